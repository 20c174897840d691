"""Files that hold tensors: safetensors that check themselves, written atomically.

Every safetensors file aligna writes carries, in its header, the SHA-256 of the tensors it
holds (their names, dtypes, shapes and bytes); reading it recomputes that digest, so a
truncated, garbled or partly overwritten file is an error that names it, never a silently
different model. Nothing here unpickles: optimizer and RNG state are flat tensors plus JSON.
Where these files live is `modeldir`'s business; this module only reads and writes them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

DIGEST_KEY = "aligna.sha256"  # safetensors header metadata: the digest of the tensors


class DamagedFileError(ValueError):
    """A file that cannot be read back as written (truncated, garbled, foreign); the message
    names the file and what is wrong with it."""


# --------------------------------------------------------------------------- plain files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` so that a crash leaves either the old file or the new one, never a part
    (a failed write leaves no partial file behind). A path that exists and is not a regular
    file (a named pipe), or a device (/dev/stdout, which may be a shell's redirection to a
    file), is written in place: it cannot be replaced. A symbolic link stays: the file it
    points to is replaced."""
    path = Path(path)
    if path.parts[:2] in (("/", "dev"), ("/", "proc")) or (path.exists() and not path.is_file()):
        with open(path, "wb") as f:
            f.write(data)
        return
    if path.is_symlink():
        try:
            path = path.resolve(strict=False)
        except (RuntimeError, OSError):  # a loop of links (RuntimeError before Python 3.13)
            raise OSError(errno.ELOOP, "a loop of symbolic links", str(path)) from None
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_files(texts: dict[Path, str], overwrite: bool = False) -> None:
    """Write each file's text, each atomically: files made from a seed or a package, which the
    same command writes again alike. A file that holds other text is replaced only with
    `overwrite` (a FileExistsError names it, before anything is written)."""
    for path, text in texts.items():
        if not overwrite and path.exists() and (not path.is_file() or path.read_bytes() != text.encode("utf-8")):
            raise FileExistsError(f"{path} exists and holds other data: give --overwrite to replace it, "
                                  "or another directory")  # fmt: skip
    for path, text in texts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)


def read_json(path: Path, what: str = "JSON") -> Any:
    """Parsed JSON of `path`; a missing, unreadable or malformed file is a named error."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DamagedFileError(f"{path}: missing") from None
    except OSError as e:
        raise DamagedFileError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFileError(f"{path}: not valid {what} ({_short(e)})") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- tensors


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over the tensors in name order: name, dtype, shape, then the raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@contextmanager
def _writing(tmp: Path, path: Path) -> Iterator[None]:
    """A failed write (a full disk) removes its temporary file and is an OSError naming `path`
    (safetensors raises its own error type, which callers that handle OSError would miss)."""
    try:
        yield
    except (SafetensorError, OSError) as e:
        tmp.unlink(missing_ok=True)
        errno, message = getattr(e, "errno", None), f"cannot write {path}: {getattr(e, 'strerror', None) or e}"
        raise (OSError(errno, message) if errno else OSError(message)) from None


def save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """A flat name -> tensor file with its digest, written atomically."""
    tmp = path.with_name(f".tmp-{path.name}")
    with _writing(tmp, path):
        save_file(tensors, str(tmp), metadata={DIGEST_KEY: tensor_digest(tensors)})
        _fsync(tmp)
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of `path`, checked against the digest written with them."""
    tensors, metadata = _read(path, lambda: load_file(str(path)))
    _check_digest(path, metadata, tensors)
    return tensors


def tied_names(state: Mapping[str, Tensor]) -> dict[str, str]:
    """The names whose tensor is another name's tensor (tied weights: the same memory, shape and
    strides), each mapped to the one of its group stored in a weights file: the first in sorted
    order, as safetensors' `save_model` chose, so files written before read the same. Views
    that are parts of one buffer are not tied (an LSTM's weights on a GPU, which cuDNN keeps in
    one flat buffer: `save_model` refused those)."""
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        key = (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        groups.setdefault(key, []).append(name)
    return {name: min(names) for names in groups.values() for name in names if name != min(names)}


def _own(t: Tensor) -> Tensor:
    """`t` on the CPU in memory of its own (a view of a larger buffer is copied out)."""
    t = t.detach().to("cpu")
    whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole else t.clone(memory_format=torch.contiguous_format)


def save_weights(model: nn.Module, path: Path) -> None:
    """A model's weights (tied weights stored once, `tied_names`) with their digest, written
    atomically."""
    state = unwrap(model).state_dict()
    tied = tied_names(state)
    tensors = {name: _own(t) for name, t in state.items() if name not in tied}
    tmp = path.with_name(f".tmp-{path.name}")
    with _writing(tmp, path):
        save_file(tensors, str(tmp), metadata={DIGEST_KEY: tensor_digest(state)})
        _fsync(tmp)
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load `path` into `model` in place; the file must fit the model exactly (of tied weights,
    one name of each group) and match its digest (files written before digests existed are
    loaded unchecked)."""
    model = unwrap(model)
    state = model.state_dict()
    tensors, metadata = _read(path, lambda: load_file(str(path)))
    tied = tied_names(state)
    stored = {tied.get(name, name) for name in tensors}  # the groups the file holds
    missing = [name for name in state if name not in tensors and tied.get(name, name) not in stored]
    unexpected = [name for name in tensors if name not in state]
    if missing or unexpected:
        raise DamagedFileError(
            f"{path}: weights do not fit this model (missing {_names(missing)}, unexpected {_names(unexpected)})"
        )
    try:
        model.load_state_dict(tensors, strict=False)  # strict would ask for every tied name
    except RuntimeError as e:  # shapes that differ
        raise DamagedFileError(f"{path}: weights do not fit this model ({_short(e)})") from None
    _check_digest(path, metadata, model.state_dict())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _read(path: Path, read: Any) -> tuple[Any, dict[str, str]]:
    """(read(), header metadata) with every failure turned into a DamagedFileError."""
    if not path.is_file():
        raise DamagedFileError(f"{path}: missing" if not path.exists() else f"{path}: not a file")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        return read(), metadata
    except SafetensorError as e:
        raise DamagedFileError(f"{path}: not a readable safetensors file ({_short(e)})") from None
    except OSError as e:
        raise DamagedFileError(f"{path}: cannot read: {e.strerror or e}") from None


def _check_digest(path: Path, metadata: dict[str, str], tensors: Mapping[str, Tensor]) -> None:
    expected = metadata.get(DIGEST_KEY)
    if expected is not None and tensor_digest(tensors) != expected:
        raise DamagedFileError(f"{path}: checksum mismatch, the tensor data was changed or damaged")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _names(names: Any) -> str:
    names = sorted(names)
    return str(names[:5])[:-1] + (f", ... {len(names) - 5} more]" if len(names) > 5 else "]")


def _short(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- optimizer and RNG


def optimizer_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer state dict as (tensors, JSON-able rest)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(prefix: str = "rng.") -> dict[str, Tensor]:
    """This process's random streams as tensors named PREFIXcpu, PREFIXcuda.N."""
    out = {f"{prefix}cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"{prefix}cuda.{i}"] = s
    return out


def set_rng_state(tensors: dict[str, Tensor], prefix: str = "rng.") -> None:
    torch.set_rng_state(tensors[f"{prefix}cpu"])
    cuda_keys = sorted(
        (k for k in tensors if k.startswith(f"{prefix}cuda.")), key=lambda k: int(k.rsplit(".", 1)[1])
    )
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
