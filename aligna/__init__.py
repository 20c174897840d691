"""aligna: sequence-to-sequence learning from the RNN encoder-decoder to the Transformer."""

__version__ = "0.1.0"

from .config import Config, ConfigError, load_config  # noqa: E402
from .translate import Translator, load, load_ensemble  # noqa: E402


def train(
    config: "str | Config", resume: bool = False, overwrite: bool = False, progress: bool = True,
    keep_freed: bool = True,
):  # fmt: skip
    """Train from a YAML path or a `Config`; returns the model directory. keep_freed False: on a
    CPU, leave this process's malloc settings as they are (see `aligna.runtime.keep_freed_memory`)."""
    from .training import train as _train

    if not isinstance(config, Config):
        config = load_config(config)
    return _train(config, resume=resume, overwrite=overwrite, progress=progress, keep_freed=keep_freed)


__all__ = ["Config", "ConfigError", "Translator", "load", "load_config", "load_ensemble", "train", "__version__"]
