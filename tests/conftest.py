"""Shared fixtures: tiny seeded corpora and configs written to a temporary directory."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from aligna.config import Config, config_from_dict
from aligna.synthetic import make_pairs

MULTI30K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"


def reverse_pairs(
    n: int, seed: int, min_len: int = 3, max_len: int = 8, symbols: int = 10
) -> list[tuple[str, str]]:
    """The toy task: a sequence of symbols -> the same sequence reversed."""
    return make_pairs("reverse", n, seed, min_len, max_len, symbols)


def write_tsv(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return path


@pytest.fixture
def toy_config(tmp_path: Path):
    """make(**sections) -> a Config training the reverse task in tmp_path."""

    def make(**overrides: dict) -> Config:
        train = write_tsv(tmp_path / "train.tsv", reverse_pairs(2000, seed=1))
        dev = write_tsv(tmp_path / "dev.tsv", reverse_pairs(100, seed=2))
        raw = {
            "model_dir": str(tmp_path / "run"),
            "data": {"train": {"tsv": str(train)}, "dev": {"tsv": str(dev)}},
            "model": {
                "emb_dim": 16,
                "hidden_size": 32,
                "encoder_layers": 1,
                "decoder_layers": 1,
                "dropout": 0.1,
            },
            "train": {"batch_tokens": 256, "epochs": 1, "validate_every": 20, "log_every": 10},
            "eval": {"metrics": ["wer"]},
        }
        for section, values in overrides.items():
            if isinstance(values, dict):
                raw.setdefault(section, {}).update(values)
            else:
                raw[section] = values
        return config_from_dict(raw)

    return make


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def aligna_log():
    """Everything the "aligna" logger says during a test (it does not propagate to pytest's caplog)."""
    handler = _Records()
    logger = logging.getLogger("aligna")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
