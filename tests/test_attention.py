import math

import pytest
import torch
from conftest import reverse_pairs, write_tsv

import aligna
from aligna.attention import (
    AdditiveAttention,
    DotAttention,
    GeneralAttention,
    ScaledDotProductAttention,
    additive_mask,
    build_attention,
)
from aligna.training import train

B, TQ, S, DQ, DK = 3, 2, 5, 4, 6


def scorers():
    torch.manual_seed(0)
    return {
        "bahdanau": build_attention("bahdanau", DQ, DK, 7),
        "concat": build_attention("concat", DQ, DK, 7),
        "general": build_attention("general", DQ, DK, 0),
        "dot": build_attention("dot", DK, DK, 0),
        "scaled": ScaledDotProductAttention(),
    }


def inputs(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    dq = DK if kind in ("dot", "scaled") else DQ
    query = torch.randn(B, TQ, dq, generator=g)
    keys = torch.randn(B, S, DK, generator=g)
    values = torch.randn(B, S, 3, generator=g)
    lengths = torch.tensor([5, 2, 3])
    mask = torch.arange(S)[None, :] < lengths[:, None]  # (B, S)
    return query, keys, values, mask, lengths


@pytest.mark.parametrize("kind", ["bahdanau", "concat", "general", "dot", "scaled"])
def test_weights_sum_to_one_and_are_zero_on_padding(kind):
    attention = scorers()[kind]
    query, keys, values, mask, _ = inputs(kind)
    context, weights = attention(query, attention.prepare(keys), values, mask)
    assert context.shape == (B, TQ, 3) and weights.shape == (B, TQ, S)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, TQ))
    assert torch.all(weights.masked_select(~mask.unsqueeze(1).expand_as(weights)) == 0)
    assert torch.all(weights.masked_select(mask.unsqueeze(1).expand_as(weights)) > 0)


@pytest.mark.parametrize("kind", ["bahdanau", "concat", "general", "dot", "scaled"])
def test_padding_inside_a_batch_changes_nothing(kind):
    attention = scorers()[kind]
    query, keys, values, mask, lengths = inputs(kind)
    # what is behind the padding must not matter either
    noisy_keys = keys.masked_fill(~mask.unsqueeze(-1), 1e3)
    noisy_values = values.masked_fill(~mask.unsqueeze(-1), -1e3)
    context, weights = attention(query, attention.prepare(noisy_keys), noisy_values, mask)
    for i, n in enumerate(lengths.tolist()):
        k, v = keys[i : i + 1, :n], values[i : i + 1, :n]
        alone_c, alone_w = attention(
            query[i : i + 1], attention.prepare(k), v, torch.ones(1, n, dtype=torch.bool)
        )
        torch.testing.assert_close(alone_c[0], context[i])
        torch.testing.assert_close(alone_w[0], weights[i, :, :n])


def direct(kind, attention, s, h):
    """The paper's score for one query vector s (Dq,) and one key vector h (Dk,)."""
    if kind in ("bahdanau", "concat"):  # v^T tanh(W s + U h)
        W, U, b, v = (
            attention.query_proj.weight,
            attention.key_proj.weight,
            attention.key_proj.bias,
            attention.v.weight[0],
        )
        return v @ torch.tanh(W @ s + U @ h + b)
    if kind == "general":  # s^T W h
        return s @ attention.key_proj.weight @ h
    if kind == "dot":
        return s @ h
    return s @ h / math.sqrt(len(s))  # scaled dot product


@pytest.mark.parametrize("kind", ["bahdanau", "concat", "general", "dot", "scaled"])
def test_each_scorer_matches_its_equation(kind):
    attention = scorers()[kind]
    query, keys, values, mask, lengths = inputs(kind)
    context, weights = attention(query, attention.prepare(keys), values, mask)
    for b in range(B):
        for q in range(TQ):
            n = int(lengths[b])
            scores = torch.stack([direct(kind, attention, query[b, q], keys[b, j]) for j in range(n)])
            expected = torch.softmax(scores, 0)
            torch.testing.assert_close(weights[b, q, :n], expected)
            torch.testing.assert_close(context[b, q], expected @ values[b, :n])


def test_scaled_dot_product_fast_path_equals_reference():
    attention = ScaledDotProductAttention()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, 8, generator=g) for _ in range(3))  # (B, h, T, d)
    mask = torch.tensor([[True, True, False], [True, True, True]])[:, None, None, :]  # (B, 1, 1, S)
    fast, none = attention(q, k, v, mask, need_weights=False)
    reference, weights = attention(q, k, v, mask, need_weights=True)
    assert none is None and weights.shape == (2, 4, 3, 3)
    torch.testing.assert_close(fast, reference)
    for need_weights in (False, True):  # the additive form of the mask, made once for every step, is the same mask
        boolean = attention(q, k, v, mask, need_weights)
        additive = attention(q, k, v, additive_mask(mask), need_weights)
        assert torch.equal(additive[0], boolean[0])


def test_bf16_training_attention_on_a_cpu_computes_the_fused_kernels_function():
    """bf16 with gradients on a CPU takes the two products (torch's fused backward is slow there):
    the output and the gradients are the float32 kernel's, to bf16 rounding; padding stays masked."""
    attention = ScaledDotProductAttention()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 3, 8, generator=g) for _ in range(3))
    mask = torch.tensor([[True, True, False], [True, True, True]])[:, None, None, :]
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [t.clone().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out, _ = attention(*leaves, mask, need_weights=False)
        out.float().pow(2).sum().backward()
        grads.append((out.float(), *(t.grad.float() for t in leaves)))
    for exact, bf16 in zip(*grads, strict=True):
        torch.testing.assert_close(bf16, exact, rtol=0.05, atol=0.05)
    assert not bool(grads[1][2][0, :, 2].any())  # no gradient reaches the padded key (B, h, S, d)


def test_modules_keep_no_state_between_calls():
    for kind, attention in scorers().items():
        before = {k: v for k, v in vars(attention).items() if not k.startswith("_")}
        a = inputs(kind, seed=1)
        b = inputs(kind, seed=2)
        first = attention(a[0], attention.prepare(a[1]), a[2], a[3])[0]
        attention(b[0], attention.prepare(b[1]), b[2], b[3])
        torch.testing.assert_close(attention(a[0], attention.prepare(a[1]), a[2], a[3])[0], first)
        assert {k: v for k, v in vars(attention).items() if not k.startswith("_")}.keys() == before.keys()
        assert list(attention.buffers()) == []


def test_dot_needs_matching_sizes():
    with pytest.raises(ValueError, match="equal query and key sizes"):
        build_attention("dot", 4, 8, 0)
    assert isinstance(build_attention("concat", 4, 8, 5), AdditiveAttention)
    assert isinstance(build_attention("general", 4, 8, 0), GeneralAttention)
    assert isinstance(build_attention("dot", 4, 4, 0), DotAttention)


def test_attention_learns_the_long_reversal_that_the_bottleneck_cannot(toy_config, tmp_path):
    """Reversing 30-34 symbols: the first output token is the last input token, which a
    fixed-size context vector has to carry through the whole sentence. With the same
    model size, data and number of updates, Bahdanau attention learns it; without
    attention the model gets (almost) no sentence right."""
    lengths = {"min_len": 30, "max_len": 34, "symbols": 26}
    # not tmp_path/train.tsv: toy_config writes its own short-sequence corpus there
    (tmp_path / "long").mkdir()
    train_tsv = write_tsv(tmp_path / "long" / "train.tsv", reverse_pairs(3000, seed=1, **lengths))
    dev_tsv = write_tsv(tmp_path / "long" / "dev.tsv", reverse_pairs(100, seed=2, **lengths))
    test = reverse_pairs(200, seed=3, **lengths)
    exact = {}
    for attention in ("bahdanau", "none"):
        config = toy_config(
            model_dir=str(tmp_path / attention),
            data={"train": {"tsv": str(train_tsv)}, "dev": {"tsv": str(dev_tsv)}, "max_len": 40},
            model={"emb_dim": 32, "hidden_size": 64, "dropout": 0.0,
                   "rnn": {"cell": "gru", "bidirectional": True, "attention": attention}},
            train={"batch_tokens": 2048, "epochs": 12, "lr": 0.003, "validate_every": 0},
            eval={"metrics": ["exact"]},
        )  # fmt: skip
        train(config, progress=False)
        hyps = aligna.load(config.model_dir).translate([s for s, _ in test])
        exact[attention] = sum(h == r for h, (_, r) in zip(hyps, test)) / len(test)
    assert exact["bahdanau"] >= 0.95, exact
    assert exact["none"] <= 0.2, exact
