"""Ensembles: several models that share their vocabularies decode as one.

At every step each member scores the next token, and the ensemble's distribution is the
mean of the members' probabilities (fairseq's `EnsembleModel`, OpenNMT's `-models a b`), or
their weighted mean (Marian's `--weights`; weights w_m > 0, normalized to sum 1)::

    p(y_t | y_<t, x) = 1/M * sum_m p_m(y_t | y_<t, x)      or      sum_m w_m p_m(y_t | y_<t, x)

so the searches rank hypotheses by the sum of these log-probabilities. Members may be of any
architecture (a Transformer beside an attention LSTM): `Ensemble` is a `Seq2Seq`, driven by
the searches through `encode` / `init_state` / `decode_step` like a single model, and its
encoder output and state are the tuples of its members', reordered together. The attention
it reports is the mean of its members' (those that have attention). Loading model
directories as an ensemble, and checking that they share tokenizers and vocabularies, is
`translate.load_ensemble`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .kernels import log_softmax_
from .model import Reorderable, Seq2Seq


@dataclass
class Members(Reorderable):
    """One encoder output, or one decoder state, per member, in member order; each
    reorders (and repeats for a beam) in its own way."""

    parts: tuple[Reorderable, ...]

    def reorder(self, index: Tensor) -> Members:
        return Members(tuple(p.reorder(index) for p in self.parts))

    def repeat(self, k: int) -> Members:
        return Members(tuple(p.repeat(k) for p in self.parts))


def mean_probabilities(log_probs: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """log(sum_m w_m * exp(log_probs[m])), elementwise: M tensors of the same shape -> one;
    `weights` sum to 1 (None: 1/M each, one shift of the sum rather than M)."""
    if weights is None:
        total = functools.reduce(torch.logaddexp, log_probs)
        return total.sub_(math.log(len(log_probs))) if len(log_probs) > 1 else total
    if not math.isclose(math.fsum(weights), 1.0, rel_tol=1e-9):
        raise ValueError(f"mean_probabilities: the weights must sum to 1, got {list(weights)}")
    return functools.reduce(torch.logaddexp, [lp + math.log(w) for lp, w in zip(log_probs, weights)])


def ensemble_weights(weights: Sequence[float], members: int) -> tuple[float, ...]:
    """`weights`, one positive finite number per member, normalized to sum 1 (a ValueError
    says what is wrong). Scaled by the largest first, so that no sum overflows; a weight so
    small beside the others that it normalizes to 0 is refused (its model would not count,
    and log 0 has no place in the search's sums)."""
    if len(weights) != members:
        raise ValueError(f"{len(weights)} ensemble weights given for {members} models: give one per model")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"ensemble weights must be positive numbers, got {list(weights)}")
    largest = max(weights)
    scaled = [w / largest for w in weights]
    total = math.fsum(scaled)
    normalized = tuple(w / total for w in scaled)
    if min(normalized) < 1e-30:
        raise ValueError(f"ensemble weights {list(weights)}: the smallest is negligible beside the largest; "
                         "give each model a weight within 1e30 of the others, or leave the model out")
    return normalized


class Ensemble(Seq2Seq):
    """Members that share the source and target vocabularies, as one model whose next-token
    distribution is the mean of theirs, or with `weights` (one per member, normalized to sum
    1) their weighted mean. Shapes as `Seq2Seq`'s; decode_step's "logits" are the ensemble's
    log-probabilities (normalized: the searches' log-softmax leaves them as they are). The
    attention is the plain mean of the members' that have attention."""

    def __init__(self, members: Sequence[Seq2Seq], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 models, not {len(members)}")
        self.members = nn.ModuleList(members)
        self.weights = ensemble_weights([1.0] * len(members) if weights is None else weights, len(members))
        self._mix = None if len(set(self.weights)) == 1 else self.weights  # None: the plain mean's fast path
        limits = [m.max_len for m in members if m.max_len is not None]
        self.max_len = min(limits) if limits else None  # every member must take the input

    def encode(self, src: Tensor, src_lengths: Tensor) -> Members:
        return Members(tuple(m.encode(src, src_lengths) for m in self.members))

    def init_state(self, encoder_output: Members) -> Members:  # type: ignore[override]
        return Members(tuple(m.init_state(e) for m, e in zip(self.members, encoder_output.parts)))

    def decode_step(  # type: ignore[override]
        self, prev_tokens: Tensor, state: Members, encoder_output: Members, need_attention: bool = True
    ) -> tuple[Tensor, Members, Tensor | None]:
        log_probs, states, maps = [], [], []
        for member, s, e in zip(self.members, state.parts, encoder_output.parts):
            logits, s, attention = member.decode_step(prev_tokens, s, e, need_attention)  # (B, V), (B, S) or None
            log_probs.append(log_softmax_(logits))  # the member's logits are ours to overwrite
            states.append(s)
            if attention is not None and need_attention:
                maps.append(attention.float())
        attention = torch.stack(maps).mean(0) if maps else None
        return mean_probabilities(log_probs, self._mix), Members(tuple(states)), attention

    def restrict_output(self, encoder_output: Members, ids: Tensor) -> Members:  # type: ignore[override]
        return Members(tuple(m.restrict_output(e, ids) for m, e in zip(self.members, encoder_output.parts)))

    def fuse_projections(self) -> None:
        for member in self.members:
            member.fuse_projections()

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, keep: Tensor | None = None) -> Tensor:
        """Teacher forcing: the ensemble's log-probabilities (B, T, V), or (N, V) with `keep`, as
        `Seq2Seq.forward` gives logits (a cross-entropy of them is the ensemble's)."""
        outputs = [torch.log_softmax(m(src, src_lengths, tgt_in, keep).float(), dim=-1) for m in self.members]
        return mean_probabilities(outputs, self._mix)

    def attention_maps(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> dict[str, Tensor]:
        """{}: the members' layers and heads are not one model's. The map the searches give
        (`decode_step`'s attention, the mean of the members') is the ensemble's."""
        return {}
