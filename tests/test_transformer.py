
import dataclasses

import pytest
import torch
from conftest import reverse_pairs, write_tsv
from test_rnn import random_batch

import aligna
from aligna.build import build_model
from aligna.config import ModelConfig, TransformerConfig
from aligna.training import train
from aligna.transformer import sinusoids
from aligna.vocab import PAD_ID

VOCAB = 23
VARIANTS = {
    "pre-norm-sinusoidal": {},
    "post-norm-learned": {"pre_norm": False, "positions": "learned", "max_positions": 32},
    "gelu-unscaled-tied": {"activation": "gelu", "scale_embeddings": False, "tie": True},
}


def make(seed=0, tie=False, dropout=0.1, **options):
    torch.manual_seed(seed)
    config = ModelConfig(
        arch="transformer", emb_dim=16, encoder_layers=2, decoder_layers=2, dropout=dropout, tie_embeddings=tie,
        transformer=TransformerConfig(heads=4, ff_size=32, attention_dropout=0.1, **options),
    )  # fmt: skip
    return build_model(config, VOCAB, VOCAB).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_mask_hides_the_future(variant):
    model = make(**VARIANTS[variant])
    src, lengths, tgt = random_batch([5, 3], tgt_len=7)
    logits = model(src, lengths, tgt)
    changed = tgt.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % VOCAB  # only positions 4.. differ
    after = model(src, lengths, changed)
    torch.testing.assert_close(after[:, :4], logits[:, :4])
    assert not torch.allclose(after[:, 4:], logits[:, 4:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_source_and_target_padding_change_nothing(variant):
    model = make(**VARIANTS[variant])
    src, lengths, tgt = random_batch([6, 2, 4], tgt_len=6)
    tgt_lengths = [6, 3, 5]
    for i, n in enumerate(tgt_lengths):
        tgt[i, n:] = PAD_ID
    logits = model(src, lengths, tgt)
    for i, (n, m) in enumerate(zip(lengths.tolist(), tgt_lengths)):
        alone = model(src[i : i + 1, :n], lengths[i : i + 1], tgt[i : i + 1, :m])
        torch.testing.assert_close(alone[0], logits[i, :m])


@pytest.mark.parametrize("variant", VARIANTS)
def test_kept_positions_get_the_logits_of_the_full_pass(variant):
    model = make(**VARIANTS[variant])
    src, lengths, tgt = random_batch([6, 2, 4], tgt_len=6)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    kept = model(src, lengths, tgt, keep)  # (N, V)
    assert kept.shape == (int(keep.sum()), VOCAB)
    torch.testing.assert_close(kept, model(src, lengths, tgt)[keep])


@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_decoding_equals_the_full_pass(variant):
    model = make(**VARIANTS[variant])
    src, lengths, tgt = random_batch([6, 3], tgt_len=8)
    full = model(src, lengths, tgt)  # (B, T, V)
    enc = model.encode(src, lengths)
    _, _, full_weights, _ = model.decode(tgt, model.init_state(enc), enc)
    state = model.init_state(enc)
    for t in range(tgt.size(1)):
        logits, state, weights = model.decode_step(tgt[:, t], state, enc)
        assert state.length == t + 1
        torch.testing.assert_close(logits, full[:, t])
        torch.testing.assert_close(weights, full_weights[:, t])


def test_a_step_projects_only_the_new_token():
    model = make()
    src, lengths, tgt = random_batch([6, 3], tgt_len=5)
    enc = model.encode(src, lengths)
    state = model.init_state(enc)
    for t in range(4):
        _, state, _ = model.decode_step(tgt[:, t], state, enc)
    seen = []
    model.decoder_layers[0].self_attention.kv_proj.register_forward_hook(
        lambda m, i, o: seen.append(i[0].shape)
    )
    model.decoder_layers[0].cross_attention.kv_proj.register_forward_hook(
        lambda m, i, o: seen.append(("cross", i[0].shape))
    )
    model.decode_step(tgt[:, 4], state, enc)
    assert seen == [torch.Size([2, 1, 16])]  # one new position; the encoder side is not re-projected


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_projections_compute_what_the_separate_ones_did(variant):
    import copy

    from aligna.runtime import quantize_int8

    model = make(**VARIANTS[variant])
    fused = copy.deepcopy(model)
    fused.fuse_projections()
    assert fused.decoder_layers[0].self_attention.qkv_proj is not None
    src, lengths, tgt = random_batch([6, 3], tgt_len=5)
    torch.testing.assert_close(fused(src, lengths, tgt), model(src, lengths, tgt))
    # int8 with one scale per row: a fused row is quantized as it was alone, so fusing is exact
    unfused = copy.deepcopy(model)
    unfused.fuse_projections = lambda: None  # as quantize_int8 was before it fused
    int8_unfused, int8_fused = quantize_int8(unfused), quantize_int8(model)
    assert int8_unfused.decoder_layers[0].self_attention.qkv_proj is None
    assert torch.equal(int8_fused(src, lengths, tgt), int8_unfused(src, lengths, tgt))


def test_fast_attention_path_equals_the_reference_path():
    model = make()
    src, lengths, tgt = random_batch([6, 3], tgt_len=6)
    enc_fast = model.encode(src, lengths)
    enc_ref = model.encode(src, lengths, need_weights=True)
    torch.testing.assert_close(enc_fast.states, enc_ref.states)
    fast, *_ = model.decode(tgt, model.init_state(enc_fast), enc_fast, need_weights="none")
    ref, _, _, maps = model.decode(tgt, model.init_state(enc_ref), enc_ref, need_weights="all")
    torch.testing.assert_close(fast, ref)
    assert len(maps["cross"]) == 2 and maps["cross"][0].shape == (2, 4, 6, 6)
    assert enc_ref.self_weights[0].shape == (2, 4, 6, 6)
    assert torch.all(maps["decoder_self"][1][0, :, 0, 1:] == 0)  # the first position sees only itself


def two_steps_in():
    """A model, a batch of three, and its state after decoding two target tokens."""
    model = make()
    src, lengths, tgt = random_batch([6, 3, 4], tgt_len=4)
    enc = model.encode(src, lengths)
    state = model.init_state(enc)
    for t in range(2):
        _, state, _ = model.decode_step(tgt[:, t], state, enc)
    return model, tgt, enc, state


def test_reorder_moves_the_cache():
    model, tgt, enc, state = two_steps_in()
    index = torch.tensor([2, 2, 0])
    moved, _, _ = model.decode_step(tgt[index, 2], state.reorder(index), enc.reorder(index))
    direct, _, _ = model.decode_step(tgt[:, 2], state, enc)
    torch.testing.assert_close(moved, direct[index])


def test_sinusoids_follow_the_paper():
    pe = sinusoids(torch.arange(50), 8)
    assert torch.allclose(pe[7, 0], torch.sin(torch.tensor(7.0)))
    assert torch.allclose(pe[7, 3], torch.cos(torch.tensor(7.0 / 10000 ** (2 / 8))))


def test_learned_positions_have_a_limit():
    model = make(positions="learned", max_positions=8)
    src, lengths, tgt = random_batch([9], tgt_len=3)
    with pytest.raises(ValueError, match="max_positions=8"):
        model(src, lengths, tgt)


def test_shared_and_tied_embeddings():
    torch.manual_seed(0)
    config = ModelConfig(arch="transformer", emb_dim=16, share_embeddings=True, tie_embeddings=True,
                         transformer=TransformerConfig(heads=2, ff_size=8))  # fmt: skip
    model = build_model(config, VOCAB, VOCAB)
    assert model.src_embedding is model.tgt_embedding and model.output.weight is model.src_embedding.weight


def test_one_seed_gives_one_model_wherever_its_modules_lie_in_memory():
    """The embeddings were initialized in the order of a set of modules, that is of their
    memory addresses: the same seed gave either table's weights to the source side."""
    first = make(seed=3)
    kept = [make(seed=3) for _ in range(24)]  # each allocated elsewhere, the earlier ones kept alive
    for model in kept:
        for (name, p), q in zip(first.named_parameters(), model.parameters()):
            assert torch.equal(p, q), name


def test_toy_reverse_task_is_learned(toy_config, tmp_path):
    config = toy_config(
        model={"arch": "transformer", "emb_dim": 64, "encoder_layers": 2, "decoder_layers": 2, "dropout": 0.0,
               "transformer": {"heads": 4, "ff_size": 128, "attention_dropout": 0.0}},
        train={"batch_tokens": 1024, "epochs": 30, "lr": 0.002, "schedule": "inverse_sqrt", "warmup_steps": 100,
               "validate_every": 0, "optimizer": "adamw"},
    )  # fmt: skip
    write_tsv(tmp_path / "train.tsv", reverse_pairs(3000, seed=1))
    train(config, progress=False)
    test = reverse_pairs(200, seed=3)
    hyps = aligna.load(config.model_dir).translate([s for s, _ in test])
    exact = sum(h == r for h, (_, r) in zip(hyps, test)) / len(test)
    assert exact >= 0.95, exact


def test_inputs_longer_than_learned_positions_are_cut_not_fatal(toy_config, aligna_log):
    config = toy_config(
        model={"arch": "transformer", "transformer": {"heads": 2, "ff_size": 32, "positions": "learned",
                                                      "max_positions": 12}},
        train={"max_steps": 5, "validate_every": 0},
        data={"max_len": 11},  # training fits the table; translation gets longer inputs
        decode={"max_len_a": 50.0},  # would ask for outputs far past the position table
    )  # fmt: skip
    train(config, progress=False)
    translator = aligna.load(config.model_dir, checkpoint="latest")
    lines = ["a b c", " ".join("abcdefghij" * 4), ""]
    out = translator.translate_detailed(lines, beam_size=2)
    assert len(out) == 3 and len(out[1].src_tokens) == 12 and all(len(t.tokens) < 12 for t in out)
    assert "1 input(s) longer than the 12 tokens this model takes" in aligna_log.text and "line(s) 2" in aligna_log.text
    scores = translator.evaluate(lines[:2], [["c b a"], [" ".join("jihgfedcba" * 4)]], ["ppl"])
    assert scores.values["ppl"] > 0


def test_a_repeated_encoder_output_decodes_as_copied_rows():
    """`enc.repeat(k)` keeps one row per sentence, which its k hypotheses attend to together;
    it must compute what k copies of the row would, and `reorder` must keep whole sentences."""
    model = make()
    src, lengths, tgt = random_batch([6, 3, 4], tgt_len=4)
    k = 3
    enc = model.encode(src, lengths)
    grouped, copied = enc.repeat(k), enc.reorder(torch.arange(3).repeat_interleave(k))
    assert grouped.cross_keys[0].size(0) == 3 and copied.cross_keys[0].size(0) == 9
    rows = tgt.repeat_interleave(k, dim=0)  # (9, T)
    a_state, b_state = model.init_state(grouped), model.init_state(copied)
    for t in range(2):
        a, a_state, a_weights = model.decode_step(rows[:, t], a_state, grouped)
        b, b_state, b_weights = model.decode_step(rows[:, t], b_state, copied)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a_weights, b_weights)
    keep = torch.tensor([6, 7, 8, 0, 1, 2])  # the third sentence's hypotheses, then the first's
    a, _, _ = model.decode_step(rows[keep, 2], a_state.reorder(keep), grouped.reorder(keep))
    b, _, _ = model.decode_step(rows[keep, 2], b_state.reorder(keep), copied.reorder(keep))
    torch.testing.assert_close(a, b)


def test_a_reordered_cache_is_gathered_in_the_next_step():
    """`TransformerState.reorder` defers the gather to the next step's copy of the cache; two
    reorders in a row compose, and the state it came from is left as it was."""
    model, tgt, enc, state = two_steps_in()
    first, second = torch.tensor([1, 1, 0]), torch.tensor([2, 0, 0])
    moved = state.reorder(first).reorder(second)
    assert moved.order is not None and moved.keys[0] is state.keys[0]  # nothing copied yet
    index = first[second]
    with torch.no_grad():
        deferred, _, _ = model.decode_step(tgt[index, 2], moved, enc.reorder(index))
    copied = dataclasses.replace(state, keys=[k[index] for k in state.keys], values=[v[index] for v in state.values])
    direct, _, _ = model.decode_step(tgt[index, 2], copied, enc.reorder(index))
    torch.testing.assert_close(deferred, direct)
    assert state.order is None


def test_extend_cache_keeps_cat_dtypes():
    """Under bf16 autocast the new keys are bf16 and the cache fp32 (or the other way round): the
    deferred gather must give what cat gives, promoted dtype included."""
    from aligna.transformer import extend_cache

    cache, order = torch.randn(3, 2, 4, 8), torch.tensor([2, 0])
    for new in (torch.randn(2, 2, 1, 8).bfloat16(), torch.randn(2, 2, 1, 8)):
        for past in (cache, cache.bfloat16()):
            with torch.no_grad():
                got = extend_cache(past, new, order)
            expected = torch.cat([past[order], new], dim=2)
            assert got.dtype == expected.dtype and torch.equal(got, expected)
