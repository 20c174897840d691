"""What the model directory's safety costs: time to write and to read back a checkpoint,
with its digests and manifest, against plain safetensors calls on the same tensors.

    python -m bench.checkpoint_io                                  # the de->en Transformer config
    python -m bench.checkpoint_io configs/multi30k_de_en_gru.yaml --repeat 5

The model is built from the config with vocabularies of --vocab tokens (no data is read);
one Adam update fills the optimizer state, so the checkpoint has its real size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from aligna.build import build_model, count_parameters
from aligna.config import load_config
from aligna.modeldir import ModelDir
from aligna.tensorfiles import optimizer_to_flat
from aligna.training import TrainState, make_optimizer
from bench.common import ROOT, config_hash, write_record


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.checkpoint_io", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("config", nargs="?", default="configs/multi30k_de_en_transformer.yaml")
    parser.add_argument("--vocab", type=int, default=8000, help="source and target vocabulary size")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(ROOT / args.config)
    model = build_model(config.model, args.vocab, args.vocab)
    optimizer = make_optimizer(model, config.train)
    model(torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 3]), torch.ones(2, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    state = TrainState(history=[])
    with tempfile.TemporaryDirectory() as tmp:
        md = ModelDir(Path(tmp) / "run")
        lock, _ = md.claim(resume=False, overwrite=False)
        step = iter(range(1, 10_000))
        save = timed(lambda: md.save_checkpoint(next(step), model, optimizer, {"step": 0}, keep=2), args.repeat)
        restore = timed(lambda: md.restore(model, optimizer, lambda s: state), args.repeat)
        plain = Path(tmp) / "plain"
        plain.mkdir()
        tensors, _ = optimizer_to_flat(optimizer.state_dict())

        def plain_save() -> None:
            save_model(model, str(plain / "model.safetensors"))
            save_file(tensors, str(plain / "optimizer.safetensors"))

        def plain_load() -> None:
            load_model(model, str(plain / "model.safetensors"), strict=False)
            load_file(str(plain / "optimizer.safetensors"))

        plain_save_s, plain_load_s = timed(plain_save, args.repeat), timed(plain_load, args.repeat)
        size = sum(f.stat().st_size for f in md.latest().iterdir())
        lock.release()
    record = {
        "config": args.config, "config_sha256": config_hash(config), "vocab": args.vocab,
        "parameters": count_parameters(model), "checkpoint_bytes": size, "repeat": args.repeat,
        "save_s": save, "restore_s": restore, "plain_save_s": plain_save_s, "plain_load_s": plain_load_s,
        "note": "save: weights + optimizer + trainer.json with digests, manifest, fsync and renames; restore: "
                "manifest check, digest checks, load into model and optimizer. plain: safetensors save_model/"
                "save_file and load_model/load_file of the same tensors, no hashing, no fsync. Medians.",
    }  # fmt: skip
    print(
        f"{args.config}: {record['parameters']:,} parameters, checkpoint {size / 2**20:.0f} MiB; "
        f"save {save:.3f} s (plain {plain_save_s:.3f} s), restore {restore:.3f} s (plain {plain_load_s:.3f} s)"
    )
    write_record(f"checkpoint_io_{Path(args.config).stem}_cpu", record)


if __name__ == "__main__":
    main()
