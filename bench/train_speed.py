"""Training speed: target tokens per second of the real train step on Multi30k batches.

Each config's model is trained for --warmup untimed and --steps timed updates on the
batches of its first epoch; the record says where it ran and with how many threads.

    python -m bench.train_speed                       # the default configs below
    python -m bench.train_speed configs/X.yaml --steps 50
    python -m bench.train_speed configs/multi30k_de_en_transformer.yaml --device cuda \
        --set train.precision=bf16 --compile --peak-tflops 989   # model FLOPs utilization on an H200

With --peak-tflops (the chip's dense peak for the precision used), the record also gives
the model FLOPs utilization: 6 x (encoder parameters x source tokens + decoder parameters x
target tokens) per update (forward and backward of every weight, Kaplan et al. 2020;
attention scores and embedding lookups left out), over the time, over the peak.
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


def model_flops(model, src_tokens: int, tgt_tokens: int) -> float:
    """6 x (encoder weights x source tokens + decoder weights x target tokens), embeddings out."""
    encoder = decoder = 0
    for name, p in model.named_parameters():
        if "embedding" in name or "table" in name:
            continue
        if name.startswith(("encoder", "src_")):
            encoder += p.numel()
        else:
            decoder += p.numel()
    return 6.0 * (encoder * src_tokens + decoder * tgt_tokens)


def measure(path: str, steps: int, warmup: int, device: str, overrides: list[str] | None = None,
            compile_model: bool = False, peak_tflops: float | None = None) -> dict:  # fmt: skip
    config = load_config(ROOT / path, overrides or [])
    torch.manual_seed(config.train.seed)
    text = read_parallel(config.data.train, "train")
    pipeline = Pipeline.build(config.data, text)
    examples = encode_pairs(pipeline, text, config.data.max_len, config.data.too_long, "train")
    model = build_model(config.model, len(pipeline.src_vocab), len(pipeline.tgt_vocab)).to(device)
    optimizer = make_optimizer(model, config.train)
    step_model = torch.compile(model) if compile_model else model
    batches = epoch_batches(examples, config.train.batch_tokens, config.train.seed, 0)
    tokens, seconds, flops = 0, 0.0, 0.0
    for i in range(warmup + steps):
        batch = collate(examples, batches[i % len(batches)])
        n = batch.n_tokens
        started = time.perf_counter()
        loss, _ = train_step(
            step_model, [batch.to(device)], n, optimizer, config.train, config.train.lr, config.train.teacher_forcing
        )
        float(loss)  # wait for the device (train_step has synced already, to check the loss is finite)
        if i >= warmup:
            tokens, seconds = tokens + n, seconds + time.perf_counter() - started
            flops += model_flops(model, int(batch.src_lengths.sum()), n)
    result = {
        "config": path,
        "overrides": overrides or [],
        "compile": compile_model,
        "precision": config.train.precision,
        "device": device,
        "model_tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / (peak_tflops * 1e12) if peak_tflops else None,
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
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s: also report MFU")
    parser.add_argument("--name", default="train_speed_cpu")
    args = parser.parse_args()
    results = [measure(c, args.steps, args.warmup, args.device, args.overrides, args.compile, args.peak_tflops)
               for c in args.configs]  # fmt: skip
    write_record(args.name, {"benchmark": "train_speed", "runs": results})


if __name__ == "__main__":
    main()
