"""Native code for what torch's operators make slow on a CPU: the log-softmax of a search
step's logits, the training loss over (tokens x vocabulary) logits, and dropout masks.

A beam search step at batch 64, beam 5 normalizes 320 rows of 7,743 logits. torch's
`log_softmax` spends about 4-5 ms on them on a Zen 3 core, nearly all in its exp (SLEEF's, to
1 ulp); the beam then adds each row's score in another pass over the 10 MB and reads them
again for its top-k: together a quarter of the step (the int8 layers are most of the rest).
`log_softmax_` normalizes each row and adds its score in one pass while the row sits in the
core's cache, with a polynomial exp (Cephes', to a few ulp) on 8 floats at a time (1.4 ms for
those 320 rows), and `log_softmax_top_` also picks each sentence's best candidates as it
writes them: `aligna/_kernels.c`, built by `pip install` where a C compiler is found. Without
it, on a processor without AVX2 (`USE`), or for tensors it does not take (not on a CPU, not
float32, not contiguous), the same is computed by torch's operators. The two agree to float
rounding (the tests hold them to 1e-5).

The training loss (`loss._CrossEntropy`) is the same kind of computation: per row, the maximum,
the sum of exp, then the gradient softmax - eps / V - (1 - eps) [gold], written once. torch's
operators take about ten passes over the (N, V) logits for it (120 MB for the tiny
Transformer's 3,900-token batches): forward and backward 110 -> 46 ms on a Zen 3 core.

Both loops release the GIL and split their rows (whole groups of them) among torch's intra-op
threads (`torch.get_num_threads()`), which sit idle while the kernel runs: with 2 threads the
tiny Transformer's loss over a 3,800 x 7,743 batch takes about half the time of one.

Dropout's masks (`model.Dropout`): `torch.rand` draws its floats one at a time from a
Mersenne Twister, then three more passes compare, convert and scale them; `dropout_mask` hashes
each value's position with a 64-bit seed drawn from torch's generator (a counter-based hash, as
torch's CUDA dropout uses Philox), 8 values at a time, and writes the scaled mask in one pass.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

try:
    from . import _kernels  # type: ignore[attr-defined]
except ImportError:  # not compiled: torch's operators below
    _kernels = None


def native() -> bool:
    """Whether the C kernel is there and vectorized on this processor."""
    return _kernels is not None and _kernels.vectorized()


# Where the C code would run its portable loops (no AVX2: an ARM processor, say), torch's own
# vectorized operators are faster on large inputs: the kernel is used where it is vectorized.
# (The tests run the portable loops too, setting this.)
USE = native()


def log_softmax_(logits: Tensor, add: Tensor | None = None) -> Tensor:
    """log_softmax(logits, dim=-1) + add[:, None], in place where it can be: logits (rows, V),
    add (rows,) or None -> (rows, V) float32, the logits' own memory in that case (so the caller
    must own them: a search owns the logits a `decode_step` returns)."""
    rows = logits.size(0)
    if _takes(logits, add):
        _in_parallel(rows, 1, lambda first, count: _kernels.log_softmax_rows(
            _row(logits, first), count, logits.size(1), _row(add, first), 1, 0, 0, 0))  # fmt: skip
        return logits
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    return log_probs if add is None else log_probs.add_(add.reshape(rows, 1))


def log_softmax_top_(logits: Tensor, add: Tensor, group: int, n: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """`log_softmax_(logits, add)` and, in the same pass, the n best of each `group` consecutive
    rows taken as one (a sentence's k beams: k * V candidates), as `top_k` of
    `out.view(-1, group * V)` would give them: out (rows, V), values (rows / group, n), positions
    (rows / group, n) in [0, group * V), best first. None where the kernel does not take these
    tensors (then nothing is computed: the caller takes `log_softmax_` and `top_k`)."""
    rows, cols = logits.shape if logits.dim() == 2 else (0, 0)
    if not _takes(logits, add) or rows % group or not 0 < n <= group * cols:
        return None
    values = torch.empty(rows // group, n, dtype=torch.float32)
    positions = torch.empty(rows // group, n, dtype=torch.long)
    _in_parallel(rows, group, lambda first, count: _kernels.log_softmax_rows(
        _row(logits, first), count, cols, _row(add, first), group, n, _row(values, first // group),
        _row(positions, first // group)))  # fmt: skip
    return logits, values, positions


def cross_entropy(logits: Tensor, targets: Tensor, eps: float, ignore: int) -> tuple[Tensor, Tensor] | None:
    """The summed label-smoothed cross-entropy of `loss._CrossEntropy` and its gradient with
    respect to the logits, in one pass over each row: logits (N, V) float32, targets (N,) ->
    loss (), grad (N, V); rows whose target is `ignore` count 0. None where the kernel does not
    take these tensors (then the caller computes them with torch's operators)."""
    if not _takes(logits.detach(), None) or targets.dtype != torch.long or not targets.is_contiguous():
        return None
    rows, cols = logits.shape
    if targets.device.type != "cpu" or targets.shape != (rows,):  # the C loop reads `rows` targets
        raise ValueError(f"cross_entropy: {tuple(targets.shape)} targets on {targets.device} for {rows} rows of logits")
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    losses = torch.empty(rows, dtype=torch.float32)
    _in_parallel(rows, 1, lambda first, count: _kernels.cross_entropy_rows(
        _row(logits, first), count, cols, _row(targets, first), eps, ignore, _row(grad, first),
        _row(losses, first)))  # fmt: skip
    return losses.sum(), grad


def dropout_mask(like: Tensor, p: float) -> Tensor | None:
    """A dropout mask shaped as `like` and of its dtype (float32, or bf16 under autocast; on a
    CPU): 1 / (1 - p) for a kept value (each with chance 1 - p, to 2^-32), 0 for a dropped one.
    Its 64-bit seed is drawn from torch's generator, so `torch.manual_seed` and a checkpoint's
    saved generator state make the masks as reproducible as torch's own. None where the kernel
    does not run (the caller draws with torch)."""
    n = like.numel()
    wanted = (torch.float32, torch.bfloat16)  # bf16: an activation under autocast, its mask cast
    if not (USE and like.device.type == "cpu" and like.dtype in wanted and 0.0 < p < 1.0 and n <= 1 << 32):
        return None
    mask = torch.empty(like.shape, dtype=torch.float32)
    seed = int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64)) & ((1 << 64) - 1)
    _kernels.dropout_mask(mask.data_ptr(), n, min(int(p * 2.0**32), (1 << 32) - 1), 1.0 / (1.0 - p), seed)
    return mask.to(like.dtype)


def _takes(logits: Tensor, add: Tensor | None) -> bool:
    """Whether the C kernel computes on these tensors (in place, in the logits' memory)."""
    return (
        USE and logits.device.type == "cpu" and logits.dtype == torch.float32
        and logits.dim() == 2 and logits.is_contiguous() and not logits.requires_grad
        and (add is None or (add.dtype == torch.float32 and add.is_contiguous() and add.numel() == logits.size(0)))
    )  # fmt: skip


def _row(t: Tensor | None, i: int) -> int:
    """The address of row i of a contiguous tensor (0 for None: the C code's "no such input")."""
    return 0 if t is None else t.data_ptr() + i * t.stride(0) * t.element_size()


# Below this many rows a thread, splitting costs more than it saves (handing a part to a pooled
# thread and waiting for it: some 10-50 us; a row of 8,000 logits: some 3-7 us).
MIN_ROWS_PER_THREAD = 32
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (its threads, the pool)
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    """In a forked child: the parent's pool object came along, its threads did not."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _in_parallel(rows: int, group: int, run: Callable[[int, int], object]) -> None:
    """run(first row, row count) over `rows` rows cut into at most torch.get_num_threads()
    parts of whole groups, the first part in this thread; the kernel releases the GIL, so the
    parts run at once. An error in any part is raised here."""
    groups = rows // group
    parts = max(1, min(torch.get_num_threads(), groups, rows // MIN_ROWS_PER_THREAD))
    if parts == 1:
        run(0, rows)
        return
    cuts = [group * (groups * i // parts) for i in range(parts + 1)]  # whole groups in each part
    pool = _executor(parts - 1)
    futures = [pool.submit(run, cuts[i], cuts[i + 1] - cuts[i]) for i in range(1, parts)]
    try:
        run(0, cuts[1])
    finally:
        for future in futures:  # every part is finished before the tensors may be freed
            future.exception()
    for future in futures:
        future.result()


def _executor(workers: int) -> ThreadPoolExecutor:
    """The kernels' thread pool, with at least `workers` threads (shared by every thread that
    calls a kernel: a server's requests, say). A pool outgrown is not shut down, since another
    caller may still be handing it work: its threads end once nothing refers to it."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] < workers:
            _pool = (workers, ThreadPoolExecutor(workers, thread_name_prefix="aligna-kernels"))
        return _pool[1]
