"""The one place where configuration meets model classes."""

from __future__ import annotations

from .config import ModelConfig
from .model import Seq2Seq
from .rnn import Bridge, RNNDecoder, RNNEncoder, RNNSeq2Seq


def build_model(config: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> Seq2Seq:
    if config.arch == "rnn":
        return _rnn_model(config, src_vocab_size, tgt_vocab_size)
    raise ValueError(f"model.arch: unknown architecture {config.arch!r}")


def _rnn_model(config: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> RNNSeq2Seq:
    rnn = config.rnn
    encoder = RNNEncoder(
        src_vocab_size, config.emb_dim, config.hidden_size, config.encoder_layers,
        rnn.cell, rnn.bidirectional, config.dropout,
    )  # fmt: skip
    bridge = Bridge(
        config.encoder_layers, encoder.output_size, config.decoder_layers,
        config.hidden_size, lstm=rnn.cell == "lstm",
    )  # fmt: skip
    decoder = RNNDecoder(
        tgt_vocab_size, config.emb_dim, config.hidden_size, config.decoder_layers, rnn.cell,
        config.dropout, context_size=encoder.output_size if rnn.feed_context else 0,
        tie_embeddings=config.tie_embeddings,
    )  # fmt: skip
    return RNNSeq2Seq(encoder, bridge, decoder)


def count_parameters(model: Seq2Seq) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
