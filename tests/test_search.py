from dataclasses import dataclass

import pytest
import torch
from test_rnn import VARIANTS, make, random_batch
from torch import Tensor

from aligna.model import Reorderable, Seq2Seq
from aligna.search import greedy_search, max_lengths
from aligna.vocab import EOS_ID, SOS_ID


def manual_greedy(model, src, lengths, limit):
    """The textbook loop for one sentence: argmax, feed back, stop at <eos>."""
    enc = model.encode(src, lengths)
    state = model.init_state(enc)
    prev, out = torch.tensor([SOS_ID]), []
    for _ in range(limit):
        logits, state, _ = model.decode_step(prev, state, enc)
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

    def decode_step(self, prev_tokens, state, enc):
        probs = torch.full((len(state.step), self.vocab), 0.1 / (self.vocab - 1))
        probs[torch.arange(len(state.step)), self.script[enc.step, state.step]] = 0.9
        return probs.log(), CountState(state.step + 1), None


def test_finished_sentences_stop_and_leave_the_batch():
    script = [[5, EOS_ID, 6, 6, 6], [4, 4, 4, EOS_ID, 7], [6, 6, 6, 6, 6]]
    model = ScriptedModel(script)
    src = torch.ones(3, 2, dtype=torch.long)
    result = greedy_search(model, src, torch.tensor([2, 2, 2]), max_len_a=0.0, max_len_b=5)
    assert result.tokens == [[5], [4, 4, 4], [6, 6, 6, 6, 6]]  # the last hits the length limit
    expected = torch.tensor([2, 4, 5]) * torch.tensor(0.9).log()
    torch.testing.assert_close(result.scores, expected)


def test_length_limit_is_relative_to_the_source():
    assert max_lengths(torch.tensor([1, 10]), 1.5, 2).tolist() == [3, 17]
    model = ScriptedModel([[6] * 30])
    result = greedy_search(model, torch.ones(1, 4, dtype=torch.long), torch.tensor([4]), 2.0, 1)
    assert len(result.tokens[0]) == 9


@pytest.mark.parametrize("variant", ["bahdanau-bigru", "luong-general-feed-bilstm"])
def test_attention_keys_are_projected_once_per_sentence_not_per_step(variant):
    model = make(**VARIANTS[variant])
    calls = []
    model.decoder.attention.key_proj.register_forward_hook(lambda *args: calls.append(1))
    src, lengths, _ = random_batch([7, 2, 5], seed=4)
    result = greedy_search(model, src, lengths, 1.0, 5)
    assert max(len(t) for t in result.tokens) > 1 and len(calls) == 1
