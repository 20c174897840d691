"""The model directory: its layout, its lock, its checkpoints and its weights, in one place.

Layout (each name is spelled here and nowhere else; the pipeline names its own files)::

    .aligna                     marker: aligna made this directory; only such are ever cleared
    .lock                       locked (flock) by the training run that owns the directory
    config.yaml                 the validated config of the run
    src_vocab.txt ...           tokenizers and vocabularies (data.Pipeline.save)
    train.log  data_report.json  tensorboard/  test_scores.json
    corpus/                     the prepared training corpus (corpus.py): manifest.json,
        src.ids  tgt.ids        token ids end to end, src.offsets  tgt.offsets, lines,
        src_vocab.txt ...       and its pipeline and data_report.json; starting over keeps
                                it (it is checked against the data config whenever used)
    .corpus.lock                locked while the corpus is checked or prepared
    best.safetensors  best.json weights and scores of the best validation so far
    averaged.safetensors        `aligna average`
    latest.json                 {"checkpoint": "checkpoints/step-000123"}, for people and tools
    checkpoints/step-000123/
        model.safetensors       weights
        optimizer.safetensors   optimizer tensors, the CPU (and CUDA) RNG state
        trainer.json            step, epoch, data position, scheduler and history
        manifest.json           size and SHA-256 of each file above

Nothing is lost to a crash, a second run or a damaged file:
- Every file is written under a temporary name and renamed into place. A checkpoint
  directory appears (by one rename) only once its files are complete and on disk, so the
  newest `step-*` directory is always a whole checkpoint; `latest.json` follows it.
- A training run holds an exclusive lock on the directory for its whole life (the kernel
  drops it when the process dies, however it dies): a second run, `--resume` or
  `--overwrite` stops with a message naming the holder.
- Every safetensors file carries a digest of its tensors and every checkpoint a manifest;
  loading checks them. `--resume` skips a damaged checkpoint, says so, and continues from
  the newest intact one; loading for inference names the damaged file.
- `--overwrite` clears only a directory that carries aligna's marker, and never the current
  directory, a parent of it, home or `/`. Without it, a directory is cleared only when it
  holds no checkpoint and nothing but what a run writes before its first (EARLY_RUN_FILES).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .tensorfiles import (
    DamagedFileError,
    atomic_write_text,
    file_sha256,
    fsync_dir,
    load_tensors,
    load_weights,
    optimizer_from_flat,
    optimizer_to_flat,
    read_json,
    rng_state,
    save_tensors,
    save_weights,
    set_rng_state,
    unwrap,
)
from .vocab import PIPELINE_FILES

log = logging.getLogger("aligna")
T = TypeVar("T")

MARKER = ".aligna"
LOCK = ".lock"
CONFIG = "config.yaml"
TRAIN_LOG = "train.log"
DATA_REPORT = "data_report.json"
TENSORBOARD = "tensorboard"
TEST_SCORES = "test_scores.json"
BEST = "best.safetensors"
BEST_SCORES = "best.json"
AVERAGED = "averaged.safetensors"
LATEST = "latest.json"
CHECKPOINTS = "checkpoints"
CORPUS = "corpus"
CORPUS_LOCK = ".corpus.lock"  # held while the corpus is checked or prepared
# inside the corpus
CORPUS_IDS = "{side}.ids"
CORPUS_OFFSETS = "{side}.offsets"
CORPUS_LINES = "lines"
# inside a checkpoint (and MANIFEST inside the corpus)
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
TRAINER = "trainer.json"
MANIFEST = "manifest.json"
STEP = re.compile(r"step-(\d+)")
# what a run writes before its first checkpoint (besides the corpus): a directory holding only
# these and no checkpoint is a run killed early, which starts over
EARLY_RUN_FILES = (CONFIG, TRAIN_LOG, DATA_REPORT, TENSORBOARD, BEST, BEST_SCORES, LATEST, CHECKPOINTS, *PIPELINE_FILES)
TMP = ".tmp-"  # prefix of files and directories being written
DAMAGED = "damaged-"  # prefix of checkpoints set aside by --resume


class ModelDirError(ValueError):
    """A model directory that cannot be used as asked; the message names it and says why."""


class BusyError(ModelDirError):
    """Another training run holds the directory's lock."""


class ModelDir:
    """One model directory (see the module docstring for what it holds)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"

    # ------------------------------------------------------------------ training: claim

    def claim(self, resume: bool, overwrite: bool) -> tuple[TrainingLock, bool]:
        """Own the directory for a training run: create it or check it is aligna's, lock it,
        clear it when the run starts over. Returns (the lock, whether to resume).

        A directory left by a run that stopped before its first checkpoint starts over,
        with or without --resume; one that holds checkpoints needs --resume or --overwrite.
        """
        if resume and overwrite:
            raise ModelDirError("give --resume (continue the run) or --overwrite (start over), not both")
        if self.path.exists() and not self.path.is_dir():
            raise ModelDirError(f"model_dir {self.path} is a file, not a directory")
        legacy = self._legacy_run()
        if self.path.is_dir() and not (self / MARKER).is_file() and not legacy:
            foreign = self._entries()
            if foreign:
                raise ModelDirError(
                    f"model_dir {self.path} holds files that aligna did not write ({_listing(foreign)}); "
                    "train into a new or empty directory"
                )
        if overwrite and (legacy or (self / MARKER).is_file()):
            self._check_clearable()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ModelDirError(f"model_dir {self.path}: cannot create it: {e.strerror or e}") from None
        lock = TrainingLock(self)
        lock.acquire()
        try:
            resuming = self._start(resume, overwrite, legacy)
        except BaseException:
            lock.release()
            raise
        return lock, resuming

    def claim_data(self) -> TrainingLock:
        """Own the directory to prepare its corpus: create it or check it is aligna's, and
        lock it (no training run may use it meanwhile); nothing in it is cleared."""
        if self.path.exists() and not self.path.is_dir():
            raise ModelDirError(f"model_dir {self.path} is a file, not a directory")
        foreign = [] if (self / MARKER).is_file() or self._legacy_run() else self._entries()
        if foreign:
            raise ModelDirError(
                f"model_dir {self.path} holds files that aligna did not write ({_listing(foreign)}); "
                "prepare into a new or empty directory"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        lock = TrainingLock(self)
        lock.acquire()
        try:
            self._remove_temporaries()
            self._write_marker()
        except BaseException:
            lock.release()
            raise
        return lock

    def _start(self, resume: bool, overwrite: bool, legacy: bool) -> bool:
        """Under the lock: clear what a new run replaces; True when resuming."""
        self._remove_temporaries()
        has_checkpoints = bool(self.checkpoints())
        if resume and has_checkpoints:
            if legacy and not (self / MARKER).is_file():
                self._write_marker()  # a run of an aligna from before the marker
            return True
        if overwrite:
            self._clear()
        elif has_checkpoints:
            raise FileExistsError(
                f"{self.path} already holds a run: use --resume to continue it, "
                "--overwrite to start over, or another model_dir"
            )
        elif kept := self._trained_files():
            raise FileExistsError(
                f"{self.path} holds a trained model ({', '.join(kept)}) but no checkpoint to "
                f"{'resume from' if resume else 'continue'}: nothing was deleted; use --overwrite to start over, "
                "or another model_dir"
            )
        elif left := self._entries(ignore=(MARKER, LOCK, CORPUS, CORPUS_LOCK)):
            if others := [name for name in left if name not in EARLY_RUN_FILES]:
                raise ModelDirError(
                    f"model_dir {self.path} holds no checkpoint, so this run would start over and clear it, but it "
                    f"also holds files that a run does not write before its first checkpoint ({_listing(others)}): "
                    "nothing was deleted; move them out of it, or train into another model_dir"
                )
            why = "--resume: no checkpoint to resume from" if resume else "no checkpoint yet"
            log.info("%s in %s (the run stopped before its first one): starting from the beginning", why, self.path)
            self._clear()
        elif resume:
            log.info("--resume: %s holds no run yet: starting a new one", self.path)
        self._write_marker()
        return False

    def _trained_files(self) -> list[str]:
        """What a run leaves once it has written a checkpoint (latest.json, written after the
        first one, and the best weights; averaged weights; test scores; checkpoints set aside): a directory
        that holds any is never cleared without --overwrite. (A run killed between its first
        best.safetensors and its first checkpoint has no latest.json: it starts over.)"""
        found = [name for name in (BEST, BEST_SCORES) if (self / name).exists() and (self / LATEST).exists()]
        found += [name for name in (AVERAGED, TEST_SCORES) if (self / name).exists()]
        if (self / CHECKPOINTS).is_dir():
            found += sorted(f"{CHECKPOINTS}/{p.name}" for p in (self / CHECKPOINTS).glob(f"{DAMAGED}*"))
        return found

    def _check_clearable(self) -> None:
        """Refuse to clear a directory aligna did not make, or one that holds the caller."""
        real, cwd, home = self.path.resolve(), Path.cwd().resolve(), Path.home().resolve()
        what = _listing(self._entries(ignore=(MARKER, LOCK)))
        protected = (
            "the root directory" if real == Path(real.anchor)
            else "your home directory" if real == home
            else "the current directory" if real == cwd
            else "a parent of the current directory" if real in cwd.parents
            else None
        )  # fmt: skip
        if protected:
            raise ModelDirError(
                f"--overwrite: model_dir {self.path} is {protected}; it would have deleted {what}. "
                "Choose a directory of its own for each run"
            )
        if not (self / MARKER).is_file():
            raise ModelDirError(
                f"--overwrite: {self.path} was not created by this version of aligna (no {MARKER} marker); "
                f"it would have deleted {what}. Delete it yourself if that is what you want"
            )

    def _clear(self) -> None:
        """Delete everything but the marker, the lock (held by this process) and the corpus."""
        for entry in self.path.iterdir():
            if entry.name in (MARKER, LOCK, CORPUS, CORPUS_LOCK):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _write_marker(self) -> None:
        if not (self / MARKER).is_file():
            info = {"created_by": "aligna", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            atomic_write_text(self / MARKER, json.dumps(info) + "\n")

    def _legacy_run(self) -> bool:
        return (self / CONFIG).is_file() and (self / CHECKPOINTS).is_dir() and not (self / MARKER).exists()

    def _entries(self, ignore: tuple[str, ...] = (LOCK,)) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name not in ignore)

    def _remove_temporaries(self) -> None:
        """Half-written files of a run that was killed (only ever called under the lock)."""
        for root in (self.path, self / CHECKPOINTS):
            if root.is_dir():
                for stale in root.glob(f"{TMP}*"):
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()

    # ------------------------------------------------------------------ checkpoints

    def checkpoints(self) -> list[Path]:
        """Complete step checkpoints, oldest first."""
        root = self / CHECKPOINTS
        if not root.is_dir():
            return []
        return sorted((p for p in root.iterdir() if STEP.fullmatch(p.name) and p.is_dir()), key=_step)

    def latest(self) -> Path | None:
        """The newest checkpoint (each step directory appears whole, by one rename)."""
        steps = self.checkpoints()
        return steps[-1] if steps else None

    def trainer_state(self, checkpoint: Path | None = None) -> dict[str, Any]:
        """trainer.json of `checkpoint` (default: the latest): step, history, ... ({} if none)."""
        checkpoint = checkpoint or self.latest()
        if checkpoint is None:
            return {}
        state = read_json(checkpoint / TRAINER)
        if not isinstance(state, dict):
            raise DamagedFileError(f"{checkpoint / TRAINER}: not a trainer state")
        return state

    def save_checkpoint(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any], keep: int, streams: dict[str, Tensor] | None = None,
    ) -> Path:  # fmt: skip
        """Write checkpoints/step-N with its manifest, point latest.json at it, keep the
        `keep` newest. The random streams saved are this process's and `streams` (the other
        processes' of a distributed run, `rng.rankR.*`). A failed write (a full disk) removes
        its partial files and raises an error that says the previous checkpoint is intact."""
        root = self / CHECKPOINTS
        name = f"step-{step:06d}"
        tmp = root / f"{TMP}{name}"
        try:
            root.mkdir(exist_ok=True)
            tmp.mkdir()  # a stale one was removed by `claim`, a failed one below
            save_weights(model, tmp / MODEL)
            tensors, meta = optimizer_to_flat(optimizer.state_dict())
            save_tensors(tensors | rng_state() | (streams or {}), tmp / OPTIMIZER)
            atomic_write_text(tmp / TRAINER, json.dumps({**trainer_state, "step": step, "optimizer": meta}, indent=1))
            files = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in sorted(tmp.iterdir())}
            atomic_write_text(tmp / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")
            fsync_dir(tmp)
            final = root / name
            if final.exists():  # a checkpoint of this step from before a resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest()
            kept = f"the previous checkpoint, {previous.name}, is intact" if previous else "no earlier checkpoint"
            raise ModelDirError(
                f"cannot write checkpoint {name} in {root}: {e.strerror or e} ({kept}); "
                "free space and continue with --resume"
            ) from None
        try:
            atomic_write_text(self / LATEST, json.dumps({"checkpoint": f"{CHECKPOINTS}/{name}"}) + "\n")
        except OSError as e:  # the checkpoint is whole: --resume finds it among the directories
            raise ModelDirError(
                f"checkpoint {name} is written and intact, but {self / LATEST} could not be updated: "
                f"{e.strerror or e}; free space and continue with --resume"
            ) from None
        for old in self.checkpoints()[:-keep]:  # renamed first: a crash mid-delete leaves no half step-N
            doomed = old.with_name(f"{TMP}{old.name}")
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        return final

    def verify(self, checkpoint: Path) -> None:
        """Check every file of a checkpoint against its manifest (a checkpoint written before
        manifests existed is only checked for its files)."""
        manifest = checkpoint / MANIFEST
        if not manifest.is_file():
            for name in (MODEL, OPTIMIZER, TRAINER):
                if not (checkpoint / name).is_file():
                    raise DamagedFileError(f"{checkpoint / name}: missing")
            return
        data = read_json(manifest)
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict) or not files:
            raise DamagedFileError(f"{manifest}: not a checkpoint manifest")
        for name, expected in files.items():
            path = checkpoint / str(name)
            if not isinstance(expected, dict) or not path.is_file():
                raise DamagedFileError(f"{path}: missing")
            if path.stat().st_size != expected.get("bytes"):
                raise DamagedFileError(
                    f"{path}: {path.stat().st_size} bytes, the manifest says {expected.get('bytes')} (truncated?)"
                )
            if file_sha256(path) != expected.get("sha256"):
                raise DamagedFileError(f"{path}: checksum mismatch, the file was changed or damaged")

    def restore(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, make_state: Callable[[dict[str, Any]], T]
    ) -> tuple[Path, T]:
        """Load the newest intact checkpoint into `model` and `optimizer` (and the RNG);
        returns its path and `make_state(trainer.json)`. Damaged checkpoints (files that fail
        their manifest, or unreadable ones) are named, set aside as checkpoints/damaged-step-N,
        and skipped; none intact is an error. A checkpoint whose files match its manifest but
        that does not fit this run (another model, another aligna's trainer state) is not
        damaged: an error names it, and nothing is moved."""
        damaged: list[str] = []
        for path in reversed(self.checkpoints()):
            intact = False
            try:
                self.verify(path)
                intact = (path / MANIFEST).is_file()  # its files are as written (older ones: unknown)
                made = self.load_checkpoint(path, model, optimizer, make_state, verified=True)
            except DamagedFileError as e:
                if intact:
                    raise ModelDirError(
                        f"{e}; its files are intact (they match its manifest), so it was left as it is: resume "
                        "with the config and aligna version that wrote it, or start over with --overwrite"
                    ) from None
                damaged.append(str(e))
                aside, n = path.with_name(DAMAGED + path.name), 1
                while aside.exists():  # an earlier one set aside is kept too
                    aside, n = path.with_name(f"{DAMAGED}{path.name}.{n}"), n + 1
                log.warning("%s; setting it aside as %s and trying the checkpoint before it", e, aside.name)
                os.replace(path, aside)
                continue
            if damaged:
                log.warning("resuming from %s, the newest intact checkpoint", path)
            return path, made
        raise ModelDirError(
            f"{self.path}: no intact checkpoint to resume from"
            + (f" ({'; '.join(damaged)})" if damaged else "")
            + "; start over with --overwrite"
        )

    def load_checkpoint(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
        make_state: Callable[[dict[str, Any]], T], rank: int = 0, verified: bool = False,
    ) -> T:  # fmt: skip
        """Load one checkpoint, verified (unless the caller just did), into `model` and
        `optimizer`, with the random stream of process `rank` of the run that saved it; a
        damaged one, or one that does not fit, is a DamagedFileError."""
        if not verified:
            self.verify(path)
        load_weights(model, path / MODEL)
        tensors = load_tensors(path / OPTIMIZER)
        state = read_json(path / TRAINER)
        try:
            optimizer.load_state_dict(optimizer_from_flat(tensors, state.pop("optimizer")))
            set_rng_state(tensors, f"rng.rank{rank}." if rank else "rng.")
            return make_state(state)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise DamagedFileError(f"{path}: not a checkpoint of this run ({e!s:.200})") from None

    # ------------------------------------------------------------------ weights

    def save_best(self, model: nn.Module, scores: dict[str, Any]) -> None:
        save_weights(model, self / BEST)
        atomic_write_text(self / BEST_SCORES, json.dumps(scores, indent=1) + "\n")

    def average(self, model: nn.Module, last: int | None = None) -> tuple[Path, list[str]]:
        """Average the weights of the `last` newest checkpoints (None: all there are) into
        averaged.safetensors, using `model` (of the right architecture) as the container:
        its path, and the names of the checkpoints averaged."""
        if last is not None and last < 1:
            raise ModelDirError(f"--last: {last} is out of range; allowed: integers >= 1")
        paths = self.checkpoints()[-last:] if last is not None else self.checkpoints()
        if not paths:
            raise ModelDirError(f"{self.path} keeps no step checkpoints to average")
        if last is not None and len(paths) < last:
            raise ModelDirError(
                f"{self.path} keeps {len(paths)} checkpoints, fewer than --last {last} "
                "(train.keep_checkpoints sets how many are kept)"
            )
        plain = unwrap(model)
        dtypes = {name: t.dtype for name, t in plain.state_dict().items()}
        total: dict[str, torch.Tensor] = {}
        for path in paths:
            load_weights(plain, path / MODEL)
            for name, tensor in plain.state_dict().items():
                total[name] = total.get(name, 0) + tensor.double()  # type: ignore[operator]
        plain.load_state_dict({name: (t / len(paths)).to(dtypes[name]) for name, t in total.items()})
        save_weights(plain, self / AVERAGED)
        log.info("averaged %s into %s", ", ".join(p.name for p in paths), self / AVERAGED)
        return self / AVERAGED, [p.name for p in paths]

    def weights(self, checkpoint: str = "best") -> Path:
        """The weights file for inference: best (the latest checkpoint while no validation
        has run), latest, averaged, or a checkpoint directory or file."""
        if checkpoint == "averaged":
            if not (self / AVERAGED).is_file():
                raise ModelDirError(f"{self.path} has no {AVERAGED}: run `aligna average {self.path}` first")
            return self / AVERAGED
        if checkpoint == "best" and (self / BEST).is_file():
            return self / BEST
        if checkpoint == "best" and (self / BEST_SCORES).is_file():  # a validation chose weights: not others
            raise ModelDirError(
                f"{self / BEST} is missing, though {BEST_SCORES} says a validation chose it: "
                "use --checkpoint latest, averaged or a checkpoint directory"
            )
        if checkpoint in ("best", "latest"):
            latest = self.latest()
            if latest is None:
                raise ModelDirError(f"{self.path} holds no trained weights yet")
            return latest / MODEL
        path = Path(checkpoint)
        if not path.exists():
            raise ModelDirError(
                f"--checkpoint {checkpoint}: no such file or directory (use best, latest, averaged or a path)"
            )
        return path / MODEL if path.is_dir() else path

    def require(self) -> None:
        """Fail unless this looks like a trained model directory."""
        if not (self / CONFIG).is_file():
            what = "does not exist" if not self.path.exists() else f"has no {CONFIG}"
            raise ModelDirError(f"{self.path} is not an aligna model directory (it {what})")


class TrainingLock:
    """An exclusive lock on a model directory for the life of a training run.

    It is an flock on `.lock`, so the kernel releases it when the process ends, however it
    ends; the file also says who holds it (pid, host, user, command, since when).
    """

    def __init__(self, directory: ModelDir) -> None:
        self.path = directory / LOCK
        self._file: Any = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            log.warning("cannot lock %s on this system: make sure only one run uses it", self.path.parent)
            return
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read(2000).strip()
            f.close()
            raise BusyError(
                f"{self.path.parent} is in use by another training run ({_holder(holder)}); "
                "wait for it to end or stop it, or use another model_dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "user": _user(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300],
        }) + "\n")  # fmt: skip
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, user {info['user']}, since {info['since']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid()) if hasattr(os, "getuid") else "?"


def _step(path: Path) -> int:
    match = STEP.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def _listing(names: list[str], limit: int = 5) -> str:
    if not names:
        return "nothing"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
