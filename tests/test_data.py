import gzip

import pytest
import torch

from aligna.config import CorpusConfig, DataConfig, TokenizerConfig
from aligna.data import (
    DataError,
    ParallelText,
    Pipeline,
    collate,
    encode_pairs,
    epoch_batches,
    group_references,
    read_lines,
    read_parallel,
    token_batches,
)
from aligna.vocab import EOS_ID, PAD_ID, SOS_ID


def write(path, text, gz=False):
    data = text.encode("utf-8") if isinstance(text, str) else text
    if gz:
        data = gzip.compress(data)
    path.write_bytes(data)
    return str(path)


def test_reads_plain_gzip_crlf_and_bom(tmp_path):
    assert read_lines(write(tmp_path / "a.txt", "\ufeffone\r\ntwo\n")) == ["one", "two"]
    assert read_lines(write(tmp_path / "a.gz", "ein\nzwei", gz=True)) == ["ein", "zwei"]
    assert read_lines(write(tmp_path / "a.GZ", "drei", gz=True)) == ["drei"]  # told by content, not name
    assert read_lines(write(tmp_path / "gzipped", "vier", gz=True)) == ["vier"]
    with pytest.raises(DataError, match=r"cut\.gz: cannot read"):
        read_lines(write(tmp_path / "cut.gz", gzip.compress(b"a\nb\n" * 100)[:-10]))  # a truncated gzip
    assert read_lines(write(tmp_path / "e.txt", "")) == []
    # lines ended by \r alone (classic Mac OS) are lines, not one long sentence
    assert read_lines(write(tmp_path / "mac.txt", "a b\rc d\re\r")) == ["a b", "c d", "e"]
    assert read_lines(write(tmp_path / "mixed.txt", "a\rb\nc")) == ["a\rb", "c"]  # with \n, \r is text
    with pytest.raises(DataError, match=r"mac2\.txt:3: invalid UTF-8"):
        read_lines(write(tmp_path / "mac2.txt", b"a\rb\rc\xff\r"))


def test_line_count_mismatch_names_both_files_and_counts(tmp_path):
    src = write(tmp_path / "train.de", "a\nb\nc\n")
    tgt = write(tmp_path / "train.en", "a\nb\n")
    with pytest.raises(DataError) as e:
        read_parallel(CorpusConfig(src=src, tgt=tgt), "train")
    assert f"{src} has 3 lines" in str(e.value) and f"{tgt} has 2 lines" in str(e.value)


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.de", b"fine\nalso fine\nbad \xff\xfe here\n")
    with pytest.raises(DataError, match=rf"{path}:3: invalid UTF-8"):
        read_lines(path)


def test_invalid_utf8_in_gzip(tmp_path):
    path = write(tmp_path / "bad.gz", b"ok\n\xc3\x28\n", gz=True)
    with pytest.raises(DataError, match=rf"{path}:2: invalid UTF-8"):
        read_lines(path)


def test_missing_file_and_empty_corpus(tmp_path):
    with pytest.raises(DataError, match=r"file not found: .*nope\.de"):
        read_parallel(CorpusConfig(src=str(tmp_path / "nope.de"), tgt=str(tmp_path / "nope.en")))
    empty = write(tmp_path / "empty.tsv", "")
    with pytest.raises(DataError, match=rf"dev corpus is empty: {empty}"):
        read_parallel(CorpusConfig(tsv=empty), "dev")


def test_tsv_line_without_tab_is_named(tmp_path):
    path = write(tmp_path / "d.tsv", "a\tb\nno tab here\n")
    with pytest.raises(DataError, match=rf"{path}:2: expected source<TAB>target, found 1"):
        read_parallel(CorpusConfig(tsv=path))


def word_pipeline(text, **data):
    config = DataConfig(train=CorpusConfig(tsv="unused"), **data)
    return Pipeline.build(config, text)


def test_empty_and_long_pairs_are_counted_not_silently_lost():
    text = ParallelText(["a b", "", "a b c d e", "c", "b"], ["x y", "x", "y", "x y z w v u", "  "], "mem")
    pipe = word_pipeline(text)
    kept = encode_pairs(pipe, text, max_len=4, too_long="filter", split="train")
    assert (kept.report.read, kept.report.empty, kept.report.too_long, kept.report.kept) == (5, 2, 2, 1)
    assert kept.line == [0]
    assert "2 with an empty side filtered" in str(kept.report)
    assert "2 over max_len=4 tokens filtered" in str(kept.report)
    cut = encode_pairs(pipe, text, max_len=4, too_long="truncate", split="train")
    assert (cut.report.truncated, len(cut)) == (2, 3)
    assert all(len(s) <= 4 and len(t) <= 4 + 2 for s, t in zip(cut.src, cut.tgt))


def test_all_pairs_unusable_is_an_error():
    text = ParallelText(["", "a"], ["b", ""], "mem.tsv")
    with pytest.raises(DataError, match=r"train: no usable pairs left in mem\.tsv"):
        encode_pairs(word_pipeline(text), text, 10, "filter", "train")


def test_collate_frames_and_pads():
    text = ParallelText(["a b c", "a"], ["x y", "x y z"], "mem")
    pipe = word_pipeline(text)
    ex = encode_pairs(pipe, text, 10, "filter", "train")
    b = collate(ex, [0, 1])
    assert b.src.tolist()[1][1:] == [PAD_ID, PAD_ID] and b.src_lengths.tolist() == [3, 1]
    x, y, z = (pipe.tgt_vocab.stoi[t] for t in "xyz")
    assert b.tgt_in.tolist() == [[SOS_ID, x, y, PAD_ID], [SOS_ID, x, y, z]]
    assert b.tgt_out.tolist() == [[x, y, EOS_ID, PAD_ID], [x, y, z, EOS_ID]]
    assert b.n_tokens == 7


def test_token_batches_cover_everything_once_within_budget():
    g = torch.Generator().manual_seed(0)
    src = torch.randint(1, 30, (500,)).tolist()
    tgt = torch.randint(1, 30, (500,)).tolist()
    batches = token_batches(src, tgt, 200, g)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        assert len(b) * max(max(src[i], tgt[i]) for i in b) <= 200
    big = token_batches([300, 2], [1, 1], 200)
    assert sorted(map(len, big)) == [1, 1]  # an over-budget example travels alone


def test_epoch_batches_depend_only_on_seed_and_epoch():
    text = ParallelText([" ".join("a" * (i % 9 + 1)) for i in range(200)], ["b"] * 200, "mem")
    ex = encode_pairs(word_pipeline(text), text, 50, "filter", "train")
    assert epoch_batches(ex, 64, seed=3, epoch=1) == epoch_batches(ex, 64, seed=3, epoch=1)
    assert epoch_batches(ex, 64, seed=3, epoch=1) != epoch_batches(ex, 64, seed=3, epoch=2)


def test_shared_subword_vocabulary_round_trip(tmp_path):
    text = ParallelText(
        ["ein kleiner hund läuft im schnee"] * 30 + ["zwei männer spielen fußball"] * 30,
        ["a small dog runs in the snow"] * 30 + ["two men play soccer"] * 30,
        "mem",
    )
    tok = TokenizerConfig(type="bpe", vocab_size=60)
    pipe = word_pipeline(text, src_tokenizer=tok, tgt_tokenizer=tok, shared_vocab=True)
    assert pipe.src_vocab is pipe.tgt_vocab
    pipe.save(tmp_path)
    loaded = Pipeline.load(tmp_path)
    ids = loaded.tgt_ids("two dogs play in the snow")
    assert loaded.detokenize(ids) == "two dogs play in the snow"
    assert loaded.src_ids("zwei männer") == pipe.src_ids("zwei männer")


def test_group_references_pools_identical_sources():
    sources, refs = group_references(["read", "lead", "read"], [["R IY1 D"], ["L IY1 D"], ["R EH1 D"]])
    assert sources == ["read", "lead"]
    assert refs == [["R IY1 D", "R EH1 D"], ["L IY1 D"]]
