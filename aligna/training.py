"""Training: a train step, the learning-rate and teacher-forcing schedules as functions of
the step, validation, and the loop that ties them to checkpoints.

The loop is exactly resumable: the batches of an epoch are a function of (seed, epoch),
and a checkpoint stores the position inside the epoch, the optimizer, the scheduler and
the RNG state, so ``aligna train CONFIG --resume`` ends with the weights an uninterrupted
run would have reached.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from . import distributed
from .build import build_on, count_parameters
from .config import Config, TrainConfig, config_to_dict, load_config, save_config
from .corpus import open_corpus, prepared
from .data import (
    Batch,
    ParallelText,
    Pipeline,
    check_readable,
    collate,
    epoch_batches,
    read_parallel,
    reference_sets,
    require_a_scorable_pair,
    write_report,
)
from .eventlog import EventLog
from .loss import sequence_loss
from .metrics import HIGHER_IS_BETTER, MODEL_METRICS, Scores
from .model import Seq2Seq
from .modeldir import CONFIG, CORPUS, DATA_REPORT, TENSORBOARD, TEST_SCORES, TRAIN_LOG, ModelDir
from .runtime import autocast, keep_freed_memory, resolve_device
from .tensorfiles import atomic_write_text, load_weights, rng_state
from .translate import Translator
from .vocab import PAD_ID

log = logging.getLogger("aligna")


class TrainingDiverged(ValueError):
    """The loss or the weights stopped being finite; the message says what is kept."""


# validation search, whatever decode says (a shortlist is made from a trained model: none yet)
GREEDY = {"beam_size": 1, "nbest": 1, "sample": False, "shortlist": False}


# --------------------------------------------------------------------------- schedules


def learning_rate(step: int, cfg: TrainConfig, plateau_scale: float = 1.0, total: int = 0) -> float:
    """The learning rate for update `step` (counted from 1) of a run of `total` updates.

    inverse_sqrt: linear warmup to `lr`, then lr * sqrt(warmup / step) -- the schedule of
    Vaswani et al. (2017) eq. (3), parameterized by its peak `lr` instead of d_model.
    linear: warmup to `lr`, then down in a straight line to lr / (total - warmup + 1) at the
    last update, `total` (a short run gains most from ending at a small rate).
    constant and plateau: `lr` (after an optional linear warmup); plateau multiplies it
    by `plateau_scale`, which validation lowers, down to `min_lr`.
    """
    if cfg.schedule == "inverse_sqrt":
        warmup = max(cfg.warmup_steps, 1)
        return cfg.lr * min(step / warmup, math.sqrt(warmup / step))
    if cfg.schedule == "linear":
        if not total:
            raise ValueError("the linear schedule needs the run's total number of updates")
        if step < cfg.warmup_steps:
            return cfg.lr * step / cfg.warmup_steps
        return cfg.lr * max(total - step + 1, 1) / max(total - cfg.warmup_steps + 1, 1)
    warm = min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "plateau":  # the floor is the decayed rate's, not the warmup's
        return warm * max(cfg.lr * plateau_scale, cfg.min_lr)
    return warm * cfg.lr


def teacher_forcing_ratio(step: int, cfg: TrainConfig) -> float:
    """Chance of feeding the gold previous token at update `step` (Bengio et al. 2015).

    linear reaches `teacher_forcing_min` at `decay_steps`; exponential halves the distance
    to it every `decay_steps`; inverse_sigmoid falls along a sigmoid centred on
    `decay_steps` (Bengio et al. use k / (k + exp(i / k)); this form is easier to set).
    """
    start, low, k = cfg.teacher_forcing, cfg.teacher_forcing_min, cfg.teacher_forcing_decay_steps
    if cfg.teacher_forcing_decay == "none":
        return start
    if cfg.teacher_forcing_decay == "linear":
        share = max(0.0, 1.0 - step / k)
    elif cfg.teacher_forcing_decay == "exponential":
        share = 0.5 ** (step / k)
    else:
        share = 1.0 / (1.0 + math.exp(min((step - k) / (k / 10), 50.0)))
    return low + (start - low) * share


@dataclass
class Plateau:
    """Reduce-on-plateau: the scale halves (x factor) after `patience` bad validations."""

    factor: float
    patience: int
    best: float | None = None
    bad: int = 0
    scale: float = 1.0

    def update(self, value: float, higher_is_better: bool) -> None:
        if self.best is None or (value > self.best if higher_is_better else value < self.best):
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            self.scale *= self.factor
            self.bad = 0
            log.info("validation has not improved for %d checks: lr scale -> %.4g", self.patience, self.scale)


# --------------------------------------------------------------------------- one step


def scheduled_sampling_logits(model: Seq2Seq, batch: Batch, ratio: float) -> Tensor:
    """Teacher forcing below 1: step by step, each sentence feeds its gold previous token
    with chance `ratio` and the model's own argmax prediction otherwise. -> (B, T, V)"""
    enc = model.encode(batch.src, batch.src_lengths)
    state = model.init_state(enc)
    prev = batch.tgt_in[:, 0]  # <sos>
    steps = []
    for t in range(batch.tgt_in.size(1)):
        logits, state, _ = model.decode_step(prev, state, enc)  # (B, V)
        steps.append(logits)
        if t + 1 < batch.tgt_in.size(1):
            gold = batch.tgt_in[:, t + 1]
            sample = torch.rand(gold.shape, device=gold.device) >= ratio
            prev = torch.where(sample & (gold != PAD_ID), logits.argmax(-1), gold)
    return torch.stack(steps, dim=1)


def train_step(
    model: Seq2Seq, batches: list[Batch], n_tokens: int, optimizer: torch.optim.Optimizer,
    cfg: TrainConfig, lr: float, tf_ratio: float, scaler: torch.amp.GradScaler | None = None,
    world_size: int = 1,
) -> tuple[Tensor, bool]:  # fmt: skip
    """One update on `batches` (this process's micro-batches, `train.accumulate` of them);
    returns this process's loss summed over its tokens and divided by `n_tokens` (the target
    tokens of the whole update, over every process), and whether the update was made.

    Gradients accumulate over the micro-batches; under DDP they are all-reduced (averaged)
    only after the last one (`no_sync` before), and each loss is scaled by the world size so
    that the average is sum(loss) / n_tokens over the whole update, as in one process. An
    update whose loss or gradient norm is not finite is skipped, so one bad batch cannot turn
    the weights into NaN (the norm is of the all-reduced gradients: every process agrees).
    `scaler` scales the loss for fp16 training (and skips overflowing steps itself)."""
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=batches[0].src.device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext():
            with autocast(batch.src.device, cfg.precision):
                keep = batch.tgt_out != PAD_ID  # (B, T): the output layer skips padded targets
                if tf_ratio >= 1.0:
                    logits = model(batch.src, batch.src_lengths, batch.tgt_in, keep)  # (N, V)
                else:
                    logits = scheduled_sampling_logits(model, batch, tf_ratio)[keep]
                loss = sequence_loss(logits, batch.tgt_out[keep], cfg.label_smoothing) / n_tokens * world_size
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        total += loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)  # so clipping sees the true gradients
    # max_norm inf only measures the norm (the gradients are multiplied by exactly 1)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm or math.inf)
    loss = total / world_size
    if scaler is not None:  # an fp16 overflow is the scaler's to handle: it skips the step
        scaler.step(optimizer)
        scaler.update()
        return loss, bool(torch.isfinite(norm))
    # The one device sync of a step. Under DDP only the norm, of the all-reduced gradients, is
    # the same in every process (a non-finite loss anywhere makes it non-finite everywhere).
    ok = torch.isfinite(norm) if world_size > 1 else torch.isfinite(loss) & torch.isfinite(norm)
    finite = bool(ok)
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return loss, finite


def make_optimizer(model: Seq2Seq, cfg: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainState:
    """Everything besides tensors that a checkpoint must restore."""

    step: int = 0
    epoch: int = 0  # current epoch, from 0
    batch: int = 0  # batches of `epoch` already consumed
    tokens: int = 0  # target tokens trained on
    train_seconds: float = 0.0  # time in train steps, validation excluded
    best: float | None = None
    best_step: int = 0
    bad_validations: int = 0
    plateau: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None  # fp16 loss scale
    history: list[dict[str, Any]] | None = None
    skipped_updates: int = 0  # updates skipped for a non-finite loss or gradient, in all
    nonfinite_in_row: int = 0  # ... and in a row, up to the last update
    world_size: int = 1  # processes that trained it (each with its random stream in the checkpoint)


class _Window:
    """Training loss and speed since the last log line (the loss stays on the device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.lr = self.ratio = 0.0
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.tokens, self.seconds = 0, 0.0

    def add(self, mean_loss: Tensor, tokens: int, seconds: float) -> None:
        self.loss_sum += mean_loss * tokens
        self.tokens += tokens
        self.seconds += seconds

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(self.tokens, 1)


class Trainer:
    """Trains `config` into `config.model_dir`; `resume` continues the latest checkpoint.

    Setting up (this class's constructor: the model directory, the data, the model and
    optimizer, the checkpoint to resume) is apart from the loop (`train`), which reads
    top-down: updates, log lines, and validation with a checkpoint, the last two on rank 0
    only under torchrun (`distributed`).

    Rank 0 holds the model directory's lock from construction until `close()` (which
    `train()` calls if it fails, and the module's `train` function when it is done); the other
    ranks never write into it.

    keep_freed: on a CPU, have the process keep the memory it frees (`runtime.keep_freed_memory`,
    faster large tensors); False leaves a host program's allocator as it is."""

    def __init__(
        self, config: Config, resume: bool = False, overwrite: bool = False, progress: bool = True,
        keep_freed: bool = True,
    ) -> None:  # fmt: skip
        self.config, self.cfg = config, config.train
        self.world = distributed.from_environment()
        # A progress bar on a terminal; where stderr is a file or a pipe (`> log 2>&1`, torchrun),
        # a log line per train.log_every updates instead of a bar redrawn at every step.
        self.progress = progress and self.world.main and sys.stderr.isatty()
        self.log_lines = self.world.main and not self.progress
        self.md = ModelDir(config.model_dir)
        self.dir = self.md.path
        self.lock = None
        self.events = EventLog(self.md / TENSORBOARD)  # written by the main process only
        setup_logging(level=logging.INFO if self.world.main else logging.WARNING)
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        self.device = distributed.device_for(self.world, resolve_device(self.cfg.device))
        if self.cfg.precision == "fp16" and self.device.type != "cuda":  # device auto on a machine without CUDA
            raise ValueError(f"train.precision fp16 needs a CUDA device, and this run trains on {self.device}: "
                             "use bf16 (or fp32) on a CPU")  # fmt: skip
        if self.device.type == "cpu" and keep_freed:
            keep_freed_memory()  # large tensors reuse freed memory instead of faulting fresh pages in
        distributed.join(self.world, self.device)
        try:
            _check_same_settings(config)
            if not resume:
                config.data.check_new_vocabulary()
            self._read_eval_sets()
            if self.world.main and not resume:  # before --overwrite (or starting over) clears the old run
                check_readable(config.data.train, "train")
            resuming = False
            if self.world.main:
                self.lock, resuming = self.md.claim(resume, overwrite)
            resuming = distributed.broadcast(resuming)
            if self.world.main:
                setup_logging(self.md / TRAIN_LOG)  # first: the run's log keeps what resuming changed
            if resuming:
                self._check_resumable()
            torch.manual_seed(self.cfg.seed)
            self._setup_data(resuming)
            self._setup_model()  # the same initial weights on every process
            if self.world.size > 1:  # then each its own dropout masks (its stream is saved per process)
                torch.manual_seed(self.cfg.seed + self.world.rank)
            if resuming:
                self._resume()
                if self._changed_settings and self.world.main:
                    save_config(self.config, self.md / CONFIG)
        except BaseException:
            self.close()
            raise

    def _read_eval_sets(self) -> None:
        """Dev and test text (rank 0, which evaluates), read first: a missing or damaged file
        stops the run before anything in model_dir changes, not after hours of training."""
        data = self.config.data
        self.dev: tuple[list[str], list[list[str]]] | None = None
        self.dev_origin = ""  # the file(s) it came from, for messages
        self.test: ParallelText | None = None
        read: dict[str, ParallelText] = {}
        if self.world.main and data.dev is not None:
            dev = read["dev"] = read_parallel(data.dev, "dev")
            self.dev, self.dev_origin = reference_sets(dev, data.group_references), dev.origin
        if self.world.main and data.test is not None:
            self.test = read["test"] = read_parallel(data.test, "test")
        for split, text in read.items():  # else the first validation (or the test score) would end the run
            require_a_scorable_pair(text.src, text.tgt, f"{split}: {text.origin}")

    def _setup_data(self, resume: bool) -> None:
        """The pipeline (built by rank 0, or the saved one), training pairs as ids, dev text."""
        config, data = self.config, self.config.data
        if self.world.distributed:
            check_one_process_settings(self.cfg)
        if self.world.main:
            pipeline = Pipeline.load(self.dir) if resume else None  # a resumed run keeps its vocabulary
            corpus = prepared(data, self.md / CORPUS, pipeline, resuming=resume)  # encoded once, then memory-mapped
            self.pipeline = pipeline or corpus.pipeline
            if not resume:
                self.pipeline.save(self.dir)
                save_config(config, self.md / CONFIG)
        distributed.barrier()  # the other ranks map the corpus and read the pipeline rank 0 wrote
        if not self.world.main:
            if not (self.md / CONFIG).is_file():  # rank 0 wrote it before the barrier
                raise ValueError(
                    f"rank {self.world.rank}: {self.dir} holds no run, though rank 0 has just written one there: "
                    "on several machines, model_dir must be on a filesystem that they all share"
                )
            self.pipeline = Pipeline.load(self.dir)
            corpus = open_corpus(self.md / CORPUS, data, verify=False)  # rank 0 has verified it
        self.train_data = corpus.examples
        if self.world.main:
            log.info("%s", self.train_data.report)
            write_report([self.train_data.report], self.md / DATA_REPORT)
        log.info(
            "vocabulary: source %d, target %d%s",
            len(self.pipeline.src_vocab), len(self.pipeline.tgt_vocab),
            " (shared)" if data.shared_vocab else "",
        )  # fmt: skip

    def _setup_model(self) -> None:
        """The model (every rank starts from the same seed; DDP also broadcasts rank 0's
        weights), its optimizer, the fp16 scaler, and the module training runs through."""
        config = self.config
        self.model = build_on(self.device, config.model, len(self.pipeline.src_vocab), len(self.pipeline.tgt_vocab))
        log.info(
            "model: %s, %d parameters, on %s%s", config.model.arch, count_parameters(self.model), self.device,
            f" x {self.world.size} processes" if self.world.distributed else "",
        )  # fmt: skip
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.scaler = torch.amp.GradScaler("cuda") if self.cfg.precision == "fp16" else None
        # Training runs through DDP and the compiled module; search and checkpoints use the plain one.
        self.train_model: Any = self.model
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        if self.cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.state = TrainState(history=[], world_size=self.world.size)
        self.plateau = Plateau(self.cfg.plateau_factor, self.cfg.plateau_patience)
        self.translator = Translator(self.model, self.pipeline, config, self.device)

    def _resume(self) -> None:
        """Continue the newest intact checkpoint (rank 0 chooses it; every rank loads it and
        its own random stream)."""
        if self.world.main:
            path, self.state = self.md.restore(self.model, self.optimizer, lambda s: TrainState(**s))
        path, trained_by = distributed.broadcast((str(path), self.state.world_size) if self.world.main else None)
        if trained_by != self.world.size:  # checked on every rank before the others look for their streams
            raise ValueError(
                f"--resume: {path} was trained by {trained_by} process(es), this job has "
                f"{self.world.size}; resume with the same number (torchrun --nproc_per_node / --nnodes), since "
                "each process's share of the batches and its random stream are saved per process"
            )
        if not self.world.main:
            self.state = self.md.load_checkpoint(
                Path(path), self.model, self.optimizer, lambda s: TrainState(**s), rank=self.world.rank
            )
        if self.state.plateau:  # its progress; factor and patience are the config's (a changed one applies)
            saved = self.state.plateau
            self.plateau = Plateau(self.cfg.plateau_factor, self.cfg.plateau_patience, saved["best"], saved["bad"],
                                   saved["scale"])  # fmt: skip
        if self.scaler is not None and self.state.scaler:
            self.scaler.load_state_dict(self.state.scaler)
        for group in self.optimizer.param_groups:  # the checkpoint's; a changed one applies, as lr does
            group["betas"], group["weight_decay"] = tuple(self.cfg.betas), self.cfg.weight_decay
        log.info("resumed from %s (epoch %d, batch %d)", path, self.state.epoch + 1, self.state.batch)

    def _check_resumable(self) -> None:
        """--resume needs the data and model of the saved run; other changes are logged."""
        saved = load_config(self.md / CONFIG)
        for section in ("data", "model"):
            free = RESUMABLE_DATA if section == "data" else ()
            was, now = ({k: v for k, v in config_to_dict(c)[section].items() if k not in free} for c in (saved, self.config))
            if was != now:
                raise ValueError(
                    f"--resume: the {section} section differs from the run in {self.dir} "
                    f"({'; '.join(_diff(was, now, f'{section}.'))}); resume with the same data and model "
                    "(or start a new model_dir)"
                )
        was, now = saved.train.early_stopping_metric, self.cfg.early_stopping_metric
        if was != now:  # best.safetensors, the patience count and the plateau's best are by the run's metric
            raise ValueError(
                f"--resume: train.early_stopping_metric is {now}, but the run in {self.dir} chose its best weights "
                f"and counted its patience by {was}: resume with {was} (or start a new model_dir)"
            )
        changed = _diff(config_to_dict(saved), config_to_dict(self.config))
        if changed and self.world.main:
            log.warning("resuming with changed settings: %s", ", ".join(changed))
        self._changed_settings = bool(changed)  # config.yaml says so once the checkpoint is loaded

    def close(self) -> None:
        """Release the model directory (idempotent)."""
        if getattr(self, "events", None) is not None:
            self.events.close()
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------------ loop

    def train(self) -> TrainState:
        """Run to the end (max_steps, epochs or early stopping); a failure releases the lock."""
        try:
            return self._loop()
        except BaseException:
            self.close()
            raise

    def _loop(self) -> TrainState:
        cfg, st = self.cfg, self.state
        per_update = self.world.size * cfg.accumulate  # batches an update takes from the epoch's order
        batches = epoch_batches(self.train_data, cfg.batch_tokens, cfg.seed, 0)
        per_epoch = len(batches) // per_update
        if per_epoch == 0:
            raise ValueError(
                f"an epoch has {len(batches)} batches of train.batch_tokens {cfg.batch_tokens}, fewer than one update "
                f"takes ({self.world.size} process(es) x train.accumulate {cfg.accumulate}); lower batch_tokens"
            )
        total = min(cfg.max_steps or cfg.epochs * per_epoch, cfg.epochs * per_epoch)
        log.info(
            "training: %d updates per epoch%s, %d updates in all", per_epoch,
            f" of {per_update} batches ({self.world.size} process(es) x {cfg.accumulate})" if per_update > 1 else "",
            total,
        )  # fmt: skip
        if len(batches) % per_update:
            log.info("the last %d batch(es) of each epoch fill no update and are left out", len(batches) % per_update)
        self._tgt_tokens = self.train_data.lengths()[1]  # (N,) target tokens of each pair, tgt_out's
        bar = tqdm(total=total, initial=st.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        self._started, self._first_step, self._total = time.monotonic(), st.step, total
        window = _Window(self.device)
        validated_at = st.step if st.step else -1
        stop = st.step >= total
        if cfg.early_stopping_patience and st.bad_validations >= cfg.early_stopping_patience:
            log.info("the run stopped early (no improvement in %d validations): nothing to train; raise "
                     "train.early_stopping_patience to continue it", st.bad_validations)  # fmt: skip
            stop = True
        while not stop and st.epoch < cfg.epochs:
            batches = epoch_batches(self.train_data, cfg.batch_tokens, cfg.seed, st.epoch)
            end = len(batches) - len(batches) % per_update
            while st.batch < end and not stop:
                self._update(batches[st.batch : st.batch + per_update], window)
                if st.step % cfg.log_every == 0 or st.step == total:
                    self._report(window, bar)
                bar.update(1)
                if cfg.validate_every and st.step % cfg.validate_every == 0:
                    stop, validated_at = self._validate_and_save(), st.step
                stop = stop or st.step >= total
            if st.batch >= end:
                st.epoch, st.batch = st.epoch + 1, 0
                if not cfg.validate_every and validated_at != st.step:
                    stop, validated_at = self._validate_and_save() or stop, st.step
        if validated_at != st.step:
            self._validate_and_save()
        bar.close()
        log.info(
            "trained %d updates, %d target tokens in %.1f s: %.0f target tokens/s",
            st.step, st.tokens, st.train_seconds, st.tokens / max(st.train_seconds, 1e-9),
        )  # fmt: skip
        if st.best is not None:
            log.info("best %s %.4f at step %d", cfg.early_stopping_metric, st.best, st.best_step)
        if st.skipped_updates:
            log.warning("%d updates were skipped for a non-finite loss or gradient", st.skipped_updates)
        self.model.eval()  # done training: the translator may use it
        self.events.close()
        return st

    def _update(self, group: list[list[int]], window: _Window) -> None:
        """One update on a group of batches of the epoch (this process's share of them);
        advances the data position. An update whose loss or gradient is not finite is skipped
        and counted; too many in a row stop the run (`train.max_nonfinite_updates`)."""
        st, a = self.state, self.cfg.accumulate
        started = time.perf_counter()
        n_tokens = sum(int(self._tgt_tokens[index].sum()) for index in group)  # every process's, on the CPU
        mine = group[self.world.rank * a : (self.world.rank + 1) * a]
        batches = [collate(self.train_data, index).to(self.device) for index in mine]
        st.step += 1
        window.lr = learning_rate(st.step, self.cfg, self.plateau.scale, self._total)
        window.ratio = teacher_forcing_ratio(st.step, self.cfg)
        scale = self.scaler.get_scale() if self.scaler is not None else None
        loss, finite = train_step(
            self.train_model, batches, n_tokens, self.optimizer, self.cfg, window.lr, window.ratio, self.scaler,
            self.world.size,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        st.batch += len(group)
        st.train_seconds += elapsed
        if finite:
            st.nonfinite_in_row = 0
            st.tokens += n_tokens
            window.add(loss, n_tokens, elapsed)
            return
        st.skipped_updates += 1
        if scale is not None and 1.0 <= self.scaler.get_scale() < scale:  # type: ignore[union-attr]
            # fp16's loss scale was too high for these gradients: the scaler skipped the update and
            # halved it, as it does now and then (most at the start), not a sign of divergence
            log.info("step %d: fp16 gradients overflowed at loss scale %g; update skipped, scale now %g",
                     st.step, scale, self.scaler.get_scale())  # type: ignore[union-attr]  # fmt: skip
            return
        st.nonfinite_in_row += 1
        log.warning(
            "step %d: the loss or gradient is not finite (loss %s); update skipped (%d in a row)",
            st.step, f"{float(loss):.4g}", st.nonfinite_in_row,
        )  # fmt: skip
        if st.nonfinite_in_row >= self.cfg.max_nonfinite_updates:
            raise TrainingDiverged(
                f"training stopped at step {st.step}: {st.nonfinite_in_row} updates in a row had a non-finite "
                f"loss or gradient and were skipped (train.max_nonfinite_updates: "
                f"{self.cfg.max_nonfinite_updates}); {self._last_good()}. Lower train.lr (now {self.cfg.lr:g}), "
                "check the data, or resume from an earlier checkpoint"
            )

    def _last_good(self) -> str:
        latest = self.md.latest()
        return f"the last checkpoint, {latest}, is kept" if latest else "no checkpoint was written"

    def _report(self, window: _Window, bar: tqdm) -> None:
        """A log line (rank 0) on the updates since the last one; every rank takes part in
        summing the loss over processes."""
        loss = distributed.all_sum([float(window.loss_sum)], self.device)[0] / max(window.tokens, 1)
        speed = window.tokens / max(window.seconds, 1e-9)
        if not self.world.main:
            window.reset()
            return
        if not window.tokens:  # every update since the last line was skipped: no loss to show (not 0)
            log.info("step %d/%d: every update since the last log line was skipped (not finite)", self.state.step,
                     self._total)  # fmt: skip
            window.reset()
            return
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:,.0f}", lr=f"{window.lr:.2e}", refresh=False)
        scalars = {"loss": loss, "tokens_per_s": speed, "lr": window.lr, "teacher_forcing": window.ratio}
        self._log_scalars("train", scalars)
        if self.log_lines:
            done = self.state.step - self._first_step
            eta = (self._total - self.state.step) * (time.monotonic() - self._started) / max(done, 1)
            log.info("step %d/%d loss %.4f tok/s %.0f lr %.3g eta %s", self.state.step, self._total, loss, speed,
                     window.lr, _duration(eta))  # fmt: skip
        else:
            log.debug("step %d loss %.4f tok/s %.0f lr %.3g", self.state.step, loss, speed, window.lr)
        window.reset()

    # ------------------------------------------------------------------ validation

    def validate(self) -> Scores:
        """Dev loss, perplexity and `eval.metrics` of greedy output (fast, and comparable
        from one validation to the next whatever the decode section says)."""
        assert self.dev is not None
        metrics = ["loss", "ppl", *(m for m in self.config.eval.metrics if m not in MODEL_METRICS)]
        self.model.eval()  # train_step switches it back
        return self.translator.evaluate(self.dev[0], self.dev[1], metrics, origin=self.dev_origin, **GREEDY)

    def _validate_and_save(self) -> bool:
        """Validate (if there is a dev set) and save a checkpoint, on rank 0; True when training
        should stop. The other ranks hand rank 0 their random streams and wait for its decision
        (to stop, and the plateau schedule's state)."""
        streams = distributed.gather(rng_state(f"rng.rank{self.world.rank}.") if self.world.rank else {})
        stop = False
        if self.world.main:
            stop = self._validate_and_save_main({k: v for stream in streams for k, v in stream.items()})
        stop, plateau = distributed.broadcast((stop, asdict(self.plateau)) if self.world.main else None)
        self.plateau = Plateau(**plateau)
        return stop

    def _validate_and_save_main(self, streams: dict[str, Tensor]) -> bool:
        st, cfg = self.state, self.cfg
        self._require_finite_weights()  # before best.safetensors or a checkpoint is written
        stop = False
        if self.dev is not None:
            started = time.perf_counter()
            scores = self.validate()
            value = scores.values[cfg.early_stopping_metric]
            higher = HIGHER_IS_BETTER[cfg.early_stopping_metric]
            improved = st.best is None or (value > st.best if higher else value < st.best)
            if improved:
                st.best, st.best_step, st.bad_validations = value, st.step, 0
                self.md.save_best(self.model, {"step": st.step, cfg.early_stopping_metric: value, **scores.values})
            else:
                st.bad_validations += 1
            if cfg.schedule == "plateau":
                self.plateau.update(value, higher)
            # train_seconds: the time-to-quality curve (update time, validation not counted)
            epoch = st.epoch + (1 if st.batch else 0)  # at an epoch's end st.epoch already counts it
            checkpoint = {"step": st.step, "epoch": epoch, "train_seconds": st.train_seconds}
            st.history = (st.history or []) + [checkpoint | scores.values]
            self._log_scalars("dev", scores.values)
            log.info(
                "step %d dev: %s%s (%.1f s)", st.step, scores, "  *best*" if improved else "",
                time.perf_counter() - started,
            )  # fmt: skip
            if cfg.early_stopping_patience and st.bad_validations >= cfg.early_stopping_patience:
                log.info("early stopping: no improvement in %d validations", st.bad_validations)
                stop = True
        st.plateau = asdict(self.plateau)
        st.scaler = self.scaler.state_dict() if self.scaler is not None else None
        self.md.save_checkpoint(st.step, self.model, self.optimizer, asdict(st), self.cfg.keep_checkpoints, streams)
        return stop

    def _require_finite_weights(self) -> None:
        """Never write weights that are not finite (nor prune the good ones for them)."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):  # one sync
            raise TrainingDiverged(
                f"training stopped at step {self.state.step}: the weights are no longer finite, so no "
                f"checkpoint was written; {self._last_good()}. Lower train.lr (now {self.cfg.lr:g}) or "
                "check the data"
            )

    def _log_scalars(self, prefix: str, values: dict[str, float]) -> None:
        self.events.scalars(prefix, values, self.state.step)


def check_one_process_settings(cfg: TrainConfig) -> None:
    """What a distributed run cannot train: scheduled sampling, whether from the start or once a
    decaying teacher-forcing ratio falls below 1 (its decoding pass runs outside DDP)."""
    decays = cfg.teacher_forcing_decay != "none" and cfg.teacher_forcing_min < cfg.teacher_forcing
    if cfg.teacher_forcing < 1.0 or decays:
        raise ValueError(
            "scheduled sampling (train.teacher_forcing < 1"
            + (f", or decaying to train.teacher_forcing_min {cfg.teacher_forcing_min:g}" if decays else "")
            + ") trains in one process only"
        )


def _check_same_settings(config: Config) -> None:
    """Every process of a distributed run must train with the same model and train settings:
    they decide each rank's batches and the order of the collective calls, and a mismatch
    would hang the job until its timeout. (Threads and device may differ between nodes.)"""
    settings = config_to_dict(config)
    mine = json.dumps({"model": settings["model"], "train": {k: v for k, v in settings["train"].items()
                                                             if k not in ("num_threads", "device")}}, sort_keys=True)  # fmt: skip
    every = distributed.gather(mine)
    if len(set(every)) > 1:
        ranks = [rank for rank, theirs in enumerate(every) if theirs != every[0]]
        raise ValueError(f"the processes of this run have other model or train settings than rank 0 (rank(s) "
                         f"{', '.join(map(str, ranks))}): give every node the same config and --set options")  # fmt: skip


def train(
    config: Config, resume: bool = False, overwrite: bool = False, progress: bool = True, keep_freed: bool = True
) -> Path:
    """Train, then score the best weights on the test set if one is configured (`Trainer` for
    the arguments)."""
    trainer = Trainer(config, resume=resume, overwrite=overwrite, progress=progress, keep_freed=keep_freed)
    ended = False
    try:
        trainer.train()
        if trainer.test is not None:  # read when training began (rank 0 only)
            load_weights(trainer.model, trainer.md.weights("best"))
            trainer.model.eval()
            test = trainer.test
            sources, references = reference_sets(test, config.data.group_references)
            options = {"shortlist": False} if config.decode.shortlist else {}  # made from the trained model, later
            scores = trainer.translator.evaluate(
                sources, references, ["ppl", *config.eval.metrics], origin=test.origin, **options
            )
            log.info("test (%s): %s", test.origin, scores)
            for name, signature in scores.signatures.items():
                log.info("  %s signature: %s", name, signature)
            atomic_write_text(trainer.md / TEST_SCORES, json.dumps(asdict(scores), indent=1) + "\n")
        ended = True
    finally:
        trainer.close()
        # DDP holds the process group: let it go now, so that the group is torn down here, once
        # every rank is done with it, and not at interpreter exit (where gloo's threads could abort)
        trainer.train_model = trainer.model
        gc.collect()
        distributed.leave(together=ended)
    return trainer.dir


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# data settings a resumed run may change: what the test set is and what the languages are called
RESUMABLE_DATA = ("test", "src_lang", "tgt_lang")


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def setup_logging(logfile: Path | None = None, level: int = logging.INFO) -> None:
    """Log to the console (through tqdm, so progress bars stay intact) and to `logfile`."""
    log.setLevel(logging.DEBUG)
    log.propagate = False
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        console = _TqdmHandler(level)
        console.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(console)
    for h in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(h)
        h.close()
    if logfile is not None:
        file = logging.FileHandler(logfile, encoding="utf-8")
        file.setLevel(logging.DEBUG)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file)
