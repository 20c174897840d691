from collections import Counter

import pytest

from aligna.config import TokenizerConfig
from aligna.vocab import (
    SPECIALS,
    UNK_ID,
    CharTokenizer,
    SentencePieceTokenizer,
    Vocabulary,
    WordTokenizer,
    load_tokenizer,
)


def test_vocabulary_specials_min_freq_max_size_and_ties():
    counts = Counter({"b": 3, "a": 3, "c": 2, "d": 1})
    v = Vocabulary.build(counts, min_freq=2)
    assert v.itos == [*SPECIALS, "a", "b", "c"]  # frequency first, then alphabetical
    assert Vocabulary.build(counts, max_size=1).itos == [*SPECIALS, "a"]
    assert v.encode(["a", "zzz"]) == [4, UNK_ID]
    assert v.decode([2, 4, 0, 5, 3, 6]) == ["a", "b"]  # <sos>/<pad> skipped, stops at <eos>


def test_vocabulary_save_load(tmp_path):
    v = Vocabulary.build(Counter(["ä", "ü", "ü", "\u2028"]))
    v.save(tmp_path / "v.txt")
    assert Vocabulary.load(tmp_path / "v.txt").itos == v.itos


def test_vocabulary_rejects_bad_lists(tmp_path):
    with pytest.raises(ValueError):
        Vocabulary(["a", "b"])
    with pytest.raises(ValueError, match="repeat"):
        Vocabulary([*SPECIALS, "a", "a"])
    with pytest.raises(ValueError, match="line break"):
        Vocabulary([*SPECIALS, "a\nb"])  # it would reload as two tokens
    (tmp_path / "v.txt").write_text("\n".join([*SPECIALS, "a", "b"]))  # no final newline: b is kept
    assert Vocabulary.load(tmp_path / "v.txt").itos == [*SPECIALS, "a", "b"]


def test_text_spelled_like_a_special_is_an_ordinary_token(tmp_path):
    """The word "<eos>" in a sentence got <eos>'s id (ending the sentence in training), "<pad>"
    got padding's (masked out of attention and the loss): text now never maps to ids 0-3."""
    counts = Counter("a <eos> b <pad> c <unk> <sos> a".split())
    v = Vocabulary.build(counts)
    ids = v.encode("a <eos> b <pad> <sos> <unk>".split())
    assert all(i >= len(SPECIALS) for i in ids)
    assert v.decode(ids) == "a <eos> b <pad> <sos> <unk>".split()  # decoded as written
    assert Vocabulary.build(Counter(["a"])).encode(["<pad>", "<eos>"]) == [UNK_ID, UNK_ID]  # unseen: unknown
    v.save(tmp_path / "v.txt")
    assert Vocabulary.load(tmp_path / "v.txt").encode(["<eos>"]) == v.encode(["<eos>"])


def test_word_and_char_tokenizers(tmp_path):
    w = WordTokenizer(lowercase=True)
    assert w.encode("Ein  Hund\tläuft") == ["ein", "hund", "läuft"]
    assert w.decode(["a", "dog"]) == "a dog"
    c = CharTokenizer()
    assert c.encode("ab  c") == ["a", "b", "\u2581", "c"]
    assert c.decode(c.encode("ab  c")) == "ab c"
    c.save(tmp_path, "src")
    assert isinstance(load_tokenizer(tmp_path, "src"), CharTokenizer)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_trains_saves_and_detokenizes(tmp_path, kind):
    lines = ["A man in an orange hat, staring at something."] * 20 + ["Zwei Hunde spielen im Schnee."] * 20
    tok = SentencePieceTokenizer.train(lines, TokenizerConfig(type=kind, vocab_size=30))
    tok.save(tmp_path, "tgt")
    again = load_tokenizer(tmp_path, "tgt")
    pieces = again.encode("A man in the snow, staring.")
    assert again.decode(pieces) == "A man in the snow, staring."


def test_sentencepiece_learns_from_lines_over_its_default_length_limit():
    """sentencepiece skips lines over 4192 bytes unless told: a corpus of long lines (a
    paragraph per line) would train on nothing and fail with a misleading hint."""
    lines = ["a man in an orange hat . " * 200] * 30  # 5,000 bytes each
    tok = SentencePieceTokenizer.train(lines, TokenizerConfig(type="bpe", vocab_size=30))
    assert tok.decode(tok.encode("an orange hat")) == "an orange hat"


def test_subword_settings_on_a_word_or_char_tokenizer_are_refused_for_a_new_vocabulary(tmp_path):
    """Refused when a run would build its vocabulary with them, before anything is written;
    a saved config that holds one (a run from before the check) still loads."""
    from aligna.config import ConfigError, config_from_dict, load_config, save_config
    from aligna.training import Trainer

    for key, value in (("vocab_size", 20), ("character_coverage", 0.9)):
        raw = {"model_dir": str(tmp_path / "run"), "data": {"train": {"tsv": "t.tsv"},
               "tgt_tokenizer": {"type": "char", key: value}}}  # fmt: skip
        config = config_from_dict(raw)
        with pytest.raises(ConfigError, match=rf"^data\.tgt_tokenizer\.{key}: applies to the subword tokenizers"):
            Trainer(config, progress=False)
        assert not (tmp_path / "run").exists()
        save_config(config, tmp_path / "saved.yaml")
        assert load_config(tmp_path / "saved.yaml").data.tgt_tokenizer.type == "char"


def test_sentencepiece_too_large_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size=5000"):
        SentencePieceTokenizer.train(["tiny corpus"] * 3, TokenizerConfig(type="bpe", vocab_size=5000))
    from aligna.config import CorpusConfig, DataConfig
    from aligna.data import ParallelText, Pipeline

    data = DataConfig(train=CorpusConfig(tsv="t.tsv"), tgt_tokenizer=TokenizerConfig(type="bpe", vocab_size=5000))
    with pytest.raises(ValueError, match=r"^data\.tgt_tokenizer: sentencepiece could not train"):  # which side
        Pipeline.build(data, ParallelText(["a b c"] * 3, ["tiny corpus"] * 3, "t.tsv"))
