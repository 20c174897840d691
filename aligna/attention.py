"""Attention: score a query against every key, softmax the scores over the real (unpadded)
positions, and return the weighted sum of the values.

Every scorer has the same call shape::

    keys = attention.prepare(encoder_states)           # once per sentence, not once per step
    context, weights = attention(query, keys, values, mask)

    query   (B, Tq, Dq)   decoder state(s); Tq = 1 for one search step
    keys    (B, S, *)     `prepare`d keys (projected where the scorer projects them)
    values  (B, S, Dv)
    mask    (B, S) or (B, Tq, S), True where a key may be attended to
    context (B, Tq, Dv),  weights (B, Tq, S): rows sum to 1, exactly 0 where masked

Nothing is stored on the module between calls; prepared keys travel in the encoder output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Base class: subclasses define `score` (and `prepare` if they project the keys)."""

    def prepare(self, keys: Tensor) -> Tensor:
        """Per-sentence key preprocessing, (B, S, Dk) -> (B, S, *)."""
        return keys

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        """(B, Tq, Dq), prepared keys (B, S, *) -> scores (B, Tq, S)."""
        raise NotImplementedError

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.score(query, keys).masked_fill(
            ~_broadcastable(mask, query), float("-inf")
        )  # (B, Tq, S)
        weights = torch.softmax(scores.float(), dim=-1).to(values.dtype)  # (B, Tq, S)
        return torch.bmm(weights, values), weights  # (B, Tq, Dv)


class AdditiveAttention(Attention):
    """score(s, h) = vᵀ tanh(W s + U h).

    Bahdanau et al. (2015), "Neural Machine Translation by Jointly Learning to Align and
    Translate", eq. (6) and appendix A.1.2. It is also Luong et al.'s (2015) "concat"
    score vᵀ tanh(W [s; h]), since W [s; h] = W_s s + W_h h. U h is computed once per
    sentence by `prepare`.
    """

    def __init__(self, query_size: int, key_size: int, hidden_size: int) -> None:
        super().__init__()
        self.query_proj = nn.Linear(query_size, hidden_size, bias=False)  # W
        self.key_proj = nn.Linear(key_size, hidden_size)  # U (its bias is W's bias too)
        self.v = nn.Linear(hidden_size, 1, bias=False)

    def prepare(self, keys: Tensor) -> Tensor:
        return self.key_proj(keys)  # (B, S, A)

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        q = self.query_proj(query).unsqueeze(2)  # (B, Tq, 1, A)
        return self.v(torch.tanh(q + keys.unsqueeze(1))).squeeze(-1)  # (B, Tq, S)


class DotAttention(Attention):
    """score(s, h) = sᵀ h (Luong et al. 2015, "Effective Approaches to Attention-based
    Neural Machine Translation", eq. 8, dot). Needs the query and key sizes to match."""

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        return torch.bmm(query, keys.transpose(1, 2))  # (B, Tq, S)


class GeneralAttention(DotAttention):
    """score(s, h) = sᵀ W h (Luong et al. 2015, eq. 8, general); W h is computed once
    per sentence by `prepare`, after which the score is a dot product."""

    def __init__(self, query_size: int, key_size: int) -> None:
        super().__init__()
        self.key_proj = nn.Linear(key_size, query_size, bias=False)  # W

    def prepare(self, keys: Tensor) -> Tensor:
        return self.key_proj(keys)  # (B, S, Dq)


class ScaledDotProductAttention(DotAttention):
    """score(q, k) = qᵀ k / sqrt(d_k) (Vaswani et al. 2017, "Attention Is All You Need",
    eq. 1). `forward` uses torch's fused kernel unless the weights are asked for or there
    is one query in each of many rows; both paths compute the same function."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        return torch.matmul(query, keys.transpose(-2, -1)) / math.sqrt(query.size(-1))

    def forward(  # type: ignore[override]
        self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, need_weights: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Also accepts a head dimension: query (B, h, Tq, d), keys/values (B, h, S, d), mask
        broadcastable to (B, h, Tq, S): boolean, or additive (`additive_mask`: 0 where a key may
        be attended to, -inf where not, the form the fused kernel takes), or None: every key
        may be attended to."""
        p = self.dropout if self.training else 0.0
        mask = None if mask is None else _broadcastable(mask, query)
        # A few queries per row (a decoding step: one, or a beam's k reading their sentence) in
        # many rows: two matrix products beat the fused kernel's per-row setup (3x at 320 rows x
        # 4 heads and one query on a CPU, 1.2x at 64 rows and 5 queries, even at 16 rows); below
        # 16 rows, for longer queries, and for training, the kernel is faster or leaner.
        few_queries = query.size(-2) <= 8 and query.size(0) >= 16 and not torch.is_grad_enabled()
        # torch's fused kernel differentiates bf16 on a CPU about 7x slower than float32 (57 against
        # 8 ms for 128 rows x 4 heads x 24 queries, forward and backward, on an AMX Xeon core);
        # the two matrix products below take 9 ms: they train bf16 on CPUs.
        slow_backward = query.dtype == torch.bfloat16 and query.device.type == "cpu" and torch.is_grad_enabled()
        if not need_weights and not few_queries and not slow_backward:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, dropout_p=p), None
        scores = self.score(query, keys)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
        weights = weights if weights.dtype == values.dtype else weights.to(values.dtype)
        context = torch.matmul(F.dropout(weights, p) if p else weights, values)
        return context, weights if need_weights else None


class MultiHeadAttention(nn.Module):
    """h heads of scaled dot-product attention over learned projections (Vaswani et al.
    2017, section 3.2.2): MultiHead(Q, K, V) = Concat(head_1..head_h) W^O with
    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    Keys and values are projected by `project` (once per sentence for encoder-decoder
    attention, once per new token for a decoder's self-attention cache), so `forward`
    takes them already split into heads: (B, h, S, d_k). Self-attention projects all three
    from one input with `project_self` and attends with `attend`.
    """

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
        self.heads, self.d_k = heads, d_model // heads
        self.query_proj: nn.Module | None = nn.Linear(d_model, d_model)  # W^Q of all heads
        self.kv_proj: nn.Module | None = nn.Linear(d_model, 2 * d_model)  # W^K and W^V of all heads
        self.out_proj = nn.Linear(d_model, d_model)  # W^O
        self.attention = ScaledDotProductAttention(dropout)
        self.qkv_proj: nn.Module | None = None  # [W^Q; W^K; W^V], made by `fuse_projections`

    def split(self, x: Tensor) -> Tensor:
        """(B, T, h * d_k) -> (B, h, T, d_k)."""
        return x.view(x.size(0), x.size(1), self.heads, self.d_k).transpose(1, 2)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, S, d_model) -> keys, values, each (B, h, S, d_k)."""
        if self.kv_proj is None:
            raise RuntimeError("a fused self-attention projects its keys and values with project_self")
        batch, length, _ = x.shape
        keys, values = self.kv_proj(x).view(batch, length, 2, self.heads, self.d_k).permute(2, 0, 3, 1, 4).unbind(0)
        return keys, values

    def project_self(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention: x (B, T, d_model) -> queries, keys, values of x, each (B, h, T, d_k)."""
        if self.qkv_proj is None:
            return self.split(self.query_proj(x)), *self.project(x)
        batch, length, _ = x.shape
        queries, keys, values = self.qkv_proj(x).view(batch, length, 3, self.heads, self.d_k).permute(2, 0, 3, 1, 4).unbind(0)
        return queries, keys, values

    def fuse_projections(self) -> None:
        """Replace W^Q and [W^K; W^V] by one [W^Q; W^K; W^V] (self-attention, where the three
        read the same input): one matrix product instead of two, per layer and decoding step.
        For a frozen copy that only decodes (`runtime.quantize_int8`): the fused weights are a
        copy, which training would not update, so `query_proj` and `kv_proj` are removed."""
        fused = nn.Linear(self.query_proj.in_features, 3 * self.query_proj.in_features)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([self.query_proj.weight, self.kv_proj.weight]))
            fused.bias.copy_(torch.cat([self.query_proj.bias, self.kv_proj.bias]))
        self.query_proj, self.kv_proj, self.qkv_proj = None, None, fused

    def forward(
        self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, need_weights: bool = False,
        group: int = 1,
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """query (B, T, d_model) attends to keys/values (B, h, S, d_k) -> output (B, T, d_model),
        weights (B, h, T, S) if asked for; the mask as `attend` takes it.

        group > 1: the query has B * group rows, each `group` consecutive ones reading the same
        row of keys and values (the hypotheses of a beam, one sentence). They attend as group * T
        queries of that row, so the keys and values are neither copied per hypothesis nor read
        once per hypothesis at every step."""
        if self.query_proj is None:
            raise RuntimeError("a fused self-attention projects its queries with project_self")
        rows, length, _ = query.shape
        # (B * group, T, d_model) -> (B, group * T, d_model): a sentence's rows are consecutive
        queries = self.split(self.query_proj(query).view(rows // group, group * length, -1))  # (B, h, group * T, d_k)
        out, weights = self.attend(queries, keys, values, mask, need_weights)  # (B, group * T, d_model)
        if weights is not None and group > 1:  # (B, h, group * T, S) -> (B * group, h, T, S)
            weights = weights.unflatten(2, (group, length)).transpose(1, 2).flatten(0, 1)
        return out.view(rows, length, -1), weights

    def attend(
        self, queries: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """queries (B, h, T, d_k), keys/values (B, h, S, d_k), mask (B, S), (B, 1|T, S) or
        (B, 1, 1|T, S), boolean or additive, or None (every key may be attended to)
        -> output (B, T, d_model), weights (B, h, T, S) if asked for."""
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(1)  # (B, 1, T, S): the same for every head
        context, weights = self.attention(queries, keys, values, mask, need_weights)  # (B, h, T, d_k)
        batch, _, length, _ = queries.shape
        context = context.transpose(1, 2).reshape(batch, length, -1)  # (B, T, h * d_k)
        return self.out_proj(context), weights


def additive_mask(mask: Tensor) -> Tensor:
    """A boolean mask (True where a key may be attended to) -> the same shape in float32,
    0 there and -inf elsewhere: what the fused kernel turns a boolean mask into on every
    call, so a mask used at every decoding step is converted once."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))


def _broadcastable(mask: Tensor, query: Tensor) -> Tensor:
    """A key mask (B, S) -> (B, 1, S), or (B, 1, 1, S) for queries with a head dimension."""
    if mask.dim() == 2:
        for _ in range(query.dim() - 2):
            mask = mask.unsqueeze(1)
    return mask


def build_attention(kind: str, query_size: int, key_size: int, hidden_size: int) -> Attention:
    """The scorer named in the config: bahdanau, dot, general or concat."""
    if kind in ("bahdanau", "concat"):
        return AdditiveAttention(query_size, key_size, hidden_size)
    if kind == "general":
        return GeneralAttention(query_size, key_size)
    if kind == "dot":
        if query_size != key_size:
            raise ValueError(
                f"dot attention needs equal query and key sizes, got {query_size} and {key_size}"
            )
        return DotAttention()
    raise ValueError(f"unknown attention {kind!r}")
