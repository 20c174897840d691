"""Export to CTranslate2: the exported model searches exactly as aligna's fp32 engine does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
from conftest import reverse_pairs, write_tsv

import aligna
import aligna.export as export_module
from aligna.config import ConfigError, config_from_dict
from aligna.export import EXPORT_INFO, ExportError, export_ctranslate2, export_info
from aligna.search import NEVER
from aligna.tensorfiles import load_weights
from aligna.training import train
from aligna.vocab import EOS_ID, SOS_ID

ctranslate2 = pytest.importorskip("ctranslate2")

VARIANTS = {
    # pre-norm, sinusoidal positions, one vocabulary with shared and tied embeddings
    "pre": {"model": {"share_embeddings": True, "tie_embeddings": True},
            "data": {"shared_vocab": True}},
    # post-norm (the paper's), learned positions, GELU, unscaled embeddings, separate vocabularies
    "post": {"model": {"transformer": {"pre_norm": False, "positions": "learned", "max_positions": 40,
                                       "activation": "gelu", "scale_embeddings": False, "heads": 2, "ff_size": 48}}},
}  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("export")
    return {
        "train": write_tsv(tmp / "train.tsv", reverse_pairs(3000, seed=1, max_len=12)),
        "dev": write_tsv(tmp / "dev.tsv", reverse_pairs(20, seed=2, max_len=12)),
        # longer than anything seen in training: some outputs run to their length limit
        "test": write_tsv(tmp / "test.tsv", reverse_pairs(300, seed=3, min_len=1, max_len=20)),
        "tmp": tmp,
    }


def _config(corpus, name: str, arch: str = "transformer", **sections):
    raw = {
        "model_dir": str(corpus["tmp"] / name),
        "data": {"train": {"tsv": str(corpus["train"])}, "dev": {"tsv": str(corpus["dev"])}, "max_len": 30},
        "model": {"arch": arch, "emb_dim": 32, "hidden_size": 32, "encoder_layers": 2, "decoder_layers": 2,
                  "dropout": 0.0, "transformer": {"heads": 4, "ff_size": 64}},
        "train": {"batch_tokens": 512, "epochs": 1, "max_steps": 120, "lr": 0.003, "validate_every": 0,
                  "log_every": 1000, "num_threads": 1},
        "decode": {"max_len_a": 1.0, "max_len_b": 3},
        "eval": {"metrics": ["exact"]},
    }  # fmt: skip
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict):
                raw[section].setdefault(key, {}).update(value)
            else:
                raw[section][key] = value
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def trained(corpus) -> dict[str, Path]:
    torch.manual_seed(0)
    return {name: Path(train(_config(corpus, name, **sections), progress=False)) for name, sections in VARIANTS.items()}


@pytest.fixture(scope="module")
def exported(trained, corpus) -> dict[str, Path]:
    return {name: export_ctranslate2(path, corpus["tmp"] / f"{name}-ct2") for name, path in trained.items()}


def _forced_score(translator, source: str, tokens: list[str]) -> float:
    """log P(tokens [<eos> unless cut at the length limit] | source) from a teacher-forced pass,
    over the tokens an output can hold, as the searches' (`search.never_emit_`)."""
    src = translator.pipeline.src_vocab.encode(translator.pipeline.src_tokens(source))
    row = translator.pipeline.tgt_vocab.encode(tokens)
    if len(tokens) < len(src) + 3:  # ended by <eos> (the limit: max_len_a 1.0, max_len_b 3)
        row.append(EOS_ID)
    model = translator.model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([src]), torch.tensor([len(src)]), torch.tensor([[SOS_ID, *row[:-1]]]))
        logits[..., list(NEVER)] = float("-inf")
    return float(torch.log_softmax(logits.float(), -1)[0, torch.arange(len(row)), torch.tensor(row)].sum())


def _sources(corpus) -> list[str]:
    return [line.split("\t")[0] for line in corpus["test"].read_text().splitlines()]


SEARCHES = [
    {"beam_size": 1},
    {"beam_size": 5},
    {"beam_size": 5, "alpha": 0.6, "nbest": 3},
    {"beam_size": 3, "batch_size": 7},
    {"beam_size": 5, "batch_size": 1},  # every call at the sentence's own limit: only the best is asked for
    {"beam_size": 1, "min_len": 2},
]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("search", SEARCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_ctranslate2_searches_as_aligna_fp32(trained, exported, corpus, variant, search):
    """Greedy and beam search through CTranslate2 float32 give aligna's fp32 output on 300
    sentences, n-best lists included, with the same scores and attention maps. Some inputs
    are longer than any seen in training, so outputs also end at their length limit."""
    torch.set_num_threads(1)
    ours, theirs = aligna.load(trained[variant]), aligna.load(exported[variant])
    assert (ours.engine, theirs.engine) == ("aligna", "ctranslate2")
    sources = _sources(corpus)
    a, b = ours.translate_detailed(sources, **search), theirs.translate_detailed(sources, **search)
    assert any(len(t.tokens) >= 1.0 * len(s.split()) + 3 for t, s in zip(a, sources))  # some hit the limit
    # Partial hypotheses whose scores tie to float rounding may be pruned either way (the engines
    # sum in other orders), and the searches then end elsewhere: at most 1 sentence in 100 may
    # differ, and there each engine's output must carry its score under aligna's model (the
    # models agree; only the search's choice at the tie differs).
    ties = [i for i, (x, y) in enumerate(zip(a, b)) if x.tokens != y.tokens]
    assert len(ties) <= len(sources) // 100, ties
    for i in ties if not (search.get("min_len") or search.get("alpha")) else ():
        for found in (a[i], b[i]):
            assert _forced_score(ours, sources[i], found.tokens) == pytest.approx(found.score, abs=1e-3), i
    a, b = [x for i, x in enumerate(a) if i not in ties], [y for i, y in enumerate(b) if i not in ties]
    if not search.get("alpha"):
        assert [[text for text, _ in t.nbest] for t in b] == [[text for text, _ in t.nbest] for t in a]
    # With a length penalty, aligna ranks every hypothesis finished at the length limit, which
    # can be more than the beam_size CTranslate2 returns: below the best, n-best lists may differ.
    for x, y in zip(a, b):
        if not search.get("min_len"):  # CTranslate2 scores renormalized after forbidding <eos>
            assert y.score == pytest.approx(x.score, abs=1e-3)
            assert y.nbest[0][1] == pytest.approx(x.nbest[0][1], abs=1e-3)
        assert y.attention.shape == x.attention.shape
        assert torch.allclose(y.attention, x.attention, atol=1e-4)


def test_loss_and_scores_agree(trained, exported, corpus, aligna_log):
    sources = _sources(corpus)[:100]
    references = [[" ".join(reversed(s.split()))] for s in sources]
    references[3] = [""]  # left out of the loss by both engines, and both say so (CTranslate2's did not)
    ours, theirs = aligna.load(trained["pre"]), aligna.load(exported["pre"])
    a = ours.evaluate(sources, references, ["exact", "loss"], origin="ours")
    b = theirs.evaluate(sources, references, ["exact", "loss"], origin="theirs")
    assert b.values["exact"] == a.values["exact"]
    assert b.values["loss"] == pytest.approx(a.values["loss"], rel=1e-4)
    for origin in ("ours", "theirs"):
        assert f"{origin}: evaluation: 100 pairs read, 99 kept; 1 with an empty side filtered" in aligna_log.text


def test_int8_export_translates_close_to_fp32(trained, corpus, tmp_path):
    out = export_ctranslate2(trained["pre"], tmp_path / "int8", quantization="int8")
    assert export_info(out)["quantization"] == "int8"
    assert (out / "model.bin").stat().st_size < (corpus["tmp"] / "pre-ct2" / "model.bin").stat().st_size
    sources = _sources(corpus)
    fp32 = aligna.load(trained["pre"]).translate(sources)
    loaded = aligna.load(out)  # the stored type by default
    assert loaded.precision == "int8" and aligna.load(out, precision="fp32").precision == "fp32"
    int8 = loaded.translate(sources)
    # Close, not equal: how many outputs of this barely trained model flip depends on the
    # processor's int8 kernel (240+ of 300 equal on a Zen 4 with AVX-512 VNNI, 74 on a Zen 3 with
    # AVX2 only, where CTranslate2's BLEU against the references stays fp32's). Weights with
    # wrong scales would translate into something else altogether.
    assert sacrebleu.corpus_bleu(int8, [fp32], tokenize="none").score >= 50


def test_engine_ctranslate2_exports_on_the_fly(trained, corpus):
    sources = _sources(corpus)[:50]
    assert aligna.load(trained["post"], engine="ctranslate2").translate(sources) == aligna.load(
        trained["post"]
    ).translate(sources)


def test_options_ctranslate2_lacks_are_errors(exported):
    translator = aligna.load(exported["pre"])
    with pytest.raises(ConfigError, match="coverage"):
        translator.translate(["1 2 3"], beam_size=3, coverage=0.2)
    with pytest.raises(ConfigError, match="no_repeat_ngram"):
        translator.translate(["1 2 3"], beam_size=3, no_repeat_ngram=2)
    for options in ({"coverage": 0.2}, {"no_repeat_ngram": 2}, {"sample": True, "seed": 12345}):
        with pytest.raises(ConfigError):  # before any decoding: the server answers 422, not 500
            translator.decode_config(**options)
    with pytest.raises(ValueError, match="precision bf16: CTranslate2 on cpu computes in"):
        aligna.load(exported["pre"], precision="bf16")
    with pytest.raises(ValueError, match="engine ctranslate2"):
        aligna.load(exported["pre"], engine="aligna")
    with pytest.raises(ValueError, match="--checkpoint does not apply"):
        aligna.load(exported["pre"], checkpoint="latest")


def test_sampling_repeats_from_a_fresh_load(exported):
    def draws():
        translator = aligna.load(exported["pre"])
        return [translator.translate(["1 2 3 4 5"] * 8, sample=True, temperature=2.0) for _ in range(2)]

    first = draws()
    assert first[0] != first[1] and draws() == first
    with pytest.raises(ConfigError, match="seeds its sampler once"):
        aligna.load(exported["pre"]).translate(["1 2"], sample=True, seed=7)


def test_an_rnn_is_refused_with_what_to_use_instead(corpus, tmp_path):
    rnn = Path(train(_config(corpus, "rnn", arch="rnn", train={"max_steps": 2}), progress=False))
    with pytest.raises(ExportError, match="CTranslate2 has no RNN.*--precision int8"):
        export_ctranslate2(rnn, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_never_overwrites_what_it_did_not_write(trained, tmp_path):
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    with pytest.raises(ExportError, match="not an earlier aligna export"):
        export_ctranslate2(trained["pre"], other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "years of work"
    with pytest.raises(ExportError, match="must not go into the model directory"):
        export_ctranslate2(trained["pre"], trained["pre"] / "ct2")
    out = export_ctranslate2(trained["pre"], tmp_path / "ct2")
    with pytest.raises(ExportError, match="--overwrite"):
        export_ctranslate2(trained["pre"], out)
    assert export_ctranslate2(trained["pre"], out, checkpoint="latest", overwrite=True) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2", "thesis"]  # no staging directory left
    assert (out / EXPORT_INFO).is_file() and (out / "config.yaml").is_file()


def test_export_to_the_working_directory_with_the_users_permissions(trained, tmp_path, monkeypatch):
    """"." staged the export inside itself (EBUSY, a .old-* left behind), and every export was
    mode 0700 (mkdtemp's), whatever the umask: a server run by another user could not read it."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    old_mask = os.umask(0o022)
    try:
        assert export_ctranslate2(trained["pre"], ".") == tmp_path / "here"
    finally:
        os.umask(old_mask)
    assert (tmp_path / "here" / EXPORT_INFO).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["here"]
    assert (tmp_path / "here").stat().st_mode & 0o777 == 0o755


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aligna", *args], capture_output=True, text=True, timeout=300)


def test_cli_export_translate_evaluate(trained, corpus, tmp_path):
    out = tmp_path / "cli-ct2"
    done = _cli("export", str(trained["pre"]), "--to", "ctranslate2", str(out))
    assert done.returncode == 0, done.stderr
    src = tmp_path / "src.txt"
    src.write_text("".join(s + "\n" for s in _sources(corpus)[:20]))
    ours = _cli("translate", str(trained["pre"]), "-i", str(src), "--beam", "4")
    theirs = _cli("translate", str(out), "-i", str(src), "--beam", "4", "--precision", "fp32")
    assert theirs.returncode == 0, theirs.stderr
    assert theirs.stdout == ours.stdout
    fly = _cli("translate", str(trained["pre"]), "-i", str(src), "--beam", "4", "--engine", "ctranslate2")
    assert fly.stdout == ours.stdout
    scored = _cli("evaluate", str(out), "--tsv", str(corpus["test"]), "--metrics", "exact,ppl")
    assert scored.returncode == 0 and "exact" in scored.stdout, scored.stderr
    refused = _cli("translate", str(out), "-i", str(src), "--coverage", "0.3", "--beam", "2")
    assert refused.returncode != 0 and "coverage" in refused.stderr and "Traceback" not in refused.stderr
    rnn_dir = corpus["tmp"] / "not-there"
    missing = _cli("export", str(rnn_dir), "--to", "ctranslate2", str(tmp_path / "x"))
    assert missing.returncode != 0 and "not an aligna model directory" in missing.stderr


def test_an_exported_model_is_served(trained, exported):
    from fastapi.testclient import TestClient

    from aligna.serve import Settings, create_app

    models = {"ct2": aligna.load(exported["pre"]), "torch": aligna.load(trained["pre"])}
    with TestClient(create_app(models, Settings(max_wait_ms=1))) as client:
        info = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert (info["ct2"]["engine"], info["torch"]["engine"]) == ("ctranslate2", "aligna")
        assert info["ct2"]["parameters"] == info["torch"]["parameters"]
        body = {"texts": ["1 2 3 4", "5 6 7"], "beam_size": 3, "attention": "all"}
        ours = client.post("/v1/translate", json={**body, "model": "torch"}).json()["results"]
        theirs = client.post("/v1/translate", json={**body, "model": "ct2"}).json()["results"]
        assert [r["text"] for r in theirs] == [r["text"] for r in ours]
        assert theirs[0]["attention"]["weights"] and theirs[0]["attention"]["maps"] == {}


def test_a_shortlist_goes_with_the_export_as_its_vocabulary_map(trained, corpus, tmp_path):
    """`aligna shortlist` before `export`: CTranslate2 gets the same list as its vocabulary map
    and, asked for the shortlist, searches over it as aligna does."""
    import shutil

    from aligna.shortlist import make

    model_dir = tmp_path / "post"
    shutil.copytree(trained["post"], model_dir)
    with pytest.raises(ConfigError, match="has no vmap.txt"):
        aligna.load(export_ctranslate2(model_dir, tmp_path / "plain")).translate(["1 2"], shortlist=True)
    make(model_dir, frequent=2, per_source=3)
    out = export_ctranslate2(model_dir, tmp_path / "listed")
    assert (out / "vmap.txt").read_text() == (model_dir / "shortlist.txt").read_text()
    sources = _sources(corpus)[:100]
    ours = aligna.load(model_dir).translate_detailed(sources, shortlist=True, beam_size=3)
    theirs = aligna.load(out).translate_detailed(sources, shortlist=True, beam_size=3)
    # Not all: CTranslate2 pads a batch's candidates to a multiple of 16 tokens, so its softmax
    # runs over a few more of them (99 of 100 equal when written).
    same = sum(a.tokens == b.tokens for a, b in zip(ours, theirs))
    assert same >= 95, f"{same}/100 equal"


def test_text_spelled_like_a_special_is_an_ordinary_token_in_both_engines(corpus, tmp_path):
    """Text such as "<eos>" is an ordinary token in aligna (here one of the vocabulary, "g"
    renamed), and "<pad>" or "<sos>" an unknown one: CTranslate2 looks tokens up by their
    strings and read them as the specials (padding, the start, the end), so the export names
    them apart and the engine hands tokens over by those names."""
    spelled = [tuple(side.replace("g", "<eos>") for side in pair) for pair in reverse_pairs(3000, seed=1, max_len=12)]
    train_tsv = write_tsv(tmp_path / "train.tsv", spelled)
    config = _config({**corpus, "train": train_tsv, "tmp": tmp_path}, "spelled", train={"max_steps": 60})
    model_dir = Path(train(config, progress=False))
    out = export_ctranslate2(model_dir, tmp_path / "spelled-ct2")
    ours, theirs = aligna.load(model_dir), aligna.load(out)
    assert "<eos>" in ours.pipeline.tgt_vocab.stoi  # an ordinary token
    sources = ["a <eos> b c", "<pad> d e", "f <sos> <eos>", "<unk> h <eos> i", "c b a"]
    for search in ({}, {"beam_size": 3}):
        a, b = ours.translate_detailed(sources, **search), theirs.translate_detailed(sources, **search)
        assert [t.tokens for t in b] == [t.tokens for t in a]
        assert [t.score for t in b] == pytest.approx([t.score for t in a], abs=1e-3)
    references = [[" ".join(reversed(s.split()))] for s in sources]
    assert theirs.evaluate(sources, references, ["loss"]).values["loss"] == pytest.approx(
        ours.evaluate(sources, references, ["loss"]).values["loss"], rel=1e-4
    )
    info = export_info(out)
    del info["token_names"]  # as an export before the names were: its vocabulary reads "<eos>" as the end
    (out / EXPORT_INFO).write_text(json.dumps(info))
    with pytest.raises(ExportError, match="export again"):
        aligna.load(out)


def test_min_len_beyond_a_sentence_limit_runs_to_the_limit(trained, exported):
    ours, theirs = aligna.load(trained["pre"]), aligna.load(exported["pre"])
    sources = ["a b", "a b c d e f g h"]  # "a b": a limit of 2 + 3 tokens
    for search in ({"min_len": 10}, {"min_len": 10, "beam_size": 3}):
        a, b = ours.translate_detailed(sources, **search), theirs.translate_detailed(sources, **search)
        assert len(a[0].tokens) == 5 and [t.tokens for t in b] == [t.tokens for t in a]


def test_export_never_deletes_the_model_directory_it_holds(trained, tmp_path):
    import shutil

    outer = export_ctranslate2(trained["pre"], tmp_path / "outer")
    inner = tmp_path / "outer" / "run"
    shutil.copytree(trained["pre"], inner)
    with pytest.raises(ExportError, match="holds the model directory"):
        export_ctranslate2(inner, outer, overwrite=True)
    assert (inner / "config.yaml").is_file()


def test_an_export_description_without_a_field_is_named(exported, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported["pre"], copy)
    info = export_info(copy)
    del info["max_positions"]
    (copy / EXPORT_INFO).write_text(json.dumps(info))
    with pytest.raises(ExportError, match=f"{EXPORT_INFO}: max_positions must be a positive integer"):
        aligna.load(copy)


def test_neither_engine_emits_pad_or_sos(trained, corpus, tmp_path, monkeypatch):
    """A model that prefers <pad> and <sos> (their output biases raised): no engine emits them.
    They left no text (an attention row each, and n-best entries with the same text twice)."""

    def prefer_never(model, weights):
        load_weights(model, weights)
        with torch.no_grad():
            model.output.bias[list(NEVER)] += 30.0

    monkeypatch.setattr(export_module, "load_weights", prefer_never)
    ours, theirs = aligna.load(trained["pre"]), aligna.load(export_ctranslate2(trained["pre"], tmp_path / "never"))
    with torch.no_grad():
        ours.model.output.bias[list(NEVER)] += 30.0
    sources = _sources(corpus)[:40]
    for translator in (ours, theirs):
        for search in ({"beam_size": 1}, {"beam_size": 5, "nbest": 5}, {"sample": True}):
            for t in translator.translate_detailed(sources, **search):
                assert t.attention.size(0) - len(t.tokens) in (0, 1), (translator.engine, search, t.tokens)
                texts = [text for text, _ in t.nbest]
                assert len(set(texts)) == len(texts), (translator.engine, search, texts)
