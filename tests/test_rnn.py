import pytest
import torch

from aligna.build import build_model
from aligna.config import ModelConfig, RNNConfig
from aligna.vocab import PAD_ID, SOS_ID

VOCAB = 23
VARIANTS = [
    # cell, bidirectional, feed_context, encoder_layers, decoder_layers, tie
    ("lstm", False, False, 2, 2, False),  # Sutskever et al.: identity bridge
    ("gru", False, True, 1, 1, False),  # Cho et al.: C at every step
    ("lstm", True, False, 2, 1, True),  # bridge across directions and layer counts
    ("gru", True, True, 1, 2, True),
]


def make(cell, bidirectional, feed_context, enc_layers, dec_layers, tie, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(
        emb_dim=8, hidden_size=12, encoder_layers=enc_layers, decoder_layers=dec_layers, dropout=0.2,
        tie_embeddings=tie, rnn=RNNConfig(cell=cell, bidirectional=bidirectional, feed_context=feed_context),
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


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_padding_does_not_change_outputs(variant):
    model = make(*variant)
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


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_decode_step_equals_teacher_forced_forward(variant):
    model = make(*variant)
    src, lengths, tgt = random_batch([4, 6])
    full = model(src, lengths, tgt)  # (B, T, V)
    enc = model.encode(src, lengths)
    state = model.init_state(enc)
    for t in range(tgt.size(1)):
        logits, state, attention = model.decode_step(tgt[:, t], state, enc)
        assert attention is None
        torch.testing.assert_close(logits, full[:, t])


def test_reorder_follows_batch_rows():
    model = make("lstm", True, True, 2, 2, False)
    src, lengths, tgt = random_batch([4, 6, 2])
    enc = model.encode(src, lengths)
    state = model.init_state(enc)
    index = torch.tensor([2, 0, 0])
    logits, _, _ = model.decode_step(tgt[index, 0], state.reorder(index), enc.reorder(index))
    direct, _, _ = model.decode_step(tgt[:, 0], state, enc)
    torch.testing.assert_close(logits, direct[index])


def test_tied_embeddings_share_one_tensor():
    model = make("gru", True, True, 1, 1, True)
    assert model.decoder.output.weight is model.decoder.embedding.weight


def test_sutskever_bridge_is_identity_and_others_are_learned():
    same = make("lstm", False, False, 2, 2, False)
    assert same.bridge.identity and not any(True for _ in same.bridge.parameters())
    for variant in VARIANTS[2:]:
        assert not make(*variant).bridge.identity


def test_dropout_is_active_only_in_training():
    model = make("lstm", False, False, 2, 2, False)
    src, lengths, tgt = random_batch([5, 5])
    model.train()
    a, b = model(src, lengths, tgt), model(src, lengths, tgt)
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(src, lengths, tgt), model(src, lengths, tgt))


def test_gradients_reach_every_parameter():
    model = make("gru", True, True, 2, 1, False).train()
    src, lengths, tgt = random_batch([5, 3])
    model(src, lengths, tgt).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
