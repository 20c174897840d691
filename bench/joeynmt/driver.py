"""The JoeyNMT side of `python -m bench.joeynmt`, run by JoeyNMT's own virtualenv.

Not meant to be run by hand: bench/joeynmt/commands.py writes a JoeyNMT config and calls
(bench/joeynmt/joey_venv.py `run_driver`, from the repository root)

    VENV/bin/python bench/joeynmt/driver.py speed CONFIG --steps 30 --warmup 3 [--threads N]
    VENV/bin/python bench/joeynmt/driver.py train CONFIG [--threads N]
    VENV/bin/python bench/joeynmt/driver.py translate CONFIG --beams 1 5 --batch-sizes 16 64 [--threads N]

Each prints one line `RESULT_PREFIX + JSON` on stdout (JoeyNMT itself logs to stderr).
It imports JoeyNMT, torch, yaml and the standard library only: aligna is not installed here,
and it is run by path (not as part of the bench package), so nothing else in bench/ is imported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import yaml
from joeynmt.batch import Batch
from joeynmt.config import parse_global_args, set_validation_args
from joeynmt.helpers import make_model_dir
from joeynmt.helpers_for_ddp import get_logger
from joeynmt.model import Model
from joeynmt.prediction import predict, prepare
from joeynmt.training import TrainManager, train

RESULT_PREFIX = "PEER_RESULT "  # joey_venv.run_driver reads the line that starts with this


def count_parameters(model: Model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- speed


def update(trainer: TrainManager, batch: Batch) -> None:
    """One update, as TrainManager.train_and_validate does it (batch_multiplier 1):
    forward, loss, backward, clipping, optimizer step, scheduler step."""
    trainer._train_step(batch)  # returns the loss as a Python float, so the device is synced
    if trainer.clip_grad_fun is not None:
        trainer.clip_grad_fun(parameters=trainer.model.parameters())
    trainer.optimizer.step()
    if trainer.scheduler_step_at == "step":
        trainer.scheduler.step(trainer.stats.steps)
    trainer.model.zero_grad()
    trainer.stats.steps += 1


def speed(cfg: dict[str, Any], steps: int, warmup: int) -> dict[str, Any]:
    """Time `steps` updates after `warmup` untimed ones, on the first batches of epoch 1.

    The update (`update`) and fetching its batch from JoeyNMT's DataLoader (sampling,
    tokenization, collation) are timed apart.
    """
    make_model_dir(Path(cfg["model_dir"]), overwrite=True)
    args = parse_global_args(cfg, rank=0, mode="train")
    model, train_data, _, _ = prepare(args, rank=0, mode="train")
    trainer = TrainManager(
        rank=0, model=model, model_dir=args.model_dir, device=args.device, n_gpu=args.n_gpu,
        num_workers=args.num_workers, autocast=args.autocast, seed=args.seed,
        train_args=args.train, dev_args=set_validation_args(args.test),
    )  # fmt: skip
    batches = iter(
        train_data.make_iter(
            batch_size=args.train.batch_size,
            batch_type=args.train.batch_type,
            seed=args.seed + 1,  # the seed TrainManager gives epoch 1
            shuffle=args.train.shuffle,
            num_workers=args.num_workers,
            device=args.device,
            eos_index=model.eos_index,
            pad_index=model.pad_index,
        )  # fmt: skip
    )
    tokens = slots = sentences = 0
    step_seconds = data_seconds = 0.0
    for i in range(warmup + steps):
        started = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        update(trainer, batch)
        if args.device.type == "cuda":
            torch.cuda.synchronize()
        done = time.perf_counter()
        if i >= warmup:
            tokens += batch.ntokens  # non-pad target tokens, <eos> included (as aligna counts)
            slots += batch.trg.numel()
            sentences += batch.nseqs
            step_seconds += done - fetched
            data_seconds += fetched - started
    return {
        "parameters": count_parameters(model),
        "steps": steps,
        "warmup": warmup,
        "target_tokens": tokens,
        "sentences": sentences,
        "target_padding_share": 1 - tokens / slots,
        "seconds": step_seconds,
        "target_tokens_per_s": tokens / step_seconds,
        "data_seconds": data_seconds,
        "with_data_target_tokens_per_s": tokens / (step_seconds + data_seconds),
    }


# --------------------------------------------------------------------------- train


VALIDATION_LINE = "peer driver: validation at step %d took %.3f s"  # commands.joey_curve parses it


def log_validation_time(logger: Any) -> None:
    """Log how long each validation takes (JoeyNMT measures it but does not log it), so
    that the time-to-quality curve can also leave validation out. Behaviour is unchanged."""
    validate = TrainManager._validate

    def timed(self: TrainManager, valid_data: Any) -> None:
        started = time.perf_counter()
        validate(self, valid_data)
        logger.info(VALIDATION_LINE, self.stats.steps, time.perf_counter() - started)

    TrainManager._validate = timed


def train_model(cfg: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """`joeynmt train CONFIG --skip-test`, as joeynmt/__main__.py runs it, plus one log line
    per validation with its duration."""
    model_dir = Path(cfg["model_dir"])
    make_model_dir(model_dir, overwrite=cfg["training"].get("overwrite", False))
    shutil.copy2(config_path, model_dir / "config.yaml")
    logger = get_logger("", log_file=(model_dir / "train.log").as_posix())
    logger.info(
        "Hello! This is Joey-NMT (version %s), run by bench/joeynmt/driver.py.", version("joeynmt")
    )
    log_validation_time(logger)
    started = time.perf_counter()
    train(rank=0, world_size=None, cfg=cfg, skip_test=True)
    return {"model_dir": str(model_dir), "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------- translate


def translate(cfg: dict[str, Any], beams: list[int], batch_sizes: list[int]) -> dict[str, Any]:
    """Decode data.test once per (beam, batch size); seconds exclude loading the model."""
    args = parse_global_args(cfg, rank=0, mode="test")
    model, _, _, test_data = prepare(args, rank=0, mode="test")
    vocab = model.trg_vocab
    not_output = {vocab.lookup(t) for t in vocab.specials} - {model.unk_index}
    runs = []
    for beam in beams:
        for batch_size in batch_sizes:
            test_args = args.test._replace(
                beam_size=beam, batch_size=batch_size, batch_type="sentence", n_best=1,
                eval_metrics=[], return_prob="none", return_attention=False,
            )  # fmt: skip
            started = time.perf_counter()
            _, _, hypotheses, tokens, _, _ = predict(
                model=model, data=test_data, device=args.device, n_gpu=args.n_gpu, compute_loss=False,
                num_workers=args.num_workers, args=test_args, autocast=args.autocast,
            )  # fmt: skip
            seconds = time.perf_counter() - started
            output_tokens = sum(1 for sent in tokens for t in sent if vocab.lookup(t) not in not_output)
            runs.append(
                {
                    "beam": beam,
                    "batch_size": batch_size,
                    "seconds": seconds,
                    "sentences": len(hypotheses),
                    "output_tokens": output_tokens,
                    "hypotheses": hypotheses,
                }  # fmt: skip
            )
    return {"parameters": count_parameters(model), "runs": runs}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["speed", "train", "translate"])
    parser.add_argument("config", type=Path, help="a JoeyNMT config written by python -m bench.joeynmt")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--beams", type=int, nargs="+", default=[1])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    if args.command == "speed":
        result = speed(cfg, args.steps, args.warmup)
    elif args.command == "train":
        result = train_model(cfg, args.config)
    else:
        result = translate(cfg, args.beams, args.batch_sizes)
    result |= {
        "joeynmt": version("joeynmt"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
