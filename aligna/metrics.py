"""Evaluation metrics: sacreBLEU BLEU and chrF, tokenized BLEU, perplexity, and the word and
phoneme error rates of grapheme-to-phoneme conversion, with ARPAbet stress digits (AH0, AH1)
or without them (`wer_nostress`, `per_nostress`: AH0 and AH1 both count as AH, the variant
that cmusphinx g2p-seq2seq reports).

References are given per sentence as a list, so a sentence may have several (CMUdict
words with more than one pronunciation); a sentence may also have fewer than others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import sacrebleu

HIGHER_IS_BETTER = {"bleu": True, "chrf": True, "tok_bleu": True, "exact": True, "wer": False, "per": False,
                    "wer_nostress": False, "per_nostress": False, "loss": False, "ppl": False}  # fmt: skip
MODEL_METRICS = ("loss", "ppl")  # need the model's probabilities, not only its output (`score` skips them)


@dataclass
class Scores:
    values: dict[str, float] = field(default_factory=dict)
    signatures: dict[str, str] = field(default_factory=dict)  # sacreBLEU signatures

    def __str__(self) -> str:
        return "  ".join(f"{k}={v:.2f}" for k, v in self.values.items())


def score(hypotheses: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str]) -> Scores:
    """Score detokenized `hypotheses` against per-sentence reference lists.

    `metrics` may hold bleu, chrf, tok_bleu, exact, wer, per, wer_nostress and per_nostress
    (loss and ppl need the model and are skipped here).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    check_reference_lists(references)
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
        elif name == "exact":  # percent of outputs equal to a reference, token for token
            out.values[name] = 100.0 - word_error_rate(hypotheses, references)
        elif name == "per":
            out.values[name] = phoneme_error_rate(hypotheses, references)
        elif name in ("wer_nostress", "per_nostress"):
            rate = word_error_rate if name == "wer_nostress" else phoneme_error_rate
            out.values[name] = rate([strip_stress(h) for h in hypotheses],
                                    [[strip_stress(r) for r in refs] for refs in references])  # fmt: skip
        elif name not in MODEL_METRICS:
            raise ValueError(f"unknown metric {name!r}")
    return out


def check_reference_lists(references: Sequence[Sequence[str]]) -> None:
    """One non-empty list of strings per sentence: a str alone would be read as one reference
    per character, and scored without an error."""
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise TypeError(f"references[{i}]: a non-empty list of reference strings, one list per source; "
                            f"got {refs!r:.80}")  # fmt: skip


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


def strip_stress(phonemes: str) -> str:
    """ARPAbet without stress: "K AH0 M P Y UW1 T ER0" -> "K AH M P Y UW T ER"."""
    return " ".join(p.rstrip("012") if p[:1].isalpha() else p for p in phonemes.split())


def perplexity(loss_per_token: float) -> float:
    return math.exp(min(loss_per_token, 100.0))


def bucket_labels(edges: Sequence[int]) -> list[str]:
    """Edges 10, 20 -> ["1-10", "11-20", "21+"]."""
    lows = [1, *(e + 1 for e in edges)]
    return [f"{lo}-{hi}" for lo, hi in zip(lows, edges)] + [f"{lows[-1]}+"]


def bucket_of(length: int, edges: Sequence[int]) -> int:
    return next((i for i, edge in enumerate(edges) if length <= edge), len(edges))


def score_by_length(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], lengths: Sequence[int],
    edges: Sequence[int], metric: str,
) -> list[tuple[str, int, float | None]]:  # fmt: skip
    """`metric` within each source-length bucket: (label, sentences, score or None if empty)."""
    members: list[list[int]] = [[] for _ in range(len(edges) + 1)]
    for i, n in enumerate(lengths):
        members[bucket_of(n, edges)].append(i)
    rows = []
    for label, index in zip(bucket_labels(edges), members):
        value = None
        if index:
            value = score([hypotheses[i] for i in index], [references[i] for i in index], [metric]).values[
                metric
            ]
        rows.append((label, len(index), value))
    return rows
