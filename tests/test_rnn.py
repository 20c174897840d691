import pytest
import torch

from aligna.build import build_model
from aligna.config import ConfigError, ModelConfig, RNNConfig
from aligna.vocab import PAD_ID, SOS_ID

VOCAB = 23
VARIANTS = {
    # Sutskever et al.: 2-layer LSTM, identity bridge
    "lstm": dict(cell="lstm", encoder_layers=2, decoder_layers=2),
    # Cho et al.: C at every step
    "gru-context": dict(cell="gru", feed_context=True),
    # bridges across directions and layer counts, tied embeddings
    "bilstm-2to1-tied": dict(cell="lstm", bidirectional=True, encoder_layers=2, tie_embeddings=True),
    "bigru-context-1to2-tied": dict(
        cell="gru", bidirectional=True, feed_context=True, decoder_layers=2, tie_embeddings=True
    ),
    # attention
    "bahdanau-bigru": dict(cell="gru", bidirectional=True, attention="bahdanau"),
    "bahdanau-lstm-2layers": dict(cell="lstm", attention="bahdanau", encoder_layers=2, decoder_layers=2),
    "luong-general-feed-bilstm": dict(cell="lstm", bidirectional=True, attention="general"),
    "luong-dot-nofeed-lstm": dict(cell="lstm", attention="dot", input_feeding=False),
    "luong-concat-feed-gru-tied": dict(cell="gru", attention="concat", tie_embeddings=True),
    # Sutskever et al.'s reversed source, without and with attention
    "lstm-reversed": dict(cell="lstm", encoder_layers=2, decoder_layers=2, reverse_source=True),
    "bahdanau-gru-reversed": dict(cell="gru", attention="bahdanau", reverse_source=True),
}
MODEL_KEYS = {"encoder_layers", "decoder_layers", "tie_embeddings"}


def make(seed=0, **options):
    torch.manual_seed(seed)
    model_options = {k: v for k, v in options.items() if k in MODEL_KEYS}
    rnn_options = {k: v for k, v in options.items() if k not in MODEL_KEYS}
    config = ModelConfig(
        emb_dim=8, hidden_size=12, dropout=0.2, **{"encoder_layers": 1, "decoder_layers": 1, **model_options},
        rnn=RNNConfig(**rnn_options),
    )  # fmt: skip
    return build_model(config, VOCAB, VOCAB).eval()


def random_batch(lengths, tgt_len=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD_ID)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(4, VOCAB, (n,), generator=g)
    tgt = torch.randint(4, VOCAB, (len(lengths), tgt_len), generator=g)
    tgt[:, 0] = SOS_ID
    return src, torch.tensor(lengths), tgt


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_does_not_change_outputs(variant):
    model = make(**VARIANTS[variant])
    src, lengths, tgt = random_batch([7, 3, 5])
    enc = model.encode(src, lengths)
    logits = model(src, lengths, tgt)
    assert torch.all(enc.states[1, 3:] == 0)  # padding positions stay empty
    for i, n in enumerate(lengths.tolist()):
        alone_src = src[i : i + 1, :n]
        alone = model.encode(alone_src, lengths[i : i + 1])
        torch.testing.assert_close(alone.states[0], enc.states[i, :n])
        torch.testing.assert_close(alone.hidden[0], enc.hidden[i])
        torch.testing.assert_close(model(alone_src, lengths[i : i + 1], tgt[i : i + 1])[0], logits[i])


@pytest.mark.parametrize("variant", VARIANTS)
def test_kept_positions_get_the_logits_of_the_full_pass(variant):
    model = make(**VARIANTS[variant])
    src, lengths, tgt = random_batch([7, 3, 5])
    keep = tgt % 3 != 0  # any pattern
    kept = model(src, lengths, tgt, keep)
    torch.testing.assert_close(kept, model(src, lengths, tgt)[keep])


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_step_equals_teacher_forced_forward(variant):
    model = make(**VARIANTS[variant])
    src, lengths, tgt = random_batch([4, 6])
    full = model(src, lengths, tgt)  # (B, T, V)
    enc = model.encode(src, lengths)
    _, _, full_weights = model.decoder(tgt, model.init_state(enc), enc)  # (B, T, S) or None
    state = model.init_state(enc)
    for t in range(tgt.size(1)):
        logits, state, weights = model.decode_step(tgt[:, t], state, enc)
        torch.testing.assert_close(logits, full[:, t])
        if full_weights is None:
            assert weights is None
        else:
            torch.testing.assert_close(weights, full_weights[:, t])


@pytest.mark.parametrize("variant", ["bigru-context-1to2-tied", "luong-general-feed-bilstm"])
def test_reorder_follows_batch_rows(variant):
    model = make(**VARIANTS[variant])
    src, lengths, tgt = random_batch([4, 6, 2])
    enc = model.encode(src, lengths)
    state = model.init_state(enc)
    _, state, _ = model.decode_step(tgt[:, 0], state, enc)  # a state with history
    index = torch.tensor([2, 0, 0])
    logits, _, _ = model.decode_step(tgt[index, 1], state.reorder(index), enc.reorder(index))
    direct, _, _ = model.decode_step(tgt[:, 1], state, enc)
    torch.testing.assert_close(logits, direct[index])


@pytest.mark.parametrize("variant", [v for v in VARIANTS if "tied" in v])
def test_tied_embeddings_share_one_tensor(variant):
    model = make(**VARIANTS[variant])
    assert model.decoder.output.weight is model.decoder.embedding.weight


def test_sutskever_bridge_is_identity_and_others_are_learned():
    same = make(**VARIANTS["lstm"])
    assert same.bridge.identity and not any(True for _ in same.bridge.parameters())
    for variant in ("bilstm-2to1-tied", "bigru-context-1to2-tied", "bahdanau-bigru"):
        assert not make(**VARIANTS[variant]).bridge.identity


def test_dropout_is_active_only_in_training():
    model = make(**VARIANTS["lstm"])
    src, lengths, tgt = random_batch([5, 5])
    model.train()
    a, b = model(src, lengths, tgt), model(src, lengths, tgt)
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(src, lengths, tgt), model(src, lengths, tgt))


@pytest.mark.parametrize("variant", ["gru-context", "bahdanau-bigru"])
def test_the_output_layer_sees_the_previous_token_dropped_out_once(variant):
    """Where E y_{t-1} joins the output layer's features, it gets dropout once there: each value
    0 or E y / (1 - p), not dropped again on top of the RNN input's dropout (1 / (1 - p)^2)."""
    model = make(**VARIANTS[variant]).train()
    decoder, p = model.decoder, model.decoder.dropout.p
    src, lengths, tgt = random_batch([5, 3, 4, 6], tgt_len=12)
    enc = model.encode(src, lengths)
    features, _, _ = decoder(tgt, model.init_state(enc), enc)
    seen = []
    decoder.readout.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    decoder.project(features)
    emb_dim = decoder.embedding.embedding_dim
    part = seen[0][..., 12 : 12 + emb_dim] if variant == "gru-context" else seen[0][..., -emb_dim:]  # hidden 12
    kept = decoder.embedding(tgt).detach() / (1 - p)
    assert torch.all((part == 0) | torch.isclose(part, kept)), "dropped out twice"
    assert 0 < float((part == 0).float().mean()) < 0.5


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant):
    model = make(**VARIANTS[variant]).train()
    src, lengths, tgt = random_batch([5, 3])
    model(src, lengths, tgt).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("variant", [v for v in VARIANTS if VARIANTS[v]["cell"] == "lstm"])
def test_lstm_forget_gate_starts_at_the_configured_bias(variant):
    """Jozefowicz et al. 2015: forget bias 1. torch adds b_ih + b_hh (gates i, f, g, o), so
    the sum is what counts: 1, not 2, and the other gates keep torch's random init."""
    for value in (1.0, 0.5):
        model = make(**VARIANTS[variant], forget_bias=value)
        lstms = [m for m in model.modules() if isinstance(m, torch.nn.LSTM)]
        assert len(lstms) == 2  # encoder and decoder
        for lstm in lstms:
            h = lstm.hidden_size
            for suffix in [n[len("bias_ih") :] for n, _ in lstm.named_parameters() if n.startswith("bias_ih")]:
                total = getattr(lstm, "bias_ih" + suffix) + getattr(lstm, "bias_hh" + suffix)  # (4H,)
                torch.testing.assert_close(total[h : 2 * h], torch.full((h,), value))
                assert total[:h].std() > 0 and total[2 * h :].std() > 0  # i, g, o untouched


def test_lstm_forget_bias_is_one_by_default():
    assert RNNConfig().forget_bias == 1.0
    model = make(**VARIANTS["luong-general-feed-bilstm"])
    lstm = model.decoder.rnn
    h = lstm.hidden_size
    assert torch.all(lstm.bias_ih_l0[h : 2 * h] + lstm.bias_hh_l0[h : 2 * h] == 1.0)


def test_init_range_draws_every_weight_but_the_embeddings_uniformly():
    model = make(**VARIANTS["luong-general-feed-bilstm"], init_range=0.1)
    h = model.decoder.rnn.hidden_size
    for name, p in model.named_parameters():
        if "embedding" in name:
            assert p.std() > 0.5, name  # torch's N(0, 1) kept
            continue
        if "bias_ih" in name:  # the forget gate's bias is set after the draw
            assert torch.all(p[h : 2 * h] == 1.0)
            p = torch.cat([p[:h], p[2 * h :]])
        assert p.abs().max() <= 0.1 and p.std() > 0.04, name  # U(-0.1, 0.1): std 0.058
    default = make(**VARIANTS["luong-general-feed-bilstm"])  # 0: torch's U(+-1/sqrt(fan_in)), +-0.29 here
    assert 0.1 < default.decoder.rnn.weight_hh_l0.abs().max() <= 1 / h**0.5


@pytest.mark.parametrize("variant", ["lstm-reversed", "bahdanau-gru-reversed"])
def test_reversed_source_reads_each_sentence_backwards(variant):
    """The encoder reads x_n .. x_1 (padding left where it is) and gives its states back in
    source order: as the same encoder without the option on hand-reversed sentences."""
    options = VARIANTS[variant]
    reversed_, plain = make(**options), make(**{**options, "reverse_source": False})
    plain.load_state_dict(reversed_.state_dict())
    src, lengths, _ = random_batch([7, 3, 5])
    backwards = src.clone()
    for i, n in enumerate(lengths.tolist()):
        backwards[i, :n] = src[i, :n].flip(0)
    ours, theirs = reversed_.encode(src, lengths), plain.encode(backwards, lengths)
    torch.testing.assert_close(ours.hidden, theirs.hidden)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(ours.states[i, :n], theirs.states[i, :n].flip(0))
    assert not torch.allclose(ours.hidden, plain.encode(src, lengths).hidden)


def test_reversed_source_with_a_bidirectional_encoder_is_refused():
    with pytest.raises(ConfigError, match="reverse_source.*both ways"):
        RNNConfig(bidirectional=True, reverse_source=True)


def test_an_lstm_under_bf16_autocast_runs_in_fp32_where_the_cpu_lacks_bf16(monkeypatch):
    """torch 2.13 sends an autocast LSTM to oneDNN's bf16 kernel, which a processor without
    native bf16 cannot build: there it runs in fp32, as without autocast."""
    from aligna import rnn as rnn_module

    monkeypatch.setattr(rnn_module, "_cpu_bf16", lambda: False)
    lstm = torch.nn.LSTM(6, 5, batch_first=True)
    x, h0, c0 = torch.randn(2, 3, 6), torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    expected, _ = lstm(x, (h0, c0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = rnn_module.recurrence(lstm, x.bfloat16(), (h0.bfloat16(), c0))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)  # the inputs went through bf16
