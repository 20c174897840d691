"""Checkpoints that resume exactly, survive a crash mid-save, and load without pickle.

Layout of a model directory::

    config.yaml  src_vocab.txt  tgt_vocab.txt  src_tokenizer.json  tgt_tokenizer.json ...
    best.safetensors                weights of the best validation so far
    latest.json                     {"checkpoint": "checkpoints/step-000123"}
    checkpoints/step-000123/
        model.safetensors           weights
        optimizer.safetensors       optimizer tensors, the CPU (and CUDA) RNG state
        trainer.json                step, epoch, data position, scheduler and history

Every write goes to a temporary name first and is renamed into place; `latest.json` is
replaced only once the checkpoint directory is complete. A run killed mid-save therefore
leaves the previous checkpoint, and the pointer to it, intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
BEST = "best.safetensors"
AVERAGED = "averaged.safetensors"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_weights(model: nn.Module, path: Path) -> None:
    """Weights as safetensors, written atomically (tied weights are stored once)."""
    tmp = path.with_name(f".tmp-{path.name}")
    save_model(_unwrap(model), str(tmp))
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: Path) -> None:
    missing, unexpected = load_model(_unwrap(model), str(path), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the model (missing {sorted(missing)}, unexpected {sorted(unexpected)})"
        )


def save_checkpoint(
    model_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any], keep: int,
) -> Path:  # fmt: skip
    """Write checkpoints/step-N, point latest.json at it, keep the `keep` newest."""
    root = model_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    save_model(_unwrap(model), str(tmp / "model.safetensors"))
    tensors, meta = _optimizer_to_flat(optimizer.state_dict())
    tensors.update(_rng_state())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {**trainer_state, "step": step, "optimizer": meta}
    (tmp / "trainer.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(model_dir / LATEST, json.dumps({"checkpoint": f"{CHECKPOINTS}/{name}"}) + "\n")
    for old in list_checkpoints(model_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def average_checkpoints(model: nn.Module, paths: list[Path], output: Path) -> None:
    """Average the weights of `paths` (checkpoint directories) into `output`, using `model`
    (of the right architecture) as the container; its own weights are overwritten."""
    if not paths:
        raise ValueError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    dtypes = {name: t.dtype for name, t in _unwrap(model).state_dict().items()}
    for path in paths:
        load_weights(model, path / "model.safetensors")
        for name, tensor in _unwrap(model).state_dict().items():
            total[name] = total.get(name, 0) + tensor.double()  # type: ignore[operator]
    _unwrap(model).load_state_dict({name: (t / len(paths)).to(dtypes[name]) for name, t in total.items()})
    save_weights(model, output)


def list_checkpoints(model_dir: Path) -> list[Path]:
    """Complete step checkpoints, oldest first."""
    root = model_dir / CHECKPOINTS
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def latest_checkpoint(model_dir: Path) -> Path | None:
    pointer = model_dir / LATEST
    if not pointer.is_file():
        return None
    path = model_dir / json.loads(pointer.read_text("utf-8"))["checkpoint"]
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} points at {path}, which does not exist")
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG state in place; return the trainer state."""
    load_weights(model, path / "model.safetensors")
    state = json.loads((path / "trainer.json").read_text("utf-8"))
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_optimizer_from_flat(tensors, state.pop("optimizer")))
    _set_rng_state(tensors)
    return state


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _optimizer_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def _set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_keys = sorted(
        (k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1])
    )
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
