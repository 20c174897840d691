"""Token-level cross-entropy, for training and for held-out loss / perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .data import Examples, collate, token_batches
from .model import Seq2Seq
from .vocab import PAD_ID


def sequence_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Summed cross-entropy over non-pad targets. logits (..., V), targets (...): (B, T, V) and
    (B, T), or the kept positions only, (N, V) and (N,).

    With label smoothing (Szegedy et al. 2016) the target distribution puts
    1 - eps on the gold token and eps spread uniformly over the vocabulary.
    """
    logits, targets = logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)
    if logits.device.type == "cpu":
        return _CrossEntropy.apply(logits, targets, label_smoothing)
    return F.cross_entropy(logits, targets, ignore_index=PAD_ID, label_smoothing=label_smoothing, reduction="sum")


LOG2E = math.log2(math.e)


class _CrossEntropy(torch.autograd.Function):
    """`F.cross_entropy(logits, targets, ignore_index=PAD_ID, label_smoothing=eps,
    reduction="sum")` for the CPU, in fewer passes over the (N, V) logits, with one (N, V)
    buffer where torch's allocates several (each a fresh mmap that the kernel then faults
    in), and exp(x) as exp2(x log2 e): torch's CPU exp is about 3x slower than its exp2 on
    AVX-512. Equal up to float rounding (the tests hold it to F.cross_entropy).

    Row i with gold g and lse_i = log sum_v exp(x_iv): loss_i = lse_i - (1 - eps) x_ig -
    eps mean_v x_iv, and d loss_i / d x_iv = softmax(x_i)_v - (1 - eps) [v = g] - eps / V,
    which the forward pass already computes in its buffer (in C where `kernels.cross_entropy`
    takes the tensors, one pass a row); backward scales it in place, so it runs once (a graph
    kept with retain_graph=True cannot run it again: an error says so)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        native = kernels.cross_entropy(logits, targets, eps, PAD_ID)  # the same, in C, one pass a row
        if native is not None:
            loss, grad = native
            ctx.save_for_backward(grad)
            ctx.spent = False
            return loss
        kept = (targets != PAD_ID).unsqueeze(1)  # (N, 1): False for padding
        gold = targets.unsqueeze(1)  # (N, 1)
        rows = -(1 - eps) * logits.gather(1, gold)
        if eps:  # (not at 0: 0 * a -inf logit would be nan)
            rows -= eps * logits.mean(-1, keepdim=True)
        top = logits.amax(-1, keepdim=True)  # (N, 1), so that exp cannot overflow
        grad = torch.sub(logits, top).mul_(LOG2E).exp2_()  # (N, V) exp(x - top)
        total = grad.sum(-1, keepdim=True)
        rows += top + total.log()  # + lse
        rows = torch.where(kept, rows, 0.0)  # padding counts 0, whatever its logits
        if not ctx.needs_input_grad[0]:  # held-out loss
            return rows.sum()
        grad.div_(total).sub_(eps / logits.size(-1))  # softmax - eps / V
        grad.scatter_add_(1, gold, torch.full(gold.shape, -(1 - eps), dtype=grad.dtype))
        if not bool(kept.all()):  # training passes only the non-pad positions
            grad.masked_fill_(~kept, 0.0)
        ctx.save_for_backward(grad)
        ctx.spent = False
        return rows.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable  # its gradient is computed, not a graph
    def backward(ctx, scale: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        if ctx.spent:
            raise RuntimeError("aligna's CPU cross-entropy runs backward once: its gradient is scaled in place")
        ctx.spent = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(scale), None, None


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
