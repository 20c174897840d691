"""Several models on one test set, scored within source-length buckets: the experiment
that shows a fixed-size context vector losing information as sentences grow (Cho et al.
2014, "On the Properties of Neural Machine Translation: Encoder-Decoder Approaches";
Bahdanau et al. 2015, figure 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metrics import HIGHER_IS_BETTER, MODEL_METRICS, bucket_labels, score, score_by_length
from .translate import TextTranslator


@dataclass
class Comparison:
    edges: list[int]  # bucket upper edges: 10, 20 -> 1-10, 11-20, 21+
    models: dict[str, dict[str, Any]]  # name -> {"metric", "all", "buckets": [{lengths, sentences, score}]}

    def table(self) -> str:
        """A markdown table: a row per model, a column per bucket (its sentence count in brackets)."""
        labels = bucket_labels(self.edges)
        counts = [b["sentences"] for b in next(iter(self.models.values()))["buckets"]]
        lines = [
            "| model | " + " | ".join(f"{lab} ({n})" for lab, n in zip(labels, counts)) + " | all |",
            "|---" * (len(labels) + 2) + "|",
        ]
        for name, m in self.models.items():
            cells = ["-" if b["score"] is None else f"{b['score']:.1f}" for b in m["buckets"]]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['all']:.1f} |")
        return "\n".join(lines)

    @property
    def metric(self) -> str:
        return "/".join(sorted({m["metric"] for m in self.models.values()}))

    def plot(self, path: str | Path, title: str | None = None) -> None:
        from .plotting import plot_lines

        series = {
            name: ([b["lengths"] for b in m["buckets"] if b["score"] is not None],
                   [b["score"] for b in m["buckets"] if b["score"] is not None])
            for name, m in self.models.items()
        }  # fmt: skip
        plot_lines(series, path, "source length (tokens)", self.metric, title)


def compare_by_length(
    translators: dict[str, TextTranslator], sources: Sequence[str], references: Sequence[Sequence[str]],
    edges: Sequence[int], metric: str | None = None, batch_size: int | None = None, **search: object,
) -> Comparison:  # fmt: skip
    """Translate `sources` with every model and score each length bucket (length: the
    whitespace tokens of the source line, the same for every model). `metric` defaults to
    each model's first eval.metrics entry that scores text (not loss or ppl, which need the
    model). Every model's metric is checked before any model translates."""
    edges = sorted(set(edges))
    chosen = {name: _metric(name, translator, metric) for name, translator in translators.items()}
    lengths = [len(s.split()) for s in sources]
    models = {}
    for name, translator in translators.items():
        hypotheses = translator.translate(sources, batch_size, **search)
        rows = score_by_length(hypotheses, references, lengths, edges, chosen[name])
        models[name] = {
            "metric": chosen[name],
            "all": score(hypotheses, references, [chosen[name]]).values[chosen[name]],
            "buckets": [{"lengths": b, "sentences": n, "score": v} for b, n, v in rows],
        }
    return Comparison(edges, models)


def _metric(name: str, translator: TextTranslator, metric: str | None) -> str:
    """The metric that scores `name`'s translations by length, or a ValueError saying why none."""
    by_text = [m for m in HIGHER_IS_BETTER if m not in MODEL_METRICS]
    if metric is not None:
        if metric not in by_text:
            raise ValueError(f"--metric {metric}: compare scores translations by length with one of "
                             f"{', '.join(by_text)}" + (" (loss and ppl need the model, not its output)"
                                                        if metric in MODEL_METRICS else ""))  # fmt: skip
        return metric
    listed = translator.config.eval.metrics
    chosen = next((m for m in listed if m not in MODEL_METRICS), None)
    if chosen is None:
        raise ValueError(f"model {name}: its eval.metrics {list(listed)} name no metric that scores translations "
                         f"({', '.join(by_text)}): give --metric")  # fmt: skip
    return chosen
