"""Training throughput of 1 process against N under torchrun, in one run.

    python -m bench.distributed_speed configs/multi30k_de_en_transformer.yaml --processes 1 2 --steps 30

Each setting trains the config from scratch for --steps updates (`aligna train`, or
`torchrun --standalone --nproc_per_node N -m aligna train`), each process with
--threads torch threads and the config's own batch_tokens (so an update of N processes is N
batches), without a dev or test set; the target tokens/s of the updates (what the trainer
logs at the end: setup, vocabulary building and the final checkpoint are not counted) are
compared. Writes bench/results/distributed_speed_<config>_cpu.json (or --name).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from aligna.config import load_config
from bench.common import ROOT, config_hash, record_name, write_record

TRAINED = re.compile(r"trained (\d+) updates, (\d+) target tokens in ([\d.]+) s: (\d+) target tokens/s")


def run(config: str, processes: int, steps: int, threads: int) -> dict:
    model_dir = ROOT / "runs" / "bench-distributed" / f"{Path(config).stem}-{processes}"
    overrides = [f"model_dir={model_dir}", f"train.max_steps={steps}", "train.validate_every=0",
                 f"train.num_threads={threads}", "train.epochs=100", "train.early_stopping_patience=0",
                 "data.dev=null", "data.test=null"]  # fmt: skip
    launcher = [sys.executable, "-m", "aligna"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", "aligna"]
    command = [*launcher, "train", config, "--overwrite", "--no-progress",
               *(a for o in overrides for a in ("--set", o))]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": str(threads)},
                          cwd=ROOT)  # fmt: skip
    found = TRAINED.search(done.stdout + done.stderr)
    if done.returncode or not found:
        raise SystemExit(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    updates, tokens, seconds, _ = found.groups()
    result = {"processes": processes, "threads_per_process": threads, "updates": int(updates),
              "target_tokens": int(tokens), "seconds": float(seconds),
              "target_tokens_per_s": int(tokens) / float(seconds)}  # fmt: skip
    print(f"{processes} process(es) x {threads} thread(s): {result['target_tokens_per_s']:,.0f} target tokens/s "
          f"({tokens} tokens in {float(seconds):.1f} s)", flush=True)  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.distributed_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("config")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--name", type=record_name)
    args = parser.parse_args()
    runs = [run(args.config, n, args.steps, args.threads) for n in args.processes]
    base = runs[0]["target_tokens_per_s"]
    for r in runs:
        r["speedup"] = r["target_tokens_per_s"] / base
    write_record(args.name or f"distributed_speed_{Path(args.config).stem}_cpu", {
        "benchmark": "distributed_speed", "config": args.config, "config_sha256": config_hash(load_config(args.config)),
        "runs": runs,
    })  # fmt: skip


if __name__ == "__main__":
    main()
