"""Decoding, written once against `Seq2Seq.encode` / `init_state` / `decode_step`.

No branch here knows which architecture it drives: every model-specific detail lives in
the encoder output and decoder state, which reorder themselves along the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .model import Seq2Seq
from .vocab import EOS_ID, PAD_ID, SOS_ID


@dataclass
class SearchResult:
    """One hypothesis per sentence, in the order of the input batch."""

    tokens: list[list[int]]  # output ids without <sos>, up to but not including <eos>
    scores: Tensor  # (B,) sum of log-probabilities, <eos> included
    attention: list[Tensor] | None  # per sentence (T_out, S_src): weights per output token


def max_lengths(src_lengths: Tensor, a: float, b: int) -> Tensor:
    """Output length limit per sentence, <eos> included: a * |x| + b (at least 1)."""
    return (a * src_lengths.float() + b).long().clamp(min=1)


@torch.no_grad()
def greedy_search(
    model: Seq2Seq, src: Tensor, src_lengths: Tensor, max_len_a: float = 1.5, max_len_b: int = 10
) -> SearchResult:
    """From `<sos>`, feed back the most probable token until `<eos>` or the length limit.

    Sentences that finish leave the batch (their rows are dropped from the state), so no
    work is spent on them.
    """
    batch, src_len = src.shape
    limit = max_lengths(src_lengths, max_len_a, max_len_b)  # (B,)
    steps = int(limit.max())
    enc = model.encode(src, src_lengths)
    state = model.init_state(enc)
    tokens = torch.full((batch, steps), PAD_ID, dtype=torch.long, device=src.device)
    scores = torch.zeros(batch, device=src.device)
    lengths = torch.zeros(batch, dtype=torch.long, device=src.device)  # tokens emitted, <eos> too
    attention: Tensor | None = None
    active = torch.arange(batch, device=src.device)  # input row of each live row
    prev = torch.full((batch,), SOS_ID, dtype=torch.long, device=src.device)
    for t in range(steps):
        logits, state, attn = model.decode_step(prev, state, enc)  # (b, V), (b, S) or None
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        best, prev = log_probs.max(dim=-1)  # (b,)
        tokens[active, t] = prev
        scores[active] += best
        lengths[active] += 1
        if attn is not None:
            if attention is None:
                attention = torch.zeros(batch, steps, src_len, device=src.device)
            attention[active, t] = attn.float()
        done = (prev == EOS_ID) | (t + 1 >= limit[active])
        if bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            active, prev = active[keep], prev[keep]
            state, enc = state.reorder(keep), enc.reorder(keep)
    return _result(tokens, lengths, scores, attention, src_lengths)


def _result(
    tokens: Tensor, lengths: Tensor, scores: Tensor, attention: Tensor | None, src_lengths: Tensor
) -> SearchResult:
    out, maps = [], []
    for i, (row, n) in enumerate(zip(tokens.tolist(), lengths.tolist())):
        out.append(row[: n - 1] if row[n - 1] == EOS_ID else row[:n])
        if attention is not None:  # a row per emitted token (<eos> too), a column per source token
            maps.append(attention[i, :n, : int(src_lengths[i])].cpu())
    return SearchResult(out, scores.cpu(), maps if attention is not None else None)
