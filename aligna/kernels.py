"""Native code for the one step of CPU decoding that torch's operators make slow: the
log-softmax of a search step's logits.

A beam search step at batch 64, beam 5 normalizes 320 rows of 7,743 logits. torch's
`log_softmax` spends about 5 ms on them on a Zen 3 core, nearly all in its exp (SLEEF's, to
1 ulp), then the beam adds each row's score in another pass over the 10 MB: on a par with
the whole decoder step. `log_softmax_` does both in one pass over each row while it sits in
the core's cache, with a polynomial exp (Cephes', to a few ulp) on 8 floats at a time:
`aligna/_kernels.c`, about 80 lines of C, built by `pip install` where a C compiler is found.
Without it, or for tensors it does not take (not on a CPU, not float32, not contiguous), the
same is computed by torch's operators. The two agree to float rounding (the tests hold them
to 1e-5).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from . import _kernels  # type: ignore[attr-defined]
except ImportError:  # not compiled: torch's operators below
    _kernels = None


def native() -> bool:
    """Whether the C kernel is there and vectorized on this processor."""
    return _kernels is not None and _kernels.vectorized()


def log_softmax_(logits: Tensor, add: Tensor | None = None) -> Tensor:
    """log_softmax(logits, dim=-1) + add[:, None], in place where it can be: logits (rows, V),
    add (rows,) or None -> (rows, V) float32, the logits' own memory in that case (so the caller
    must own them: a search owns the logits a `decode_step` returns)."""
    rows = logits.size(0)
    if (
        _kernels is not None and logits.device.type == "cpu" and logits.dtype == torch.float32
        and logits.dim() == 2 and logits.is_contiguous() and not logits.requires_grad
        and (add is None or (add.dtype == torch.float32 and add.is_contiguous() and add.numel() == rows))
    ):  # fmt: skip
        _kernels.log_softmax_rows(logits.data_ptr(), rows, logits.size(1), 0 if add is None else add.data_ptr())
        return logits
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    return log_probs if add is None else log_probs.add_(add.reshape(rows, 1))
