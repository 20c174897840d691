"""Shared by the benchmarks: where a result was measured, and how records are written."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from aligna.config import Config, config_to_dict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine() -> dict[str, Any]:
    cpu, fields = platform.processor() or "unknown", {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():  # the first processor's block ends
                break
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    info = {
        "cpu": cpu,
        # A virtual machine's model name may say only "AMD EPYC": the family and model tell the
        # generation (25/1: Zen 3, 25/17: Zen 4), and torch's kernels the vector width it uses.
        "cpu_id": f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}",
        "isa": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def config_hash(config: Config) -> str:
    data = config_to_dict(config)
    data.pop("model_dir", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def command_line() -> str:
    """The command that started this process, to be run again from the repository root:
    `python -m bench.NAME ARGS` for a benchmark (python sets sys.argv[0] to the module's
    file, which cannot be run by path), the arguments as given otherwise; quoted for a POSIX
    shell (`--set 'eval.metrics=[wer, per]'` stays one argument)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        return shlex.join(["python", *sys.argv])
    return shlex.join(["python", "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]])


def record_name(name: str) -> str:
    """An argparse type for --name, checked before the benchmark runs, not after: a record's name,
    which `write_record` turns into bench/results/NAME.json."""
    if not name or Path(name).name != name or name in (".", "..") or name.endswith(".json"):
        raise argparse.ArgumentTypeError(
            f"{name!r}: a record's name, not a path or file name (records are written to bench/results/NAME.json)"
        )
    return name


def write_record(name: str, record: dict[str, Any]) -> Path:
    """bench/results/NAME.json: `record` with the name, date, commit, machine and command line."""
    record_name(name)
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": git_commit(),
        "machine": machine(),
        "command": command_line(),
        **record,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"record written to {path.relative_to(ROOT)}")
    return path
