"""The prepared training corpus: encoded pairs in flat binary files, memory-mapped.

Like fairseq's indexed dataset, the token ids of all kept pairs lie end to end in one file
per side and int64 offsets in another, so training holds no Python object per pair and
every process that reads the corpus (the ranks of a distributed run, several runs) shares
the same pages of the operating system's cache, read-only, without a copy.

A corpus directory (MODEL_DIR/corpus/, names in modeldir.py)::

    manifest.json        format version, counts, dtype, the data-config fingerprint, and
                         the size and SHA-256 of every file below
    src.ids  tgt.ids     token ids, end to end: uint16 when both vocabularies fit, else
                         uint32; targets without <sos>/<eos>
    src.offsets  tgt.offsets   int64, (N + 1,): pair i is ids[offsets[i]:offsets[i + 1]]
    lines                int64, (N,): the 0-based line of each kept pair in data.train
    src_vocab.txt ...    the tokenizers and vocabularies (data.Pipeline.save)
    data_report.json     what was filtered (data.FilterReport)

`prepare` encodes with one worker process per core, over chunks of lines, and writes the
chunks in order, so the files are byte-identical to a one-process encoding. A corpus is
reused while the data settings it depends on (training files, tokenizers, vocabulary and
length settings) and the training files' content are unchanged: a file of the same size
and modification time is taken as unchanged, one rewritten since is compared by SHA-256.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import Config, DataConfig, config_to_dict, load_config
from .data import (
    EOS_ID,
    SOS_ID,
    DataError,
    FilterReport,
    ParallelText,
    Pipeline,
    pair_ids,
    read_parallel,
    write_report,
)
from .modeldir import (
    CONFIG,
    CORPUS,
    CORPUS_IDS,
    CORPUS_LINES,
    CORPUS_LOCK,
    CORPUS_OFFSETS,
    DATA_REPORT,
    MANIFEST,
    TMP,
    ModelDir,
)
from .tensorfiles import atomic_write_text, file_sha256, fsync_dir

log = logging.getLogger("aligna")

FORMAT, VERSION = "aligna-corpus", 1
CHUNK_LINES = 20_000  # lines per encoding task
UINT16_VOCAB = 2**16  # vocabularies up to this size store ids as uint16


class CorpusError(DataError):
    """A prepared corpus that cannot be used; the message names the file and says why."""


class StaleCorpus(CorpusError):
    """A whole, readable corpus of other data settings or of another format version."""


# --------------------------------------------------------------------------- reading


class _Side:
    """One side's sequences, read from the memory map on demand: `side[i]` -> (L,) int64."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, framed: bool) -> None:
        self.ids, self.offsets, self.framed = ids, offsets, framed

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair {i} of {len(self)}")
        i %= len(self)
        ids = self.ids[self.offsets[i] : self.offsets[i + 1]].astype(np.int64)  # (L,), a copy
        if self.framed:  # <sos> y1..yn <eos>
            ids = np.concatenate(([SOS_ID], ids, [EOS_ID]))
        return torch.from_numpy(ids)

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> np.ndarray:
        """(N,) int64 lengths without specials."""
        return np.diff(self.offsets)


class MappedExamples:
    """The `data.Examples` of a prepared corpus: `src[i]` (S,) and `tgt[i]` (T + 2,), framed
    `<sos> y1..yn <eos>`, are the tensors `encode_pairs` gives, read from memory maps."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        dtype = np.dtype(manifest["dtype"])

        def mapped(name: str, dtype: np.dtype) -> np.ndarray:
            if (directory / name).stat().st_size == 0:  # np.memmap cannot map an empty file
                return np.zeros(0, dtype)
            return np.memmap(directory / name, dtype=dtype, mode="r")

        self.src = _Side(mapped(CORPUS_IDS.format(side="src"), dtype),
                         mapped(CORPUS_OFFSETS.format(side="src"), np.dtype(np.int64)), framed=False)  # fmt: skip
        self.tgt = _Side(mapped(CORPUS_IDS.format(side="tgt"), dtype),
                         mapped(CORPUS_OFFSETS.format(side="tgt"), np.dtype(np.int64)), framed=True)  # fmt: skip
        self.line = mapped(CORPUS_LINES, np.dtype(np.int64))  # (N,)
        self.report = FilterReport(**manifest["report"])

    def __len__(self) -> int:
        return len(self.src)

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Source lengths and target lengths + 1 (the tokens of tgt_in and tgt_out), (N,) int64."""
        return self.src.lengths(), self.tgt.lengths() + 1


@dataclass
class PreparedCorpus:
    directory: Path
    pipeline: Pipeline
    examples: MappedExamples
    manifest: dict[str, Any]


def fingerprint(data: DataConfig) -> dict[str, Any]:
    """The data settings the encoded training pairs depend on, and the training files."""
    settings = config_to_dict(data)
    for unused in ("dev", "test", "src_lang", "tgt_lang", "group_references"):
        settings.pop(unused, None)
    return {"settings": settings, "files": [str(Path(p).resolve()) for p in data.train.paths]}


def source_files(data: DataConfig, digest: bool = True) -> dict[str, dict[str, Any]]:
    """Size, modification time and (with `digest`) SHA-256 of each training file. A pipe
    (`<(...)`, /dev/stdin) is not read here, which would use it up: its entry has no digest
    (None), and a corpus made from it is never taken as current."""
    files = {}
    for path in data.train.paths:
        try:
            stat = Path(path).stat()
            files[str(Path(path).resolve())] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            if digest:
                regular = Path(path).is_file()
                files[str(Path(path).resolve())]["sha256"] = file_sha256(Path(path)) if regular else None
        except FileNotFoundError:
            raise DataError(f"file not found: {path}") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    return files


def _changed_source(manifest: dict[str, Any], data: DataConfig) -> str | None:
    """The first training file whose content differs from the one prepared (None: none).
    A file of the same size and time is taken as unchanged; one rewritten since is hashed."""
    saved = manifest.get("sources") or {}
    for path, now in source_files(data, digest=False).items():
        then = saved.get(path)
        if then is None or then.get("sha256") is None or not Path(path).is_file() or then["bytes"] != now["bytes"]:
            return path
        if then["mtime_ns"] != now["mtime_ns"] and then["sha256"] != file_sha256(Path(path)):
            return path
    return None


def open_corpus(directory: str | Path, data: DataConfig | None = None, verify: bool = True) -> PreparedCorpus:
    """The corpus in `directory`, checked against its manifest (sizes always, checksums when
    `verify`) and, given `data`, against that data config: a CorpusError names what is wrong."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text("utf-8"))
    except FileNotFoundError:
        raise CorpusError(f"{manifest_path}: missing (no prepared corpus; run `aligna prepare CONFIG`)") from None
    except (OSError, ValueError) as e:
        raise CorpusError(f"{manifest_path}: unreadable ({e!s:.200})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusError(f"{manifest_path}: not an aligna corpus manifest")
    if manifest.get("version") != VERSION:
        raise StaleCorpus(
            f"{manifest_path}: corpus format version {manifest.get('version')}, this aligna reads version "
            f"{VERSION}; prepare it again"
        )
    _check_manifest(manifest, manifest_path)
    if data is not None and manifest.get("fingerprint") != fingerprint(data):
        raise StaleCorpus(f"{directory}: prepared from other data or data settings than the config's")
    changed = _changed_source(manifest, data) if data is not None else None
    if changed:
        raise StaleCorpus(f"{directory}: {changed} has changed since the corpus was prepared")
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CorpusError(f"{path}: missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CorpusError(f"{path}: {size} bytes, the manifest says {expected['bytes']} (truncated?)")
        if verify and file_sha256(path) != expected["sha256"]:
            raise CorpusError(f"{path}: checksum mismatch, the file was changed or damaged")
    pipeline = Pipeline.load(directory)
    sizes = {"src": len(pipeline.src_vocab), "tgt": len(pipeline.tgt_vocab)}
    if manifest["vocab"] != sizes:
        raise CorpusError(f"{directory}: vocabularies of {sizes} tokens, the manifest says {manifest['vocab']}")
    return PreparedCorpus(directory, pipeline, MappedExamples(directory, manifest), manifest)


def _check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Each entry open_corpus reads, of the type it reads (a CorpusError names the first that is
    missing or of another type): an edited or damaged manifest is never a traceback."""

    def entries(value: Any, **types: type | tuple[type, ...]) -> bool:  # {name: {key: value of its type}}
        return isinstance(value, dict) and all(
            isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in types.items()) for e in value.values()
        )

    report = manifest.get("report")
    checks = {
        "files": entries(manifest.get("files"), bytes=int, sha256=str),
        "sources": entries(manifest.get("sources", {}), bytes=int, mtime_ns=int, sha256=(str, type(None))),
        "vocab": isinstance(manifest.get("vocab"), dict),
        "dtype": manifest.get("dtype") in ("uint16", "uint32"),
        "report": isinstance(report, dict) and isinstance(report.get("split"), str) and "read" in report
        and report.keys() <= {f.name for f in dataclasses.fields(FilterReport)}
        and all(isinstance(v, int) for k, v in report.items() if k != "split"),
    }
    for key, ok in checks.items():
        if not ok:
            raise CorpusError(f"{path}: not a complete corpus manifest ({key!r} is missing or damaged)")


# --------------------------------------------------------------------------- writing

# What the encoder processes share: set in the parent before they fork, read in the child.
_JOB: tuple[Pipeline, ParallelText, int, str, np.dtype] | None = None


def _encode_chunk(bounds: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Lines [start, end) -> src ids, src lengths, tgt ids, tgt lengths, kept lines, and the
    counts (empty, too long, truncated), the same pairs and ids as `encode_pairs`."""
    assert _JOB is not None
    pipeline, text, max_len, too_long, dtype = _JOB
    start, end = bounds
    report = FilterReport("train", end - start, max_len=max_len)
    src: list[int] = []
    tgt: list[int] = []
    src_len, tgt_len, lines = [], [], []
    for i in range(start, end):
        ids = pair_ids(pipeline, text.src[i], text.tgt[i], max_len, too_long, report)
        if ids is None:
            continue
        src += ids[0]
        tgt += ids[1]
        src_len.append(len(ids[0]))
        tgt_len.append(len(ids[1]))
        lines.append(i)
    counts = np.array([report.empty, report.too_long, report.truncated], np.int64)
    return (np.array(src, dtype), np.array(src_len, np.int64), np.array(tgt, dtype),
            np.array(tgt_len, np.int64), np.array(lines, np.int64), counts)  # fmt: skip


def _chunks(pipeline: Pipeline, text: ParallelText, data: DataConfig, dtype: np.dtype,
            workers: int, chunk_lines: int) -> Iterator[tuple[np.ndarray, ...]]:  # fmt: skip
    """The encoded chunks, in order; forked workers when there are several."""
    global _JOB
    bounds = [(s, min(s + chunk_lines, len(text.src))) for s in range(0, len(text.src), chunk_lines)]
    _JOB = (pipeline, text, data.max_len, data.too_long, dtype)
    try:
        if workers <= 1 or len(bounds) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            yield from map(_encode_chunk, bounds)
            return
        with multiprocessing.get_context("fork").Pool(min(workers, len(bounds))) as pool:
            yield from pool.imap(_encode_chunk, bounds)
    finally:
        _JOB = None


def prepare(data: DataConfig, directory: Path, pipeline: Pipeline | None = None,
            workers: int | None = None, chunk_lines: int = CHUNK_LINES) -> PreparedCorpus:  # fmt: skip
    """Encode data.train into `directory` (replacing what is there) and open it.

    The pipeline is built from the training text as `Trainer` always did, unless one is given
    (a resumed run keeps its vocabulary). `workers` (default: the usable cores) encode
    chunks of `chunk_lines` lines each; the result does not depend on either.
    """
    if pipeline is None:
        data.check_new_vocabulary()
    sources = source_files(data)  # before reading: a file changed meanwhile is hashed again when used
    text = read_parallel(data.train, "train")
    log.info("preparing %s: %d pairs read from %s", directory, len(text.src), text.origin)
    if pipeline is None:
        pipeline = Pipeline.build(data, text)
    largest = max(len(pipeline.src_vocab), len(pipeline.tgt_vocab))
    dtype = np.dtype(np.uint16 if largest <= UINT16_VOCAB else np.uint32)
    workers = workers or _cores()
    log.info("encoding with %d process%s", workers, "es" if workers > 1 else "")
    tmp = directory.with_name(f"{TMP}{directory.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    report = FilterReport("train", len(text.src), max_len=data.max_len)
    files = {name: open(tmp / name, "wb") for name in _data_files()}
    src_offset = tgt_offset = pairs = 0
    try:
        files[CORPUS_OFFSETS.format(side="src")].write(np.zeros(1, np.int64).tobytes())
        files[CORPUS_OFFSETS.format(side="tgt")].write(np.zeros(1, np.int64).tobytes())
        for src, src_len, tgt, tgt_len, lines, counts in _chunks(pipeline, text, data, dtype, workers, chunk_lines):
            files[CORPUS_IDS.format(side="src")].write(src.tobytes())
            files[CORPUS_IDS.format(side="tgt")].write(tgt.tobytes())
            files[CORPUS_OFFSETS.format(side="src")].write((src_offset + np.cumsum(src_len)).tobytes())
            files[CORPUS_OFFSETS.format(side="tgt")].write((tgt_offset + np.cumsum(tgt_len)).tobytes())
            files[CORPUS_LINES].write(lines.tobytes())
            src_offset, tgt_offset, pairs = src_offset + len(src), tgt_offset + len(tgt), pairs + len(lines)
            report.empty, report.too_long, report.truncated = (
                int(a + b) for a, b in zip((report.empty, report.too_long, report.truncated), counts)
            )
    finally:
        for f in files.values():
            f.close()
    if not pairs:
        shutil.rmtree(tmp)
        raise DataError(f"train: no usable pairs left in {text.origin} ({report})")
    del text
    pipeline.save(tmp)
    write_report([report], tmp / DATA_REPORT)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "pairs": pairs,
        "tokens": {"src": src_offset, "tgt": tgt_offset},
        "dtype": dtype.name,
        "vocab": {"src": len(pipeline.src_vocab), "tgt": len(pipeline.tgt_vocab)},
        "report": asdict(report),
        "fingerprint": fingerprint(data),
        "sources": sources,
        "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
                  for name in [*_data_files(), *_pipeline_files(tmp)]},  # fmt: skip
    }
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    fsync_dir(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    log.info("prepared %s: %d pairs, %d + %d tokens, %s ids", directory, pairs, src_offset, tgt_offset, dtype.name)
    return open_corpus(directory, verify=False)


def prepared(data: DataConfig, directory: Path, pipeline: Pipeline | None = None,
             workers: int | None = None, repair: bool = False, resuming: bool = False) -> PreparedCorpus:  # fmt: skip
    """The corpus in `directory` if it was prepared from `data` (and, given `pipeline`, with
    its vocabularies); otherwise prepare it now. A damaged corpus is a CorpusError naming the
    file, or with `repair` (`aligna prepare`) is encoded again. Safe to call from several
    processes at once (the ranks of a distributed run): one prepares, the others wait for
    it and then map the same files. `resuming`: a corpus whose files have changed is said
    louder, as the resumed run then trains on other pairs than the run it continues."""
    with _exclusive(directory.parent / CORPUS_LOCK):  # one prepares; the others wait, then reuse it
        return _prepared(data, directory, pipeline, workers, repair, resuming)


def _prepared(data: DataConfig, directory: Path, pipeline: Pipeline | None, workers: int | None,
              repair: bool, resuming: bool) -> PreparedCorpus:  # fmt: skip
    if (directory / MANIFEST).is_file():
        try:
            corpus = open_corpus(directory, data)
        except StaleCorpus as e:
            if resuming:
                log.warning("%s; preparing it again: the resumed run goes on with other training pairs (in "
                            "another order) than the run it continues, so it is not an exact continuation", e)  # fmt: skip
            else:
                log.info("%s; preparing it again", e)
        except CorpusError as e:
            if not repair:
                raise CorpusError(f"{e}; run `aligna prepare CONFIG` to encode the corpus again") from None
            log.warning("%s; encoding the corpus again", e)
        else:
            if pipeline is None or _same_vocabularies(pipeline, corpus.pipeline):
                log.info("using the prepared corpus in %s (%d pairs)", directory, len(corpus.examples))
                return corpus
            log.info("%s: prepared with other vocabularies than the run's; preparing it again", directory)
    return prepare(data, directory, pipeline, workers)


def prepare_model_dir(config: Config, workers: int | None = None) -> PreparedCorpus:
    """`aligna prepare`: the corpus of `config.model_dir`, encoded unless it is up to date,
    under the directory's lock. A run in the directory on the same data keeps its
    vocabularies (so that `train --resume` can use the corpus)."""
    md = ModelDir(config.model_dir)
    lock = md.claim_data()
    try:
        pipeline = None
        if md.checkpoints() and load_config(md / CONFIG).data == config.data:
            pipeline = Pipeline.load(md.path)
        return prepared(config.data, md / CORPUS, pipeline, workers, repair=True)
    finally:
        lock.release()


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an flock on `path` (created if need be) for the block; a no-op where there is none."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _same_vocabularies(a: Pipeline, b: Pipeline) -> bool:
    return a.src_vocab.itos == b.src_vocab.itos and a.tgt_vocab.itos == b.tgt_vocab.itos


def _pipeline_files(directory: Path) -> list[str]:
    """The vocabularies and tokenizers `Pipeline.save` wrote: checked with the ids, which
    they must match (a changed vocabulary file would decode every id to another word)."""
    return sorted(p.name for p in directory.iterdir() if p.name not in (*_data_files(), DATA_REPORT, MANIFEST))


def _data_files() -> list[str]:
    sides = [name.format(side=side) for side in ("src", "tgt") for name in (CORPUS_IDS, CORPUS_OFFSETS)]
    return [*sides, CORPUS_LINES]
