import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import reverse_pairs, write_tsv
from test_rnn import VARIANTS, make, random_batch
from test_transformer import make as make_transformer

import aligna
from aligna.cli import main
from aligna.compiled import CompiledTransformer
from aligna.config import config_from_dict, config_to_dict, load_config
from aligna.ensemble import Ensemble, mean_probabilities
from aligna.search import NEVER, beam_search, greedy_search
from aligna.vocab import EOS_ID, SOS_ID


def members(eos_bias=0.0):
    """Three architectures over the same vocabulary: their states reorder in three ways.
    eos_bias: added to each output layer's <eos> bias, so that untrained models end some outputs."""
    models = [
        make_transformer(seed=1, pre_norm=False),
        make(seed=2, **VARIANTS["luong-general-feed-bilstm"]),
        make(seed=3, **VARIANTS["gru-context"]),  # no attention
    ]
    with torch.no_grad():
        for m in models:
            (m.output if hasattr(m, "output") else m.decoder.output).bias[EOS_ID] += eos_bias
    return models


def teacher_forced_log_prob(model, src, lengths, tokens, ended):
    """log P(tokens [<eos> where ended] | src) of one sentence from a teacher-forced pass of `model`,
    over the tokens an output can hold, as the searches' (`search.never_emit_`)."""
    row = tokens + [EOS_ID] if ended else tokens
    tgt_in, tgt_out = torch.tensor([[SOS_ID, *row[:-1]]]), torch.tensor([row])
    with torch.no_grad():
        outputs = model(src, lengths, tgt_in).float()
        outputs[..., list(NEVER)] = float("-inf")
        log_probs = torch.log_softmax(outputs, -1)
    return log_probs.gather(2, tgt_out.unsqueeze(2)).sum()


def test_the_step_distribution_is_the_mean_of_the_members_probabilities():
    parts = members()
    ensemble = Ensemble(parts).eval()
    src, lengths, _ = random_batch([6, 3, 4], seed=5)
    prev = torch.tensor([SOS_ID, 7, 9])
    log_probs, _, attention = ensemble.decode_step(prev, ensemble.init_state(e := ensemble.encode(src, lengths)), e)
    probs, maps = [], []
    for m in parts:
        enc = m.encode(src, lengths)
        logits, _, attn = m.decode_step(prev, m.init_state(enc), enc)
        probs.append(torch.softmax(logits, -1))
        if attn is not None:
            maps.append(attn)
    torch.testing.assert_close(log_probs.exp(), torch.stack(probs).mean(0))
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3))
    assert len(maps) == 2  # the GRU without attention has none to add
    torch.testing.assert_close(attention, torch.stack(maps).mean(0))
    _, _, none = ensemble.decode_step(prev, ensemble.init_state(e), e, need_attention=False)
    assert none is None


def test_weights_mix_the_members_probabilities_in_those_proportions():
    parts = members()
    src, lengths, _ = random_batch([6, 3, 4], seed=5)
    prev = torch.tensor([SOS_ID, 7, 9])
    probs = []
    for m in parts:
        enc = m.encode(src, lengths)
        probs.append(torch.softmax(m.decode_step(prev, m.init_state(enc), enc)[0], -1))
    ensemble = Ensemble(parts, weights=[2, 1, 1]).eval()  # normalized: 0.5, 0.25, 0.25
    assert ensemble.weights == (0.5, 0.25, 0.25)
    log_probs, _, _ = ensemble.decode_step(prev, ensemble.init_state(e := ensemble.encode(src, lengths)), e)
    torch.testing.assert_close(log_probs.exp(), 0.5 * probs[0] + 0.25 * probs[1] + 0.25 * probs[2])
    equal = Ensemble(parts, weights=[1, 1, 1]).eval()
    torch.testing.assert_close(equal.decode_step(prev, equal.init_state(e), e)[0],
                               Ensemble(parts).eval().decode_step(prev, equal.init_state(e), e)[0])  # fmt: skip
    tgt = random_batch([6, 3, 4], seed=5)[2]
    with torch.no_grad():
        forced = ensemble(src, lengths, tgt)
    each = torch.stack([torch.softmax(m(src, lengths, tgt), -1) for m in parts])
    torch.testing.assert_close(forced.exp(), (torch.tensor([0.5, 0.25, 0.25]).view(3, 1, 1, 1) * each).sum(0))
    for bad, message in (([1, 1], "2 ensemble weights given for 3 models"), ([1, 0, 1], "positive"),
                         ([1, float("nan"), 1], "positive"), ([1e-300, 1e300, 1], "negligible")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            Ensemble(parts, weights=bad)
    assert Ensemble(parts, weights=[1e308, 1e308, 5e307]).weights == pytest.approx((0.4, 0.4, 0.2))  # no overflow
    with pytest.raises(ValueError, match="sum to 1"):
        mean_probabilities([torch.zeros(2), torch.zeros(2)], [2, 2])


@pytest.mark.parametrize("beam,weights", [(1, None), (3, None), (3, [0.5, 0.2, 0.3])])
def test_search_scores_are_the_ensembles_teacher_forced_scores(beam, weights):
    """Each hypothesis's log-probability is the ensemble's: the members' states, encoder outputs
    and beams stayed aligned through every reorder and repeat of the search."""
    ensemble = Ensemble(members(eos_bias=0.4), weights).eval()
    src, lengths, _ = random_batch([7, 2, 5, 9], seed=6)
    if beam == 1:
        found = greedy_search(ensemble, src, lengths, 1.0, 3)
    else:
        found = beam_search(ensemble, src, lengths, beam, 1.0, 3, nbest=beam)
    checked = 0
    for i, hyps in enumerate(found.nbest):
        n = int(lengths[i])
        for h in hyps:
            ended = len(h.tokens) < n + 3  # else cut at the length limit (1.0 * n + 3 tokens), no <eos>
            expected = teacher_forced_log_prob(ensemble, src[i : i + 1, :n], lengths[i : i + 1], h.tokens, ended)
            assert h.log_prob == pytest.approx(float(expected), abs=1e-4)
            checked += ended
    assert 0 < checked < sum(map(len, found.nbest))  # some hypotheses end in <eos>, others at the limit


def test_an_ensemble_of_one_model_twice_is_that_model():
    model = make(seed=4, **VARIANTS["bahdanau-bigru"])
    src, lengths, _ = random_batch([5, 8, 3], seed=7)
    alone = beam_search(model, src, lengths, 4, 1.5, 4, nbest=2)
    twice = beam_search(Ensemble([model, model]).eval(), src, lengths, 4, 1.5, 4, nbest=2)
    for a, b in zip(alone.nbest, twice.nbest):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        for x, y in zip(a, b):
            assert x.log_prob == pytest.approx(y.log_prob, abs=1e-5)
            torch.testing.assert_close(x.attention, y.attention)


def test_teacher_forced_scores_average_probabilities_not_log_probabilities():
    parts = members()[:2]
    src, lengths, tgt = random_batch([4, 6], seed=8)
    with torch.no_grad():
        out = Ensemble(parts).eval()(src, lengths, tgt)
    each = torch.stack([torch.softmax(m(src, lengths, tgt), -1) for m in parts])
    torch.testing.assert_close(out, each.mean(0).log())
    assert math.isclose(float(out.exp().sum(-1).mean()), 1.0, rel_tol=1e-5)


def test_an_ensemble_needs_two_models():
    with pytest.raises(ValueError, match="at least 2"):
        Ensemble([make()])


def toy_run(directory, name, train_pairs, **sections):
    """Train a toy reverse-task model in directory/name; returns its config file."""
    raw = {
        "model_dir": str(directory / name),
        "data": {"train": {"tsv": str(write_tsv(directory / f"{name}.train.tsv", train_pairs))},
                 "dev": {"tsv": str(write_tsv(directory / "dev.tsv", reverse_pairs(100, seed=2)))},
                 "test": {"tsv": str(write_tsv(directory / "test.tsv", reverse_pairs(20, seed=5)))}},
        "model": {"emb_dim": 16, "hidden_size": 32, "encoder_layers": 1, "decoder_layers": 1, "dropout": 0.1},
        "train": {"batch_tokens": 256, "epochs": 1, "validate_every": 15, "max_steps": 30},
        "eval": {"metrics": ["wer"]},
    }  # fmt: skip
    for section, values in sections.items():
        raw[section].update(values)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config_from_dict(raw))))
    assert main(["train", str(path), "--no-progress"]) == 0
    return path


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two toy models, an attention GRU and a Transformer, trained on the same data with other
    seeds: their model directories, and the test set."""
    directory = tmp_path_factory.mktemp("ensemble")
    pairs = reverse_pairs(2000, seed=1)
    toy_run(directory, "run1", pairs, model={"rnn": {"attention": "bahdanau"}}, train={"seed": 1})
    toy_run(directory, "run2", pairs, model={"arch": "transformer"}, train={"seed": 2})
    return [str(directory / "run1"), str(directory / "run2")], directory / "test.tsv"


def test_api_misuse_is_a_clear_error_naming_the_argument(two_runs):
    """What a library user gets wrong is a TypeError or ValueError that names the argument,
    never a wrong score or an IndexError from inside."""
    from aligna.config import ConfigError

    dirs, _ = two_runs
    with pytest.raises(TypeError, match="model_dirs: a list"):
        aligna.load_ensemble(dirs[0])  # each character would be a directory
    with pytest.raises(ValueError, match="at least 2 model directories, got 0"):
        aligna.load_ensemble([])
    ensemble = aligna.load_ensemble(dirs)
    with pytest.raises(ConfigError, match="member 1 of the ensemble, a RNNSeq2Seq model has no vocabulary shortlist"):
        ensemble.translate(["a b"], shortlist=True)
    t = aligna.load(dirs[1])
    for texts, words in (([None], r"texts\[0\]: expected str, got NoneType"), (["a", b"b"], r"texts\[1\].*bytes")):
        with pytest.raises(TypeError, match=words):
            t.translate(texts)
    src, refs = ["a b c", "d e"], ["c b a", "e d"]
    with pytest.raises(TypeError, match=r"references\[0\]: a non-empty list"):  # a flat list: one str per source
        t.evaluate(src, refs, ["wer"], hypotheses=refs)
    with pytest.raises(TypeError, match=r"references\[1\]: a non-empty list"):
        t.evaluate(src, [["c b a"], []], ["wer"])
    with pytest.raises(ValueError, match="2 sources, 1 reference lists"):
        t.evaluate(src, [["c b a"]], ["loss"])
    with pytest.raises(ValueError, match="no sources"):
        t.evaluate([], [], ["bleu"])
    assert t.evaluate((s for s in src), [[r] for r in refs], ["wer", "loss"], hypotheses=refs).values["wer"] == 0.0
    empty = t.translate_detailed(["", "a b", " "], beam_size=2, nbest=2)
    assert empty[0] is not empty[2] and empty[0].nbest is not empty[2].nbest and empty[0].nbest == [("", 0.0)] * 2
    without = t.translate_detailed(["a b c"], attention=False, beam_size=2, coverage=0.2)
    assert without[0].attention is None  # the search kept it for the penalty alone
    texts, sampling = ["a b c d e", "f g", "h i j"], {"sample": True, "seed": 5, "temperature": 3.0}
    samples = t.translate(texts, **sampling)  # input i's sample is (seed, i)'s: batch_size and later inputs change nothing
    assert samples == t.translate(texts, batch_size=1, **sampling) == t.translate([*texts, "a"], **sampling)[:3]
    assert samples != t.translate(texts, **{**sampling, "seed": 6})


def test_cli_translates_and_evaluates_with_an_ensemble(two_runs, tmp_path, capsys):
    (a, b), test = two_runs
    source = tmp_path / "in.txt"
    source.write_text("3 1 4 1 5\n9 2 6\n")
    assert main(["translate", a, b, "-i", str(source), "--beam", "3", "--attention", str(tmp_path / "maps")]) == 0
    lines = capsys.readouterr().out.splitlines()
    ensemble = aligna.load_ensemble([a, b])
    assert lines == ensemble.translate(["3 1 4 1 5", "9 2 6"], beam_size=3)
    assert (tmp_path / "maps" / "0001.png").is_file()  # the members' mean attention
    record = tmp_path / "scores.json"
    assert main(["evaluate", a, b, "--tsv", str(test), "--checkpoint", "best,latest", "--beam", "2",
                 "--ensemble-weights", "1,3", "--json", str(record)]) == 0  # fmt: skip
    assert "wer" in capsys.readouterr().out
    saved = json.loads(record.read_text())
    assert saved["checkpoint"] == "best,latest" and saved["ensemble_weights"] == [0.25, 0.75]
    # int8: the members quantized and their decoding compiled, the same translations in nearly every case
    int8 = aligna.load_ensemble([a, b], precision="int8", weights=[3, 1])
    assert len(int8.translate(["3 1 4 1 5", "9 2 6"], beam_size=3)) == 2
    assert isinstance(int8.search_model().members[1], CompiledTransformer)
    assert int8.search_model().weights == (0.75, 0.25)  # kept by the int8 copy and its compiled members
    assert main(["translate", a, b, "-i", str(source), "--beam", "3", "--ensemble-weights", "0.75,0.25"]) == 0
    weighted = aligna.load_ensemble([a, b], weights=[0.75, 0.25])
    assert capsys.readouterr().out.splitlines() == weighted.translate(["3 1 4 1 5", "9 2 6"], beam_size=3)


def test_compare_takes_an_ensemble_as_one_model(two_runs, tmp_path, capsys):
    """`aligna compare A A,B`: the ensemble is a model of the table, named A+B, scored as
    `load_ensemble` translates."""

    (a, b), test = two_runs
    out = tmp_path / "compare"
    assert main(["compare", a, f"{a},{b}", "--tsv", str(test), "--buckets", "5,10", "--ensemble-weights", "2,1",
                 "--out", str(out)]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "run1+run2" in table
    models = json.loads((out / "compare.json").read_text())["models"]
    assert set(models) == {"run1", "run1+run2"} and models["run1+run2"]["model_dir"] == [a, b]
    assert models["run1+run2"]["ensemble_weights"] == pytest.approx([2 / 3, 1 / 3])  # the record says how it ran
    assert "ensemble_weights" not in models["run1"] and models["run1"]["checkpoint"] == "best"
    sources, references = zip(*[line.split("\t") for line in test.read_text().splitlines()])
    expected = aligna.load_ensemble([a, b], weights=[2, 1]).evaluate(sources, [[r] for r in references], ["wer"])
    assert models["run1+run2"]["all"] == pytest.approx(expected.values["wer"])


def test_an_ensemble_of_models_with_other_vocabularies_is_refused(two_runs, tmp_path, capsys):
    (a, _), _ = two_runs
    path = toy_run(tmp_path, "other", reverse_pairs(300, seed=9, symbols=4), train={"max_steps": 2})
    other = str(tmp_path / "other")
    with pytest.raises(ValueError, match="src_vocab.txt differs"):
        aligna.load_ensemble([a, other])
    capsys.readouterr()
    assert main(["translate", a, other, "-i", str(path)]) == 1
    assert "must share their tokenizers and vocabularies" in capsys.readouterr().err
    assert main(["translate", a, a, "--checkpoint", "best,latest,best"]) == 1
    assert "3 checkpoints for 2 models" in capsys.readouterr().err
    assert main(["translate", a, a, "--engine", "ctranslate2"]) == 1
    assert "aligna engine" in capsys.readouterr().err
    for weights, message in (("1,2,3", "3 ensemble weights given for 2 models"), ("1,-1", "must be positive")):
        assert main(["translate", a, a, "-i", str(path), "--ensemble-weights", weights]) == 1
        assert message in capsys.readouterr().err
    assert main(["translate", a, "-i", str(path), "--ensemble-weights", "1"]) == 1
    assert "give several models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["translate", a, a, "--ensemble-weights", "half,half"])
    assert "not a comma-separated list of numbers" in capsys.readouterr().err


def test_the_bench_ensemble_row_decodes_its_member_rows_runs(two_runs, tmp_path, monkeypatch):
    """bench.published's ensemble row: each member with the weights its row's record names, the
    length penalty chosen on dev, the test set scored once."""
    import argparse

    from bench import published

    (a, b), test = two_runs
    wer = dict(metric="wer", published=10.0, target=10.0, source="-", higher_is_better=False)
    configs = [str(Path(d).with_suffix(".yaml")) for d in (a, b)]
    rows = {"m1": published.Row(configs[0], **wer), "m2": published.Row(configs[1], **wer),
            "both": published.Row(configs[0], **wer, members=("m1", "m2"))}  # fmt: skip
    results = tmp_path / "results"
    results.mkdir()
    for name, weights in (("m1", "best checkpoint"), ("m2", "average of the last 2 checkpoints")):
        record = {"overrides": [], "weights": weights, "reproduce": f"train {name}", "arch": "rnn",
                  "train_steps": 30, "train_seconds": 60.0, "train_precision": "fp32"}  # fmt: skip
        (results / f"published_{name}.json").write_text(json.dumps(record))
    written = {}
    monkeypatch.setattr(published, "ROWS", rows)
    monkeypatch.setattr(published, "RESULTS", results)
    monkeypatch.setattr(published, "write_record", lambda name, record: written.update(record, name=name))
    monkeypatch.setattr(published, "WEIGHT_ROUNDS", 1)
    args = argparse.Namespace(overrides=[], tune=True, beam=2, alpha=0.6, alphas=[0.0, 1.0], ensemble_weights=None,
                              note="")
    config = load_config(configs[0])
    published.ensemble_row(args, "both", rows["both"], config)
    assert written["name"] == "published_both"
    grid = written["dev_grid"]
    first_alpha = min(grid[:2], key=lambda g: g["dev_wer"])["alpha"]  # equal weights, each alpha; then the search
    assert [(g["member_weights"], g["alpha"]) for g in grid[:4]] == [
        ([0.5, 0.5], 0.0), ([0.5, 0.5], 1.0), ([0.333333, 0.666667], first_alpha), ([0.666667, 0.333333], first_alpha)]
    assert len({(tuple(g["member_weights"]), g["alpha"]) for g in grid}) == len(grid)  # each decoded once
    best = min(grid, key=lambda g: g["dev_wer"])  # the first of equals
    alpha = float(written["search"].split("alpha ")[1])
    assert alpha == best["alpha"] and [m["member_weight"] for m in written["members"]] == pytest.approx(best["member_weights"])
    ensemble = aligna.load_ensemble([a, b], ["best", "averaged"], weights=best["member_weights"])
    sources, references = zip(*[line.split("\t") for line in test.read_text().splitlines()])
    expected = ensemble.evaluate(sources, [[r] for r in references], ["wer"], beam_size=2, alpha=alpha)
    assert written["metrics"]["wer"] == pytest.approx(expected.values["wer"])
    assert written["reproduce"].startswith("train m1 && train m2 && ")
    assert written["train_steps"] == "30 + 30" and written["train_seconds"] == 120.0
    assert "the member weights (a coordinate search" in written["chosen_by"]
    assert "rounds) and alpha by the dev set's wer" in written["chosen_by"]
    published.ensemble_row(argparse.Namespace(**{**vars(args), "beam": 1}), "both", rows["both"], config)  # greedy
    assert [(g["member_weights"], g["alpha"]) for g in written["dev_grid"]][:3] == [
        ([0.5, 0.5], 0.0), ([0.333333, 0.666667], 0.0), ([0.666667, 0.333333], 0.0)]
    assert "the member weights (a coordinate search" in written["chosen_by"] and written["search"] == "greedy"
    published.ensemble_row(argparse.Namespace(**{**vars(args), "ensemble_weights": [1.0, 3.0]}), "both", rows["both"],
                           config)
    assert [g["member_weights"] for g in written["dev_grid"]] == [[1.0, 3.0]] * 2
    assert "member weights given (--ensemble-weights); alpha by the dev set's" in written["chosen_by"]
