"""Vocabulary shortlists: built from co-occurrence, read back from CTranslate2's vocabulary-map
format, and searched over exactly as the full model restricted to the listed tokens."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from test_rnn import VOCAB, random_batch
from test_rnn import make as make_rnn
from test_transformer import make as make_transformer

from aligna.cli import main
from aligna.data import DataError
from aligna.runtime import quantize_int8
from aligna.search import beam_search, greedy_search
from aligna.shortlist import Shortlist, build, restrict
from aligna.training import train
from aligna.vocab import EOS_ID, Vocabulary


def _pairs():
    # source 5 always comes with target 9, source 6 with 10 and now and then 11; target 4 is everywhere
    return [([5], [9, 4])] * 6 + [([6], [10, 4])] * 5 + [([6, 7], [11, 4])] * 2 + [([7], [12, 4])]


def test_build_ranks_by_p_target_given_source():
    shortlist = build(_pairs(), src_size=8, tgt_size=13, frequent=1, per_source=2)
    assert shortlist.always.tolist() == [0, 1, 2, 3, 4]  # the special tokens and the most frequent one
    assert shortlist.table[5].tolist() == [9, -1]
    assert shortlist.table[6].tolist() == [10, 11]  # 5/7 before 2/7
    assert shortlist.table[7].tolist() == [11, 12]  # 2/3 before 1/3
    assert shortlist.table[3].tolist() == [-1, -1]  # never seen as a source
    src = torch.tensor([[5, 0], [7, 5]])
    assert shortlist.candidates(src).tolist() == [0, 1, 2, 3, 4, 9, 11, 12]


def test_counts_merged_in_parts_equal_counts_at_once():
    pairs = _pairs() * 3
    at_once = build(pairs, 8, 13, frequent=1, per_source=3)
    in_parts = build(pairs, 8, 13, frequent=1, per_source=3, merge_every=4)
    assert torch.equal(at_once.table, in_parts.table) and torch.equal(at_once.always, in_parts.always)


def test_written_and_read_back_in_ctranslate2_format(tmp_path):
    src_vocab = Vocabulary(["<pad>", "<unk>", "<sos>", "<eos>", "a", "b", "c", "d"])
    tgt_vocab = Vocabulary(["<pad>", "<unk>", "<sos>", "<eos>", *"vwxyzuts", "r"])
    shortlist = build(_pairs(), len(src_vocab), len(tgt_vocab), frequent=1, per_source=2)
    path = tmp_path / "shortlist.txt"
    shortlist.write(path, src_vocab.itos, tgt_vocab.itos)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == ["\t<pad> <unk> <sos> <eos> v", "b\tu", "c\tt s", "d\ts r"]
    back = Shortlist.read(path, src_vocab, tgt_vocab)
    assert torch.equal(back.always, shortlist.always)
    for src_id in range(len(src_vocab)):  # the table may be narrower: compare the listed ids
        assert [t for t in back.table[src_id].tolist() if t >= 0] == [t for t in shortlist.table[src_id].tolist() if t >= 0]
    path.write_text("\tv\nb\tw nope\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"shortlist.txt:2: target token 'nope'"):
        Shortlist.read(path, src_vocab, tgt_vocab)
    path.write_text("\tv\nb w\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"shortlist.txt:2: expected source<TAB>targets"):
        Shortlist.read(path, src_vocab, tgt_vocab)


def test_tokens_spelled_like_specials_or_breaks_read_back_as_written(tmp_path):
    """An ordinary "<unk>" among the always candidates, and a subword U+0085 (a line break to
    str.splitlines, whitespace to str.split; only "\n" and " " are CTranslate2's), come back as
    written; a file that is not UTF-8 is named."""
    src_vocab = Vocabulary(["<pad>", "<unk>", "<sos>", "<eos>", "a", "\x85"])
    tgt_vocab = Vocabulary(["<pad>", "<unk>", "<sos>", "<eos>", "<unk>", "\x85", "v"])
    shortlist = Shortlist(torch.tensor([0, 1, 2, 3, 4]), torch.tensor([[-1, -1]] * 4 + [[5, 6], [5, -1]]), 7)
    path = tmp_path / "shortlist.txt"
    shortlist.write(path, src_vocab.itos, tgt_vocab.itos)
    back = Shortlist.read(path, src_vocab, tgt_vocab)
    assert back.always.tolist() == [0, 1, 2, 3, 4]  # the ordinary "<unk>" (id 4) too
    assert back.table[4].tolist() == [5, 6] and back.table[5].tolist()[:1] == [5]
    path.write_bytes(b"\t<pad> \xff\n")
    with pytest.raises(DataError, match=r"shortlist.txt: not UTF-8 text \(byte 7\)"):
        Shortlist.read(path, src_vocab, tgt_vocab)


def _masked(model, ids):
    """A copy of `model` whose output layer can emit only `ids`: what a shortlist must equal."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        out = torch.full((VOCAB,), -1e9)
        out[ids] = 0.0
        masked.output.bias += out
    return masked


@pytest.mark.parametrize("tie", [False, True])
def test_search_over_a_shortlist_is_the_restricted_model(tie):
    model = make_transformer(seed=3, tie=tie, dropout=0.0)
    src, lengths, _ = random_batch([7, 4, 5], seed=2)
    every = torch.arange(VOCAB)
    for search in (greedy_search, lambda *a, **k: beam_search(*a, beam_size=3, **k)):
        full, listed = search(model, src, lengths), search(model, src, lengths, vocabulary=every)
        assert full.tokens == listed.tokens and torch.equal(full.scores, listed.scores)
    ids = torch.tensor([0, 1, 2, 3, *range(4, VOCAB, 3)])
    greedy = greedy_search(model, src, lengths, vocabulary=ids)
    assert greedy.tokens == greedy_search(_masked(model, ids), src, lengths).tokens
    beam = beam_search(model, src, lengths, 4, nbest=4, no_repeat_ngram=2, vocabulary=ids)
    assert all(set(h.tokens) <= set(ids.tolist()) for hyps in beam.nbest for h in hyps)
    assert beam_search(model, src, lengths, 4, no_repeat_ngram=2, vocabulary=every).tokens == beam_search(
        model, src, lengths, 4, no_repeat_ngram=2
    ).tokens


def test_int8_rows_are_the_same_int8_weights():
    model = make_transformer(seed=4, dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for per_channel in (True, False):
            layer = quantize_int8(model, per_channel=per_channel).output
            ids = torch.tensor([0, 3, 5, VOCAB - 1])
            x = torch.randn(6, 1, layer.in_features)
            assert torch.equal(restrict(layer, ids)(x), layer(x)[..., ids])
            assert torch.equal(restrict(layer, ids)(x), layer(x)[..., ids])  # from the kept unpacked weights
    x = torch.randn(2, 16)
    torch.testing.assert_close(restrict(model.output, ids)(x), model.output(x)[:, ids])


def test_an_rnn_says_it_has_no_shortlist():
    model = make_rnn(seed=1)
    src, lengths, _ = random_batch([3, 2])
    with pytest.raises(ValueError, match="has no vocabulary shortlist"):
        greedy_search(model, src, lengths, vocabulary=torch.arange(VOCAB))


def test_the_cli_refuses_to_make_one_for_an_rnn(toy_config, capsys):
    """It wrote shortlist.txt, which every --shortlist decode of the model then refused."""
    config = toy_config(train={"max_steps": 2, "validate_every": 0})
    run = train(config, progress=False)
    assert main(["shortlist", str(run)]) == 1
    assert "restricts a Transformer's output layer; this model is an RNN" in capsys.readouterr().err
    assert not (Path(run) / "shortlist.txt").exists()


def test_eos_keeps_its_place():
    """The special tokens are always listed, first, so each one's column is its id."""
    shortlist = build(_pairs(), 8, 13, frequent=0, per_source=1)
    assert shortlist.candidates(torch.tensor([[6]])).tolist()[: EOS_ID + 1] == list(range(EOS_ID + 1))


def test_cli_writes_it_and_translate_uses_it(tmp_path: Path, toy_config, capsys):
    config = toy_config(
        model={"arch": "transformer", "emb_dim": 16, "transformer": {"heads": 2, "ff_size": 32}},
        train={"max_steps": 30, "validate_every": 0},
    )
    run = train(config, progress=False)
    source = tmp_path / "in.txt"
    source.write_text("1 2 3\n4 5\n", encoding="utf-8")
    assert main(["translate", str(run), "-i", str(source), "--shortlist"]) == 1
    assert "shortlist.txt is missing: make it with `aligna shortlist MODEL_DIR`" in capsys.readouterr().err
    assert main(["shortlist", str(run), "--frequent", "2", "--per-source", "3"]) == 0
    assert "target tokens always" in capsys.readouterr().err
    assert (run / "shortlist.txt").is_file()
    assert main(["translate", str(run), "-i", str(source), "--shortlist", "--beam", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["translate", str(run), "-i", str(source), "--shortlist", "--sample"]) == 1
    assert "shortlist applies to greedy and beam search" in capsys.readouterr().err
    (run / "shortlist.txt").write_text("\tv\n", encoding="utf-8")
    assert main(["translate", str(run), "-i", str(source), "--shortlist"]) == 1
    assert "shortlist.txt:1: target token 'v' is not in the target vocabulary" in capsys.readouterr().err
