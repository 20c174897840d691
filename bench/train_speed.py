"""Training speed: target tokens per second of the real train step on Multi30k batches.

Each config's model is trained for --warmup untimed and --steps timed updates on the
batches of its first epoch; the record says where it ran and with how many threads.

    python -m bench.train_speed                       # the default configs below
    python -m bench.train_speed configs/X.yaml --steps 50
    python -m bench.train_speed configs/multi30k_de_en_transformer.yaml --device cuda \
        --set train.precision=bf16 --compile --peak-tflops 989   # model FLOPs utilization on an H200
    git worktree add ../aligna-5d95717 5d95717                   # the code to compare with,
    (cd ../aligna-5d95717 && python setup.py build_ext --inplace)  # with its C kernels
    OMP_NUM_THREADS=1 python -m bench.train_speed configs/multi30k_en_de_transformer_tiny.yaml \
        --baseline ../aligna-5d95717 \
        --rounds 2 --steps 20 --name train_speed_tiny_against_5d95717

With --baseline, each round measures the baseline tree and then this one, each in a fresh
process running its own `bench.train_speed` (so its own aligna), and the record gives both
and the speed-up of this tree, from the fastest round of each.

With --peak-tflops (the chip's dense peak for the precision used), the record also gives
the model FLOPs utilization: 6 x (encoder parameters x source tokens + decoder parameters x
target tokens) per update (forward and backward of every weight, Kaplan et al. 2020;
attention scores and embedding lookups left out), over the time, over the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from aligna.build import build_model, count_parameters
from aligna.config import load_config
from aligna.data import Pipeline, collate, encode_pairs, epoch_batches, read_parallel
from aligna.runtime import keep_freed_memory
from aligna.training import make_optimizer, train_step
from bench.common import ROOT, command_line, config_hash, record_name, write_record

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
    parser.add_argument("--name", type=record_name, default="train_speed_cpu")
    parser.add_argument("--baseline", type=Path, help="another aligna tree (a git worktree) to compare with")
    parser.add_argument("--rounds", type=int, default=2, help="with --baseline: rounds of (baseline, this tree)")
    args = parser.parse_args()
    keep_freed_memory()  # as training does
    if args.baseline:
        compare(args)
        return
    results = [measure(c, args.steps, args.warmup, args.device, args.overrides, args.compile, args.peak_tflops)
               for c in args.configs]  # fmt: skip
    write_record(args.name, {"benchmark": "train_speed", "runs": results})


def run_tree(tree: Path, args: argparse.Namespace) -> list[dict]:
    """`python -m bench.train_speed` of `tree`, in a fresh process: its runs."""
    command = [sys.executable, "-m", "bench.train_speed", *args.configs, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device, "--name", "_train_speed_round",
               *[f"--set={o}" for o in args.overrides], *(["--compile"] if args.compile else [])]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run(command, cwd=tree, env=env, check=True)
    path = tree / "bench" / "results" / "_train_speed_round.json"
    record = json.loads(path.read_text())
    path.unlink()
    return record["runs"]


def compare(args: argparse.Namespace) -> None:
    trees = {"baseline": args.baseline.resolve(), "this": ROOT}
    commits = {
        label: subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()
        for label, tree in trees.items()
    }
    rounds = []
    for i in range(args.rounds):
        for label, tree in trees.items():
            print(f"round {i + 1}: {label} ({tree}, {commits[label][:7]})", flush=True)
            rounds.append({"round": i + 1, "tree": label, "runs": run_tree(tree, args)})
    best = {
        label: [max(r["runs"][c]["target_tokens_per_s"] for r in rounds if r["tree"] == label)
                for c in range(len(args.configs))]
        for label in trees
    }  # fmt: skip
    summary = [
        {"config": c, "baseline_tokens_per_s": b, "tokens_per_s": t, "speedup": t / b}
        for c, b, t in zip(args.configs, best["baseline"], best["this"])
    ]
    for s in summary:
        print(f"{s['config']}: {s['baseline_tokens_per_s']:,.0f} -> {s['tokens_per_s']:,.0f} target tokens/s "
              f"({s['speedup']:.2f}x)")  # fmt: skip
    reproduce = (
        f"git worktree add {args.baseline} {commits['baseline'][:7]} && "  # its C kernels built, as this tree's
        f"(cd {args.baseline} && python setup.py build_ext --inplace) && "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())} {command_line()}"
    )
    write_record(args.name, {
        "benchmark": "train_speed_against", "reproduce": reproduce, "baseline_commit": commits["baseline"],
        "threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())), "rounds": rounds,
        "summary": summary, "chosen_by": "the fastest round of each tree",
    })  # fmt: skip


if __name__ == "__main__":
    main()
