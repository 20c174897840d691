"""Evaluation metrics: sacreBLEU BLEU and chrF, tokenized BLEU, perplexity, and the word and
phoneme error rates of grapheme-to-phoneme conversion.

References are given per sentence as a list, so a sentence may have several (CMUdict
words with more than one pronunciation); a sentence may also have fewer than others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import sacrebleu

HIGHER_IS_BETTER = {"bleu": True, "chrf": True, "tok_bleu": True, "wer": False, "per": False,
                    "loss": False, "ppl": False}  # fmt: skip


@dataclass
class Scores:
    values: dict[str, float] = field(default_factory=dict)
    signatures: dict[str, str] = field(default_factory=dict)  # sacreBLEU signatures

    def __str__(self) -> str:
        return "  ".join(f"{k}={v:.2f}" for k, v in self.values.items())


def score(hypotheses: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str]) -> Scores:
    """Score detokenized `hypotheses` against per-sentence reference lists.

    `metrics` may hold bleu, chrf, tok_bleu, wer and per (loss and ppl need the model and
    are skipped here).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    out = Scores()
    streams = _streams(references)
    for name in metrics:
        if name == "bleu":
            # force: pre-tokenized data is allowed on purpose; the signature says tok:13a.
            bleu = sacrebleu.BLEU(force=True)
            out.values[name] = bleu.corpus_score(list(hypotheses), streams).score
            out.signatures[name] = str(bleu.get_signature())
        elif name == "tok_bleu":
            # multi-bleu.perl -lc on text that is already tokenized (Multi30k lc.norm.tok).
            bleu = sacrebleu.BLEU(tokenize="none", lowercase=True, force=True)
            out.values[name] = bleu.corpus_score(list(hypotheses), streams).score
            out.signatures[name] = str(bleu.get_signature())
        elif name == "chrf":
            chrf = sacrebleu.CHRF()
            out.values[name] = chrf.corpus_score(list(hypotheses), streams).score
            out.signatures[name] = str(chrf.get_signature())
        elif name == "wer":
            out.values[name] = word_error_rate(hypotheses, references)
        elif name == "per":
            out.values[name] = phoneme_error_rate(hypotheses, references)
        elif name not in ("loss", "ppl"):
            raise ValueError(f"unknown metric {name!r}")
    return out


def _streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-sentence lists -> sacreBLEU's reference streams (None where a sentence has fewer)."""
    width = max(len(r) for r in references) if references else 1
    return [[r[i] if i < len(r) else None for r in references] for i in range(width)]


def word_error_rate(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Percent of sentences whose tokens match none of their references exactly."""
    wrong = sum(all(h.split() != r.split() for r in refs) for h, refs in zip(hypotheses, references))
    return 100.0 * wrong / max(len(hypotheses), 1)


def phoneme_error_rate(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Percent: token edit distance to the closest reference, summed, over the summed
    lengths of those references (between equally close references, the shorter)."""
    errors = length = 0
    for h, refs in zip(hypotheses, references):
        hyp = h.split()
        best_dist, best_len = min((edit_distance(hyp, r.split()), len(r.split())) for r in refs)
        errors += best_dist
        length += best_len
    return 100.0 * errors / max(length, 1)


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between token sequences (substitution, insertion, deletion)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def perplexity(loss_per_token: float) -> float:
    return math.exp(min(loss_per_token, 100.0))
