"""JoeyNMT's virtualenv: made (torch and JoeyNMT pinned) when missing, and driver.py run in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import ROOT
from bench.joeynmt.joey_config import JOEYNMT, rel

TORCH = "2.13.0"
DRIVER = Path(__file__).resolve().with_name("driver.py")  # run by path with the venv's python
RESULT_PREFIX = "PEER_RESULT "  # the driver's result line (driver.RESULT_PREFIX)


def joeynmt_version(python: Path) -> str | None:
    """The JoeyNMT version that `python` can import and train with, or None."""
    probe = (
        "import importlib.metadata as m, joeynmt.training, sentencepiece as s; "
        "assert hasattr(s.SentencePieceProcessor, 'SetVocabulary'); print(m.version('joeynmt'))"
    )
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_venv(venv: Path) -> Path:
    """The python of a virtualenv with JoeyNMT 2.3.0, made (or completed) if needed."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} for JoeyNMT {JOEYNMT}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if joeynmt_version(python) != JOEYNMT:
        print(f"{venv}: installing torch=={TORCH} and joeynmt=={JOEYNMT}")
        pip = str(venv / "bin" / "pip")
        subprocess.run([pip, "install", f"torch=={TORCH}"], check=True)
        # JoeyNMT 2.3.0 imports importlib_metadata without declaring it, and calls
        # SentencePieceProcessor.SetVocabulary, which sentencepiece 0.2.2 removed.
        requirements = [f"joeynmt=={JOEYNMT}", "importlib-metadata", "sentencepiece<0.2.2"]
        subprocess.run([pip, "install", *requirements], check=True)
        if joeynmt_version(python) != JOEYNMT:
            raise SystemExit(f"{venv}: JoeyNMT {JOEYNMT} still does not import")
    return python


def run_driver(
    python: Path, command: str, config: Path, options: Sequence[str], threads: int, log: Path
) -> dict[str, Any]:
    """Run one driver command in JoeyNMT's venv; its log (stderr) goes to `log`."""
    cmd = [str(python), str(DRIVER), command, rel(config), *options]
    env = dict(os.environ)
    if threads:
        cmd += ["--threads", str(threads)]
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("w", encoding="utf-8") as stderr:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8").splitlines()[-25:])
        raise SystemExit(f"JoeyNMT failed (exit {done.returncode}): {' '.join(cmd)}\n{tail}\nlog: {rel(log)}")
    results = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not results:
        raise SystemExit(f"JoeyNMT printed no result: {' '.join(cmd)}; log: {rel(log)}")
    return json.loads(results[-1].removeprefix(RESULT_PREFIX))
