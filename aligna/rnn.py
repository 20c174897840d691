"""The RNN encoder-decoder (Sutskever et al. 2014, "Sequence to Sequence Learning with
Neural Networks"; Cho et al. 2014, "Learning Phrase Representations using RNN
Encoder-Decoder for Statistical Machine Translation").

The encoder reads x1..xS and keeps its final state; the top layer's final state is the
context vector C. The decoder starts from C (through a bridge where the two differ in
layers or sizes) and predicts y_t from y_{t-1} and its state. With ``feed_context``,
C also enters every decoder step and the output layer, as in Cho et al. (2014) eq. (4);
their maxout output layer is replaced by a plain linear projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .model import Reorderable, Seq2Seq
from .vocab import PAD_ID


@dataclass
class RNNEncoderOutput(Reorderable):
    states: Tensor  # (B, S, D) top-layer output at every position, zeros at padding
    mask: Tensor  # (B, S) True at real tokens
    hidden: Tensor  # (B, L_enc, D) final hidden state of every layer, directions concatenated
    cell: Tensor | None  # (B, L_enc, D) final LSTM cell state, None for a GRU

    @property
    def context(self) -> Tensor:
        """C: the top layer's final hidden state, (B, D)."""
        return self.hidden[:, -1]


@dataclass
class RNNState(Reorderable):
    hidden: Tensor  # (B, L_dec, H)
    cell: Tensor | None  # (B, L_dec, H), LSTM only


def _rnn(
    cell: str, input_size: int, hidden_size: int, layers: int, dropout: float, bidirectional: bool = False
) -> nn.RNNBase:
    cls = nn.LSTM if cell == "lstm" else nn.GRU
    return cls(
        input_size, hidden_size, layers, batch_first=True,
        dropout=dropout if layers > 1 else 0.0, bidirectional=bidirectional,
    )  # fmt: skip


def _batch_first(state: Tensor, layers: int, directions: int) -> Tensor:
    """torch's (L * dirs, B, H) final state -> (B, L, dirs * H)."""
    _, batch, hidden = state.shape
    return (
        state.view(layers, directions, batch, hidden)
        .permute(2, 0, 1, 3)
        .reshape(batch, layers, directions * hidden)
    )


class RNNEncoder(nn.Module):
    def __init__(
        self, vocab_size: int, emb_dim: int, hidden_size: int, layers: int, cell: str,
        bidirectional: bool, dropout: float,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.rnn = _rnn(cell, emb_dim, hidden_size, layers, dropout, bidirectional)
        self.layers, self.directions = layers, 2 if bidirectional else 1
        self.output_size = hidden_size * self.directions

    def forward(self, src: Tensor, src_lengths: Tensor) -> RNNEncoderOutput:
        emb = self.dropout(self.embedding(src))  # (B, S, E)
        # Packing keeps padding out of the recurrence, in both directions.
        packed = pack_padded_sequence(emb, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, final = self.rnn(packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))  # (B, S, D)
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


class RNNDecoder(nn.Module):
    """One decoder for both full teacher-forced sequences and single search steps."""

    def __init__(
        self, vocab_size: int, emb_dim: int, hidden_size: int, layers: int, cell: str,
        dropout: float, context_size: int, tie_embeddings: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.feed_context = context_size > 0
        self.rnn = _rnn(cell, emb_dim + context_size, hidden_size, layers, dropout)
        features = hidden_size + (emb_dim + context_size if self.feed_context else 0)
        # Tying needs the projection's input size to be emb_dim.
        needs_readout = tie_embeddings and features != emb_dim
        self.readout = (
            nn.Sequential(nn.Linear(features, emb_dim), nn.Tanh()) if needs_readout else nn.Identity()
        )
        self.output = nn.Linear(emb_dim if needs_readout else features, vocab_size)
        if tie_embeddings:
            self.output.weight = self.embedding.weight

    def forward(self, tokens: Tensor, state: RNNState, enc: RNNEncoderOutput) -> tuple[Tensor, RNNState]:
        """tokens (B, T) -> logits (B, T, V) and the state after the last token."""
        emb = self.dropout(self.embedding(tokens))  # (B, T, E)
        inputs = emb
        if self.feed_context:
            context = enc.context.unsqueeze(1).expand(-1, tokens.size(1), -1)  # (B, T, D)
            inputs = torch.cat([emb, context], dim=-1)  # (B, T, E + D)
        h0 = state.hidden.transpose(0, 1).contiguous()  # (L, B, H)
        if state.cell is None:
            out, h = self.rnn(inputs, h0)  # out: (B, T, H)
            new_state = RNNState(h.transpose(0, 1), None)
        else:
            out, (h, c) = self.rnn(inputs, (h0, state.cell.transpose(0, 1).contiguous()))
            new_state = RNNState(h.transpose(0, 1), c.transpose(0, 1))
        features = torch.cat([out, emb, context], dim=-1) if self.feed_context else out
        logits = self.output(self.readout(self.dropout(features)))  # (B, T, V)
        return logits, new_state


class RNNSeq2Seq(Seq2Seq):
    def __init__(self, encoder: RNNEncoder, bridge: Bridge, decoder: RNNDecoder) -> None:
        super().__init__()
        self.encoder, self.bridge, self.decoder = encoder, bridge, decoder

    def encode(self, src: Tensor, src_lengths: Tensor) -> RNNEncoderOutput:
        return self.encoder(src, src_lengths)

    def init_state(self, encoder_output: RNNEncoderOutput) -> RNNState:  # type: ignore[override]
        return self.bridge(encoder_output)

    def decode_step(
        self,
        prev_tokens: Tensor,
        state: RNNState,
        encoder_output: RNNEncoderOutput,  # type: ignore[override]
    ) -> tuple[Tensor, RNNState, None]:
        logits, state = self.decoder(prev_tokens.unsqueeze(1), state, encoder_output)  # (B, 1, V)
        return logits.squeeze(1), state, None

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        enc = self.encode(src, src_lengths)
        logits, _ = self.decoder(tgt_in, self.init_state(enc), enc)
        return logits
