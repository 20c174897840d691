"""The Transformer (Vaswani et al. 2017, "Attention Is All You Need").

Encoder layers: multi-head self-attention (Q = K = V from the source) and a position-wise
feed-forward network. Decoder layers: masked multi-head self-attention (a position sees
only itself and earlier positions), encoder-decoder attention (Q from the decoder,
K = V from the encoder) and a feed-forward network. Each sublayer has a residual
connection and layer normalization: after the residual as in the paper (post-norm), or
before the sublayer (pre-norm, Wang et al. 2019), which trains more stably without
warmup tricks and is the default here.

Decoding is incremental: the decoder state caches every layer's self-attention keys and
values, so a step projects only the new token; the encoder-decoder keys and values are
projected once per sentence in `encode`. The cache is part of the explicit state and
reorders along the batch like any other state; a reorder is deferred into the next step's
copy of the cache (one copy per step, not two), and in beam search a sentence's hypotheses
share its encoder-decoder keys and values, attending to them together (`repeat`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiHeadAttention, additive_mask
from .model import Dropout, Reorderable, Seq2Seq, output_layer
from .vocab import PAD_ID


@dataclass
class TransformerEncoderOutput(Reorderable):
    states: Tensor  # (B, S, d_model) the encoder's output ("memory")
    mask: Tensor  # (B, 1, 1, S) additive: 0 at real tokens, -inf at padding; made once per sentence
    cross_keys: list[Tensor]  # per decoder layer (B, h, S, d_k), projected once per sentence
    cross_values: list[Tensor]  # per decoder layer (B, h, S, d_k)
    self_weights: list[Tensor] | None = None  # per encoder layer (B, h, S, S), when asked for
    # Decoder rows per sentence (a beam's hypotheses: `repeat`): the tensors above keep one row
    # per sentence, which the beams of that sentence attend to together, as `beams` queries.
    beams: int = 1
    output: nn.Module | None = None  # the output layer over a vocabulary shortlist (`restrict_output`)

    def repeat(self, k: int) -> TransformerEncoderOutput:
        """k decoder rows per sentence, without copying the sentence: its encoder-decoder
        keys and values are read once per step for all its hypotheses."""
        return dataclasses.replace(self, beams=self.beams * k)

    def reorder(self, index: Tensor) -> TransformerEncoderOutput:
        """index: decoder rows. After `repeat` they come in whole sentences (the beam keeps or
        drops a sentence's hypotheses together), so every `beams`-th names the sentence."""
        return super().reorder(index[:: self.beams] // self.beams if self.beams > 1 else index)


@dataclass
class TransformerState(Reorderable):
    keys: list[Tensor]  # per decoder layer (B', h, t, d_k): self-attention keys of the t tokens so far
    values: list[Tensor]  # per decoder layer (B', h, t, d_k)
    # (B,) the row of keys/values that each row of the state continues; None: row i continues
    # row i (B = B'). A beam reorders its rows at every step, and the next step copies the cache
    # anyway to append its token, so `reorder` leaves the reordering to that copy: one copy of
    # the cache per step (`extend_cache`) instead of two.
    order: Tensor | None = None

    @property
    def length(self) -> int:
        """Tokens decoded so far, the position of the next one."""
        return self.keys[0].size(2)

    def reorder(self, index: Tensor) -> TransformerState:
        return dataclasses.replace(self, order=index if self.order is None else self.order[index])


def extend_cache(cache: Tensor, new: Tensor, order: Tensor | None) -> Tensor:
    """cache (B', h, t, d_k), of which rows `order` (B,) go on (None: all, in order), and the new
    positions' keys or values new (B, h, T, d_k) -> (B, h, t + T, d_k), contiguous, as attention
    reads it fastest: the cache rows are gathered straight into their place, a single copy."""
    if order is None:
        return torch.cat([cache, new], dim=2)
    dtype = torch.promote_types(cache.dtype, new.dtype)  # as cat's: under autocast, new keys may be bf16
    if torch.is_grad_enabled() or cache.dtype != dtype:  # out= is not differentiable, nor converts
        return torch.cat([cache.index_select(0, order), new], dim=2)
    past = cache.size(2)
    out = new.new_empty(new.size(0), new.size(1), past + new.size(2), new.size(3), dtype=dtype)
    torch.index_select(cache, 0, order, out=out[:, :, :past])
    out[:, :, past:] = new
    return out


class PositionalEncoding(nn.Module):
    """Adds position information to scaled embeddings: sinusoidal (Vaswani et al. 2017,
    section 3.5; any length) or learned (one vector per position, up to `max_positions`)."""

    def __init__(self, d_model: int, kind: str, max_positions: int) -> None:
        super().__init__()
        self.kind, self.d_model, self.max_positions = kind, d_model, max_positions
        self.table: nn.Embedding | None = None
        if kind == "learned":
            self.table = nn.Embedding(max_positions, d_model)
            nn.init.normal_(self.table.weight, std=d_model**-0.5)
        else:  # computed once, not once per decoding step; longer sequences compute theirs
            self.register_buffer("sinusoids", sinusoids(torch.arange(max_positions), d_model), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """x (B, T, d_model) for positions offset..offset+T-1."""
        end = offset + x.size(1)
        if self.table is not None:  # learned (a branch TorchScript settles once: `aligna.compiled`)
            if end > self.max_positions:
                raise ValueError(f"sequence of {end} tokens is longer than max_positions={self.max_positions}")
            return x + self.table.weight[offset:end]
        else:
            table = self.sinusoids[offset:end] if end <= self.sinusoids.size(0) else sinusoids(
                torch.arange(offset, end, device=x.device), self.d_model
            )  # fmt: skip
            return x + (table if table.dtype == x.dtype else table.to(x.dtype))


def sinusoids(positions: Tensor, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...) -> (T, d_model)."""
    rates = torch.exp(torch.arange(0, d_model, 2, device=positions.device) * (-math.log(10000.0) / d_model))
    angles = positions.float().unsqueeze(1) * rates  # (T, d_model / 2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :d_model]


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2 (section 3.3), with dropout on the activations."""

    def __init__(self, d_model: int, ff_size: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Linear(d_model, ff_size), nn.Linear(ff_size, d_model)
        self.activation = F.gelu if activation == "gelu" else F.relu
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.activation(self.w1(x))
        return self.w2(self.dropout(h) if self.training else h)  # eval: not even a call


class Sublayer(nn.Module):
    """x + Dropout(f(LayerNorm(x))) (pre-norm) or LayerNorm(x + Dropout(f(x))) (post-norm),
    as `sublayer.output(x, f(sublayer.input(x)))`."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.norm, self.dropout, self.pre_norm = nn.LayerNorm(d_model), Dropout(dropout), pre_norm

    def input(self, x: Tensor) -> Tensor:
        """x (B, T, d) -> what f reads: LayerNorm(x) (pre-norm) or x (post-norm)."""
        return self.norm(x) if self.pre_norm else x

    def output(self, x: Tensor, out: Tensor) -> Tensor:
        """x, f's output (B, T, d) -> the residual sum, normalized after it in post-norm."""
        x = x + (self.dropout(out) if self.training else out)
        return x if self.pre_norm else self.norm(x)


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ff_size: int, dropout: float, attention_dropout: float,
                 activation_dropout: float, activation: str, pre_norm: bool) -> None:  # fmt: skip
        super().__init__()
        self.self_attention = MultiHeadAttention(d_model, heads, attention_dropout)
        self.feed_forward = FeedForward(d_model, ff_size, activation_dropout, activation)
        self.attention_block = Sublayer(d_model, dropout, pre_norm)
        self.ff_block = Sublayer(d_model, dropout, pre_norm)

    def forward(self, x: Tensor, mask: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """x (B, S, d), mask (B, 1, 1, S) additive -> x (B, S, d), self-attention weights (B, h, S, S)."""
        h = self.attention_block.input(x)
        out, weights = self.self_attention.attend(*self.self_attention.project_self(h), mask, need_weights)
        x = self.attention_block.output(x, out)
        x = self.ff_block.output(x, self.feed_forward(self.ff_block.input(x)))
        return x, weights


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ff_size: int, dropout: float, attention_dropout: float,
                 activation_dropout: float, activation: str, pre_norm: bool) -> None:  # fmt: skip
        super().__init__()
        self.self_attention = MultiHeadAttention(d_model, heads, attention_dropout)
        self.cross_attention = MultiHeadAttention(d_model, heads, attention_dropout)
        self.feed_forward = FeedForward(d_model, ff_size, activation_dropout, activation)
        self.self_block = Sublayer(d_model, dropout, pre_norm)
        self.cross_block = Sublayer(d_model, dropout, pre_norm)
        self.ff_block = Sublayer(d_model, dropout, pre_norm)

    def forward(
        self, x: Tensor, cache: tuple[Tensor, Tensor], causal: Tensor | None, cross: tuple[Tensor, Tensor],
        src_mask: Tensor, need_weights: str = "none", beams: int = 1, order: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor | None, Tensor | None]:  # fmt: skip
        """x (B, T, d): the new positions; cache: keys/values (B', h, t, d_k) of the earlier ones,
        of which rows `order` (B,) go on (None: all);
        causal (1, T, t + T): which positions each new one may see (None: all, as for one new
        position); cross: the encoder-decoder keys/values (B / beams, h, S, d_k), src_mask
        (B / beams, 1, 1, S) additive, shared by each `beams` consecutive rows. -> x (B, T, d),
        the extended cache, and the self- and cross-attention weights (B, h, T, *) where
        need_weights asks for them: "all", "cross" or "none"."""
        h = self.self_block.input(x)
        queries, keys, values = self.self_attention.project_self(h)  # (B, h, T, d_k): only the new tokens
        keys, values = extend_cache(cache[0], keys, order), extend_cache(cache[1], values, order)  # (B, h, t + T, d_k)
        out, self_weights = self.self_attention.attend(queries, keys, values, causal, need_weights == "all")
        x = self.self_block.output(x, out)
        h = self.cross_block.input(x)
        out, cross_weights = self.cross_attention(h, cross[0], cross[1], src_mask, need_weights != "none", beams)
        x = self.cross_block.output(x, out)
        x = self.ff_block.output(x, self.feed_forward(self.ff_block.input(x)))
        return x, (keys, values), self_weights, cross_weights


class Transformer(Seq2Seq):
    def __init__(
        self, src_vocab_size: int, tgt_vocab_size: int, d_model: int, heads: int, ff_size: int,
        encoder_layers: int, decoder_layers: int, dropout: float, attention_dropout: float,
        activation_dropout: float, activation: str, pre_norm: bool, positions: str, max_positions: int,
        scale_embeddings: bool, share_embeddings: bool, tie_embeddings: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.d_model, self.heads = d_model, heads
        self.src_embedding = nn.Embedding(src_vocab_size, d_model, padding_idx=PAD_ID)
        self.tgt_embedding = (
            self.src_embedding
            if share_embeddings
            else nn.Embedding(tgt_vocab_size, d_model, padding_idx=PAD_ID)
        )
        self.scale = math.sqrt(d_model) if scale_embeddings else 1.0  # section 3.4
        self.max_len = max_positions if positions == "learned" else None
        self.src_positions = PositionalEncoding(d_model, positions, max_positions)
        self.tgt_positions = PositionalEncoding(d_model, positions, max_positions)
        self.dropout = Dropout(dropout)
        layer_args = (
            d_model,
            heads,
            ff_size,
            dropout,
            attention_dropout,
            activation_dropout,
            activation,
            pre_norm,
        )
        self.encoder_layers = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(decoder_layers))
        # Pre-norm leaves the residual stream unnormalized: one last LayerNorm per stack.
        self.encoder_norm = nn.LayerNorm(d_model) if pre_norm else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model) if pre_norm else nn.Identity()
        self.output = nn.Linear(d_model, tgt_vocab_size)
        self._init_weights()
        if tie_embeddings:  # Press & Wolf (2017); section 3.4
            self.output.weight = self.tgt_embedding.weight

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1 and "embedding" not in name and "table" not in name:
                nn.init.xavier_uniform_(p)
        # src, then tgt (one table when they are shared): a set's order would follow the
        # modules' memory addresses, and one seed would draw either table's weights first
        for embedding in dict.fromkeys([self.src_embedding, self.tgt_embedding]):
            nn.init.normal_(embedding.weight, std=self.d_model**-0.5)  # x sqrt(d) gives unit scale
            nn.init.zeros_(embedding.weight[PAD_ID])

    # ------------------------------------------------------------------ encoder

    def encode(
        self, src: Tensor, src_lengths: Tensor, need_weights: bool = False
    ) -> TransformerEncoderOutput:
        mask = additive_mask(src != PAD_ID)[:, None, None, :]  # (B, 1, 1, S)
        x = self.dropout(self.src_positions(self.src_embedding(src) * self.scale))  # (B, S, d)
        maps = []
        for layer in self.encoder_layers:
            x, weights = layer(x, mask, need_weights)
            maps.append(weights)
        x = self.encoder_norm(x)
        cross = [layer.cross_attention.project(x) for layer in self.decoder_layers]  # once per sentence
        return TransformerEncoderOutput(
            x, mask, [k for k, _ in cross], [v for _, v in cross], maps if need_weights else None
        )

    def restrict_output(self, encoder_output: TransformerEncoderOutput, ids: Tensor) -> TransformerEncoderOutput:  # type: ignore[override]
        from .shortlist import restrict

        return dataclasses.replace(encoder_output, output=restrict(self.output, ids))

    def fuse_projections(self) -> None:
        """Every self-attention's W^Q, W^K, W^V as one product (`MultiHeadAttention.fuse_projections`)."""
        for layer in [*self.encoder_layers, *self.decoder_layers]:
            layer.self_attention.fuse_projections()

    def init_state(self, encoder_output: TransformerEncoderOutput) -> TransformerState:  # type: ignore[override]
        batch, device = encoder_output.states.size(0) * encoder_output.beams, encoder_output.states.device
        empty = torch.zeros(
            batch, self.heads, 0, self.d_model // self.heads, device=device, dtype=encoder_output.states.dtype
        )
        return TransformerState([empty] * len(self.decoder_layers), [empty] * len(self.decoder_layers))

    # ------------------------------------------------------------------ decoder

    def decode(
        self,
        tokens: Tensor,
        state: TransformerState,
        enc: TransformerEncoderOutput,
        need_weights: str = "last",
        keep: Tensor | None = None,
    ) -> tuple[Tensor, TransformerState, Tensor | None, dict[str, list[Tensor]]]:
        """tokens (B, T) at positions state.length.. -> logits (B, T, V), the extended state,
        the last layer's encoder-decoder attention averaged over heads (B, T, S), and with
        need_weights="all" every layer's self- and cross-attention weights (B, h, T, *).
        With `keep` (B, T) bool, the final norm and the output layer run on the kept positions
        only: logits (N, V), N = keep.sum()."""
        past, steps = state.length, tokens.size(1)
        x = self.tgt_positions(self.tgt_embedding(tokens) * self.scale, offset=past)  # (B, T, d)
        x = self.dropout(x) if self.training else x
        # The new position past + i may see positions 0 .. past + i, (1, T, past + T); a single
        # one sees them all.
        causal = (
            None if steps == 1
            else torch.ones(steps, past + steps, dtype=torch.bool, device=tokens.device).tril(diagonal=past)[None]
        )  # fmt: skip
        keys, values, maps = [], [], {"decoder_self": [], "cross": []}
        summary = None
        last = len(self.decoder_layers) - 1
        for i, layer in enumerate(self.decoder_layers):
            wanted = need_weights if need_weights != "last" else "cross" if i == last else "none"
            x, (k, v), self_w, cross_w = layer(
                x, (state.keys[i], state.values[i]), causal, (enc.cross_keys[i], enc.cross_values[i]), enc.mask, wanted,
                enc.beams, state.order,
            )  # fmt: skip
            keys.append(k)
            values.append(v)
            if need_weights == "all":
                maps["decoder_self"].append(self_w)
                maps["cross"].append(cross_w)
            if need_weights != "none" and i == last:
                summary = cross_w.mean(dim=1)  # (B, T, S)
        x = x if keep is None else x[keep]  # (N, d)
        logits = output_layer(self.output if enc.output is None else enc.output, self.decoder_norm(x))  # (B, T, V), or V' over a shortlist
        return logits, TransformerState(keys, values), summary, maps

    def decode_step(
        self,
        prev_tokens: Tensor,
        state: TransformerState,
        encoder_output: TransformerEncoderOutput,  # type: ignore[override]
        need_attention: bool = True,
    ) -> tuple[Tensor, TransformerState, Tensor | None]:
        logits, state, weights, _ = self.decode(
            prev_tokens.unsqueeze(1), state, encoder_output, "last" if need_attention else "none"
        )  # fmt: skip
        return logits.squeeze(1), state, None if weights is None else weights.squeeze(1)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, keep: Tensor | None = None) -> Tensor:
        enc = self.encode(src, src_lengths)
        logits, _, _, _ = self.decode(tgt_in, self.init_state(enc), enc, need_weights="none", keep=keep)
        return logits

    def attention_maps(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> dict[str, Tensor]:
        enc = self.encode(src, src_lengths, need_weights=True)
        _, _, _, maps = self.decode(tgt_in, self.init_state(enc), enc, need_weights="all")
        return {
            "encoder": torch.stack(enc.self_weights, dim=1),  # type: ignore[arg-type]  # (B, L, h, S, S)
            "decoder": torch.stack(maps["decoder_self"], dim=1),  # (B, L, h, T, T)
            "cross": torch.stack(maps["cross"], dim=1),  # (B, L, h, T, S)
        }
