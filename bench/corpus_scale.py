"""Data that scales: preparing and training on Multi30k repeated N times.

For a corpus of the Multi30k de-en training pairs repeated `--repeat` times (written under
runs/corpus_scale/, never into the repository), the quickstart RNN config with
`train.max_steps: 1` is run as a new user would run it, each command in a subprocess of
its own:

1. `aligna prepare CONFIG` (skipped with --baseline): wall time and peak RSS;
2. `aligna train CONFIG --overwrite` on the prepared corpus: wall time, peak RSS, and the
   time from the start of the process to the end of its first update (the `step 1` line of
   train.log, whose timestamps have millisecond resolution).

Peak RSS is measured twice: the largest single process (getrusage of a wrapper's children,
exact) and the sum over the process tree (/proc polled every 50 ms; prepare's encoder
workers count here, and pages they share with the parent are counted once per process).

    python -m bench.corpus_scale --repeat 20                         # this tree
    git worktree add ../aligna-490138e 490138e                       # the code before `aligna prepare`
    python -m bench.corpus_scale --repeat 20 --baseline --tree ../aligna-490138e --name corpus_scale_x20_baseline
    nice -n 10 python -m bench.corpus_scale --repeat 170
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, record_name, write_record

WORK = ROOT / "runs" / "corpus_scale"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
STEP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) DEBUG step 1 loss", re.M)
# The wrapper reports the peak RSS of the largest process among its waited-for descendants.
WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)


def multi30k() -> Path:
    for base in (ROOT.parent / "shared", Path("/work/shared")):
        if (base / "data" / "multi30k").is_dir():
            return base / "data" / "multi30k"
    raise SystemExit("Multi30k not found under ../shared/data/multi30k")


def build_corpus(repeat: int) -> tuple[Path, Path, int]:
    """train.de / train.en: the Multi30k training pairs `repeat` times (plain text)."""
    out = WORK / f"data-x{repeat}"
    src, tgt = out / "train.de", out / "train.en"
    pairs = 0
    for side, path in (("de", src), ("en", tgt)):
        with gzip.open(multi30k() / f"train.lc.norm.tok.{side}.gz", "rb") as f:
            text = f.read()
        pairs = text.count(b"\n")
        if not path.is_file() or path.stat().st_size != len(text) * repeat:
            out.mkdir(parents=True, exist_ok=True)
            with open(path.with_suffix(".tmp"), "wb") as f:
                for _ in range(repeat):
                    f.write(text)
            os.replace(path.with_suffix(".tmp"), path)
    return src, tgt, pairs * repeat


def write_config(src: Path, tgt: Path, model_dir: Path) -> Path:
    """The quickstart config on the big corpus: one update, no dev or test set."""
    config = yaml.safe_load(QUICKSTART.read_text())
    config["model_dir"] = str(model_dir)
    config["data"]["train"] = {"src": str(src), "tgt": str(tgt)}
    config["data"].pop("dev", None)
    config["data"].pop("test", None)
    config["train"].update(max_steps=1, log_every=1, validate_every=0)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    path = model_dir.parent / f"{model_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its descendants (0 once it is gone)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
        except (OSError, ValueError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def run_measured(args: list[str], tree: Path, log: Path) -> dict[str, Any]:
    """Run `python -m aligna ARGS` from `tree`; wall time and peak RSS (MiB)."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    maxrss = log.with_suffix(".maxrss")
    command = [sys.executable, "-c", WRAPPER, str(maxrss), sys.executable, "-m", "aligna", *args]
    started_wall, started = time.time(), time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak_tree = 0
        while process.poll() is None:
            peak_tree = max(peak_tree, tree_rss(process.pid))
            time.sleep(0.05)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({process.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return {
        "started": started_wall,
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(int(maxrss.read_text()) / 1024, 1),  # ru_maxrss is in KiB on Linux
        "peak_tree_rss_mib": round(peak_tree / 2**20, 1),
    }


def tree_commit(tree: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def first_update_seconds(train_log: Path, started: float) -> float:
    match = STEP_LINE.search(train_log.read_text())
    if match is None:
        raise SystemExit(f"{train_log}: no 'step 1' line")
    at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return round(at - started, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20, help="copies of Multi30k (20: 580k pairs)")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the aligna source tree to run (default: this one)")
    parser.add_argument("--baseline", action="store_true", help="no `aligna prepare` step (a tree without it)")
    parser.add_argument("--name", type=record_name, help="record name (default corpus_scale_xN)")
    args = parser.parse_args()

    src, tgt, pairs = build_corpus(args.repeat)
    label = "baseline" if args.baseline else "prepared"
    model_dir = WORK / f"x{args.repeat}-{label}"
    config = write_config(src, tgt, model_dir)
    tree = args.tree.resolve()
    print(f"{pairs} pairs, {tree} ({label})", flush=True)
    record: dict[str, Any] = {
        "repeat": args.repeat, "pairs": pairs, "tree": str(tree), "tree_commit": tree_commit(tree), "mode": label,
        "config": "configs/quickstart.yaml with data.train the repeated corpus (plain text), "
                  "no dev/test, train.max_steps 1",
        "nice": os.nice(0), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"),
    }  # fmt: skip
    if not args.baseline:
        prepare = run_measured(["prepare", str(config)], tree, WORK / f"x{args.repeat}-prepare.out")
        prepare.pop("started")
        record["prepare"] = prepare
        print(f"prepare: {prepare}", flush=True)
    train = run_measured(["train", str(config), "--overwrite", "--no-progress"], tree, WORK / f"x{args.repeat}-{label}.out")
    train["first_update_seconds"] = first_update_seconds(model_dir / "train.log", train.pop("started"))
    record["train"] = train
    print(f"train: {train}", flush=True)
    write_record(args.name or f"corpus_scale_x{args.repeat}", record)


if __name__ == "__main__":
    main()
