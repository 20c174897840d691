"""The prepared, memory-mapped corpus: the same examples and batches as the in-memory path,
reused while the data settings hold, damage named, and the same files from any number of
encoder processes."""

import json
import multiprocessing
import random

import numpy as np
import pytest
import torch
from conftest import reverse_pairs, write_tsv

from aligna import corpus as corpus_module
from aligna.cli import main
from aligna.config import save_config
from aligna.corpus import CorpusError, MappedExamples, open_corpus, prepare, prepared
from aligna.data import Pipeline, collate, encode_pairs, epoch_batches, read_parallel, token_batches
from aligna.modeldir import CORPUS, MANIFEST
from aligna.training import Trainer

FIELDS = ("src", "src_lengths", "tgt_in", "tgt_out", "index")


def awkward_pairs(n: int = 700) -> list[tuple[str, str]]:
    """Reverse-task pairs with empty sides and over-long sentences mixed in."""
    pairs = reverse_pairs(n, seed=7, min_len=1, max_len=14)
    pairs[5] = ("", "a b")
    pairs[17] = ("a b", " ")
    pairs[40] = (" ".join("abcdefghij" * 3), "a")
    return pairs


@pytest.mark.parametrize("too_long", ["filter", "truncate"])
def test_mapped_corpus_gives_the_same_examples_and_batches(toy_config, tmp_path, too_long):
    write_tsv(tmp_path / "awkward.tsv", awkward_pairs())
    config = toy_config(data={"train": {"tsv": str(tmp_path / "awkward.tsv")}, "max_len": 10, "too_long": too_long})
    text = read_parallel(config.data.train, "train")
    pipeline = Pipeline.build(config.data, text)
    memory = encode_pairs(pipeline, text, config.data.max_len, too_long, "train")
    mapped = prepare(config.data, tmp_path / "corpus", workers=2, chunk_lines=97).examples

    assert isinstance(mapped, MappedExamples) and len(mapped) == len(memory) < len(text.src)
    assert mapped.report == memory.report and mapped.line.tolist() == memory.line
    for i in range(len(memory)):
        assert torch.equal(mapped.src[i], memory.src[i]) and mapped.src[i].dtype == torch.long
        assert torch.equal(mapped.tgt[i], memory.tgt[i]) and mapped.tgt[i].dtype == torch.long
    for a, b in zip(mapped.lengths(), memory.lengths()):
        assert np.array_equal(a, b) and a.dtype == np.int64
    for epoch in range(3):
        ours, theirs = epoch_batches(mapped, 96, seed=5, epoch=epoch), epoch_batches(memory, 96, seed=5, epoch=epoch)
        assert list(ours) == list(theirs) and len(ours) > 5
        for index in ours:
            x, y = collate(mapped, index), collate(memory, index)
            for name in FIELDS:
                assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_wide_vocabularies_are_stored_as_uint32(toy_config, tmp_path, monkeypatch):
    config = toy_config()
    memory = encode_pairs(*_pipeline_and_text(config), 100, "filter", "train")
    monkeypatch.setattr(corpus_module, "UINT16_VOCAB", 8)  # the toy vocabularies have 14 tokens
    prepared_ = prepare(config.data, tmp_path / "corpus", workers=1)
    assert prepared_.manifest["dtype"] == "uint32"
    assert all(torch.equal(prepared_.examples.tgt[i], memory.tgt[i]) for i in range(len(memory)))


def _pipeline_and_text(config):
    text = read_parallel(config.data.train, "train")
    return Pipeline.build(config.data, text), text


def reference_token_batches(src, tgt, budget, generator=None):
    """token_batches as it was written before it was vectorized: one Python loop."""
    n = len(src)
    order = torch.randperm(n, generator=generator).tolist() if generator else list(range(n))
    order.sort(key=lambda i: (src[i], tgt[i]))
    batches, current, longest = [], [], 0
    for i in order:
        length = max(src[i], tgt[i])
        if current and (len(current) + 1) * max(longest, length) > budget:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
    return batches


@pytest.mark.parametrize("seed", range(6))
def test_vectorized_token_batches_equal_the_loop(seed):
    rng = random.Random(seed)
    n, top = rng.choice([1, 2, 50, 3000]), rng.choice([1, 5, 40, 300])
    src = [rng.randint(0 if seed == 5 else 1, top) for _ in range(n)]
    tgt = [rng.randint(0, top) for _ in range(n)]
    budget = rng.choice([1, 7, 64, 256, 5000])
    for shuffled in (False, True):
        g1 = torch.Generator().manual_seed(seed) if shuffled else None
        g2 = torch.Generator().manual_seed(seed) if shuffled else None
        batches = token_batches(np.array(src), np.array(tgt), budget, g1)
        assert list(batches) == reference_token_batches(src, tgt, budget, g2)
        assert batches == reference_token_batches(src, tgt, budget, torch.Generator().manual_seed(seed) if shuffled else None)
    assert list(token_batches([], [], 10)) == []


def test_training_prepares_once_then_reuses_and_redoes_on_changed_data(toy_config, aligna_log):
    config = toy_config(train={"max_steps": 3, "validate_every": 0})
    assert Trainer(config, progress=False).train().step == 3
    manifest = config.model_dir + f"/{CORPUS}/{MANIFEST}"
    first = json.loads(open(manifest).read())
    assert "prepared" in aligna_log.text and "using the prepared corpus" not in aligna_log.text

    aligna_log.lines.clear()
    trainer = Trainer(config, overwrite=True, progress=False)  # a new run in the same model_dir
    trainer.close()
    assert "using the prepared corpus" in aligna_log.text
    assert json.loads(open(manifest).read()) == first

    aligna_log.lines.clear()
    changed = toy_config(train={"max_steps": 3, "validate_every": 0}, data={"max_len": 5})
    trainer = Trainer(changed, overwrite=True, progress=False)
    trainer.close()
    assert "prepared from other data or data settings" in aligna_log.text
    again = json.loads(open(manifest).read())
    assert again["fingerprint"]["settings"]["max_len"] == 5 and again["pairs"] < first["pairs"]
    assert len(trainer.train_data) == again["pairs"]


def test_resume_reads_the_prepared_corpus_with_the_runs_vocabulary(toy_config, aligna_log):
    config = toy_config(train={"max_steps": 4, "validate_every": 2})
    Trainer(config, progress=False).train()
    resumed = toy_config(train={"max_steps": 6, "validate_every": 2})
    aligna_log.lines.clear()
    assert Trainer(resumed, resume=True, progress=False).train().step == 6
    assert "using the prepared corpus" in aligna_log.text


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_ids_file_is_an_error_naming_it(toy_config, damage):
    config = toy_config(train={"max_steps": 2, "validate_every": 0})
    Trainer(config, progress=False).train()
    ids = config.model_dir + f"/{CORPUS}/tgt.ids"
    data = open(ids, "rb").read()
    open(ids, "wb").write(data[:-3] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    why = "truncated" if damage == "truncate" else "checksum mismatch"
    with pytest.raises(CorpusError, match=f"{ids}: .*{why}.*aligna prepare"):
        Trainer(config, overwrite=True, progress=False)
    with pytest.raises(CorpusError, match=f"{ids}: .*{why}"):
        open_corpus(config.model_dir + "/" + CORPUS)
    path = config.model_dir + ".yaml"
    save_config(config, path)
    assert main(["prepare", path]) == 0  # as the error says: prepare encodes it again (it failed the same way)
    assert open_corpus(config.model_dir + "/" + CORPUS).manifest["pairs"] == 2000


@pytest.mark.parametrize("edit", [{"dtype": "uint12"}, {"report": {"split": "train", "read": 3, "extra": 1}},
                                  {"report": {"split": "train"}},
                                  {"sources": {"t.tsv": {"bytes": 1}}}, {"files": []}, {"vocab": 7}])  # fmt: skip
def test_a_damaged_manifest_is_an_error_naming_it(toy_config, edit):
    config = toy_config(train={"max_steps": 2, "validate_every": 0})
    Trainer(config, progress=False).train()
    manifest = config.model_dir + f"/{CORPUS}/{MANIFEST}"
    raw = json.loads(open(manifest).read())
    open(manifest, "w").write(json.dumps({**raw, **edit}))
    with pytest.raises(CorpusError, match=rf"{manifest}: not a complete corpus manifest \('{next(iter(edit))}'"):
        open_corpus(config.model_dir + "/" + CORPUS, config.data)


def test_a_training_file_that_is_a_pipe_is_read_once(toy_config, tmp_path):
    """A pipe (`<(zcat ...)`, here /dev/fd/N of an os.pipe) is read as a file: the check of
    whether a prepared corpus is current must not use it up (a second read finds it empty:
    "train corpus is empty"), and a corpus made from one is never reused."""
    import dataclasses
    import os
    import threading

    config = toy_config()
    text = (tmp_path / "train.tsv").read_bytes()
    for _ in range(2):  # the second time: not taken for the corpus prepared the first time
        read_end, write_end = os.pipe()

        def feed(fd: int = write_end) -> None:
            with os.fdopen(fd, "wb") as f:
                f.write(text)

        writer = threading.Thread(target=feed)
        writer.start()
        try:
            train = dataclasses.replace(config.data.train, tsv=f"/dev/fd/{read_end}")
            corpus = prepared(dataclasses.replace(config.data, train=train), tmp_path / "corpus")
        finally:
            writer.join()
            os.close(read_end)
        assert len(corpus.examples) == 2000


def test_a_changed_vocabulary_file_is_not_reused(toy_config):
    """The corpus's vocabularies are checked with its ids: two lines of tgt_vocab.txt swapped
    decoded every id to another word, and the corpus was used all the same."""
    config = toy_config(train={"max_steps": 2, "validate_every": 0})
    Trainer(config, progress=False).train()
    vocab = config.model_dir + f"/{CORPUS}/tgt_vocab.txt"
    lines = open(vocab, encoding="utf-8").read().split("\n")
    lines[4], lines[5] = lines[5], lines[4]
    open(vocab, "w", encoding="utf-8").write("\n".join(lines))
    with pytest.raises(CorpusError, match="tgt_vocab.txt: checksum mismatch"):
        open_corpus(config.model_dir + "/" + CORPUS)
    manifest = config.model_dir + f"/{CORPUS}/{MANIFEST}"
    data = json.loads(open(manifest).read())
    del data["vocab"]
    open(manifest, "w").write(json.dumps(data))
    with pytest.raises(CorpusError, match="not a complete corpus manifest"):  # was a KeyError traceback
        open_corpus(config.model_dir + "/" + CORPUS, verify=False)


def test_multiprocess_encoding_writes_the_same_files(toy_config, tmp_path):
    write_tsv(tmp_path / "awkward.tsv", awkward_pairs(2500))
    config = toy_config(data={"train": {"tsv": str(tmp_path / "awkward.tsv")}, "max_len": 9})
    one = prepare(config.data, tmp_path / "one", workers=1)
    many = prepare(config.data, tmp_path / "many", workers=3, chunk_lines=101)
    names = sorted(p.name for p in one.directory.iterdir())
    assert names == sorted(p.name for p in many.directory.iterdir()) and MANIFEST in names
    for name in names:
        assert (one.directory / name).read_bytes() == (many.directory / name).read_bytes(), name


def test_processes_that_ask_at_once_share_one_preparation(toy_config, tmp_path, monkeypatch):
    config = toy_config()
    calls = tmp_path / "calls.txt"
    real = corpus_module.prepare

    def counted(*args, **kwargs):
        with open(calls, "a") as f:
            f.write("prepare\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(corpus_module, "prepare", counted)
    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=prepared, args=(config.data, tmp_path / "run" / CORPUS, None, 1)) for _ in range(3)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(60)
    assert [p.exitcode for p in ranks] == [0, 0, 0]
    assert calls.read_text() == "prepare\n"
    assert len(open_corpus(tmp_path / "run" / CORPUS, config.data).examples) == 2000


def test_prepare_cli_then_train_reuses_it(toy_config, tmp_path, capsys, aligna_log):
    config = toy_config(train={"max_steps": 2, "validate_every": 0})
    path = tmp_path / "toy.yaml"
    save_config(config, path)
    assert main(["prepare", str(path), "--set", "data.max_len=6", "--workers", "2"]) == 0
    assert "corpus in" in capsys.readouterr().err
    corpus = prepared(toy_config(data={"max_len": 6}).data, tmp_path / "run" / CORPUS)
    assert corpus.manifest["fingerprint"]["settings"]["max_len"] == 6
    aligna_log.lines.clear()
    assert main(["train", str(path), "--set", "data.max_len=6", "--no-progress"]) == 0
    assert "using the prepared corpus" in aligna_log.text and "preparing" not in aligna_log.text
    assert main(["prepare", str(path), "--set", "data.max_len=6"]) == 0  # up to date: verified, kept

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert main(["prepare", str(path), "--set", f"model_dir={tmp_path / 'foreign'}"]) == 1
    assert "aligna did not write (notes.txt)" in capsys.readouterr().err
