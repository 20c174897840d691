"""The one place where configuration meets model classes."""

from __future__ import annotations

import torch

from .attention import build_attention
from .config import ConfigError, ModelConfig
from .model import Seq2Seq
from .rnn import (
    BahdanauDecoder,
    Bridge,
    LuongDecoder,
    RNNDecoder,
    RNNEncoder,
    RNNSeq2Seq,
    init_forget_bias,
    init_uniform,
)
from .runtime import available_memory
from .transformer import Transformer


def build_model(config: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> Seq2Seq:
    if config.arch == "rnn":
        return _rnn_model(config, src_vocab_size, tgt_vocab_size)
    if config.arch == "transformer":
        return _transformer_model(config, src_vocab_size, tgt_vocab_size)
    raise ValueError(f"model.arch: unknown architecture {config.arch!r}")


def _transformer_model(config: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> Transformer:
    t = config.transformer
    return Transformer(
        src_vocab_size, tgt_vocab_size, d_model=config.emb_dim, heads=t.heads, ff_size=t.ff_size,
        encoder_layers=config.encoder_layers, decoder_layers=config.decoder_layers, dropout=config.dropout,
        attention_dropout=t.attention_dropout, activation_dropout=t.activation_dropout,
        activation=t.activation, pre_norm=t.pre_norm, positions=t.positions, max_positions=t.max_positions,
        scale_embeddings=t.scale_embeddings, share_embeddings=config.share_embeddings,
        tie_embeddings=config.tie_embeddings,
    )  # fmt: skip


def _rnn_model(config: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> RNNSeq2Seq:
    rnn = config.rnn
    encoder = RNNEncoder(
        src_vocab_size, config.emb_dim, config.hidden_size, config.encoder_layers,
        rnn.cell, rnn.bidirectional, config.dropout, rnn.reverse_source,
    )  # fmt: skip
    bridge = Bridge(
        config.encoder_layers, encoder.output_size, config.decoder_layers,
        config.hidden_size, lstm=rnn.cell == "lstm",
    )  # fmt: skip
    shared = (
        tgt_vocab_size,
        config.emb_dim,
        config.hidden_size,
        config.decoder_layers,
        rnn.cell,
        config.dropout,
    )
    decoder: RNNDecoder | BahdanauDecoder | LuongDecoder
    if rnn.attention == "none":
        context = encoder.output_size if rnn.feed_context else 0
        decoder = RNNDecoder(*shared, context_size=context, tie_embeddings=config.tie_embeddings)
    else:
        attention = build_attention(
            rnn.attention, config.hidden_size, encoder.output_size, rnn.attention_size or config.hidden_size
        )
        if rnn.attention == "bahdanau":
            decoder = BahdanauDecoder(*shared, attention, encoder.output_size, config.tie_embeddings)
        else:
            decoder = LuongDecoder(
                *shared, attention, encoder.output_size, rnn.input_feeding, config.tie_embeddings
            )
    if config.share_embeddings:  # one vocabulary, one embedding table
        decoder.embedding = encoder.embedding
        if config.tie_embeddings:
            decoder.output.weight = encoder.embedding.weight
    model = RNNSeq2Seq(encoder, bridge, decoder)
    if rnn.init_range:
        init_uniform(model, rnn.init_range)
    init_forget_bias(model, rnn.forget_bias)  # after init_uniform; no-op for a GRU
    return model


def count_parameters(model: Seq2Seq) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_on(device: torch.device, config: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> Seq2Seq:
    """`build_model` on `device` for training, after checking (on the meta device, which
    allocates nothing) that weights, gradients and Adam's two moments fit in its memory."""
    with torch.device("meta"):
        params = count_parameters(build_model(config, src_vocab_size, tgt_vocab_size))
    need = params * 4 * 4  # fp32 weights, gradients, exp_avg, exp_avg_sq
    free = available_memory(device)
    sizes = (
        f"model.emb_dim {config.emb_dim}, hidden_size {config.hidden_size}, "
        f"{config.encoder_layers}+{config.decoder_layers} layers, vocabularies {src_vocab_size}/{tgt_vocab_size}"
    )
    if free is not None and need > free:
        raise ConfigError(
            f"model: {params:,} parameters ({sizes}) need about {need / 2**30:.1f} GiB for weights, "
            f"gradients and optimizer state, more than the {free / 2**30:.1f} GiB available on {device}"
        )
    try:
        return build_model(config, src_vocab_size, tgt_vocab_size).to(device)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        raise ConfigError(f"model: cannot allocate {params:,} parameters ({sizes}) on {device}: {e!s:.200}") from None
