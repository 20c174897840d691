import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import MULTI30K, reverse_pairs, write_tsv

from aligna.cli import main
from aligna.config import config_to_dict


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("command", [[], ["train"], ["translate"], ["evaluate"], ["prepare-cmudict"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage: aligna" in capsys.readouterr().out


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "aligna", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("aligna ")


# Ctrl-C while torch loads, made exact: the import of torch raises KeyboardInterrupt, as the
# signal would in the first seconds of any command.
_INTERRUPTED_IMPORT = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
import aligna
assert "torch" not in sys.modules
from aligna.__main__ import main  # the `aligna` command's entry point (pyproject.toml)
sys.exit(main())
"""


def test_ctrl_c_while_torch_loads_is_a_clean_interruption():
    out = subprocess.run([sys.executable, "-c", _INTERRUPTED_IMPORT, "--version"], capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (130, "aligna: interrupted\n")
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '\n[project.scripts]\naligna = "aligna.__main__:main"\n' in pyproject


def test_the_api_names_load_on_first_use():
    code = ("import sys, aligna; assert 'torch' not in sys.modules; aligna.load; print(aligna.Translator.__name__); "
            "assert aligna.search.search and aligna.translate.average")  # submodules, as an eager import had them
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (0, "Translator\n"), out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import aligna

        aligna.nope  # noqa: B018


@pytest.fixture
def trained(toy_config, tmp_path):
    config = toy_config(
        train={"max_steps": 30},
        data={"test": {"tsv": str(write_tsv(tmp_path / "test.tsv", reverse_pairs(20, 5)))}},
    )
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    assert main(["train", str(path), "--no-progress"]) == 0
    return config, path


def test_train_translate_evaluate(trained, tmp_path, capsys, monkeypatch):
    config, _ = trained
    assert json.loads((tmp_path / "run" / "test_scores.json").read_text())["values"]["wer"] >= 0
    src = tmp_path / "in.txt"
    src.write_text("a b c\n\nd e f\n")
    assert (
        main(["translate", config.model_dir, "--input", str(src), "--output", str(tmp_path / "out.txt")]) == 0
    )
    lines = (tmp_path / "out.txt").read_text().split("\n")
    assert len(lines) == 4 and lines[1] == ""  # one output line per input line, empty stays empty

    import io

    stdout = io.BytesIO()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a b c\nd e f\n")))
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(stdout))
    assert main(["translate", config.model_dir]) == 0
    assert stdout.getvalue().decode().split("\n") == [lines[0], lines[2], ""]
    monkeypatch.undo()
    capsys.readouterr()

    ref = tmp_path / "ref.txt"
    ref.write_text("c b a\n\nf e d\n")
    scores = tmp_path / "scores.json"
    assert main(["evaluate", config.model_dir, "--src", str(src), "--ref", str(ref),
                 "--metrics", "bleu,chrf,wer,ppl", "--json", str(scores)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "bleu" in out and "nrefs:1|case:mixed" in out and "ppl" in out
    assert set(json.loads(scores.read_text())["values"]) == {"bleu", "chrf", "wer", "loss", "ppl"}


def test_errors_name_the_problem(trained, tmp_path, capsys):
    config, path = trained
    src = tmp_path / "in.txt"
    src.write_text("a\nb\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("a\n")
    assert main(["evaluate", config.model_dir, "--src", str(src), "--ref", str(ref)]) == 1
    assert f"{src} has 2 lines but {ref} has 1 lines" in capsys.readouterr().err
    assert main(["train", str(path), "--no-progress"]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", str(path), "--set", "model.rnn.cel=gru"]) == 1
    assert "model.rnn.cel: unknown key (did you mean 'cell'?)" in capsys.readouterr().err
    assert main(["translate", str(tmp_path)]) == 1
    assert "not an aligna model directory" in capsys.readouterr().err


def test_missing_data_file_is_named(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"model_dir: {tmp_path / 'run'}\ndata:\n  train: {{src: {tmp_path}/x.de, tgt: {tmp_path}/x.en}}\n"
    )
    assert main(["train", str(path), "--no-progress"]) == 1
    assert f"file not found: {tmp_path}/x.de" in capsys.readouterr().err


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="needs ../shared/data/multi30k")
def test_quickstart_config_runs_on_real_data(tmp_path, monkeypatch):
    import aligna

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # configs name data relative to the repo
    overrides = [f"model_dir={tmp_path / 'qs'}", "train.max_steps=5", "train.validate_every=5", "model.emb_dim=16",
                 "model.transformer.ff_size=32", "model.encoder_layers=1", "model.decoder_layers=1",
                 "data.test=null", "eval.metrics=[tok_bleu]"]  # fmt: skip
    assert cli("train", "configs/quickstart.yaml", "--no-progress", *[a for o in overrides for a in ("--set", o)]) == 0  # fmt: skip
    out = aligna.load(tmp_path / "qs").translate(["ein hund läuft im schnee ."])
    assert len(out) == 1 and isinstance(out[0], str)


def test_prepare_synthetic(tmp_path, capsys):
    assert (
        cli("prepare-synthetic", "reverse", tmp_path, "--min-len", 3, "--max-len", 5, "--sizes", "5,2,3") == 0
    )
    lines = (tmp_path / "test.tsv").read_text().splitlines()
    assert len(lines) == 3
    src, tgt = lines[0].split("\t")
    assert tgt.split() == src.split()[::-1] and 3 <= len(src.split()) <= 5


def test_attention_maps_and_compare(toy_config, tmp_path, capsys):
    plain = toy_config(train={"max_steps": 10}, model_dir=str(tmp_path / "plain"))
    attentive = toy_config(train={"max_steps": 10}, model_dir=str(tmp_path / "attn"),
                           model={"rnn": {"attention": "bahdanau", "bidirectional": True}})  # fmt: skip
    for config in (plain, attentive):
        path = tmp_path / f"{Path(config.model_dir).name}.yaml"
        path.write_text(yaml.safe_dump(config_to_dict(config)))
        assert main(["train", str(path), "--no-progress"]) == 0
    src = tmp_path / "in.txt"
    src.write_text("a b c d\n\nj i h\n")
    maps = tmp_path / "maps"
    assert (
        cli("translate", attentive.model_dir, "-i", src, "-o", tmp_path / "o.txt", "--attention", maps) == 0
    )
    assert sorted(p.name for p in maps.iterdir()) == ["0001.json", "0001.png", "0003.json", "0003.png"]
    record = json.loads((maps / "0003.json").read_text())
    assert record["src_tokens"] == ["j", "i", "h"] and len(record["weights"][0]) == 3
    assert len(record["weights"]) == len(record["tgt_tokens"])
    assert all(abs(sum(row) - 1) < 1e-4 for row in record["weights"])
    assert (maps / "0001.png").read_bytes()[:4] == b"\x89PNG"
    assert cli("translate", plain.model_dir, "-i", src, "-o", tmp_path / "o.txt", "--attention", maps) == 1
    assert "has no attention" in capsys.readouterr().err

    test = write_tsv(tmp_path / "test.tsv", reverse_pairs(40, seed=9, min_len=2, max_len=12))
    out = tmp_path / "cmp"
    assert main(["compare", plain.model_dir, attentive.model_dir, "--tsv", str(test), "--buckets", "4,8",
                 "--metric", "exact", "--names", "plain,bahdanau", "--out", str(out)]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "| plain |" in table and "| bahdanau |" in table and "1-4" in table and "9+" in table
    result = json.loads((out / "compare.json").read_text())
    assert sum(b["sentences"] for b in result["models"]["plain"]["buckets"]) == 40
    assert (out / "compare.png").stat().st_size > 1000
    assert main(["compare", plain.model_dir, attentive.model_dir, "--tsv", str(test), "--names", "a,a"]) == 1
    assert "names must be distinct" in capsys.readouterr().err  # one of them was dropped silently
    (tmp_path / "afile").write_text("")
    assert main(["compare", plain.model_dir, "--tsv", str(test), "--out", str(tmp_path / "afile" / "sub")]) == 1
    assert "--out " in capsys.readouterr().err  # before translating (it failed after, the table lost)
    assert main(["evaluate", plain.model_dir, "--tsv", str(test), "--metrics", "bleu,blue"]) == 1
    assert "--metrics: unknown metric(s) 'blue'; choose from bleu, chrf" in capsys.readouterr().err
    assert main(["evaluate", plain.model_dir, "--tsv", str(test), "--metrics", "bleu, exact"]) == 0
    for metric in ("ppl", "blue"):  # refused before any model translates (ppl was a KeyError traceback)
        assert main(["compare", plain.model_dir, "--tsv", str(test), "--metric", metric]) == 1
        err = capsys.readouterr().err
        assert f"--metric {metric}: compare scores translations by length with one of" in err
        assert "Traceback" not in err
    # Text is drawn as written: "$...$" is no mathtext ("$x^$" stopped the figure), and a name
    # starting with "_" keeps its legend entry
    out = tmp_path / "cmp2"
    assert main(["compare", plain.model_dir, attentive.model_dir, "--tsv", str(test), "--metric", "exact",
                 "--names", "_plain,$x^$", "--out", str(out)]) == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.png"]
    src.write_text("a $x^$ b\n")
    assert cli("translate", attentive.model_dir, "-i", src, "-o", tmp_path / "o.txt", "--attention", maps) == 0
    assert (maps / "0001.png").read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["evaluate", plain.model_dir, "--src", str(empty), "--ref", str(empty), "--metrics", "bleu"]) == 1
    err = capsys.readouterr().err
    assert "the test set is empty" in err and "Traceback" not in err


def test_transformer_attention_maps_per_layer_and_head(toy_config, tmp_path):
    config = toy_config(train={"max_steps": 5}, model={"arch": "transformer", "emb_dim": 16, "encoder_layers": 2,
                                                       "decoder_layers": 2, "transformer": {"heads": 2, "ff_size": 16}})  # fmt: skip
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    assert main(["train", str(path), "--no-progress"]) == 0
    src = tmp_path / "in.txt"
    src.write_text("a b c d\n")
    maps = tmp_path / "maps"
    assert cli("translate", config.model_dir, "-i", src, "-o", tmp_path / "o.txt", "--attention", maps) == 0
    names = sorted(p.name for p in (maps / "0001").iterdir())
    assert names == [f"{kind}_layer{i}.png" for kind in ("cross", "decoder", "encoder") for i in (1, 2)] + [
        "maps.json"
    ]
    record = json.loads((maps / "0001" / "maps.json").read_text())
    cross = record["cross"]["weights"]  # layers x heads x rows x cols
    assert len(cross) == 2 and len(cross[0]) == 2 and len(cross[0][0][0]) == 4
    assert record["encoder"]["rows"] == record["encoder"]["cols"] == ["a", "b", "c", "d"]
    assert len(record["decoder"]["rows"]) == len(record["decoder"]["weights"][0][0]) == len(record["cross"]["rows"])
    summary = tmp_path / "summary"  # only the map search used: no per-layer plots to wait for
    assert cli("translate", config.model_dir, "-i", src, "-o", tmp_path / "o2.txt", "--attention", summary,
               "--attention-maps", "summary") == 0  # fmt: skip
    assert sorted(p.name for p in summary.iterdir()) == ["0001.json", "0001.png"]


def test_search_options_and_nbest_output(trained, tmp_path, capsys):
    config, _ = trained
    src = tmp_path / "in.txt"
    src.write_text("a b c\nd e\n")
    out = tmp_path / "nbest.txt"
    assert main(["translate", config.model_dir, "-i", str(src), "-o", str(out), "--beam", "3", "--nbest", "2",
                 "--alpha", "0.6"]) == 0  # fmt: skip
    lines = out.read_text().splitlines()
    assert [line.split(" ||| ")[0] for line in lines] == ["0", "0", "1", "1"]
    assert float(lines[0].split(" ||| ")[2]) >= float(lines[1].split(" ||| ")[2])
    assert (
        main(["translate", config.model_dir, "-i", str(src), "-o", str(out), "--sample", "--seed", "3"]) == 0
    )
    assert main(["translate", config.model_dir, "-i", str(src), "-o", str(out), "--nbest", "4"]) == 1
    assert "decode.nbest: must be <= beam_size" in capsys.readouterr().err
    assert main(["translate", config.model_dir, "-i", str(src), "-o", str(out), "--max-len-a", "0",
                 "--max-len-b", "1"]) == 0  # fmt: skip
    assert [len(line.split()) <= 1 for line in out.read_text().splitlines()] == [True, True]


# Fields a user edits most, with values around and far outside their ranges.
FUZZED_FIELDS = [
    ("model", "emb_dim"), ("model", "hidden_size"), ("model", "encoder_layers"), ("model", "dropout"),
    ("model", "arch"), ("model", "tie_embeddings"), ("train", "lr"), ("train", "batch_tokens"),
    ("train", "warmup_steps"), ("train", "schedule"), ("train", "clip_grad_norm"), ("train", "label_smoothing"),
    ("train", "early_stopping_patience"), ("train", "keep_checkpoints"), ("train", "num_threads"),
    ("train", "device"), ("train", "precision"), ("train", "teacher_forcing"), ("train", "min_lr"),
    ("decode", "max_len_a"), ("decode", "beam_size"), ("decode", "nbest"), ("data", "max_len"),
    ("data", "too_long"), ("eval", "metrics"), (None, "model_dir"), ("train", "validate_every"),
]  # fmt: skip


def fuzzed_values():
    from hypothesis import strategies as st

    return st.one_of(
        st.integers(-3, 300), st.sampled_from([0, 1, 2, 10**7, 2**63, -(2**31)]),
        st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.booleans(), st.none(),
        st.text(max_size=30), st.sampled_from(["", ".", "lstm", "gru", "transformer", "cuda:abc", "cpu", "1e-3",
                                               "inverse_sqrt", "plateau", "bf16", "fp16", "truncate", "x" * 5000]),
        st.lists(st.sampled_from(["wer", "bleu", "loss", "nope"]), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    )  # fmt: skip


def test_fuzzed_configs_train_or_fail_with_one_named_line(tmp_path, capsys, monkeypatch):
    """Hypothesis-made configs: `aligna train` either trains (and the model translates) or
    prints one line naming the problem; never a traceback."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    monkeypatch.chdir(tmp_path)  # model_dir "." must be refused here, not fill the repository
    train_tsv = write_tsv(tmp_path / "train.tsv", reverse_pairs(200, seed=1))
    dev_tsv = write_tsv(tmp_path / "dev.tsv", reverse_pairs(20, seed=2))
    runs = iter(range(10**6))

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(st.tuples(st.sampled_from(FUZZED_FIELDS), fuzzed_values()), min_size=1, max_size=3))
    def check(changes):
        run = next(runs)
        raw = {
            "model_dir": str(tmp_path / f"run{run}"),
            "data": {"train": {"tsv": str(train_tsv)}, "dev": {"tsv": str(dev_tsv)}},
            "model": {"emb_dim": 8, "hidden_size": 8, "encoder_layers": 1, "decoder_layers": 1},
            "train": {"batch_tokens": 128, "max_steps": 2, "validate_every": 2, "num_threads": 1},
            "eval": {"metrics": ["wer"]},
        }
        for (section, key), value in changes:
            if section is None:
                raw[key] = value
            else:
                raw.setdefault(section, {})[key] = value
        if isinstance(raw["model_dir"], str) and raw["model_dir"] not in ("", "."):
            raw["model_dir"] = str(tmp_path / f"run{run}" / raw["model_dir"].replace("/", "_")[:50])
        path = tmp_path / f"c{run}.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        capsys.readouterr()
        rc = main(["train", str(path), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc in (0, 1), (changes, err)
        if rc == 1:
            assert "\n" not in err and err.startswith("aligna train: error: ") and len(err) < 1000, (changes, err)
        else:
            trained_dir = yaml.safe_load(path.read_text())["model_dir"]
            assert main(["translate", trained_dir, "-i", str(dev_tsv), "-o", str(tmp_path / "out.txt")]) in (0, 1)

    check()


def test_compare_plots_every_name_and_sorts_its_buckets(monkeypatch, tmp_path):
    """The API's edges in any order: scores and labels from the same sorted buckets; the
    legend names every model, "_"-prefixed ones too."""
    from types import SimpleNamespace

    import matplotlib.axes

    from aligna.compare import compare_by_length

    class Echo:  # translates each sentence into itself
        config = SimpleNamespace(eval=SimpleNamespace(metrics=("ppl", "exact")))

        def translate(self, sources, batch_size=None, **search):
            return list(sources)

    sources = ["a", "a b c d e f g h i j k l m n o", "b c"]
    result = compare_by_length({"_base": Echo(), "b": Echo()}, sources, [[s] for s in sources], [20, 10])
    assert result.edges == [10, 20] and result.models["_base"]["metric"] == "exact"  # ppl needs the model
    assert [(b["lengths"], b["sentences"]) for b in result.models["b"]["buckets"]] == [
        ("1-10", 2), ("11-20", 1), ("21+", 0)
    ]  # fmt: skip
    labels = []
    legend = matplotlib.axes.Axes.legend
    monkeypatch.setattr(matplotlib.axes.Axes, "legend", lambda ax, *a, **k: labels.append(list(a[1])) or legend(ax, *a, **k))
    result.plot(tmp_path / "c.png", title="$x^$ costs $5")
    assert labels == [["_base", "b"]] and (tmp_path / "c.png").stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_evaluate_and_translate_keep_the_users_lines(toy_config, tmp_path, monkeypatch, aligna_log):
    """--hyp-output has a line per input line when sources are pooled (data.group_references);
    pairs left out of the loss are a warning naming the files; -i - is stdin; an output
    that is a symbolic link stays a link to the file written."""
    import io
    import os

    config = toy_config(train={"max_steps": 3, "validate_every": 0}, data={"group_references": True})
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    assert main(["train", str(path), "--no-progress"]) == 0
    src, ref, hyp = tmp_path / "s.txt", tmp_path / "r.txt", tmp_path / "h.txt"
    src.write_text("a b c\nd e f\na b c\n")
    ref.write_text("c b a\nf e d\n\n")  # the repeated source's second reference is empty
    assert cli("evaluate", config.model_dir, "--src", src, "--ref", ref, "--hyp-output", hyp) == 0
    lines = hyp.read_text().splitlines()
    assert len(lines) == 3 and lines[0] == lines[2]
    assert f"{src} / {ref}: evaluation: 3 pairs read, 2 kept; 1 with an empty side" in aligna_log.text

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "out.txt").write_text("old\n")
    os.symlink(tmp_path / "real" / "out.txt", tmp_path / "link.txt")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"a b c\n")))
    assert cli("translate", config.model_dir, "-i", "-", "-o", tmp_path / "link.txt") == 0
    assert (tmp_path / "link.txt").is_symlink() and (tmp_path / "real" / "out.txt").read_text() == lines[0] + "\n"
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    assert cli("translate", config.model_dir, "-i", src, "-o", tmp_path / "loop") == 1  # said, not a traceback


def test_bad_command_lines_lose_nothing_and_say_what_is_wrong(toy_config, tmp_path, capsys):
    """An output that is an input, --tsv with --src, options that would change nothing, an
    impossible --attention and a dataset written over are refused before any work, with the
    file or flag named; a pipe is read as a file."""
    import os
    import threading

    from aligna.data import read_lines

    plain = toy_config(train={"max_steps": 5}, model_dir=str(tmp_path / "plain"))
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(plain)))
    assert main(["train", str(path), "--no-progress"]) == 0
    src = tmp_path / "in.txt"
    src.write_text("a b c\n")
    test = write_tsv(tmp_path / "test.tsv", reverse_pairs(5, seed=9))

    def refused(*args: object, says: str) -> None:
        assert cli(*args) == 1
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err

    refused("translate", plain.model_dir, "-i", src, "-o", src, says="--output")
    assert src.read_text() == "a b c\n"  # the input is still there
    refused("translate", plain.model_dir, "-i", src, "-o", tmp_path / "nodir" / "o.txt", says="does not exist")
    refused("evaluate", plain.model_dir, "--tsv", test, "--hyp-output", test, says="is an input file")
    refused("evaluate", plain.model_dir, "--tsv", test, "--src", src, says="not both")
    refused("translate", plain.model_dir, "-i", src, "--temperature", 5, says="decode.temperature: applies to sampling only")
    refused("translate", plain.model_dir, "-i", src, "--alpha", 1, says="decode.alpha: the length penalty ranks beam")
    refused("translate", plain.model_dir, "-i", src, "--beam", 2, "--coverage", 0.2, says="this model has none")
    refused("translate", plain.model_dir, "-i", src, "--attention-maps", "summary", says="give --attention DIR too")
    out = tmp_path / "o.txt"
    refused("translate", plain.model_dir, "-i", src, "-o", out, "--attention", tmp_path / "maps", says="no attention")
    assert not out.exists()  # refused before translating, not after writing the output
    (tmp_path / "afile").write_text("kept\n")
    for maps, says in ((tmp_path / "afile", f"--attention {tmp_path / 'afile'}: is a file; give a directory"),
                       (tmp_path / "afile" / "maps", "afile is a file, so the directory cannot be made")):  # fmt: skip
        refused("translate", plain.model_dir, "-i", src, "-o", out, "--attention", maps, says=says)
        assert not out.exists()  # before any work (it failed after writing the translations)
    refused("serve", plain.model_dir, "--api-key-file", tmp_path / "nope", says=f"{tmp_path / 'nope'}: No such file")
    for command in ("evaluate", "compare"):  # they score each sentence's best translation: --nbest 1 at most
        refused(command, plain.model_dir, "--tsv", test, "--beam", 2, "--nbest", 2, says=f"--nbest: {command} scores")
    assert cli("evaluate", plain.model_dir, "--tsv", test, "--nbest", 1) == 0  # as scripts have passed it
    (tmp_path / "blank.tsv").write_text("a b\t\n")  # no reference: refused before translating, not after
    refused("evaluate", plain.model_dir, "--tsv", tmp_path / "blank.tsv", says="blank.tsv (loss, ppl): no pair has text")
    with pytest.raises(SystemExit):
        cli("evaluate", "--help")
    assert "--nbest" not in capsys.readouterr().out  # not listed where it cannot be more than 1
    import socket

    with socket.socket() as taken:  # a port in use: named before any model loads (uvicorn said so after)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused("serve", plain.model_dir, "--port", port, says=f"--host 127.0.0.1 --port {port}: cannot listen there")

    data = tmp_path / "reverse"
    assert cli("prepare-synthetic", "reverse", data, "--sizes", "5,2,2", "--min-len", 2, "--max-len", 4) == 0
    assert cli("prepare-synthetic", "reverse", data, "--sizes", "5,2,2", "--min-len", 2, "--max-len", 4) == 0  # alike
    before = (data / "train.tsv").read_text()
    refused("prepare-synthetic", "reverse", data, "--sizes", "1,1,1", says="holds other data: give --overwrite")
    assert (data / "train.tsv").read_text() == before
    assert cli("prepare-synthetic", "reverse", data, "--sizes", "1,1,1", "--overwrite") == 0
    assert len((data / "train.tsv").read_text().splitlines()) == 1

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("x y\nz\n"))
    writer.start()
    assert read_lines(fifo) == ["x y", "z"]
    writer.join()
    with pytest.raises(ValueError, match="a directory, not a file"):
        read_lines(tmp_path)
