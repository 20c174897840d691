"""The interface every aligna model shares, and its explicit, reorderable state.

A model is used in three ways, all through the methods of `Seq2Seq`:

* training, teacher-forced: ``logits = model(src, src_lengths, tgt_in)``;
* search, one step at a time::

      enc = model.encode(src, src_lengths)
      state = model.init_state(enc)
      logits, state, attention = model.decode_step(prev_tokens, state, enc)
      logits, state, _ = model.decode_step(prev_tokens, state, enc, need_attention=False)

* beam search gives each sentence k rows with ``enc.repeat(k)`` and reorders ``enc`` and
  ``state`` along the batch with ``.reorder(index)`` (drop finished sentences, follow
  surviving hypotheses).

Nothing is cached on the module between calls: everything a step needs is in `enc` and
`state`, so the search code never needs to know which architecture it drives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Optional, TypeVar

import torch
from torch import Tensor, nn

from . import kernels

T = TypeVar("T", bound="Reorderable")


class Reorderable:
    """Mixin for dataclasses whose tensors are all batch-first.

    `reorder(index)` selects (and may repeat) batch rows of every tensor field, including
    tensors inside lists and tuples; `None` and non-tensor fields are kept as they are.
    """

    def reorder(self: T, index: Tensor) -> T:
        changes = {f.name: _select(getattr(self, f.name), index) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def repeat(self: T, k: int) -> T:
        """Every row k times in a row (the k hypotheses of a beam): row i becomes rows
        i * k .. i * k + k - 1. A model whose rows need not be copied for that (the
        Transformer's encoder output) overrides this; `reorder` then still takes indices
        of the repeated rows."""
        rows = next(_tensors(self))
        return self.reorder(torch.arange(rows.size(0), device=rows.device).repeat_interleave(k))


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in `value`, in field order."""
    if isinstance(value, Tensor):
        yield value
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _select(value: Any, index: Tensor) -> Any:
    if isinstance(value, Tensor):
        return value.index_select(0, index)
    if isinstance(value, Reorderable):
        return value.reorder(index)
    if isinstance(value, (list, tuple)):
        return type(value)(_select(v, index) for v in value)
    return value


class Dropout(nn.Module):
    """`nn.Dropout` whose mask on a CPU comes from `kernels.dropout_mask` (float32 or bf16; a hash of each
    position under a seed drawn from torch's generator, 8 values at a time), or else from
    `torch.rand`. The `bernoulli_` of torch's dropout draws one number at a time there: 6.3 ms
    on a (4800, 128) activation, 1 thread, against 2.6 for torch.rand and its three passes, and
    0.25-0.6 for the kernel; torch.rand's masks were 7% of the G2P Transformer's training step.
    Other devices take `F.dropout`. The same distribution: each value kept with chance 1 - p and
    scaled by 1 / (1 - p); identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability {p} is not in [0, 1]")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p == 1.0:
            return nn.functional.dropout(x, self.p, True)
        keep: Optional[Tensor] = None  # noqa: UP045 - TorchScript (compiled decoding) reads this annotation
        if not torch.jit.is_scripting():
            keep = self._kernel_mask(x)  # the C kernel's, for float32
        if keep is None:
            keep = torch.rand(x.shape, device=x.device).ge_(self.p).to(x.dtype).div_(1.0 - self.p)  # float32 draws
        return x * keep

    @torch.jit.unused
    def _kernel_mask(self, x: Tensor) -> Optional[Tensor]:  # noqa: UP045
        """`kernels.dropout_mask`, which TorchScript cannot compile (`aligna.compiled` scripts
        the modules that decode, in eval mode, where no mask is drawn); None under
        torch.compile, which traces torch.rand but would break its graph at the C call."""
        return None if torch.compiler.is_compiling() else kernels.dropout_mask(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# An output layer from which fp32 products on a CPU run oneDNN's kernel rather than MKL's (torch's
# default), with at least this many rows. MKL is slow on such a layer: a short inner dimension
# (d_model) and a wide output. On a Zen 3 core (1 thread, ms MKL / oneDNN, 128 -> 7,653 with bias):
# 57 / 34 at 1,000 rows, 183 / 113 at 4,000; gradient of the input 44 / 66 GFLOP/s at 3,900 rows.
# MKL stays faster on a narrow layer (128 -> 1,000: 0.8-0.9x) and equal on a few rows.
WIDE_FP32_FEATURES, WIDE_FP32_ROWS = 4096, 32


def output_layer(layer: nn.Module, x: Tensor) -> Tensor:
    """`layer(x)`, x (..., in) -> (..., out): for a wide nn.Linear (a model's output layer) at fp32
    on a CPU, on oneDNN's kernel (`WIDE_FP32_FEATURES`), forward and backward; the same products
    but for float rounding."""
    rows = x.numel() // max(x.size(-1), 1)
    if not (
        isinstance(layer, nn.Linear) and layer.out_features >= WIDE_FP32_FEATURES and rows >= WIDE_FP32_ROWS
        and x.device.type == "cpu" and x.dtype == layer.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu") and _ONEDNN_LINEAR is not None
    ):  # fmt: skip
        return layer(x)
    flat = x.reshape(rows, x.size(-1)).contiguous()
    bias_grad = layer.bias is not None and layer.bias.requires_grad
    if torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad or bias_grad):
        out = _OneDNNLinear.apply(flat, layer.weight, layer.bias)
    else:
        out = _ONEDNN_LINEAR(flat, layer.weight, layer.bias, "none", [], "")
    return out.view(*x.shape[:-1], layer.out_features)


_ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
)


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b on oneDNN; the input's gradient on oneDNN too (the same shape of product),
    the weight's and bias's on torch's default (MKL is as fast there)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")  # type: ignore[misc]

    @staticmethod
    @torch.autograd.function.once_differentiable  # oneDNN's products are not a graph to differentiate again
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _ONEDNN_LINEAR(grad, weight.t().contiguous(), None, "none", [], "") if ctx.needs_input_grad[0] else None  # type: ignore[misc]
        grad_weight = grad.t().mm(x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


class Seq2Seq(nn.Module):
    """Base class of encoder-decoder models. Shapes: B batch, S source, T target length,
    V target vocabulary. Token ids use `aligna.vocab`'s specials (pad = 0)."""

    # The longest source, and target (<sos> or <eos> included), the model can take: a table
    # of learned positions ends somewhere. None: any length.
    max_len: int | None = None

    def encode(self, src: Tensor, src_lengths: Tensor) -> Reorderable:
        """src (B, S) padded ids, src_lengths (B,) -> the encoder output."""
        raise NotImplementedError

    def init_state(self, encoder_output: Reorderable) -> Reorderable:
        """The decoder state before the first output token."""
        raise NotImplementedError

    def decode_step(
        self, prev_tokens: Tensor, state: Reorderable, encoder_output: Reorderable, need_attention: bool = True
    ) -> tuple[Tensor, Reorderable, Tensor | None]:
        """prev_tokens (B,) -> logits (B, V), the new state, attention (B, S) or None.
        need_attention False: the caller will not read the attention, which a model may then
        skip computing (a Transformer does) and return None for; the logits and state are the same.
        The logits are the caller's: the searches normalize them in place (`kernels.log_softmax_`)."""
        raise NotImplementedError

    def restrict_output(self, encoder_output: Reorderable, ids: Tensor) -> Reorderable:
        """The encoder output, carrying an output layer over the target ids `ids` (V',) only (a
        vocabulary shortlist, `aligna.shortlist`): decode_step's logits are then (B, V'), column j
        for target id ids[j]."""
        raise ValueError(f"the {type(self).__name__} model has no vocabulary shortlist (a Transformer has)")

    def fuse_projections(self) -> None:
        """Merge, in place, linear layers that read the same input into one wider layer, for a
        frozen copy that only decodes (fewer, larger products per step; nothing here to merge
        by default). Training such a copy would not update the original weights."""

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, keep: Tensor | None = None) -> Tensor:
        """Teacher forcing: tgt_in (B, T) = `<sos> y1..` -> logits (B, T, V). With `keep` (B, T)
        bool, the logits of the kept positions only, (N, V) in row-major order, N = keep.sum():
        training keeps the positions whose target is not padding, and a model may then spare the
        output layer the rest."""
        raise NotImplementedError

    def attention_maps(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> dict[str, Tensor]:
        """Every attention map of a teacher-forced pass, each (B, layers, heads, rows, cols):
        "cross" (target positions x source positions) and, where the model has them,
        "encoder" (source x source) and "decoder" (target x target) self-attention.
        Empty for a model without attention."""
        raise NotImplementedError
