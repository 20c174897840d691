"""Training speed: target tokens per second of the real train step on Multi30k batches.

Each config's model is trained for --warmup untimed and --steps timed updates on the
batches of its first epoch; the record says where it ran and with how many threads.

    python -m bench.train_speed                       # the default configs below
    python -m bench.train_speed configs/X.yaml --steps 50
"""

from __future__ import annotations

import argparse
import time

import torch

from aligna.build import build_model, count_parameters
from aligna.config import load_config
from aligna.data import Pipeline, collate, encode_pairs, epoch_batches, read_parallel
from aligna.training import make_optimizer, train_step
from bench.common import ROOT, config_hash, write_record

DEFAULT = ["configs/multi30k_de_en_lstm.yaml", "configs/multi30k_de_en_gru.yaml", "configs/quickstart.yaml"]


def measure(path: str, steps: int, warmup: int, device: str) -> dict:
    config = load_config(ROOT / path)
    torch.manual_seed(config.train.seed)
    text = read_parallel(config.data.train, "train")
    pipeline = Pipeline.build(config.data, text)
    examples = encode_pairs(pipeline, text, config.data.max_len, config.data.too_long, "train")
    model = build_model(config.model, len(pipeline.src_vocab), len(pipeline.tgt_vocab)).to(device)
    optimizer = make_optimizer(model, config.train)
    batches = epoch_batches(examples, config.train.batch_tokens, config.train.seed, 0)
    tokens, seconds = 0, 0.0
    for i in range(warmup + steps):
        batch = collate(examples, batches[i % len(batches)])
        n = batch.n_tokens
        started = time.perf_counter()
        loss, _ = train_step(
            model, [batch.to(device)], n, optimizer, config.train, config.train.lr, config.train.teacher_forcing
        )
        float(loss)  # wait for the device (train_step has synced already, to check the loss is finite)
        if i >= warmup:
            tokens, seconds = tokens + n, seconds + time.perf_counter() - started
    result = {
        "config": path,
        "config_sha256": config_hash(config),
        "parameters": count_parameters(model),
        "batch_tokens": config.train.batch_tokens,
        "steps": steps,
        "target_tokens": tokens,
        "seconds": seconds,
        "target_tokens_per_s": tokens / seconds,
    }
    print(
        f"{path}: {result['target_tokens_per_s']:,.0f} target tokens/s ({tokens} tokens, {steps} steps, {seconds:.1f} s)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_speed",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("configs", nargs="*", default=DEFAULT)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="train_speed_cpu")
    args = parser.parse_args()
    results = [measure(c, args.steps, args.warmup, args.device) for c in args.configs]
    write_record(args.name, {"benchmark": "train_speed", "runs": results})


if __name__ == "__main__":
    main()
