"""The quickstart as a newcomer runs it: a fresh clone of HEAD beside this checkout (so that
../shared resolves the same way), `./quickstart.sh > LOG 2>&1`, timed from the outside.

    python -m bench.quickstart                 # writes bench/results/quickstart_cpu.json
    python -m bench.quickstart --figure docs/quickstart_attention.png   # also keep its map
    python -m bench.quickstart --keep          # leave the clone (and its runs/) in place

The record holds the wall time of the whole script and of its install step, the training
time and speed, the translations it printed and the test scores of `aligna evaluate`. The
clone installs into its own .venv, so pip's cache (or its absence) shows in the time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from aligna.modeldir import ModelDir
from bench.common import ROOT, record_name, write_record

SCORE = re.compile(r"^\s*(tok_bleu|bleu|chrf|loss|ppl)\s+(-?[\d.]+)")


def parse(log: str) -> dict:
    """The install time, the translations and the test scores quickstart.sh printed."""
    out: dict = {"translations": [], "test": {}}
    section = None
    for line in log.splitlines():
        if m := re.match(r"--- installed in (\d+) s", line):
            out["install_seconds"] = int(m.group(1))
        if line.startswith("---"):
            section = "translations" if "translating" in line else "test" if "test_2016" in line else None
            continue
        if section == "translations" and line and not line.startswith((" ", "attention maps")):
            out["translations"].append(line)
        elif section == "test" and (m := SCORE.match(line)):
            out["test"][m.group(1)] = float(m.group(2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--figure", type=Path, help="copy the first sentence's attention map here")
    parser.add_argument("--keep", action="store_true", help="keep the clone afterwards")
    parser.add_argument("--name", type=record_name, default="quickstart_cpu")
    args = parser.parse_args()
    clone = ROOT.parent / f".aligna-quickstart-{os.getpid()}"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    log_path = clone / "quickstart.log"
    try:
        started = time.perf_counter()
        with open(log_path, "w") as log:
            done = subprocess.run(["bash", "quickstart.sh"], cwd=clone, stdout=log, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - started
        log = log_path.read_text(errors="replace")
        if done.returncode:
            args.keep = True  # for its whole log and what it left
            raise SystemExit(f"quickstart.sh failed ({done.returncode}); the end of its log (all of it: {log_path}):\n"
                             f"{log[-3000:]}")  # fmt: skip
        parsed = parse(log)
        state = ModelDir(clone / "runs" / "quickstart").trainer_state()
        if args.figure:
            args.figure.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(clone / "runs" / "quickstart" / "attention" / "0001.png", args.figure)
        print(log)
        print(f"quickstart.sh: {seconds:.0f} s in all, install {parsed.get('install_seconds')} s, "
              f"training {state['train_seconds']:.0f} s; test {parsed['test']}")  # fmt: skip
        write_record(
            args.name,
            {
                "benchmark": "quickstart",
                "measured_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True,
                                                  text=True).stdout.strip(),  # the clean clone that ran  # fmt: skip
                "config": "configs/quickstart.yaml",
                "seconds": seconds,
                "install_seconds": parsed.get("install_seconds"),
                "train_seconds": state["train_seconds"],
                "train_steps": state["step"],
                "train_target_tokens_per_s": state["tokens"] / max(state["train_seconds"], 1e-9),
                "test_set": "test_2016_flickr (lc.norm.tok), greedy",
                "test": parsed["test"],
                "translations": parsed["translations"],
                "dev_history": state.get("history") or [],
                "figure": str(args.figure) if args.figure else None,
            },
        )
    finally:
        if args.keep:
            print(f"the clone is kept: {clone}")
        else:
            shutil.rmtree(clone, ignore_errors=True)


if __name__ == "__main__":
    main()
