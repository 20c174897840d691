"""The benchmarks' records and the README: every table between the results markers is
rendered from bench/results/*.json, so a record changed without re-rendering fails here; and
bench.published's checks, on a toy row."""

import json
import shlex
import shutil
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import reverse_pairs, write_tsv

from bench import common, published, render_table


def test_the_readme_tables_are_rendered_from_the_records():
    text = render_table.README.read_text(encoding="utf-8")
    _, _, rest = text.partition(render_table.START)
    rendered, found, _ = rest.partition(render_table.END)
    assert found, f"{render_table.END} is missing from README.md"
    assert render_table.START + rendered + render_table.END == render_table.render(), (
        "README.md's results are not the records': run python -m bench.render_table"
    )


# --------------------------------------------------------------------------- bench.published, on a toy row
#
# The harness runs on a toy row (tests/conftest.py's reverse task) in a temporary directory: its
# config, data, model directory and RESULTS, never bench/results/ nor a real row.

TOY = published.Row("toy.yaml", "wer", 50.0, 40.0, "a toy", higher_is_better=False)
TOY_ROWS = {"toy": TOY, "toy_ensemble": published.Row("toy.yaml", "wer", 50.0, 40.0, "a toy", False,
                                                       members=("toy", "toy"))}  # fmt: skip
TRAIN_STEPS = 30  # --train-set train.max_steps of the toy run


def write_toy(root: Path) -> Path:
    """The toy row's config (relative paths: the harness runs in `root`) and data."""
    root.mkdir(parents=True, exist_ok=True)
    write_tsv(root / "train.tsv", reverse_pairs(500, seed=1))
    write_tsv(root / "dev.tsv", reverse_pairs(20, seed=2))
    write_tsv(root / "test.tsv", reverse_pairs(20, seed=3))
    raw = {
        "model_dir": "run",
        "data": {"train": {"tsv": "train.tsv"}, "dev": {"tsv": "dev.tsv"}, "test": {"tsv": "test.tsv"}},
        "model": {"emb_dim": 16, "hidden_size": 32, "encoder_layers": 1, "decoder_layers": 1},
        "train": {"batch_tokens": 256, "validate_every": 10, "log_every": 10, "num_threads": 1, "device": "cpu"},
        "eval": {"metrics": ["wer"]},
    }
    (root / "toy.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return root


def harness_in(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Point the harness at `root`: its rows, config, RESULTS (root/results) and command line."""
    mp.chdir(root)
    for module in (published, common):
        mp.setattr(module, "ROOT", root)
        mp.setattr(module, "RESULTS", root / "results")
    mp.setattr(published, "ROWS", TOY_ROWS)
    mp.setattr(common, "git_commit", lambda: "test")
    mp.setattr(published, "git_commit", lambda: "test")
    mp.setattr(sys.modules["__main__"], "__spec__", types.SimpleNamespace(name="bench.published"))


def bench_run(mp: pytest.MonkeyPatch, *args: str) -> None:
    """`python -m bench.published ARGS`, in this process."""
    mp.setattr(sys, "argv", ["bench/published.py", *args])
    published.main()


def record(root: Path, row: str = "toy") -> dict:
    return json.loads((root / "results" / f"published_{row}.json").read_text())


@pytest.fixture(scope="module")
def trained_toy(tmp_path_factory) -> Path:
    """A directory where the harness trained the toy row (train.max_steps by --train-set) and
    recorded it, greedy, the best checkpoint."""
    root = write_toy(tmp_path_factory.mktemp("bench"))
    with pytest.MonkeyPatch.context() as mp:
        harness_in(mp, root)
        mp.setenv("OMP_NUM_THREADS", "1")
        bench_run(mp, "toy", "--beam", "1", "--average", "0", "--train-set", f"train.max_steps={TRAIN_STEPS}")
    return root


@pytest.fixture
def bench(trained_toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of `trained_toy` that the harness works in."""
    root = tmp_path / "bench"
    shutil.copytree(trained_toy, root)
    harness_in(monkeypatch, root)
    return root


@pytest.fixture
def untrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The toy row without a run; training it fails the test."""
    root = write_toy(tmp_path / "bench")
    harness_in(monkeypatch, root)
    monkeypatch.setattr(published, "train", lambda *a, **k: pytest.fail("trained before checking the options"))
    return root


def refused(monkeypatch, capsys, *args: str) -> str:
    """The error line of a run the harness refuses with exit status 2 (no traceback)."""
    with pytest.raises(SystemExit) as e:
        bench_run(monkeypatch, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err


def test_a_row_the_harness_trained_keeps_its_train_only_settings_apart(trained_toy):
    r = record(trained_toy)
    assert r["train_steps"] == TRAIN_STEPS  # --train-set reached training
    assert r["overrides"] == [] and r["train_overrides"] == [f"train.max_steps={TRAIN_STEPS}"]
    assert r["run_train_differences"] == {} and r["test_decodes"] == 1
    assert "aligna train's own end-of-training test score chose nothing" in r["chosen_by"]
    assert "times in all" not in r["chosen_by"]


def test_skip_train_refuses_a_run_with_other_model_or_data_settings(bench, monkeypatch):
    for option, found in (("model.hidden_size=24", "model.hidden_size is 32 there, 24 here"),
                          ("data.max_len=50", "data.max_len is 100 there, 50 here")):  # fmt: skip
        with pytest.raises(SystemExit, match=rf"^--skip-train: the run in run was not trained .*{found}"):
            bench_run(monkeypatch, "toy", "--skip-train", "--beam", "1", "--set", option)
    assert record(bench)["test_decodes"] == 1  # nothing decoded, nothing written


def test_skip_train_records_how_the_run_was_trained_and_quotes_its_reproduce_line(bench, monkeypatch):
    metrics = "eval.metrics=[wer, per]"
    bench_run(monkeypatch, "toy", "--skip-train", "--beam", "1", "--average", "0", "--set", "train.lr=0.002",
              "--set", metrics, "--train-set", f"train.max_steps={TRAIN_STEPS}")  # fmt: skip
    r = record(bench)
    assert r["run_train_differences"] == {"train.lr": {"run": 0.001, "config": 0.002}}
    assert r["chosen_by"].startswith("given on the command line after training (--average, --alpha)")
    assert "fixed before training" not in r["chosen_by"]
    assert "aligna train's own end-of-training test score chose nothing" in r["chosen_by"]  # test_scores.json
    assert "per" in r["metrics"]
    words = shlex.split(r["reproduce"])
    cut = words.index("&&")
    assert words[:cut] == ["aligna", "train", "toy.yaml", "--set", "train.lr=0.002", "--set", metrics,
                           "--set", f"train.max_steps={TRAIN_STEPS}"]  # fmt: skip
    assert words[cut + 1 :] == shlex.split(r["command"])
    assert shlex.split(r["command"])[:3] == ["python", "-m", "bench.published"] and metrics in shlex.split(r["command"])
    assert r["overrides"] == ["train.lr=0.002", metrics] and r["train_overrides"] == [f"train.max_steps={TRAIN_STEPS}"]


def test_a_record_says_what_else_scored_the_test_set_and_how_often_the_run_was_resumed(bench, monkeypatch):
    (bench / "run" / "test_scores.json").unlink()  # aligna train's own test score, when it ended
    log = bench / "run" / "train.log"
    log.write_text(log.read_text() + "2026-01-01 00:00:00,000 INFO resumed from run/checkpoints/step-000004\n" * 2)
    bench_run(monkeypatch, "toy", "--skip-train", "--beam", "1", "--average", "0", "--note", "made by hand")
    r = record(bench)
    assert "aligna train's own" not in r["chosen_by"]
    assert r["note"] == "made by hand; the run was interrupted and resumed (--resume) 2 times (MODEL_DIR/train.log)"
    assert r["train_devices"] == ["cpu"]


def test_a_tune_over_the_best_checkpoint_alone(bench, monkeypatch, capsys):
    bench_run(monkeypatch, "toy", "--skip-train", "--tune", "--beam", "1", "--averages")
    assert [g["weights"] for g in record(bench)["dev_grid"]] == ["best checkpoint"]
    err = refused(monkeypatch, capsys, "toy", "--skip-train", "--tune", "--averages", "0", "3")
    assert "--averages: 0 is the best checkpoint" in err


def test_a_greedy_tune_says_it_chose_the_weights_alone(bench, monkeypatch):
    bench_run(monkeypatch, "toy", "--skip-train", "--tune", "--beam", "1")
    r = record(bench)
    assert len(r["dev_grid"]) == 2  # the best checkpoint and the average of the last 3, greedy
    assert r["chosen_by"].startswith("the dev set's wer: the weights of the best dev score in dev_grid")
    assert render_table._chosen_on_dev(r) == " (weights chosen on dev)"


def test_the_harness_counts_its_decodings_of_a_rows_test_set(bench, monkeypatch):
    bench_run(monkeypatch, "toy", "--skip-train", "--beam", "1", "--average", "0")
    r = record(bench)
    assert r["test_decodes"] == 2
    assert r["chosen_by"].endswith("the harness has decoded this row's test set 2 times in all")
    del r["test_decodes"]  # a record from before the count: it decoded the test set once
    (bench / "results" / "published_toy.json").write_text(json.dumps(r))
    bench_run(monkeypatch, "toy", "--skip-train", "--beam", "1", "--average", "0")
    assert record(bench)["test_decodes"] == 2


def test_a_challenger_run_replaces_the_record_only_if_it_is_better_on_dev(bench, monkeypatch, capsys):
    """--challenge: a second run of a row decodes the test set and replaces the record only if its
    best dev score beats the record's; a tie or worse leaves the record, and the try is kept."""
    assert "needs --tune" in refused(monkeypatch, capsys, "toy", "--skip-train", "--beam", "1", "--challenge")
    err = refused(monkeypatch, capsys, "toy", "--skip-train", "--tune", "--beam", "1", "--challenge")
    assert "published_toy.json has no dev scores" in err  # recorded without --tune
    bench_run(monkeypatch, "toy", "--skip-train", "--tune", "--beam", "1")
    recorded = record(bench)
    score_test = published.score_test
    monkeypatch.setattr(published, "score_test", lambda *a, **k: pytest.fail("decoded the test set"))
    bench_run(monkeypatch, "toy", "--skip-train", "--tune", "--beam", "1", "--challenge")  # the same run: a tie
    r = record(bench)
    assert {k: v for k, v in r.items() if k != "dev_challenges"} == recorded
    (tie,) = r["dev_challenges"]
    assert not tie["replaced_the_record"] and tie["dev_best"]["dev_wer"] == tie["record"]["dev_best"]["dev_wer"]
    assert "the record stands; the test set is not decoded" in capsys.readouterr().out
    worse = r | {"dev_grid": [g | {"dev_wer": 1000.0} for g in r["dev_grid"]]}  # as if its run were worse on dev
    (bench / "results" / "published_toy.json").write_text(json.dumps(worse))
    monkeypatch.setattr(published, "score_test", score_test)
    bench_run(monkeypatch, "toy", "--skip-train", "--tune", "--beam", "1", "--challenge")
    r = record(bench)
    assert [c["replaced_the_record"] for c in r["dev_challenges"]] == [False, True]
    assert r["test_decodes"] == recorded["test_decodes"] + 1
    assert "the run was chosen on dev too (--challenge)" in r["chosen_by"] and "against the earlier record's 1000.00" in r["chosen_by"]
    assert "--challenge" not in r["reproduce"] and "--challenge" in r["command"]  # run again, it reproduces the run
    # refused before anything trains: scores that would not compare, and a challenger trained over the record's run
    assert "give --beam 1 (not 2)" in refused(monkeypatch, capsys, "toy", "--skip-train", "--tune", "--challenge", "--beam", "2")
    err = refused(monkeypatch, capsys, "toy", "--skip-train", "--tune", "--beam", "1", "--challenge", "--set", "data.dev.tsv=./x.tsv")
    assert "this run's dev set" in err and "is not the record's" in err
    err = refused(monkeypatch, capsys, "toy", "--tune", "--beam", "1", "--challenge", "--set", "train.seed=7")
    assert "holds the recorded run, which training the challenger there would replace" in err


def test_a_decode_is_counted_even_if_the_run_fails_after_it(bench, monkeypatch):
    """A row whose eval.metrics lacks its verdict's metric failed after decoding (KeyError), and
    the decode went uncounted."""
    first = record(bench)["test_decodes"]
    bench_run(monkeypatch, "toy", "--skip-train", "--beam", "1", "--set", "eval.metrics=[per]")  # the verdict's wer too
    assert record(bench)["test_decodes"] == first + 1 and "wer" in record(bench)["metrics"]

    def fails(*args, **kwargs):
        raise RuntimeError("after the decode")

    monkeypatch.setattr(published, "write_record", fails)
    with pytest.raises(RuntimeError):
        bench_run(monkeypatch, "toy", "--skip-train", "--beam", "1")
    assert record(bench)["test_decodes"] == first + 2


def test_an_ensemble_member_must_still_be_its_recorded_run(bench, monkeypatch):
    bench_run(monkeypatch, "toy_ensemble", "--beam", "1")
    assert record(bench, "toy_ensemble")["test_decodes"] == 1
    path = bench / "results" / "published_toy.json"
    original = record(bench)
    path.write_text(json.dumps(original | {"train_steps": TRAIN_STEPS - 1}))  # the directory was trained on since
    with pytest.raises(SystemExit, match=rf"latest checkpoint is step {TRAIN_STEPS}.*Record the member row again"):
        bench_run(monkeypatch, "toy_ensemble", "--beam", "1")
    path.write_text(json.dumps(original | {"overrides": ["model.hidden_size=24"]}))
    with pytest.raises(SystemExit, match=r"model.hidden_size is 32 there, 24 here.*Record the member row again"):
        bench_run(monkeypatch, "toy_ensemble", "--beam", "1")
    path.write_text(json.dumps(original | {"overrides": ["train.seed=7"]}))  # another seed, the same step count
    with pytest.raises(SystemExit, match=r"its train settings differ .*Record the member row again"):
        bench_run(monkeypatch, "toy_ensemble", "--beam", "1")
    path.write_text(json.dumps(original))
    bench_run(monkeypatch, "toy_ensemble", "--beam", "1")
    assert record(bench, "toy_ensemble")["train_devices"] == ["cpu"]


def test_a_dev_set_that_is_the_test_set_is_refused(untrained, monkeypatch, capsys):
    (untrained / "same.tsv").symlink_to(untrained / "dev.tsv")
    err = refused(monkeypatch, capsys, "toy", "--set", "data.test.tsv=./same.tsv")
    assert "data.dev is the test set" in err and "dev.tsv" in err


def test_decode_settings_are_refused(untrained, monkeypatch, capsys):
    err = refused(monkeypatch, capsys, "toy", "--set", "decode.beam_size=5")
    assert "--set decode.beam_size=5" in err and "--beam" in err


@pytest.mark.parametrize(
    "args, named",
    [
        (["toy", "--tune", "--alphas", "0.6", "20"], "--alphas: 20.0 is out of range"),
        (["toy", "--beam", "0"], "--beam: 0 is out of range"),
        (["toy", "--average", "-1"], "--average: -1 is out of range"),
        (["toy", "--alpha", "nan"], "--alpha: nan is not a finite number"),
        (["toy", "--set", "train.lr=-1"], "train.lr: -1"),
        (["toy", "--train-set", "model.emb_dim=8"], "--train-set model.emb_dim=8: only train.* keys"),
        (["toy", "--train-set", "train.lr=x"], "train.lr: expected a number"),
        (["toy", "--ensemble-weights", "1", "2"], "--ensemble-weights: toy is not an ensemble row"),
        (["toy_ensemble", "--ensemble-weights", "1"], "--ensemble-weights: 1 ensemble weights given for 2 models"),
    ],
)
def test_bad_options_are_refused_before_training(untrained, monkeypatch, capsys, args, named):
    assert named in refused(monkeypatch, capsys, *args)


def test_command_lines_are_quoted_for_a_shell(monkeypatch):
    argv = ["toy", "--set", "eval.metrics=[wer, per]", "--set", "data.dev.tsv=it's.tsv"]
    monkeypatch.setattr(sys, "argv", ["bench/published.py", *argv])
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", types.SimpleNamespace(name="bench.published"))
    assert shlex.split(common.command_line()) == ["python", "-m", "bench.published", *argv]
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)
    assert shlex.split(common.command_line()) == ["python", "bench/published.py", *argv]


@pytest.mark.parametrize(
    "grid, phrase",
    [
        ([], ""),
        ([{"weights": "best checkpoint", "alpha": 0.0}, {"weights": "average of the last 3", "alpha": 0.0}],
         " (weights chosen on dev)"),  # greedy --tune
        ([{"member_weights": [1, 1], "alpha": 0.0}, {"member_weights": [1, 1], "alpha": 0.6}],
         " (alpha chosen on dev)"),  # an ensemble with --ensemble-weights
        ([{"weights": "best checkpoint", "alpha": a} for a in (0.0, 0.6)]
         + [{"weights": "average of the last 3", "alpha": a} for a in (0.0, 0.6)], " (both chosen on dev)"),
    ],
)  # fmt: skip
def test_the_table_says_what_was_chosen_on_dev(grid, phrase):
    assert render_table._chosen_on_dev({"dev_grid": grid}) == phrase


def test_the_ensemble_weights_are_searched_member_by_member_on_dev(monkeypatch):
    """tune_ensemble: alpha with equal weights, then each member's weight halved and doubled at
    that alpha, a change kept only where dev improves, in rounds until one changes nothing, then
    alpha again at the weights found; nothing decoded twice."""
    monkeypatch.setattr(published, "WEIGHT_FACTORS", (0.5, 2.0))
    monkeypatch.setattr(published, "WEIGHT_ROUNDS", 2)
    calls = []

    def evaluate(mix, alpha):  # best at weights (0.5, 0.25, 0.25) and alpha 0.6
        calls.append((tuple(mix), alpha))
        return -sum((w - t) ** 2 for w, t in zip(mix, (0.5, 0.25, 0.25))) - abs(alpha - 0.6)

    grid = published.tune_ensemble(evaluate, 3, [0.0, 0.6, 1.0], True, "dev_x")
    equal, found = [0.333333] * 3, [0.5, 0.25, 0.25]
    assert [(g["member_weights"], g["alpha"]) for g in grid] == [
        (equal, 0.0), (equal, 0.6), (equal, 1.0),
        ([0.2, 0.4, 0.4], 0.6), (found, 0.6),  # round 1, member 1 halved and doubled: doubled is kept
        ([0.571429, 0.142857, 0.285714], 0.6), ([0.4, 0.4, 0.2], 0.6),  # member 2, from there: not kept
        ([0.571429, 0.285714, 0.142857], 0.6), ([0.4, 0.2, 0.4], 0.6),  # member 3: not kept
        ([0.666667, 0.166667, 0.166667], 0.6),  # round 2: only member 1 doubled again is new; nothing kept
        (found, 0.0), (found, 1.0),  # alpha again, at the weights found
    ]  # fmt: skip
    assert len(calls) == len(set(calls)) == len(grid)
    assert max(grid, key=lambda g: g["dev_x"])["member_weights"] == found

    flat = published.tune_ensemble(lambda mix, alpha: 1.0, 2, [0.0], False, "dev_x")  # ties keep what came first
    assert [g["member_weights"] for g in flat] == [[0.5, 0.5], [0.333333, 0.666667], [0.666667, 0.333333]]


# --------------------------------------------------------------------------- bench.train_eval and common


def train_eval_run(mp: pytest.MonkeyPatch, *args: str) -> None:
    from bench import train_eval

    mp.setattr(sys, "argv", ["bench/train_eval.py", *args])
    mp.setattr(sys.modules["__main__"], "__spec__", types.SimpleNamespace(name="bench.train_eval"))
    train_eval.main()


def test_train_eval_never_trains_over_a_run_and_scores_only_its_own(bench, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:  # the toy run is in run/: several rows may share a directory
        train_eval_run(monkeypatch, "toy.yaml")
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="model.hidden_size is 32 there, 24 here"):
        train_eval_run(monkeypatch, "toy.yaml", "--skip-train", "--set", "model.hidden_size=24")
    train_eval_run(monkeypatch, "toy.yaml", "--skip-train", "--name", "toy_eval", "--set", "eval.metrics=[wer, per]")
    r = json.loads((bench / "results" / "toy_eval.json").read_text())
    assert r["search"] == "greedy" and "per" in r["metrics"]
    train, _, harness = r["reproduce"].partition(" && ")
    assert shlex.split(train) == ["aligna", "train", "toy.yaml", "--set", "eval.metrics=[wer, per]"]
    assert harness.startswith("python -m bench.train_eval toy.yaml --skip-train")


def test_a_runs_overrides_train_it_again_from_its_config_file(bench):
    from aligna.config import load_config

    base = load_config(bench / "toy.yaml")
    run = load_config(bench / "toy.yaml", ["model_dir=elsewhere", "train.seed=7", "model.rnn.attention=general",
                                           "eval.metrics=[wer]", "train.betas=[0.8, 0.9]"])  # fmt: skip
    again = load_config(bench / "toy.yaml", common.overrides_of(run, base))
    assert common.config_hash(again) == common.config_hash(run) and again.model_dir == "elsewhere"
    g2p = load_config(bench / "toy.yaml", ["data.train.tsv=data/cmudict/train.tsv"])
    assert common.prepare_steps(g2p) == ["aligna prepare-cmudict data/cmudict"]
    assert common.train_command("c.yaml", g2p, ["train.seed=7"]) == (
        "aligna prepare-cmudict data/cmudict && aligna train c.yaml --set train.seed=7"
    )
