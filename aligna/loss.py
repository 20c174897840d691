"""Token-level cross-entropy, for training and for held-out loss / perplexity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Examples, collate, token_batches
from .model import Seq2Seq
from .vocab import PAD_ID


def sequence_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Summed cross-entropy over non-pad targets. logits (..., V), targets (...): (B, T, V) and
    (B, T), or the kept positions only, (N, V) and (N,).

    With label smoothing (Szegedy et al. 2016) the target distribution puts
    1 - eps on the gold token and eps spread uniformly over the vocabulary.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=PAD_ID,
        label_smoothing=label_smoothing,
        reduction="sum",
    )


@torch.inference_mode()
def corpus_loss(
    model: Seq2Seq, examples: Examples, batch_tokens: int, device: torch.device
) -> tuple[float, int]:
    """Mean per-token cross-entropy (no smoothing) and the number of target tokens; `model`
    is in eval mode (the caller's business: a shared model is never switched here)."""
    total, tokens = 0.0, 0
    lengths = [len(s) for s in examples.src], [len(t) - 1 for t in examples.tgt]
    for index in token_batches(*lengths, batch_tokens):
        batch = collate(examples, index).to(device)
        logits = model(batch.src, batch.src_lengths, batch.tgt_in)
        total += float(sequence_loss(logits, batch.tgt_out))
        tokens += batch.n_tokens
    return total / max(tokens, 1), tokens
