"""aligna: sequence-to-sequence learning from the RNN encoder-decoder to the Transformer."""

__version__ = "0.1.0"

from .config import Config, ConfigError, load_config  # noqa: E402
from .translate import Translator, load, load_ensemble  # noqa: E402


def train(config: "str | Config", resume: bool = False, overwrite: bool = False, progress: bool = True):
    """Train from a YAML path or a `Config`; returns the model directory."""
    from .training import train as _train

    if not isinstance(config, Config):
        config = load_config(config)
    return _train(config, resume=resume, overwrite=overwrite, progress=progress)


__all__ = ["Config", "ConfigError", "Translator", "load", "load_config", "load_ensemble", "train", "__version__"]
