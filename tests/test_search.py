import math
import random
from dataclasses import dataclass

import pytest
import torch
from test_rnn import VARIANTS, make, random_batch
from torch import Tensor

from aligna.config import ConfigError, DecodeConfig
from aligna.kernels import log_softmax_
from aligna.model import Reorderable, Seq2Seq
from aligna.search import NEVER, greedy_search, max_lengths, search, top_k
from aligna.vocab import EOS_ID, PAD_ID, SOS_ID


def manual_greedy(model, src, lengths, limit):
    """The textbook loop for one sentence: argmax, feed back, stop at <eos>."""
    enc = model.encode(src, lengths)
    state = model.init_state(enc)
    prev, out = torch.tensor([SOS_ID]), []
    for _ in range(limit):
        logits, state, _ = model.decode_step(prev, state, enc)
        logits[:, NEVER] = float("-inf")  # tokens no output holds
        prev = logits.argmax(-1)
        if prev.item() == EOS_ID:
            break
        out.append(prev.item())
    return out


@pytest.mark.parametrize(
    "variant", ["bigru-context-1to2-tied", "bahdanau-bigru", "luong-general-feed-bilstm"]
)
def test_greedy_in_a_batch_equals_each_sentence_alone(variant):
    model = make(seed=3, **VARIANTS[variant])
    src, lengths, _ = random_batch([7, 2, 5, 9], seed=4)
    batched = greedy_search(model, src, lengths, 1.0, 3)
    for i, n in enumerate(lengths.tolist()):
        alone = greedy_search(model, src[i : i + 1, :n], lengths[i : i + 1], 1.0, 3)
        assert alone.tokens[0] == batched.tokens[i]
        torch.testing.assert_close(alone.scores[0], batched.scores[i])
        if batched.attention is not None:  # a row per emitted token (<eos> too), a column per source token
            rows, cols = batched.attention[i].shape
            assert cols == n and rows - len(batched.tokens[i]) in (0, 1)
            torch.testing.assert_close(alone.attention[0], batched.attention[i])
        limit = int(max_lengths(lengths[i : i + 1], 1.0, 3))
        assert batched.tokens[i] == manual_greedy(model, src[i : i + 1, :n], lengths[i : i + 1], limit)


@dataclass
class CountState(Reorderable):
    step: Tensor  # (B,)


class ScriptedModel(Seq2Seq):
    """Emits script[b][t] with probability 0.9 at step t for sentence b."""

    def __init__(self, script, vocab=8):
        super().__init__()
        self.script, self.vocab = torch.tensor(script), vocab

    def encode(self, src, src_lengths):
        return CountState(torch.arange(src.size(0)))  # remembers each row's sentence

    def init_state(self, enc):
        return CountState(torch.zeros_like(enc.step))

    def decode_step(self, prev_tokens, state, enc, need_attention=True):
        probs = torch.full((len(state.step), self.vocab), 0.1 / (self.vocab - 1))
        probs[torch.arange(len(state.step)), self.script[enc.step, state.step]] = 0.9
        return probs.log(), CountState(state.step + 1), None


def test_finished_sentences_stop_and_leave_the_batch():
    script = [[5, EOS_ID, 6, 6, 6], [4, 4, 4, EOS_ID, 7], [6, 6, 6, 6, 6]]
    model = ScriptedModel(script)
    src = torch.ones(3, 2, dtype=torch.long)
    result = greedy_search(model, src, torch.tensor([2, 2, 2]), max_len_a=0.0, max_len_b=5)
    assert result.tokens == [[5], [4, 4, 4], [6, 6, 6, 6, 6]]  # the last hits the length limit
    step = 0.9 / (1 - 2 * 0.1 / 7)  # renormalized without <pad> and <sos> (`never_emit_`)
    expected = torch.tensor([2, 4, 5]) * torch.tensor(step).log()
    torch.testing.assert_close(result.scores, expected)


def test_length_limit_is_relative_to_the_source():
    assert max_lengths(torch.tensor([1, 10]), 1.5, 2).tolist() == [3, 17]
    model = ScriptedModel([[6] * 30])
    result = greedy_search(model, torch.ones(1, 4, dtype=torch.long), torch.tensor([4]), 2.0, 1)
    assert len(result.tokens[0]) == 9


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_source_without_tokens_is_refused_with_its_index(beam_size):
    model = make(seed=3, **VARIANTS["bahdanau-bigru"])
    src, lengths, _ = random_batch([3, 1, 2], seed=4)
    lengths[1] = 0
    with pytest.raises(ValueError, match=r"source\(s\) \[1\] of the batch have no tokens"):
        search(model, src, lengths, DecodeConfig(beam_size=beam_size))


@pytest.mark.parametrize("variant", ["bahdanau-bigru", "luong-general-feed-bilstm"])
def test_attention_keys_are_projected_once_per_sentence_not_per_step(variant):
    model = make(**VARIANTS[variant])
    calls = []
    model.decoder.attention.key_proj.register_forward_hook(lambda *args: calls.append(1))
    src, lengths, _ = random_batch([7, 2, 5], seed=4)
    result = greedy_search(model, src, lengths, 1.0, 5)
    assert max(len(t) for t in result.tokens) > 1 and len(calls) == 1


# --------------------------------------------------------------------------- beam search

from aligna.search import beam_search, coverage_penalty, length_penalty, sample_search  # noqa: E402

A, Bt, C = 4, 5, 6  # token ids of a tiny vocabulary (0-3 are the specials)


@dataclass
class LastToken(Reorderable):
    token: Tensor  # (B,)


class MarkovModel(Seq2Seq):
    """P(next | previous token) from a fixed table: a language model ignoring the source."""

    def __init__(self, table: dict[int, dict[int, float]], vocab: int = 7):
        super().__init__()
        self.log_probs = torch.full((vocab, vocab), -30.0)
        for prev, row in table.items():
            for tok, p in row.items():
                self.log_probs[prev, tok] = torch.tensor(p).log()

    def encode(self, src, src_lengths):
        return LastToken(torch.zeros(src.size(0), dtype=torch.long))

    def init_state(self, enc):
        return LastToken(torch.full_like(enc.token, SOS_ID))

    def decode_step(self, prev_tokens, state, enc, need_attention=True):
        return self.log_probs[prev_tokens], LastToken(prev_tokens), None


def run(model, fn, **kw):
    src = torch.ones(1, 3, dtype=torch.long)
    return fn(model, src, torch.tensor([3]), max_len_a=0.0, max_len_b=6, **kw)


def test_beam_finds_what_greedy_misses():
    # Greedy takes A (0.6) and ends with A C <eos> at 0.6 * 0.4 * 0.6 = 0.144;
    # beam 2 keeps B as well, which ends at 0.4 * 1.0.
    model = MarkovModel({SOS_ID: {A: 0.6, Bt: 0.4}, A: {C: 0.4, EOS_ID: 0.3, A: 0.3}, Bt: {EOS_ID: 1.0},
                         C: {EOS_ID: 0.6, C: 0.4}})  # fmt: skip
    greedy = run(model, greedy_search)
    assert greedy.tokens == [[A, C]]
    beam = run(model, beam_search, beam_size=2, nbest=2)
    assert beam.tokens == [[Bt]]
    torch.testing.assert_close(beam.scores, torch.tensor([0.4]).log(), atol=1e-4, rtol=0)
    torch.testing.assert_close(greedy.scores, torch.tensor([0.144]).log(), atol=1e-4, rtol=0)
    assert [h.tokens for h in beam.nbest[0]] == [[Bt], [A, C]]
    scores = [h.score for h in beam.nbest[0]]
    assert scores == sorted(scores, reverse=True)


def test_no_search_emits_pad_or_sos_and_scores_stay_the_models():
    """<pad> and <sos> vanish from a translation's text: emitted, they gave an empty output, or
    n-best entries with the same text. No search emits them: each step's distribution is the
    model's over the other tokens, renormalized (as CTranslate2's suppressed tokens)."""
    model = MarkovModel({SOS_ID: {PAD_ID: 0.5, A: 0.3, Bt: 0.2}, PAD_ID: {EOS_ID: 1.0},
                         A: {SOS_ID: 0.5, EOS_ID: 0.3, C: 0.2}, Bt: {EOS_ID: 1.0}, C: {EOS_ID: 1.0}})  # fmt: skip
    greedy = run(model, greedy_search)
    assert greedy.tokens == [[A]]
    torch.testing.assert_close(greedy.scores, torch.tensor([0.6 * 0.6]).log(), atol=1e-4, rtol=0)
    beam = run(model, beam_search, beam_size=3, nbest=3)
    assert [h.tokens for h in beam.nbest[0]] == [[Bt], [A], [A, C]]
    torch.testing.assert_close(torch.tensor([h.log_prob for h in beam.nbest[0]]),
                               torch.tensor([0.4, 0.36, 0.24]).log(), atol=1e-4, rtol=0)  # fmt: skip
    src = torch.ones(50, 3, dtype=torch.long)
    sampled = sample_search(model, src, torch.full((50,), 3), 0.0, 6, generator=torch.Generator().manual_seed(0))
    assert {tuple(t) for t in sampled.tokens} == {(Bt,), (A,), (A, C)}


def test_length_penalty_prefers_longer_hypotheses():
    model = MarkovModel(
        {SOS_ID: {A: 0.5, Bt: 0.5}, A: {EOS_ID: 0.6, C: 0.4}, Bt: {C: 1.0}, C: {C: 0.45, EOS_ID: 0.55}}
    )
    short = run(model, beam_search, beam_size=2, alpha=0.0)
    long = run(model, beam_search, beam_size=2, alpha=3.0)
    assert short.tokens == [[A]] and long.tokens == [[Bt, C]]  # log P: -1.20 vs -1.29; / lp: -0.76 vs -0.54
    assert length_penalty(1, 0.0) == 1.0 and length_penalty(7, 1.0) == 2.0


def test_min_length_and_ngram_blocking():
    model = MarkovModel(
        {SOS_ID: {A: 1.0}, A: {Bt: 0.6, EOS_ID: 0.4}, Bt: {A: 0.6, EOS_ID: 0.2, C: 0.2}, C: {EOS_ID: 1.0}}
    )
    assert run(model, beam_search, beam_size=2).tokens == [[A]]
    assert len(run(model, beam_search, beam_size=2, min_len=3).tokens[0]) >= 3
    blocked = run(model, beam_search, beam_size=2, min_len=3, no_repeat_ngram=2).tokens[0]
    bigrams = list(zip(blocked, blocked[1:]))
    assert len(bigrams) == len(set(bigrams))  # A B A B would repeat "A B"


def test_greedy_search_blocks_ngrams_too():
    """decode.no_repeat_ngram with beam_size 1 is greedy search with blocking (a beam of one),
    not greedy search that ignores it."""
    model = MarkovModel({SOS_ID: {A: 1.0}, A: {Bt: 0.7, EOS_ID: 0.3}, Bt: {A: 0.8, EOS_ID: 0.2}})
    plain = search(model, torch.ones(1, 3, dtype=torch.long), torch.tensor([3]),
                   DecodeConfig(max_len_a=0.0, max_len_b=6)).tokens[0]  # fmt: skip
    assert plain == [A, Bt, A, Bt, A, Bt]  # A B repeats until the length limit
    blocked = search(model, torch.ones(1, 3, dtype=torch.long), torch.tensor([3]),
                     DecodeConfig(max_len_a=0.0, max_len_b=6, no_repeat_ngram=2)).tokens[0]  # fmt: skip
    assert blocked == [A, Bt, A]  # after A B A, "A B" may not come again: <eos>
    with pytest.raises(ConfigError, match="no_repeat_ngram"):
        DecodeConfig(sample=True, no_repeat_ngram=2)


def test_coverage_penalty():
    assert coverage_penalty(torch.tensor([1.0, 2.0]), 1.0) == 0.0  # fully covered costs nothing
    assert coverage_penalty(torch.tensor([0.5, 1.0]), 2.0) == pytest.approx(2 * math.log(0.5))


@pytest.mark.parametrize("variant", ["gru-context", "bahdanau-bigru", "luong-general-feed-bilstm"])
def test_beam_of_one_equals_greedy(variant):
    model = make(seed=5, **VARIANTS[variant])
    src, lengths, _ = random_batch([7, 2, 5, 9], seed=6)
    greedy = greedy_search(model, src, lengths, 1.0, 3)
    beam = beam_search(model, src, lengths, 1, 1.0, 3)
    assert beam.tokens == greedy.tokens
    torch.testing.assert_close(beam.scores, greedy.scores)
    if greedy.attention is not None:
        for a, b in zip(beam.attention, greedy.attention):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("variant", ["bigru-context-1to2-tied", "bahdanau-bigru"])
def test_beam_results_do_not_depend_on_the_batch(variant):
    model = make(seed=3, **VARIANTS[variant])
    src, lengths, _ = random_batch([7, 2, 5, 9], seed=4)
    batched = beam_search(model, src, lengths, 4, 1.0, 3, alpha=0.6, nbest=3)
    for i, n in enumerate(lengths.tolist()):
        alone = beam_search(model, src[i : i + 1, :n], lengths[i : i + 1], 4, 1.0, 3, alpha=0.6, nbest=3)
        assert [h.tokens for h in alone.nbest[0]] == [h.tokens for h in batched.nbest[i]]
        for a, b in zip(alone.nbest[0], batched.nbest[i]):
            assert a.score == pytest.approx(b.score, abs=1e-5)


def test_beam_attention_follows_the_surviving_hypothesis():
    model = make(seed=2, **VARIANTS["bahdanau-bigru"])
    src, lengths, _ = random_batch([6, 4], seed=8)
    result = beam_search(model, src, lengths, 3, 1.5, 2)
    for i, hyps in enumerate(result.nbest):
        hyp, n = hyps[0], int(lengths[i])
        tgt_in = torch.tensor([[SOS_ID, *hyp.tokens]])[:, : hyp.attention.size(0)]
        maps = model.attention_maps(src[i : i + 1, :n], lengths[i : i + 1], tgt_in)["cross"][0, 0, 0]
        torch.testing.assert_close(hyp.attention, maps)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = make(seed=1, **VARIANTS["gru-context"])
    src, lengths, _ = random_batch([7, 2, 5], seed=2)
    first = sample_search(model, src, lengths, 1.0, 3, generator=torch.Generator().manual_seed(0))
    again = sample_search(model, src, lengths, 1.0, 3, generator=torch.Generator().manual_seed(0))
    other = sample_search(
        model, src, lengths, 1.0, 3, temperature=5.0, generator=torch.Generator().manual_seed(1)
    )
    assert first.tokens == again.tokens and first.tokens != other.tokens
    top1 = sample_search(model, src, lengths, 1.0, 3, top_k=1, generator=torch.Generator().manual_seed(3))
    nucleus = sample_search(
        model, src, lengths, 1.0, 3, top_p=1e-6, generator=torch.Generator().manual_seed(3)
    )
    assert top1.tokens == nucleus.tokens == greedy_search(model, src, lengths, 1.0, 3).tokens


def test_a_row_with_its_own_generator_samples_the_same_whatever_it_is_batched_with():
    """One generator per row: row i draws only from its own, so its sample does not depend
    on the batch (a Translator seeds input i's from (seed, i): batch_size changes nothing)."""
    model = make(seed=1, **VARIANTS["luong-general-feed-bilstm"])
    src, lengths, _ = random_batch([7, 2, 5, 6], seed=2)

    def generators(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    options = {"max_len_a": 1.0, "max_len_b": 6, "temperature": 3.0}
    together = sample_search(model, src, lengths, generator=generators(10, 11, 12, 13), **options).tokens
    for i in range(4):
        n = int(lengths[i])
        alone = sample_search(model, src[i : i + 1, :n], lengths[i : i + 1], generator=generators(10 + i), **options)
        assert alone.tokens == [together[i]], i
    pair = sample_search(model, src[[2, 0]], lengths[[2, 0]], generator=generators(12, 10), **options).tokens
    assert pair == [together[2], together[0]]
    with pytest.raises(ValueError, match="3 generators for a batch of 4 sources"):
        sample_search(model, src, lengths, generator=generators(1, 2, 3), **options)


# --------------------------------------------------------------------------- beam search: back-pointers

from test_transformer import VARIANTS as TRANSFORMERS  # noqa: E402
from test_transformer import make as make_transformer  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from aligna.search import Hypothesis, SearchResult, _block_ngrams  # noqa: E402


@torch.no_grad()
def _reference_beam_search(
    model: Seq2Seq, src: Tensor, src_lengths: Tensor, beam_size: int, max_len_a: float = 1.5,
    max_len_b: int = 10, alpha: float = 0.0, nbest: int = 1, min_len: int = 0, no_repeat_ngram: int = 0,
    coverage: float = 0.0,
) -> SearchResult:  # fmt: skip
    """`beam_search` as it was before it kept back-pointers (aligna c61294d, with the stopping
    rule of today): every step copied the whole token and attention history of every row
    (O(t * S) a step). The reference the new one must match exactly; the algorithm is the
    one `beam_search`'s docstring describes."""
    k = beam_size
    batch = src.size(0)
    device = src.device
    limit = max_lengths(src_lengths, max_len_a, max_len_b, model.max_len)  # (B,)
    enc = model.encode(src, src_lengths)
    enc = enc.repeat(k)  # (B * k, ...) as the model repeats it: the same arithmetic as the search's
    state = model.init_state(enc)
    sentence = torch.arange(batch, device=device)  # input sentence of each live sentence
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start as the same empty prefix: expand only one
    history = torch.zeros(batch * k, 0, dtype=torch.long, device=device)  # (rows, t)
    attention: Tensor | None = None  # (rows, t, S) weights of every emitted token
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    top_ended = torch.zeros(batch, dtype=torch.bool, device=device)
    prev = torch.full((batch * k,), SOS_ID, dtype=torch.long, device=device)
    for t in range(int(limit.max())):
        logits, state, attn = model.decode_step(prev, state, enc)  # (b * k, V), (b * k, S) or None
        # the search's own arithmetic: log P(y_t | ...) with the row's score added, in one rounding
        logits[:, NEVER] = float("-inf")  # tokens no output holds
        log_probs = log_softmax_(logits.float(), scores.view(-1))
        vocab = log_probs.size(-1)
        eos = log_probs[:, EOS_ID].clone()
        if t < min_len:
            log_probs[:, EOS_ID] = float("-inf")
        if no_repeat_ngram and t >= no_repeat_ngram - 1:
            log_probs = _block_ngrams(history, log_probs, no_repeat_ngram)
        stuck = torch.isneginf(log_probs).all(-1)  # n-gram blocking left no token before min_len: stop here
        if bool(stuck.any()):
            log_probs[stuck, EOS_ID] = eos[stuck]
        live = sentence.size(0)
        candidates = log_probs.view(live, k * vocab)
        top_scores, top = candidates.topk(2 * k, dim=1)  # (b, 2k), best first
        parent = top // vocab + torch.arange(live, device=device).unsqueeze(1) * k  # row of each candidate
        token = top % vocab
        if attn is not None:
            attn = attn.float()
            attention = (
                attn.unsqueeze(1) if attention is None else torch.cat([attention, attn.unsqueeze(1)], 1)
            )
        at_limit = t + 1 >= limit[sentence]  # (b,)
        # Finish the k best candidates that end in <eos>, and everything at the length limit.
        rank = torch.arange(2 * k, device=device).unsqueeze(0)
        finish = ((token == EOS_ID) | at_limit.unsqueeze(1)) & (rank < k) & (top_scores > float("-inf"))
        for i, j in finish.nonzero().tolist():
            row, n = int(parent[i, j]), t + 1
            ids = history[row].tolist() + ([] if token[i, j] == EOS_ID else [int(token[i, j])])
            maps = None if attention is None else attention[row, :, : int(src_lengths[sentence[i]])].cpu()
            log_prob = float(top_scores[i, j])
            penalty = coverage_penalty(maps.sum(0), coverage) if maps is not None else 0.0
            finished[int(sentence[i])].append(
                Hypothesis(ids, log_prob / length_penalty(n, alpha) + penalty, log_prob, maps)
            )
        # Continue with the k best candidates that do not end in <eos>.
        order = torch.where(token == EOS_ID, 2 * k + rank, rank)  # <eos> candidates last
        pick = order.argsort(dim=1)[:, :k]  # (b, k)
        scores = top_scores.gather(1, pick)
        rows = parent.gather(1, pick).view(-1)  # (b * k,)
        prev = token.gather(1, pick).view(-1)
        top_ended |= (token[:, 0] == EOS_ID) & (top_scores[:, 0] > float("-inf"))
        done = at_limit | (torch.tensor([len(finished[int(s)]) >= k for s in sentence], device=device) & top_ended)
        if bool(done.all()):
            break
        keep = (~done).nonzero().squeeze(1)  # live sentences that go on
        keep_rows = (keep.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
        rows, prev, scores, sentence, top_ended = (
            rows.view(live, k)[keep].view(-1),
            prev.view(live, k)[keep].view(-1),
            scores[keep],
            sentence[keep],
            top_ended[keep],
        )
        history = torch.cat([history[rows], prev.unsqueeze(1)], dim=1)
        attention = None if attention is None else attention[rows]
        state, enc = state.reorder(rows), enc.reorder(keep_rows)
    ranked = [sorted(hyps, key=lambda h: -h.score)[:nbest] for hyps in finished]
    return SearchResult(ranked)


MODELS = {  # name: how to build it (once, on first use)
    **{name: lambda name=name: make(seed=7, **VARIANTS[name])
       for name in ["gru-context", "bahdanau-bigru", "luong-general-feed-bilstm", "luong-dot-nofeed-lstm"]},
    **{name: lambda name=name: make_transformer(seed=7, **TRANSFORMERS[name]) for name in TRANSFORMERS},
}  # fmt: skip
_built: dict[str, Seq2Seq] = {}


def random_case(seed):
    """A model, a batch and beam options drawn at random from `seed`."""
    rng = random.Random(seed)
    name = rng.choice(sorted(MODELS))
    model = _built.setdefault(name, MODELS[name]())
    src, lengths, _ = random_batch([rng.randint(1, 9) for _ in range(rng.randint(1, 5))], seed=seed)
    k = rng.choice([1, 2, 3, 5])
    options = dict(
        beam_size=k, max_len_a=rng.choice([0.5, 1.0, 2.0]), max_len_b=rng.choice([0, 3, 10]),
        alpha=rng.choice([0.0, 0.6, 1.5]), nbest=rng.randint(1, k + 2), min_len=rng.choice([0, 0, 2, 5, 40]),
        no_repeat_ngram=rng.choice([0, 0, 1, 2, 3]), coverage=rng.choice([0.0, 0.0, 0.2, 1.0]),
    )  # fmt: skip
    return model, src, lengths, options


@pytest.mark.parametrize("seed", range(40))
def test_beam_search_equals_the_copying_reference(seed):
    """Same hypotheses, in the same order, with bit-identical scores and attention maps."""
    model, src, lengths, options = random_case(seed)
    if seed == 0:  # one sure case of n-gram blocking leaving no token before min_len
        options.update(max_len_a=2.0, max_len_b=10, min_len=40, no_repeat_ngram=1)
    new = beam_search(model, src, lengths, **options)
    old = _reference_beam_search(model, src, lengths, **options)
    assert len(new.nbest) == len(old.nbest) == src.size(0)
    for mine, theirs in zip(new.nbest, old.nbest):
        assert len(mine) == len(theirs) > 0
        for a, b in zip(mine, theirs):
            assert (a.tokens, a.score, a.log_prob) == (b.tokens, b.score, b.log_prob)
            assert (a.attention is None) == (b.attention is None)
            if a.attention is not None:
                assert a.attention.shape == b.attention.shape and torch.equal(a.attention, b.attention)


class Written(TorchDispatchMode):
    """Counts the tensor elements that aten operations write (views write nothing)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.elements += sum(x.numel() for x in pytree.tree_leaves(out) if isinstance(x, Tensor))
        return out


@dataclass
class Source(Reorderable):
    mask: Tensor  # (B, S) true at real tokens


class Attending(MarkovModel):
    """A `MarkovModel` that attends evenly to the source tokens: a cheap model with attention."""

    def encode(self, src, src_lengths):
        return Source(torch.arange(src.size(1)) < src_lengths.unsqueeze(1))

    def init_state(self, enc):
        return LastToken(torch.full((enc.mask.size(0),), SOS_ID))

    def decode_step(self, prev_tokens, state, enc, need_attention=True):
        return self.log_probs[prev_tokens], LastToken(prev_tokens), enc.mask / enc.mask.sum(1, keepdim=True)


def written_per_step(search, steps):
    """Elements written by each step of `search` (and in all) on a sentence of 6 tokens,
    beam 3, decoded for `steps` steps (min_len: <eos> is never allowed)."""
    model = Attending({SOS_ID: {A: 0.5, Bt: 0.5}, A: {A: 0.5, C: 0.5}, Bt: {C: 1.0}, C: {A: 0.2, C: 0.8}})
    counter, marks = Written(), []
    decode_step = model.decode_step
    model.decode_step = lambda *args: (marks.append(counter.elements), decode_step(*args))[1]
    with counter:
        result = search(
            model, torch.ones(1, 6, dtype=torch.long), torch.tensor([6]), 3, 0.0, steps, min_len=10**9
        )
    assert len(result.tokens[0]) == steps
    return [b - a for a, b in zip(marks, marks[1:])], counter.elements


def test_a_beam_step_costs_the_same_at_any_length():
    """The old search copied the whole history every step: O(t * S) a step, O(T^2 * S) in all."""
    per_step, total = written_per_step(beam_search, 400)
    assert per_step[390] == per_step[10]  # nothing in a step grows with t
    _, short = written_per_step(beam_search, 100)
    assert total < 4.5 * short  # 4x the length: 4x the work
    old_per_step, old_total = written_per_step(_reference_beam_search, 400)
    assert old_per_step[390] > 10 * old_per_step[10] and old_total > 10 * total  # what this test catches


@pytest.mark.parametrize("m, chunk", [(4000, 64), (4003, 64), (1000, 7)])
def test_top_k_in_two_passes_equals_topk(m, chunk):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(6, m, generator=g)
    x[1] = float("-inf")  # a row with no candidate: any n positions, all -inf
    x[2, : m - 3] = float("-inf")  # fewer candidates than n
    x[3, -1] = 100.0  # the best one in the short last chunk
    x[4] = x[4].round(decimals=1)  # many ties
    values, indices = top_k(x, 10, chunk)
    expected, _ = x.topk(10, dim=1)
    assert torch.equal(values, expected)
    assert torch.equal(x.gather(1, indices), values) and bool((indices < m).all())
    assert all(len(set(row)) == 10 for row in indices.tolist())  # no position twice


def test_one_finished_hypothesis_is_enough_for_the_best_by_log_prob(monkeypatch):
    """With nbest 1, alpha 0 and no coverage penalty a sentence is done once its best candidate
    ends: the same best hypothesis as when k finished ones are collected, in fewer steps."""
    steps = {"one": 0, "k": 0}
    for seed in range(12):
        model, src, lengths, options = random_case(seed)
        options.update(beam_size=5, nbest=1, alpha=0.0, coverage=0.0, max_len_a=2.0, max_len_b=10)
        calls: list[int] = []

        def counted(*args, real=model.decode_step, calls=calls, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(model, "decode_step", counted)
        one = beam_search(model, src, lengths, **options)
        steps["one"] += len(calls)
        calls.clear()
        full = beam_search(model, src, lengths, **{**options, "nbest": 5})  # needs 5 finished: the old rule
        steps["k"] += len(calls)
        monkeypatch.undo()
        for a, b in zip(one.nbest, full.nbest):
            assert (a[0].tokens, a[0].log_prob) == (b[0].tokens, b[0].log_prob)
    assert steps["one"] < steps["k"], steps
