"""Reading parallel text, turning it into ids, and batching it under a token budget.

The flow is: `read_parallel` (files -> lines, with clear errors) -> `Pipeline.build`
(tokenizers and vocabularies from the training lines) -> `encode_pairs` (lines -> ids,
empty and over-long pairs filtered or truncated and counted) -> `token_batches` (length
buckets under a token budget) -> `collate` (padded, batch-first tensors).
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from .config import CorpusConfig, DataConfig, TokenizerConfig
from .vocab import (
    EOS_ID,
    PAD_ID,
    SOS_ID,
    VOCAB_FILE,
    Tokenizer,
    Vocabulary,
    build_tokenizer,
    load_tokenizer,
)

log = logging.getLogger("aligna")


class DataError(ValueError):
    """Bad input data; the message names the file and, where it applies, the line."""


# --------------------------------------------------------------------------- reading


def read_lines(path: str | Path) -> list[str]:
    """All lines of a UTF-8 text file (plain or gzip: told by its first bytes, whatever its
    name), without line endings."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a directory, not a file")
    if not path.exists():  # a pipe (/dev/stdin, <(...)) is read as a file
        raise DataError(f"file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # gzip's magic number
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    return decode_lines(raw, str(path))


def check_readable(corpus: CorpusConfig, split: str) -> None:
    """Each file of `corpus` exists and opens (it is read in full later): a typo stops a run
    before anything is changed, such as an old run that --overwrite clears."""
    for path in map(Path, corpus.paths):
        if path.is_dir():
            raise DataError(f"{split}: {path}: a directory, not a file")
        try:
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            raise DataError(f"{split}: file not found: {path}") from None
        except OSError as e:
            raise DataError(f"{split}: {path}: cannot read: {e.strerror or e}") from None


def decode_lines(raw: bytes, name: str) -> list[str]:
    """UTF-8 bytes -> lines without endings (\n, \r\n, or \r in a file without \n); `name` (a
    file, stdin) is named in errors."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        ending = b"\n" if b"\n" in raw or b"\r" not in raw else b"\r"  # as the lines are split below
        line = raw.count(ending, 0, e.start) + 1
        bad = raw[e.start : e.end].hex(" ")
        raise DataError(f"{name}:{line}: invalid UTF-8 (bytes {bad})") from None
    text = text.removeprefix("\ufeff")
    ending = "\n" if "\n" in text or "\r" not in text else "\r"  # \r alone: classic Mac OS line ends
    lines = text.split(ending)
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


@dataclass
class ParallelText:
    """Line-aligned source and target sentences, as read."""

    src: list[str]
    tgt: list[str]
    origin: str  # the file(s) it came from, for messages


def read_parallel(corpus: CorpusConfig, split: str = "data") -> ParallelText:
    """Read one split; `split` names it in errors (train, dev, test)."""
    if corpus.tsv is not None:
        src, tgt = [], []
        for number, line in enumerate(read_lines(corpus.tsv), start=1):
            fields = line.split("\t")
            if len(fields) != 2:
                raise DataError(
                    f"{corpus.tsv}:{number}: expected source<TAB>target, found {len(fields)} "
                    "tab-separated field(s)"
                )
            src.append(fields[0])
            tgt.append(fields[1])
        origin = corpus.tsv
    else:
        src, tgt = read_lines(corpus.src), read_lines(corpus.tgt)  # type: ignore[arg-type]
        if len(src) != len(tgt):
            raise DataError(
                f"{split}: source and target differ in length: {corpus.src} has {len(src)} "
                f"lines, {corpus.tgt} has {len(tgt)} lines"
            )
        origin = f"{corpus.src} / {corpus.tgt}"
    if not src:
        raise DataError(f"{split} corpus is empty: {origin}")
    return ParallelText(src, tgt, origin)


def group_references(
    sources: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[list[str], list[list[str]]]:
    """Pool the references of identical sources: unique sources in first-seen order."""
    pooled: dict[str, list[str]] = {}
    for s, refs in zip(sources, references):
        pooled.setdefault(s, []).extend(refs)
    return list(pooled), list(pooled.values())


def reference_sets(text: ParallelText, grouped: bool) -> tuple[list[str], list[list[str]]]:
    """Sources and their reference lists: one reference per line, or pooled by source."""
    references = [[t] for t in text.tgt]
    return group_references(text.src, references) if grouped else (text.src, references)


# --------------------------------------------------------------------------- text <-> ids


def _tokenizer(key: str, config: TokenizerConfig, lines: list[str]) -> Tokenizer:
    """`build_tokenizer`, its error naming the config key of the side that failed."""
    try:
        return build_tokenizer(config, lines)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


@dataclass
class Pipeline:
    """Tokenizers and vocabularies of both sides: raw text in, ids out, and back."""

    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    src_vocab: Vocabulary
    tgt_vocab: Vocabulary

    @classmethod
    def build(cls, config: DataConfig, train: ParallelText) -> Pipeline:
        src_cfg, tgt_cfg = config.src_tokenizer, config.tgt_tokenizer
        joint = config.shared_vocab and src_cfg == tgt_cfg and src_cfg.type in ("bpe", "unigram")
        if joint:  # one subword model trained on both sides
            src_tok = tgt_tok = _tokenizer("data.src_tokenizer (shared)", src_cfg, train.src + train.tgt)
        else:
            src_tok = _tokenizer("data.src_tokenizer", src_cfg, train.src)
            tgt_tok = _tokenizer("data.tgt_tokenizer", tgt_cfg, train.tgt)
        src_counts = Counter(t for line in train.src for t in src_tok.encode(line))
        tgt_counts = Counter(t for line in train.tgt for t in tgt_tok.encode(line))
        if config.shared_vocab:
            vocab = _vocab(src_counts + tgt_counts, src_cfg)
            return cls(src_tok, tgt_tok, vocab, vocab)
        return cls(src_tok, tgt_tok, _vocab(src_counts, src_cfg), _vocab(tgt_counts, tgt_cfg))

    def src_ids(self, text: str) -> list[int]:
        return self.src_vocab.encode(self.src_tokenizer.encode(text))

    def tgt_ids(self, text: str) -> list[int]:
        return self.tgt_vocab.encode(self.tgt_tokenizer.encode(text))

    def src_tokens(self, text: str) -> list[str]:
        """The source tokens the model sees (for attention-map labels)."""
        return self.src_tokenizer.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Target ids (up to `<eos>`) to text."""
        return self.tgt_tokenizer.decode(self.tgt_vocab.decode(ids))

    def save(self, directory: Path) -> None:
        self.src_tokenizer.save(directory, "src")
        self.tgt_tokenizer.save(directory, "tgt")
        self.src_vocab.save(directory / VOCAB_FILE.format(side="src"))
        self.tgt_vocab.save(directory / VOCAB_FILE.format(side="tgt"))

    @classmethod
    def load(cls, directory: Path) -> Pipeline:
        """The pipeline saved in `directory`; a missing or damaged file is a DataError naming it."""

        def side(name: str) -> tuple[Tokenizer, Vocabulary]:
            path = directory / VOCAB_FILE.format(side=name)
            try:
                return load_tokenizer(directory, name), Vocabulary.load(path)
            except FileNotFoundError as e:
                raise DataError(f"{e.filename}: missing (is {directory} a complete model directory?)") from None
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
                raise DataError(f"{directory}: cannot load the {name} tokenizer or vocabulary: {e!s:.200}") from None

        (src_tok, src_vocab), (tgt_tok, tgt_vocab) = side("src"), side("tgt")
        return cls(src_tok, tgt_tok, src_vocab, tgt_vocab)


def _vocab(counts: Counter[str], config: TokenizerConfig) -> Vocabulary:
    return Vocabulary.build(counts, config.min_freq, config.max_size)


@dataclass
class FilterReport:
    """What happened to the pairs of one split on their way to ids."""

    split: str
    read: int
    empty: int = 0  # dropped: a side has no tokens
    too_long: int = 0  # dropped: a side over max_len (too_long: filter)
    truncated: int = 0  # cut to max_len (too_long: truncate)
    max_len: int = 0

    @property
    def kept(self) -> int:
        return self.read - self.empty - self.too_long

    def __str__(self) -> str:
        parts = [f"{self.split}: {self.read} pairs read, {self.kept} kept"]
        if self.empty:
            parts.append(f"{self.empty} with an empty side filtered")
        if self.too_long:
            parts.append(f"{self.too_long} over max_len={self.max_len} tokens filtered")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_len={self.max_len} tokens")
        return "; ".join(parts)


@dataclass
class Examples:
    """Id sequences of kept pairs. `tgt` is framed: `<sos> y1..yn <eos>`."""

    src: list[Tensor]  # each (S,), no specials
    tgt: list[Tensor]  # each (T + 2,)
    line: list[int]  # 0-based line of each pair in its split
    report: FilterReport = field(default_factory=lambda: FilterReport("", 0))

    def __len__(self) -> int:
        return len(self.src)

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Source lengths and target lengths + 1 (the tokens of tgt_in and tgt_out), (N,) int64."""
        src = np.fromiter((len(s) for s in self.src), np.int64, len(self.src))
        return src, np.fromiter((len(t) - 1 for t in self.tgt), np.int64, len(self.tgt))


def require_a_scorable_pair(src: Sequence[str], tgt: Sequence[str], what: str) -> None:
    """Loss and perplexity need a pair with text on both sides: a set without one is refused
    before any work, not after it has been decoded (or at a run's first validation)."""
    if not any(s.strip() and t.strip() for s, t in zip(src, tgt)):
        raise DataError(f"{what}: no pair has text on both sides ({len(src)} read), so no loss can be computed")


def pair_ids(
    pipeline: Pipeline, src: str, tgt: str, max_len: int, too_long: str, report: FilterReport
) -> tuple[list[int], list[int]] | None:
    """The ids of one pair (targets without specials), or None when it is dropped; what
    happened to it is counted in `report`."""
    s_ids, t_ids = pipeline.src_ids(src), pipeline.tgt_ids(tgt)
    if not s_ids or not t_ids:
        report.empty += 1
        return None
    if len(s_ids) > max_len or len(t_ids) > max_len:
        if too_long == "filter":
            report.too_long += 1
            return None
        report.truncated += 1
        s_ids, t_ids = s_ids[:max_len], t_ids[:max_len]
    return s_ids, t_ids


def encode_pairs(pipeline: Pipeline, text: ParallelText, max_len: int, too_long: str, split: str) -> Examples:
    """Ids of every usable pair; dropped and truncated pairs are counted in `report`."""
    report = FilterReport(split, len(text.src), max_len=max_len)
    src_out, tgt_out, lines = [], [], []
    for i, (s, t) in enumerate(zip(text.src, text.tgt)):
        ids = pair_ids(pipeline, s, t, max_len, too_long, report)
        if ids is None:
            continue
        s_ids, t_ids = ids
        src_out.append(torch.tensor(s_ids, dtype=torch.long))
        tgt_out.append(torch.tensor([SOS_ID, *t_ids, EOS_ID], dtype=torch.long))
        lines.append(i)
    if not src_out:
        raise DataError(f"{split}: no usable pairs left in {text.origin} ({report})")
    return Examples(src_out, tgt_out, lines, report)


# --------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """Padded, batch-first tensors. `tgt_in` is `<sos> y1..yn`, `tgt_out` is `y1..yn <eos>`."""

    src: Tensor  # (B, S)
    src_lengths: Tensor  # (B,)
    tgt_in: Tensor  # (B, T)
    tgt_out: Tensor  # (B, T)
    index: Tensor  # (B,) position of each pair in its `Examples`

    @property
    def n_tokens(self) -> int:
        return int((self.tgt_out != PAD_ID).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self.__dict__.values()))


class ExamplesLike(Protocol):
    """`Examples` or a prepared corpus's `MappedExamples` (corpus.py)."""

    @property
    def src(self) -> Sequence[Tensor]: ...  # each (S,)
    @property
    def tgt(self) -> Sequence[Tensor]: ...  # each (T + 2,), <sos> y1..yn <eos>
    def __len__(self) -> int: ...
    def lengths(self) -> tuple[np.ndarray, np.ndarray]: ...


def collate(examples: ExamplesLike, index: Sequence[int]) -> Batch:
    src = [examples.src[i] for i in index]
    tgt = torch.nn.utils.rnn.pad_sequence(
        [examples.tgt[i] for i in index], batch_first=True, padding_value=PAD_ID
    )  # (B, T + 1)
    return Batch(
        src=pad_batch(src),
        src_lengths=torch.tensor([len(s) for s in src]),
        tgt_in=tgt[:, :-1].masked_fill(tgt[:, :-1] == EOS_ID, PAD_ID),
        tgt_out=tgt[:, 1:],
        index=torch.tensor(list(index)),
    )


def pad_batch(sequences: Sequence[Tensor]) -> Tensor:
    """(B, S_max) with `<pad>` after each sequence."""
    return torch.nn.utils.rnn.pad_sequence(list(sequences), batch_first=True, padding_value=PAD_ID)


class Batches(Sequence[list[int]]):
    """Batches of example indices, held as two flat arrays (no Python object per example):
    batch k is ``order[bounds[j]:bounds[j + 1]]`` with j = ``shuffle[k]``; `batches[k]` is
    that batch as a list of ints."""

    def __init__(self, order: np.ndarray, bounds: np.ndarray, shuffle: np.ndarray | None = None) -> None:
        self.order, self.bounds = order, bounds  # (N,), (n_batches + 1,) int64
        self.shuffle = np.arange(len(bounds) - 1) if shuffle is None else shuffle  # (n_batches,)

    def __len__(self) -> int:
        return len(self.shuffle)

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        j = self.shuffle[k]
        return self.order[self.bounds[j] : self.bounds[j + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[k] for k in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Batches):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"Batches({len(self)} batches of {len(self.order)} examples)"


def token_batches(
    src_lengths: Sequence[int] | np.ndarray,
    tgt_lengths: Sequence[int] | np.ndarray,
    batch_tokens: int,
    generator: torch.Generator | None = None,
) -> Batches:
    """Group example indices into batches of similar length.

    A batch holds as many examples as fit `batch_tokens` >= size x longest sequence (on
    each side, so padding counts against the budget); an example longer than the budget
    gets a batch of its own. With a `generator`, ties in length are broken at random and
    the batch order is shuffled; without one, the order is deterministic (for decoding).
    Vectorized over numpy arrays: the cost is a sort plus a few array operations per batch.
    """
    src = np.asarray(src_lengths, dtype=np.int64).reshape(-1)  # (N,)
    tgt = np.asarray(tgt_lengths, dtype=np.int64).reshape(-1)  # (N,)
    n = len(src)
    order = torch.randperm(n, generator=generator).numpy() if generator else np.arange(n, dtype=np.int64)
    if n:  # a stable sort by (source, target) length: ties keep the random order
        key = src[order] * (int(tgt.max()) + 1) + tgt[order]
        order = order[np.argsort(key, kind="stable")]
    longest = np.maximum(src, tgt)[order]  # (N,) in batch order
    bounds = [0]
    start = 0
    while start < n:
        # The batch's longest is at least its first example's, so at most budget // that
        # many fit: look at one more than that to find where to cut.
        first = int(longest[start])
        window = longest[start : start + (batch_tokens // first + 1 if first else n)]
        cost = np.arange(1, len(window) + 1) * np.maximum.accumulate(window)  # size x longest so far
        over = np.flatnonzero(cost[1:] > batch_tokens)  # the first example always fits
        start += int(over[0]) + 1 if len(over) else len(window)
        bounds.append(start)
    shuffle = torch.randperm(len(bounds) - 1, generator=generator).numpy() if generator is not None else None
    return Batches(order, np.array(bounds, dtype=np.int64), shuffle)


def epoch_batches(examples: ExamplesLike, batch_tokens: int, seed: int, epoch: int) -> Batches:
    """The batches of one training epoch; a function of (seed, epoch) only, so a resumed
    run sees exactly the batches it would have seen."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return token_batches(*examples.lengths(), batch_tokens, generator)


def write_report(reports: Sequence[FilterReport], path: Path) -> None:
    path.write_text(json.dumps([r.__dict__ for r in reports], indent=2) + "\n", "utf-8")
