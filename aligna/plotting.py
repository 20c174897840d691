"""Figures: one function per kind, each taking plain numbers and labels and writing a file.

matplotlib is imported inside the functions with the non-interactive Agg backend, so
nothing here needs a display and importing aligna stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Tried in order for each glyph (matplotlib >= 3.6 falls back per character), so German,
# French, Greek, Cyrillic and, where such a font is installed, CJK labels all render.
FONTS = ["DejaVu Sans", "Noto Sans", "Noto Sans CJK JP", "Noto Sans CJK SC", "WenQuanYi Zen Hei"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style() -> dict[str, Any]:
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    # text.parse_math off: a user's text is drawn as written ("$5 or $10" is not mathtext, and
    # "$x^$" does not stop the figure)
    fonts = [f for f in FONTS if f in installed] or ["sans-serif"]
    return {"font.family": fonts, "font.size": 9, "text.parse_math": False}


def _save(fig: Any, path: str | Path, dpi: int) -> None:
    """Write the figure whole or not at all: into a file beside `path`, renamed into place."""
    path = Path(path)
    partial = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:  # the format of path's suffix (PNG without one: savefig would add ".png" to the partial file)
        fig.savefig(partial, dpi=dpi, format=path.suffix[1:].lower() or "png")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def plot_attention(
    weights: Any, src_tokens: Sequence[str], tgt_tokens: Sequence[str], path: str | Path,
    title: str | None = None,
) -> None:  # fmt: skip
    """A heatmap of attention weights (T_out, S): one row per output token, one column per
    source token. Weights (h, T_out, S) of several heads give one panel per head plus
    their mean. Subword tokens are shown as the model saw them (sentencepiece's `▁` marks
    the start of a word)."""
    import numpy as np

    plt = _pyplot()
    data = np.asarray(weights, dtype=float)
    panels = [data] if data.ndim == 2 else [*data, data.mean(axis=0)]
    names = [None] if data.ndim == 2 else [f"head {i + 1}" for i in range(len(data))] + ["mean"]
    src_tokens, tgt_tokens = readable(src_tokens), readable(tgt_tokens)
    if panels[0].shape != (len(tgt_tokens), len(src_tokens)):
        raise ValueError(
            f"weights {panels[0].shape} do not match {len(tgt_tokens)} x {len(src_tokens)} labels"
        )
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    width = min(1.6 + 0.3 * len(src_tokens), 30.0)
    height = min(1.4 + 0.28 * len(tgt_tokens), 30.0)
    with plt.rc_context(_style()):
        fig, axes = plt.subplots(
            rows, columns, figsize=(max(width, 3.5) * columns, max(height, 2.5) * rows), squeeze=False,
            layout="constrained",
        )  # fmt: skip
        for ax in axes.flat[len(panels) :]:
            ax.axis("off")
        for ax, panel, name in zip(axes.flat, panels, names):
            image = ax.imshow(
                panel, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest"
            )
            ax.set_xticks(range(len(src_tokens)), src_tokens, rotation=60, ha="right", rotation_mode="anchor")
            ax.set_yticks(range(len(tgt_tokens)), tgt_tokens)
            ax.tick_params(length=0)
            if name:
                ax.set_title(name, fontsize=9)
        fig.colorbar(image, ax=axes, shrink=0.8)
        if title:
            fig.suptitle(title, fontsize=9)
        try:
            _save(fig, path, 110)
        finally:
            plt.close(fig)


def readable(tokens: Sequence[str]) -> list[str]:
    """Axis labels for tokens. For sentencepiece pieces (some start with `▁`, the word
    boundary), a word's first piece is shown bare and a continuation as `·piece`;
    other tokens are shown as they are."""
    if not any(t.startswith("\u2581") for t in tokens):
        return list(tokens)
    special = {"<sos>", "<eos>", "<unk>", "<pad>"}
    return [t if t in special else t[1:] or "\u2423" if t.startswith("\u2581") else f"·{t}" for t in tokens]


def plot_record(record: dict[str, Any], path: str | Path, title: str | None = None) -> None:
    """The heatmap of an attention record (`Translator.attention_record`): its `weights`,
    a row per target token and a column per source token."""
    plot_attention(record["weights"], record["src_tokens"], record["tgt_tokens"], path, title)


def plot_lines(
    series: dict[str, tuple[Sequence[Any], Sequence[float]]], path: str | Path, xlabel: str, ylabel: str,
    title: str | None = None, categorical: bool = True,
) -> None:  # fmt: skip
    """One line per named series of (x, y) points: x as labels (categorical, e.g. source-length
    buckets) or as numbers (e.g. training time)."""
    plt = _pyplot()
    with plt.rc_context(_style()):
        fig, ax = plt.subplots(figsize=(6.0, 3.8))
        lines = [ax.plot([str(x) for x in xs] if categorical else list(xs), ys, marker="o")[0]
                 for xs, ys in series.values()]  # fmt: skip
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(lines, list(series))  # every name, "_x" too (a label= starting with _ is left out)
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        try:
            _save(fig, path, 130)
        finally:
            plt.close(fig)
