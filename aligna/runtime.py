"""Where and how a model runs: the device, the precision (fp32, bf16 / fp16 autocast,
int8 weights), and how much memory is free there. Training, translation and serving all
take these from here, so each choice is checked, and explained when refused, in one place.
"""

from __future__ import annotations

import copy
import threading
import warnings

import torch
from torch import Tensor, nn

from .model import Seq2Seq


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name[:40]!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # decoding: exact, autocast, autocast, int8 weights


def check_precision(device: torch.device, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (on a CPU use bf16 or int8)")
    if precision == "int8" and device.type != "cpu":
        raise ValueError("precision int8 decodes on a CPU (on a GPU use bf16 or fp16)")


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision (bf16 / fp16) on `device`; fp32 and int8 turn it off."""
    check_precision(device, precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=precision in ("bf16", "fp16"))


def quantize_int8(model: Seq2Seq, per_channel: bool = True) -> Seq2Seq:
    """A copy of `model` for CPU decoding with int8 weights: linear layers that read the same
    input are fused (`Seq2Seq.fuse_projections`), then every nn.LSTM and nn.GRU is replaced by
    PyTorch's dynamically quantized version and every nn.Linear by `Int8Linear` (torch's
    fbgemm and oneDNN int8 kernels, called directly): activations quantized on the fly per
    batch, as CTranslate2 does for CPU inference. A Linear's weights get one scale per output
    row (`per_channel`, as CTranslate2 and fbgemm's kernels do: a row of small weights keeps its
    precision next to a row of large ones, and a fused layer computes exactly what its parts
    did; False: one per tensor); the recurrent cells' weights one per tensor, the only kind
    torch quantizes them with. Embeddings, layer norms and the search itself stay fp32. A
    decode step reads a quarter of the fp32 weight bytes, which is what bounds small-batch
    decoding on a CPU. Activations get one scale per batch (a tensor's padded positions
    included), so unlike fp32 a sentence's output can differ slightly with the sentences it is
    batched with and with the padding that batch adds."""
    try:
        from torch.ao.quantization import (
            default_dynamic_qconfig,
            per_channel_dynamic_qconfig,
            quantize_dynamic,
        )
        from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings
    except ImportError as e:  # torch.ao.quantization is deprecated and may leave a future torch
        raise RuntimeError(
            f"precision int8 needs torch.ao.quantization, which torch {torch.__version__} lacks"
        ) from e
    model = copy.deepcopy(model).eval()
    model.fuse_projections()
    # one quantization at a time: `_pack_onednn` switches torch's global quantized engine for a moment
    with _QUANTIZING, warnings.catch_warnings():  # its deprecation notices, once per module, say nothing to a user
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        linear = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        spec = {nn.Linear: linear, nn.LSTM: default_dynamic_qconfig, nn.GRU: default_dynamic_qconfig}
        mapping = {**get_default_dynamic_quant_module_mappings(), nn.Linear: Int8Linear}
        return quantize_dynamic(model, spec, dtype=torch.qint8, mapping=mapping, inplace=True)


_QUANTIZING = threading.Lock()

# Outputs (rows x out_features) from which a call runs oneDNN's int8 kernel rather than fbgemm's.
# Measured on a Zen 4 core (1 thread, per-row weight scales; microseconds fbgemm / oneDNN):
# fbgemm is faster on a few rows (256 -> 768 at 5 rows: 19 / 52), but slows down once its int32
# output passes about 1 MB, the core's L2 cache (at 320 rows: 750 / 382; 256 -> 8000, the output
# layer: 1,075 / 841 at 64 rows, 10,967 / 4,314 at 320), where oneDNN's time stays linear in the rows.
WIDE_OUTPUT = 200_000


class Int8Linear(nn.Module):
    """y = x W^T + b with int8 W (torch's dynamically quantized kernel, as its quantized
    dynamic Linear): the kernel called directly on its packed weights, for the one-row calls of
    a decoding step, where torch's module spends a third of the time around the kernel (its
    dtype and version checks, a no-op dtype conversion, the operator's Python dispatch).
    The weights are packed twice where torch has both x86 kernels: for fbgemm, which is fastest
    on few rows, and for oneDNN, which is fastest on many (`WIDE_OUTPUT`); both quantize the
    activations and weights alike and compute the same products."""

    def __init__(self, in_features: int, out_features: int, packed: torch.ScriptObject,
                 wide: torch.ScriptObject | None = None) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.packed = packed  # int8 weights with their scales, and the fp32 bias, as the kernel takes them
        self.wide = packed if wide is None else wide  # the same, packed for oneDNN where torch has it
        # rows from which a call takes `wide` (never, without a second packing)
        self.wide_rows = -(-WIDE_OUTPUT // out_features) if wide is not None else 2**31
        self._unpacked: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None  # for `rows`, made on first use

    @classmethod
    def from_float(cls, linear: nn.Module, use_precomputed_fake_quant: bool = False) -> Int8Linear:
        """Quantize `linear` (an nn.Linear with a qconfig, as `quantize_dynamic` passes it)."""
        from torch.ao.nn.quantized.dynamic import Linear

        quantized = Linear.from_float(linear, use_precomputed_fake_quant)
        packed = quantized._packed_params._packed_params
        return cls(linear.in_features, linear.out_features, packed, _pack_onednn(packed))

    def forward(self, x: Tensor) -> Tensor:
        """(*, in_features) fp32 -> (*, out_features) fp32."""
        packed = self.wide if x.numel() // self.in_features >= self.wide_rows else self.packed
        return _LINEAR_INT8(x, packed, True)  # True: 7-bit activations, as torch's module (fbgemm overflow)

    def rows(self, ids: Tensor) -> Int8Linear:
        """The layer over output rows `ids` only (a vocabulary shortlist): the same int8 weights
        and per-row scales, packed anew (once per batch; the unpacked weights are kept from the
        first call, which saves two thirds of the time)."""
        if self._unpacked is None:
            weight, bias = torch.ops.quantized.linear_unpack(self.packed)
            if weight.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric):
                weight = torch.quantize_per_channel(
                    weight.dequantize(), torch.full((weight.size(0),), weight.q_scale(), dtype=torch.double),
                    torch.full((weight.size(0),), weight.q_zero_point(), dtype=torch.long), 0, torch.qint8,
                )  # fmt: skip
            self._unpacked = (weight.int_repr(), weight.q_per_channel_scales(), weight.q_per_channel_zero_points(), bias)
        values, scales, zero_points, bias = self._unpacked
        ids = ids.cpu()
        part = torch._make_per_channel_quantized_tensor(values[ids], scales[ids], zero_points[ids], 0)
        packed = torch.ops.quantized.linear_prepack(part, None if bias is None else bias[ids])
        return Int8Linear(self.in_features, ids.numel(), packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _pack_onednn(packed: torch.ScriptObject) -> torch.ScriptObject | None:
    """`packed`'s weights and bias packed for oneDNN's kernel; None where torch has no oneDNN
    quantized engine, or where `packed` is oneDNN's already."""
    engines = torch.backends.quantized.supported_engines
    if "onednn" not in engines or torch.backends.quantized.engine == "onednn":
        return None
    weight, bias = torch.ops.quantized.linear_unpack(packed)
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "onednn"
        return torch.ops.quantized.linear_prepack(weight, bias)
    finally:
        torch.backends.quantized.engine = engine


# The C++ operator itself: calling it through torch.ops' Python wrapper costs a check of every
# argument for a fake script object, 15% of a one-row call.
_LINEAR_INT8 = torch.ops.quantized.linear_dynamic._op


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every allocation from its heap and keep what is freed there,
    for a CPU training process: its large tensors, (tokens x vocabulary) logits and their
    gradient (over 100 MB each for the tiny Transformer's 4,000-token batches), are otherwise
    each a fresh mmap, returned at free, whose every page then faults in again at first touch.
    That made a pass over such a tensor 3-6x slower than over reused memory (a 120 MB
    subtraction 53 against 10 ms, the bias copy of the output layer 45 against 8 ms), and beam
    search's (rows x vocabulary) scores at batch 64 slower too. The cost: the process keeps its
    peak memory until it exits. The `aligna` command and training call it (a program that
    trains through `aligna.train` or `Trainer` may pass keep_freed=False); a program that
    decodes through `aligna.load` may call it itself. Returns whether it applied (glibc only)."""
    global _KEPT
    if _KEPT is not None:
        return _KEPT
    _KEPT = False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_MAX 0: no allocation is mmapped; M_TRIM_THRESHOLD: freed heap never trimmed
        no_mmap, no_trim = bool(libc.mallopt(-4, 0)), bool(libc.mallopt(-1, 2**31 - 1))  # both tried
        _KEPT = no_mmap and no_trim
    except (OSError, AttributeError):  # not glibc: its allocator's own behaviour stays
        pass
    return _KEPT


_KEPT: bool | None = None


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new model on `device` (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
