"""Inference that is safe to share: one Translator, many threads, per-call options."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import aligna
from aligna.compiled import script
from aligna.training import train

OPTIONS = [
    {},
    {"beam_size": 3},
    {"beam_size": 4, "nbest": 2, "alpha": 0.6},
    {"sample": True, "top_k": 3, "seed": 7},
    {"sample": True, "temperature": 0.5, "seed": 3},
    {"beam_size": 2, "min_len": 4},
    {"no_repeat_ngram": 2},
    {"beam_size": 5, "coverage": 0.2},
]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_one_translator_answers_eight_threads_as_it_answers_one(toy_config, precision):
    config = toy_config(
        model={"rnn": {"attention": "bahdanau"}}, train={"max_steps": 30, "validate_every": 0}
    )
    train(config, progress=False)
    translator = aligna.load(config.model_dir, precision=precision)
    texts = ["a b c", "j i h g f", "", "d e", "c c c c c c c"]

    def run(options):
        return [(t.text, round(t.score, 4), t.nbest) for t in translator.translate_detailed(texts, **options)]

    sequential = [run(o) for o in OPTIONS]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            assert list(pool.map(run, OPTIONS)) == sequential
    assert not translator.model.training


def test_a_model_in_training_mode_is_refused_not_switched(toy_config):
    config = toy_config(train={"max_steps": 5, "validate_every": 0})
    train(config, progress=False)
    translator = aligna.load(config.model_dir)
    translator.model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        translator.translate(["a b"])
    assert translator.model.training  # left as the owner set it
    translator.model.eval()
    with torch.inference_mode():
        assert translator.translate(["a b"])


def test_attention_rows_keep_their_labels_when_a_model_emits_specials(toy_config):
    """<unk> is the special a search can emit (never <pad> or <sos>, however likely: `search.NEVER`)."""
    from aligna.vocab import PAD_ID, SOS_ID, UNK_ID

    config = toy_config(model={"rnn": {"attention": "bahdanau"}}, train={"max_steps": 3, "validate_every": 0})
    train(config, progress=False)
    translator = aligna.load(config.model_dir)
    with torch.no_grad():
        bias = translator.model.decoder.output.bias
        bias[PAD_ID] = bias[SOS_ID] = 200.0
        bias[UNK_ID] = 100.0  # an untrained model's habit, exaggerated
    (t,) = translator.translate_detailed(["a b c"])
    assert t.tokens and set(t.tokens) == {"<unk>"}
    record = translator.attention_record(t, every_map=True)
    assert len(record["weights"]) == len(record["tgt_tokens"]) == len(t.tokens)
    assert len(record["maps"]["cross"]["rows"]) == len(record["maps"]["cross"]["weights"][0][0])


def test_int8_linear_runs_onednn_on_many_rows_with_the_same_products():
    """Many rows go to oneDNN's kernel, few to fbgemm's (`runtime.WIDE_OUTPUT`): the same int8
    weights and activations, so the outputs agree to float rounding; scripted as eager."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    from aligna.runtime import WIDE_OUTPUT, Int8Linear

    if "onednn" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch has no oneDNN quantized engine")
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 1000)
    linear.qconfig = per_channel_dynamic_qconfig
    layer = Int8Linear.from_float(linear)
    assert layer.wide_rows == -(-WIDE_OUTPUT // 1000) and layer.wide is not layer.packed
    kernel = torch.ops.quantized.linear_dynamic
    many, few = torch.randn(layer.wide_rows, 32), torch.randn(layer.wide_rows - 1, 32)
    assert torch.equal(layer(many), kernel(many, layer.wide, True))
    assert torch.equal(layer(few), kernel(few, layer.packed, True))
    torch.testing.assert_close(kernel(many, layer.packed, True), layer(many), rtol=1e-5, atol=1e-5)
    # 7-bit activations: within 0.064 of fp32 over 40 seeds (outputs of magnitude ~1)
    torch.testing.assert_close(layer(many), linear(many), rtol=0.0, atol=0.15)
    scripted = script(layer, "the layer")  # aligna's TorchScript call, as the decoding step's
    assert torch.equal(scripted(many), layer(many)) and torch.equal(scripted(few), layer(few))
    narrow = layer.rows(torch.arange(0, 1000, 7))  # a shortlist's layer: fbgemm only
    assert narrow.wide is narrow.packed


def test_int8_linear_built_under_a_higher_threshold_keeps_many_rows_on_fbgemm(monkeypatch):
    """`WIDE_OUTPUT` is read when a layer is made (as bench.engine_speed's `aligna-fbgemm` makes
    its int8 copy): rows that the default threshold sends to oneDNN stay on fbgemm."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    from aligna import runtime

    linear = torch.nn.Linear(64, 8)
    linear.qconfig = per_channel_dynamic_qconfig
    many = torch.randn(-(-runtime.WIDE_OUTPUT // 8), 64)  # enough rows for oneDNN at the default
    monkeypatch.setattr(runtime, "WIDE_OUTPUT", 2**40)
    layer = runtime.Int8Linear.from_float(linear)
    assert torch.equal(layer(many), torch.ops.quantized.linear_dynamic(many, layer.packed, True))
    assert torch.equal(script(layer, "the layer")(many), layer(many))


def test_keep_freed_memory_applies_once_on_glibc():
    import platform

    from aligna.runtime import keep_freed_memory

    kept = keep_freed_memory()
    assert kept == (platform.libc_ver()[0] == "glibc")
    assert keep_freed_memory() == kept  # idempotent
    big = torch.ones(40_000_000)  # 160 MB: from the heap now, not a fresh mapping
    assert float(big.sum()) == 40_000_000


def test_a_library_trainer_may_leave_the_allocator_as_it_is(toy_config, monkeypatch):
    from aligna import training

    calls = []
    monkeypatch.setattr(training, "keep_freed_memory", lambda: calls.append(1))
    for keep_freed, expected in ((False, []), (True, [1])):
        trainer = training.Trainer(toy_config(train={"device": "cpu"}), overwrite=True, keep_freed=keep_freed)
        trainer.close()
        assert calls == expected


def test_the_loss_comes_from_the_precision_that_translates_and_texts_must_be_a_list(toy_config):
    config = toy_config(train={"max_steps": 10, "validate_every": 0})
    train(config, progress=False)
    sources, references = ["a b c", "d e f g"], [["c b a"], ["g f e d"]]
    fp32 = aligna.load(config.model_dir).evaluate(sources, references, ["loss"]).values["loss"]
    bf16 = aligna.load(config.model_dir, precision="bf16").evaluate(sources, references, ["loss"]).values["loss"]
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.02)  # bf16 was fp32's, to the last digit
    with pytest.raises(TypeError, match="texts: a list of strings"):
        aligna.load(config.model_dir).translate("a b c")  # was three sentences, one per character
