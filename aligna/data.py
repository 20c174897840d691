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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    """All lines of a UTF-8 text file (plain or .gz), without line endings."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    return decode_lines(raw, str(path))


def decode_lines(raw: bytes, name: str) -> list[str]:
    """UTF-8 bytes -> lines without endings; `name` (a file, stdin) is named in errors."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        bad = raw[e.start : e.end].hex(" ")
        raise DataError(f"{name}:{line}: invalid UTF-8 (bytes {bad})") from None
    text = text.removeprefix("\ufeff")
    lines = text.split("\n")
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
            src_tok = tgt_tok = build_tokenizer(src_cfg, train.src + train.tgt)
        else:
            src_tok = build_tokenizer(src_cfg, train.src)
            tgt_tok = build_tokenizer(tgt_cfg, train.tgt)
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


def encode_pairs(pipeline: Pipeline, text: ParallelText, max_len: int, too_long: str, split: str) -> Examples:
    """Ids of every usable pair; dropped and truncated pairs are counted in `report`."""
    report = FilterReport(split, len(text.src), max_len=max_len)
    src_out, tgt_out, lines = [], [], []
    for i, (s, t) in enumerate(zip(text.src, text.tgt)):
        s_ids, t_ids = pipeline.src_ids(s), pipeline.tgt_ids(t)
        if not s_ids or not t_ids:
            report.empty += 1
            continue
        if len(s_ids) > max_len or len(t_ids) > max_len:
            if too_long == "filter":
                report.too_long += 1
                continue
            report.truncated += 1
            s_ids, t_ids = s_ids[:max_len], t_ids[:max_len]
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


def collate(examples: Examples, index: Sequence[int]) -> Batch:
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


def token_batches(
    src_lengths: Sequence[int],
    tgt_lengths: Sequence[int],
    batch_tokens: int,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Group example indices into batches of similar length.

    A batch holds as many examples as fit `batch_tokens` >= size x longest sequence (on
    each side, so padding counts against the budget); an example longer than the budget
    gets a batch of its own. With a `generator`, ties in length are broken at random and
    the batch order is shuffled; without one, the order is deterministic (for decoding).
    """
    n = len(src_lengths)
    order = torch.randperm(n, generator=generator).tolist() if generator else list(range(n))
    order.sort(key=lambda i: (src_lengths[i], tgt_lengths[i]))  # stable: ties stay random
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        length = max(src_lengths[i], tgt_lengths[i])
        if current and (len(current) + 1) * max(longest, length) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
    return batches


def epoch_batches(examples: Examples, batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one training epoch; a function of (seed, epoch) only, so a resumed
    run sees exactly the batches it would have seen."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return token_batches(
        [len(s) for s in examples.src], [len(t) - 1 for t in examples.tgt], batch_tokens, generator
    )


def write_report(reports: Sequence[FilterReport], path: Path) -> None:
    path.write_text(json.dumps([r.__dict__ for r in reports], indent=2) + "\n", "utf-8")
