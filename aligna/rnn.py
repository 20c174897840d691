"""The RNN encoder-decoder (Sutskever et al. 2014, "Sequence to Sequence Learning with
Neural Networks"; Cho et al. 2014, "Learning Phrase Representations using RNN
Encoder-Decoder for Statistical Machine Translation").

The encoder reads x1..xS and keeps its final state; the top layer's final state is the
context vector C. The decoder starts from C (through a bridge where the two differ in
layers or sizes) and predicts y_t from y_{t-1} and its state. With ``feed_context``,
C also enters every decoder step and the output layer, as in Cho et al. (2014) eq. (4);
their maxout output layer is replaced by a plain linear projection.

With attention the decoder looks back at every encoder state at every step instead:
`BahdanauDecoder` (Bahdanau et al. 2015) attends before its recurrence, `LuongDecoder`
(Luong et al. 2015) after it; the scorers live in `aligna.attention`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .attention import Attention
from .model import Dropout, Reorderable, Seq2Seq, output_layer
from .vocab import PAD_ID


@dataclass
class RNNEncoderOutput(Reorderable):
    states: Tensor  # (B, S, D) top-layer output at every position, zeros at padding
    mask: Tensor  # (B, S) True at real tokens
    hidden: Tensor  # (B, L_enc, D) final hidden state of every layer, directions concatenated
    cell: Tensor | None  # (B, L_enc, D) final LSTM cell state, None for a GRU
    keys: Tensor | None = None  # (B, S, *) attention keys, prepared once per sentence

    @property
    def context(self) -> Tensor:
        """C: the top layer's final hidden state, (B, D)."""
        return self.hidden[:, -1]


@dataclass
class RNNState(Reorderable):
    hidden: Tensor  # (B, L_dec, H)
    cell: Tensor | None  # (B, L_dec, H), LSTM only
    attentional: Tensor | None = None  # (B, 1, H) Luong's h~_{t-1}, for input feeding


def _rnn(
    cell: str, input_size: int, hidden_size: int, layers: int, dropout: float, bidirectional: bool = False
) -> nn.RNNBase:
    cls = nn.LSTM if cell == "lstm" else nn.GRU
    return cls(
        input_size, hidden_size, layers, batch_first=True,
        dropout=dropout if layers > 1 else 0.0, bidirectional=bidirectional,
    )  # fmt: skip


def recurrence(rnn: nn.Module, inputs: Tensor | PackedSequence, state: Tensor | tuple[Tensor, Tensor] | None = None):
    """rnn(inputs, state), except for an LSTM under CPU bf16 autocast on a processor without
    native bf16 (no AVX-512 BF16 or AMX: a Zen 3, say), which runs in fp32 there: autocast sends
    it to oneDNN's bf16 LSTM, which such a processor cannot build ("could not create a primitive
    descriptor for the LSTM forward propagation primitive", torch 2.13)."""
    if isinstance(rnn, nn.LSTM) and torch.is_autocast_enabled("cpu") and not _cpu_bf16():
        with torch.autocast("cpu", enabled=False):
            state = state if state is None else tuple(s.float() for s in state)
            return rnn(inputs.float() if isinstance(inputs, Tensor) else inputs.to(torch.float32), state)
    return rnn(inputs) if state is None else rnn(inputs, state)


@functools.cache
def _cpu_bf16() -> bool:
    """Whether oneDNN computes bf16 natively on this CPU (torch's own test; True where torch lacks it)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def init_forget_bias(module: nn.Module, value: float) -> None:
    """Set the forget-gate bias of every LSTM in `module` to `value` (Jozefowicz et al. 2015,
    "An Empirical Exploration of Recurrent Network Architectures", section 2.2: 1).

    torch draws every bias from U(-1/sqrt(H), 1/sqrt(H)), so the forget gate starts near
    sigmoid(0) = 0.5 and what the cell holds halves at every step: gradients through c vanish
    over a sentence until the bias is learned. torch adds two biases, b_ih + b_hh, with
    the gates in the order i, f, g, o; the forget slice of b_ih gets `value` and that of
    b_hh 0, so their sum is `value`, not twice it."""
    for lstm in (m for m in module.modules() if isinstance(m, nn.LSTM)):
        h = lstm.hidden_size
        with torch.no_grad():
            for name, bias in lstm.named_parameters():
                if name.startswith("bias_"):  # bias_ih_l{k}[_reverse], bias_hh_l{k}[_reverse]
                    bias[h : 2 * h].fill_(value if name.startswith("bias_ih") else 0.0)


def init_uniform(module: nn.Module, init_range: float) -> None:
    """Draw every weight of `module` but the embeddings from U(-init_range, init_range), as
    Luong et al. (2015, section 4.1: 0.1) and Sutskever et al. (2014: 0.08) do, in place of
    torch's U(+-1/sqrt(fan_in)) (+-0.044 for the recurrent weights at H = 512). Deviation:
    the embeddings keep torch's N(0, 1), which learned faster (issue 16).

    Measured on de->en (issue 16): with torch's init a bi-LSTM encoder's attention
    collapses within 150 updates onto the last source word for every target word (weight
    1.0), and the decoder falls back to a fixed context vector; from U(-0.1, 0.1) it
    spreads over the source words."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in embeddings:  # a tied output projection is an embedding too
                p.uniform_(-init_range, init_range)


def _batch_first(state: Tensor, layers: int, directions: int) -> Tensor:
    """torch's (L * dirs, B, H) final state -> (B, L, dirs * H)."""
    _, batch, hidden = state.shape
    return (
        state.view(layers, directions, batch, hidden)
        .permute(2, 0, 1, 3)
        .reshape(batch, layers, directions * hidden)
    )


def _reversal(lengths: Tensor, width: int) -> Tensor:
    """(B, width) indices that reverse each row's first lengths[b] positions and leave its
    padding where it is: its own inverse."""
    positions = torch.arange(width, device=lengths.device).expand(lengths.size(0), width)
    last = (lengths - 1).unsqueeze(1)
    return torch.where(positions <= last, last - positions, positions)


class RNNEncoder(nn.Module):
    def __init__(
        self, vocab_size: int, emb_dim: int, hidden_size: int, layers: int, cell: str,
        bidirectional: bool, dropout: float, reverse_source: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=PAD_ID)
        self.dropout = Dropout(dropout)
        self.rnn = _rnn(cell, emb_dim, hidden_size, layers, dropout, bidirectional)
        self.layers, self.directions = layers, 2 if bidirectional else 1
        self.output_size = hidden_size * self.directions
        self.reverse_source = reverse_source

    def forward(self, src: Tensor, src_lengths: Tensor) -> RNNEncoderOutput:
        order = _reversal(src_lengths, src.size(1)) if self.reverse_source else None  # (B, S)
        emb = self.dropout(self.embedding(src if order is None else src.gather(1, order)))  # (B, S, E)
        # Packing keeps padding out of the recurrence, in both directions.
        packed = pack_padded_sequence(emb, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, final = recurrence(self.rnn, packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))  # (B, S, D)
        if order is not None:  # back into source order, so that attention's j-th state is word j's
            states = states.gather(1, order.unsqueeze(2).expand_as(states))
        h, c = final if isinstance(final, tuple) else (final, None)  # (L * dirs, B, H)
        return RNNEncoderOutput(
            states=states,
            mask=src != PAD_ID,
            hidden=_batch_first(h, self.layers, self.directions),  # (B, L, D)
            cell=None if c is None else _batch_first(c, self.layers, self.directions),
        )


class Bridge(nn.Module):
    """Encoder final state (B, L_enc, D) -> decoder initial state (B, L_dec, H).

    Where layers and sizes match this is the identity (Sutskever et al. 2014). Otherwise
    each layer's state goes through a linear map (tanh for the hidden state, as in Cho
    et al. 2014 eq. 5's initialization); with different layer counts every decoder layer
    starts from the encoder's top layer.
    """

    def __init__(self, enc_layers: int, enc_dim: int, dec_layers: int, dec_hidden: int, lstm: bool) -> None:
        super().__init__()
        self.dec_layers = dec_layers
        self.same_layers = enc_layers == dec_layers
        self.identity = self.same_layers and enc_dim == dec_hidden
        if not self.identity:
            self.hidden = nn.Linear(enc_dim, dec_hidden)
            self.cell = nn.Linear(enc_dim, dec_hidden) if lstm else None

    def forward(self, enc: RNNEncoderOutput) -> RNNState:
        hidden, cell = enc.hidden, enc.cell
        if self.identity:
            return RNNState(hidden, cell)
        if not self.same_layers:  # (B, 1, D) -> (B, L_dec, D)
            hidden = hidden[:, -1:].expand(-1, self.dec_layers, -1)
            cell = None if cell is None else cell[:, -1:].expand(-1, self.dec_layers, -1)
        return RNNState(
            torch.tanh(self.hidden(hidden)),
            None if self.cell is None or cell is None else self.cell(cell),
        )


class _Decoder(nn.Module):
    """What every RNN decoder has: target embedding, recurrence, output projection.

    Subclasses implement `forward(tokens (B, T), state, enc) -> (features (B, T, F), state,
    attention (B, T, S) or None)`, and `project` turns features into logits; one call serves a
    whole teacher-forced sequence and a single search step (T = 1) alike.
    """

    def __init__(
        self, vocab_size: int, emb_dim: int, rnn_input: int, hidden_size: int, layers: int, cell: str,
        dropout: float, features: int, tie_embeddings: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=PAD_ID)
        self.dropout = Dropout(dropout)
        self.rnn = _rnn(cell, rnn_input, hidden_size, layers, dropout)
        # Tying needs the projection's input size to be emb_dim.
        needs_readout = tie_embeddings and features != emb_dim
        self.readout = (
            nn.Sequential(nn.Linear(features, emb_dim), nn.Tanh()) if needs_readout else nn.Identity()
        )
        self.output = nn.Linear(emb_dim if needs_readout else features, vocab_size)
        if tie_embeddings:
            self.output.weight = self.embedding.weight

    def prepare(self, enc: RNNEncoderOutput) -> RNNEncoderOutput:
        """Per-sentence work before the first step (attention keys); none by default."""
        return enc

    def project(self, features: Tensor) -> Tensor:
        """What `forward` gives, (..., F) -> logits (..., V): the model projects only the
        positions it needs (training skips padded targets)."""
        return output_layer(self.output, self.readout(self.dropout(features)))

    def recur(self, inputs: Tensor, state: RNNState) -> tuple[Tensor, RNNState]:
        """Run the RNN over inputs (B, T, I) from `state` -> outputs (B, T, H), new state."""
        h0 = state.hidden.transpose(0, 1).contiguous()  # (L, B, H)
        if state.cell is None:
            out, h = recurrence(self.rnn, inputs, h0)
            return out, replace(state, hidden=h.transpose(0, 1))
        out, (h, c) = recurrence(self.rnn, inputs, (h0, state.cell.transpose(0, 1).contiguous()))
        return out, replace(state, hidden=h.transpose(0, 1), cell=c.transpose(0, 1))


class RNNDecoder(_Decoder):
    """No attention: the decoder sees the source only through its initial state and, with
    `feed_context`, through C at every step (Cho et al. 2014, eq. 4)."""

    def __init__(
        self, vocab_size: int, emb_dim: int, hidden_size: int, layers: int, cell: str,
        dropout: float, context_size: int, tie_embeddings: bool,
    ) -> None:  # fmt: skip
        self.feed_context = context_size > 0
        features = hidden_size + (emb_dim + context_size if self.feed_context else 0)
        super().__init__(
            vocab_size, emb_dim, emb_dim + context_size, hidden_size, layers, cell, dropout,
            features, tie_embeddings,
        )  # fmt: skip

    def forward(
        self, tokens: Tensor, state: RNNState, enc: RNNEncoderOutput
    ) -> tuple[Tensor, RNNState, None]:
        embedded = self.embedding(tokens)  # (B, T, E)
        emb = self.dropout(embedded)
        if not self.feed_context:
            out, state = self.recur(emb, state)  # (B, T, H)
            return out, state, None
        context = enc.context.unsqueeze(1).expand(-1, tokens.size(1), -1)  # (B, T, D)
        out, state = self.recur(torch.cat([emb, context], dim=-1), state)
        # the features get dropout in `project`: the embedding there undropped, or it would be dropped twice
        return torch.cat([out, embedded, context], dim=-1), state, None


class BahdanauDecoder(_Decoder):
    """Attention before the recurrence (Bahdanau et al. 2015, eqs. 4-6): the previous state
    s_{t-1} queries the encoder states, and the context c_t enters the RNN with y_{t-1}.

    The output layer reads [s_t; c_t; E y_{t-1}] through a linear projection where the
    paper uses s_{t-1} and a maxout layer (as in bentrevett's tutorial 3). The query is
    the top decoder layer. Each step depends on the last, so training runs step by step;
    the output projection still runs once over all steps.
    """

    def __init__(
        self, vocab_size: int, emb_dim: int, hidden_size: int, layers: int, cell: str,
        dropout: float, attention: Attention, context_size: int, tie_embeddings: bool,
    ) -> None:  # fmt: skip
        super().__init__(
            vocab_size, emb_dim, emb_dim + context_size, hidden_size, layers, cell, dropout,
            hidden_size + context_size + emb_dim, tie_embeddings,
        )  # fmt: skip
        self.attention = attention

    def prepare(self, enc: RNNEncoderOutput) -> RNNEncoderOutput:
        return replace(enc, keys=self.attention.prepare(enc.states))

    def forward(
        self, tokens: Tensor, state: RNNState, enc: RNNEncoderOutput
    ) -> tuple[Tensor, RNNState, Tensor]:
        embedded = self.embedding(tokens)  # (B, T, E)
        emb = self.dropout(embedded)
        features, weights = [], []
        for t in range(tokens.size(1)):
            query = state.hidden[:, -1:]  # (B, 1, H): s_{t-1}, top layer
            context, w = self.attention(query, enc.keys, enc.states, enc.mask)  # (B, 1, D), (B, 1, S)
            out, state = self.recur(torch.cat([emb[:, t : t + 1], context], dim=-1), state)  # (B, 1, H)
            # the features get dropout in `project`: the embedding there undropped, or it would be dropped twice
            features.append(torch.cat([out, context, embedded[:, t : t + 1]], dim=-1))
            weights.append(w)
        return torch.cat(features, dim=1), state, torch.cat(weights, dim=1)  # (B, T, F), (B, T, S)


class LuongDecoder(_Decoder):
    """Attention after the recurrence (Luong et al. 2015, eqs. 5-8): the new state s_t
    queries the encoder states, and the attentional hidden state
    h~_t = tanh(W_c [c_t; s_t]) predicts y_t.

    With input feeding (Luong et al. 2015, section 3.3) h~_{t-1} joins the next input, so
    training runs step by step; without it, all steps run at once.
    """

    def __init__(
        self, vocab_size: int, emb_dim: int, hidden_size: int, layers: int, cell: str,
        dropout: float, attention: Attention, context_size: int, input_feeding: bool,
        tie_embeddings: bool,
    ) -> None:  # fmt: skip
        self.input_feeding = input_feeding
        rnn_input = emb_dim + (hidden_size if input_feeding else 0)
        super().__init__(
            vocab_size, emb_dim, rnn_input, hidden_size, layers, cell, dropout, hidden_size, tie_embeddings
        )
        self.attention = attention
        self.combine = nn.Linear(context_size + hidden_size, hidden_size, bias=False)  # W_c

    def prepare(self, enc: RNNEncoderOutput) -> RNNEncoderOutput:
        return replace(enc, keys=self.attention.prepare(enc.states))

    def attend(self, out: Tensor, enc: RNNEncoderOutput) -> tuple[Tensor, Tensor]:
        """s (B, T, H) -> h~ (B, T, H) after dropout, weights (B, T, S)."""
        context, weights = self.attention(out, enc.keys, enc.states, enc.mask)  # (B, T, D)
        return self.dropout(torch.tanh(self.combine(torch.cat([context, out], dim=-1)))), weights

    def forward(
        self, tokens: Tensor, state: RNNState, enc: RNNEncoderOutput
    ) -> tuple[Tensor, RNNState, Tensor]:
        emb = self.dropout(self.embedding(tokens))  # (B, T, E)
        if not self.input_feeding:
            out, state = self.recur(emb, state)  # (B, T, H)
            attentional, weights = self.attend(out, enc)
            return attentional, state, weights
        feed = (
            state.attentional
            if state.attentional is not None
            else emb.new_zeros(emb.size(0), 1, self.combine.out_features)
        )
        steps, weights = [], []
        for t in range(tokens.size(1)):
            out, state = self.recur(torch.cat([emb[:, t : t + 1], feed], dim=-1), state)  # (B, 1, H)
            feed, w = self.attend(out, enc)  # (B, 1, H), (B, 1, S)
            steps.append(feed)
            weights.append(w)
        state = replace(state, attentional=feed)
        return torch.cat(steps, dim=1), state, torch.cat(weights, dim=1)

    def project(self, features: Tensor) -> Tensor:
        """h~ (..., H), dropped out already in `attend` (input feeding reads it) -> logits (..., V)."""
        return output_layer(self.output, self.readout(features))


class RNNSeq2Seq(Seq2Seq):
    def __init__(self, encoder: RNNEncoder, bridge: Bridge, decoder: _Decoder) -> None:
        super().__init__()
        self.encoder, self.bridge, self.decoder = encoder, bridge, decoder

    def encode(self, src: Tensor, src_lengths: Tensor) -> RNNEncoderOutput:
        return self.decoder.prepare(self.encoder(src, src_lengths))

    def init_state(self, encoder_output: RNNEncoderOutput) -> RNNState:  # type: ignore[override]
        return self.bridge(encoder_output)

    def decode_step(
        self,
        prev_tokens: Tensor,
        state: RNNState,
        encoder_output: RNNEncoderOutput,  # type: ignore[override]
        need_attention: bool = True,  # an attention decoder needs its weights anyway: returned
    ) -> tuple[Tensor, RNNState, Tensor | None]:
        features, state, weights = self.decoder(prev_tokens.unsqueeze(1), state, encoder_output)  # (B, 1, F)
        return self.decoder.project(features.squeeze(1)), state, None if weights is None else weights.squeeze(1)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, keep: Tensor | None = None) -> Tensor:
        enc = self.encode(src, src_lengths)
        features, _, _ = self.decoder(tgt_in, self.init_state(enc), enc)  # (B, T, F)
        return self.decoder.project(features if keep is None else features[keep])

    def attention_maps(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> dict[str, Tensor]:
        enc = self.encode(src, src_lengths)
        _, _, weights = self.decoder(tgt_in, self.init_state(enc), enc)  # (B, T, S) or None
        return {} if weights is None else {"cross": weights[:, None, None]}  # one layer, one head
