"""aligna: sequence-to-sequence learning from the RNN encoder-decoder to the Transformer."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .config import Config, ConfigError, config_from_dict, load_config  # noqa: E402

if TYPE_CHECKING:
    from .translate import Translator, load, load_ensemble

# Imported on first use, so that `import aligna` (and with it the `aligna` command) starts without
# torch: Ctrl-C while torch loads is then the command's clean "interrupted", and `--help` is quick.
_LAZY = {"Translator": "translate", "load": "translate", "load_ensemble": "translate"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _submodules():  # aligna.translate, aligna.search, ... as an eager import made them
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _submodules() -> set[str]:
    import pkgutil

    return {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def train(
    config: str | Path | dict | Config, resume: bool = False, overwrite: bool = False, progress: bool = True,
    keep_freed: bool = True,
):  # fmt: skip
    """Train from a YAML path, a mapping of sections (as a YAML file reads) or a `Config`;
    returns the model directory. keep_freed False: on a CPU, leave this process's malloc
    settings as they are (see `aligna.runtime.keep_freed_memory`)."""
    from .training import train as _train

    if isinstance(config, dict):
        config = config_from_dict(config)
    elif not isinstance(config, Config):
        config = load_config(config)
    return _train(config, resume=resume, overwrite=overwrite, progress=progress, keep_freed=keep_freed)


__all__ = ["Config", "ConfigError", "Translator", "config_from_dict", "load", "load_config", "load_ensemble", "train",
           "__version__"]
