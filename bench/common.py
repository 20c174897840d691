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

from aligna.config import Config, config_to_dict, load_config
from aligna.modeldir import CONFIG

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
        # the records are not the code they measured: a record the run itself updates first (a
        # published row counts its test decodes before decoding) leaves the commit clean
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
            cwd=ROOT, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):  # a copy without .git (a device machine's): the caller's word
        return os.environ.get("ALIGNA_GIT_COMMIT", "unknown")


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


# --------------------------------------------------------------------------- the run a record scores


def dotted(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A config section's dict as {"prefix.key.subkey": value}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= dotted(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def differences(run: Config, config: Config, section: str) -> dict[str, dict[str, Any]]:
    """The keys of `section` where a model directory's saved config (`run`) is not `config`:
    {"train.lr": {"run": 0.002, "config": 0.001}, ...}."""
    theirs = dotted(config_to_dict(getattr(run, section)), f"{section}.")
    ours = dotted(config_to_dict(getattr(config, section)), f"{section}.")
    return {k: {"run": theirs.get(k), "config": ours.get(k)}
            for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k)}  # fmt: skip


def run_config(model_dir: Path) -> Config:
    """The config the run in `model_dir` was trained with (its config.yaml)."""
    path = model_dir / CONFIG
    if not path.is_file():
        raise SystemExit(f"{path} is missing: {model_dir} holds no trained run")
    return load_config(path)


def other_model_or_data(run: Config, config: Config) -> str:
    """Where the run's model and data sections differ from `config`'s, in words ('' if nowhere)."""
    found = differences(run, config, "model") | differences(run, config, "data")
    return "; ".join(f"{k} is {v['run']!r} there, {v['config']!r} here" for k, v in found.items())


def overrides_of(run: Config, config: Config) -> list[str]:
    """The --set options that turn `config` into the config `run` was trained with (model_dir
    included): how to train that run again from `config`'s file."""
    items = [f"model_dir={run.model_dir}"] if run.model_dir != config.model_dir else []
    for section in ("data", "model", "train"):
        for key, values in differences(run, config, section).items():
            value = values["run"]
            text = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
            items.append(f"{key}={text}")
    return items


def checked_run(model_dir: Path, config: Config, config_name: str) -> Config:
    """--skip-train: the config the run in model_dir was trained with, refused (SystemExit) unless
    its model and data sections are those of `config` (`config_name` and its --set options)."""
    run = run_config(model_dir)
    found = other_model_or_data(run, config)
    if found:
        raise SystemExit(
            f"--skip-train: the run in {model_dir} was not trained with the model and data settings that "
            f"{config_name} and these --set options give ({model_dir / CONFIG}: {found}); its scores would not be "
            "this row's. Give the --set options it was trained with, or train it (without --skip-train)."
        )
    return run


# The data a config reads that a command makes (not in the repository): a record's reproduce
# line runs it first.
PREPARE = {
    "data/cmudict/": "aligna prepare-cmudict data/cmudict",
    "data/reverse/": "aligna prepare-synthetic reverse data/reverse --min-len 10 --max-len 60 --symbols 26",
}


def prepare_steps(config: Config) -> list[str]:
    """The commands that make the data `config` reads (`PREPARE`), in order, each once."""
    paths = [p for split in (config.data.train, config.data.dev, config.data.test) if split for p in split.paths]
    return [command for prefix, command in PREPARE.items() if any(p.startswith(prefix) for p in paths)]


def train_command(config_path: str, config: Config, overrides: list[str]) -> str:
    """The shell command that trains `config` as a record's run was trained: its data made first."""
    sets = [word for o in overrides for word in ("--set", o)]
    return " && ".join([*prepare_steps(config), shlex.join(["aligna", "train", config_path, *sets])])
