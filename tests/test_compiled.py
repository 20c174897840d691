"""The compiled decoding step (`aligna.compiled`) computes what the eager step does."""

import warnings

import pytest
import torch
from test_rnn import random_batch
from test_transformer import VARIANTS, make

from aligna.compiled import CompiledTransformer, compile_decoding
from aligna.config import DecodeConfig
from aligna.runtime import quantize_int8
from aligna.search import search


def steps(model, src, lengths, beams=1, vocabulary=None):
    """Logits and attention of five decoding steps, with a beam's reorders between them."""
    enc = model.encode(src, lengths)
    if vocabulary is not None:
        enc = model.restrict_output(enc, vocabulary)
    enc = enc.repeat(beams)
    state = model.init_state(enc)
    rows = src.size(0) * beams
    prev = torch.arange(rows) % 7 + 4
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(5):
        logits, state, weights = model.decode_step(prev, state, enc)
        out += [logits, weights]
        prev = logits.argmax(-1) % 20 + 3
        # each sentence's rows in a random order, as a beam reorders them
        order = torch.cat([torch.randperm(beams, generator=generator) + s * beams for s in range(src.size(0))])
        state = state.reorder(order)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("rows", [2, 17])  # below and above the two-matmul attention path's 16 rows
def test_compiled_step_equals_the_eager_step(variant, precision, rows):
    model = make(**VARIANTS[variant])
    if precision == "int8":
        model = quantize_int8(model)
    compiled = compile_decoding(model)
    assert isinstance(compiled, CompiledTransformer)
    src, lengths, _ = random_batch([6, 3, 5, 2, 6, 4, 1, 6, 5, 3, 2, 6, 4, 5, 3, 6, 2][:rows], tgt_len=2)
    with torch.inference_mode():
        for beams in (1, 3):
            eager, fast = steps(model, src, lengths, beams), steps(compiled, src, lengths, beams)
            for a, b in zip(eager, fast):
                assert torch.equal(a, b)


def test_compiled_step_over_a_shortlist_and_searches_alike():
    model = quantize_int8(make())
    compiled = compile_decoding(model)
    src, lengths, _ = random_batch([6, 3, 5], tgt_len=2)
    shortlist = torch.tensor([0, 1, 2, 3, 5, 8, 9, 12, 20])
    with torch.inference_mode():
        for a, b in zip(steps(model, src, lengths, 2, vocabulary=shortlist),
                        steps(compiled, src, lengths, 2, vocabulary=shortlist)):  # fmt: skip
            assert a.shape[-1] in (9, 6) and torch.equal(a, b)
        for cfg in (DecodeConfig(beam_size=1), DecodeConfig(beam_size=4, nbest=2, alpha=0.6)):
            for vocabulary in (None, shortlist):
                eager, fast = (search(m, src, lengths, cfg, vocabulary=vocabulary) for m in (model, compiled))
                assert [[(h.tokens, h.log_prob) for h in hyps] for hyps in eager.nbest] == [
                    [(h.tokens, h.log_prob) for h in hyps] for hyps in fast.nbest
                ]
                assert all(torch.equal(a, b) for a, b in zip(eager.attention, fast.attention))


def test_with_gradients_or_autocast_a_step_runs_eagerly():
    model = make()
    compiled = compile_decoding(model)
    src, lengths, _ = random_batch([6, 3], tgt_len=2)
    compiled.program = None  # the program would fail: only the eager path may run
    eager, fast = steps(model, src, lengths), steps(compiled, src, lengths)  # gradients enabled
    assert all(torch.equal(a, b) for a, b in zip(eager, fast))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager, fast = steps(model, src, lengths), steps(compiled, src, lengths)
    assert all(torch.equal(a, b) for a, b in zip(eager, fast))


def test_what_is_not_compiled_decodes_as_it_is(monkeypatch):
    from aligna.build import build_model
    from aligna.config import ModelConfig, RNNConfig

    rnn = build_model(ModelConfig(arch="rnn", emb_dim=8, hidden_size=8, rnn=RNNConfig(attention="dot")), 20, 20)
    assert compile_decoding(rnn.eval()) is rnn  # an RNN step is not compiled
    model = make()
    assert compile_decoding(model.train()) is model  # nor a model in training

    def fails(module):
        raise RuntimeError("Python builtin <built-in function foo> is currently not supported in Torchscript\nmore")

    monkeypatch.setattr(torch.jit, "script", fails)
    with pytest.warns(RuntimeWarning, match="decoding runs eagerly: TorchScript could not compile the decoding step "
                                            r"\(Python builtin .* not supported in Torchscript\)$"):  # fmt: skip
        assert compile_decoding(model.eval()) is model
    calls = []

    def step_only(module):  # the first call, the step, compiles; the next, an encoder layer, does not
        calls.append(module)
        return module if len(calls) == 1 else fails(module)

    monkeypatch.setattr(torch.jit, "script", step_only)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compile_decoding(model) is model
    assert [str(w.message)[:69] for w in caught] == ["decoding runs eagerly: TorchScript could not compile an encoder layer"]


def test_an_int8_translator_searches_with_the_compiled_step():
    from aligna.translate import Translator

    class Pipeline:  # only what search_model reads
        pass

    translator = Translator(make(), Pipeline(), None, torch.device("cpu"), "int8")  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # compiling says nothing (TorchScript's deprecation notice is its own)
        searcher = translator.search_model()
    assert isinstance(searcher, CompiledTransformer) and searcher is translator.search_model()
    assert type(Translator(make(), Pipeline(), None, torch.device("cpu"), "fp32").search_model()).__name__ == "Transformer"


def test_a_search_without_attention_finds_the_same_and_carries_none():
    """Without attention the Transformer (eager, int8 and compiled) skips the weights of its last
    encoder-decoder attention; every search finds the same tokens and scores (to float rounding),
    and no attention."""
    import test_rnn

    transformer = make()
    models = {"transformer": transformer, "int8 compiled": compile_decoding(quantize_int8(transformer)),
              "bahdanau": test_rnn.make(**test_rnn.VARIANTS["bahdanau-bigru"])}  # fmt: skip
    src, lengths, _ = random_batch([6, 3, 5, 2], tgt_len=2)
    configs = [DecodeConfig(beam_size=1), DecodeConfig(beam_size=4, nbest=2, alpha=0.6),
               DecodeConfig(sample=True, top_k=5), DecodeConfig(beam_size=3, coverage=0.2)]  # fmt: skip
    with torch.inference_mode():
        for name, model in models.items():
            for cfg in configs:
                found = []
                for attention in (True, False):
                    generator = torch.Generator().manual_seed(3)
                    found.append(search(model, src, lengths, cfg, generator, attention=attention))
                    enc = model.encode(src, lengths)
                    _, _, weights = model.decode_step(torch.full((4,), 3), model.init_state(enc), enc, attention)
                    assert (weights is not None) == (attention or name == "bahdanau")  # an RNN's costs nothing extra
                with_maps, without = found
                assert [[h.tokens for h in hyps] for hyps in with_maps.nbest] == [
                    [h.tokens for h in hyps] for hyps in without.nbest
                ], (name, cfg)
                # the attention without its weights is another kernel: the same sums in another order
                scores = [(h.log_prob, h.score) for hyps in with_maps.nbest for h in hyps]
                assert torch.tensor(scores) == pytest.approx(
                    torch.tensor([(h.log_prob, h.score) for hyps in without.nbest for h in hyps]), abs=1e-4
                )
                assert with_maps.attention is not None
                # the coverage penalty reads the attention, so that search keeps it
                assert (without.attention is None) == (cfg.coverage == 0), (name, cfg)
