"""Synthetic tasks that need alignment: copy or reverse a sequence of symbols.

Classic for learning and testing seq2seq models: the answer is known exactly, sequences can
be made as long as wanted, and a fixed-size context vector visibly fails on long ones.
"""

from __future__ import annotations

import random
from pathlib import Path

from .tensorfiles import write_files

SYMBOLS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"{c}{c}" for c in "abcdefghijklmnopqrstuvwxyz"]


def make_pairs(
    task: str, n: int, seed: int, min_len: int, max_len: int, symbols: int = 10
) -> list[tuple[str, str]]:
    """`n` (source, target) pairs of `min_len`..`max_len` space-separated symbols drawn
    from `symbols` distinct ones; the target is the source copied or reversed."""
    if task not in ("copy", "reverse"):
        raise ValueError(f"unknown synthetic task {task!r}; allowed: copy, reverse")
    if not 1 <= symbols <= len(SYMBOLS):
        raise ValueError(f"symbols must be in 1..{len(SYMBOLS)}")
    if not 1 <= min_len <= max_len:
        raise ValueError("need 1 <= min_len <= max_len")
    rng = random.Random(seed)
    alphabet = SYMBOLS[:symbols]
    pairs = []
    for _ in range(n):
        x = [rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len))]
        y = x[::-1] if task == "reverse" else x
        pairs.append((" ".join(x), " ".join(y)))
    return pairs


def write_task(
    out_dir: str | Path, task: str, min_len: int, max_len: int, symbols: int = 10,
    sizes: tuple[int, int, int] = (20000, 500, 1000), seed: int = 1, overwrite: bool = False,
) -> dict[str, Path]:  # fmt: skip
    """Write train/dev/test TSV files (different seeds per split) and return their paths; files
    with other data are replaced only with `overwrite` (`tensorfiles.write_files`)."""
    out_dir = Path(out_dir)
    paths, texts = {}, {}
    for offset, (split, n) in enumerate(zip(("train", "dev", "test"), sizes)):
        pairs = make_pairs(task, n, seed + offset, min_len, max_len, symbols)
        paths[split] = out_dir / f"{split}.tsv"
        texts[paths[split]] = "".join(f"{s}\t{t}\n" for s, t in pairs)
    write_files(texts, overwrite)
    return paths
