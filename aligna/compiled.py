"""The Transformer's decoding step as one compiled program, for small-batch CPU decoding.

At batch 1 a decoding step of the int8 Transformer is not arithmetic but dispatch: some 460
operators, each a few microseconds of Python and dispatcher around a kernel that takes about
as long (`bench/decode_profile.py`). `StepProgram` is that step (embedding and positions, the
decoder layers with their caches, the last norm) compiled by TorchScript, so its interpreter,
not Python, walks from operator to operator. It runs aligna's own modules, scripted as they
are (`DecoderLayer`, `PositionalEncoding`, `Int8Linear`, ...): nothing is written twice.
On the de->en Transformer at int8, 1 thread, on a 2-core EPYC (record
`engine_speed_compiled.json`, `aligna` against `aligna-eager`): 1.86x the sentences/s of eager
greedy search at batch 1, 1.64x beam 5; 1.16x and 1.20x at batch 64; the same outputs.

`CompiledTransformer` is the model as the search sees it: `encode`, `init_state` and
`restrict_output` are the model's own, `decode_step` runs the program, then the output layer
(the model's, or a shortlist's, in Python, since it may change with every batch).

TorchScript, not `torch.compile`: dynamo cannot trace fbgemm's packed int8 weights, so a
compiled step breaks its graph at every linear layer (tried once, at batch 1: 3.0 ms a step
against 1.15 ms eager). TorchScript is deprecated in torch 2.x; where scripting fails,
`compile_decoding` warns and the model decodes eagerly, with the same results.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .ensemble import Ensemble
from .model import Reorderable, Seq2Seq
from .transformer import Transformer, TransformerEncoderOutput, TransformerState


class StepProgram(nn.Module):
    """`Transformer.decode_step` up to the output layer, for one new token per row and the last
    layer's encoder-decoder attention. It holds the model's modules, not copies."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.embedding, self.positions = model.tgt_embedding, model.tgt_positions
        self.layers, self.norm, self.scale = model.decoder_layers, model.decoder_norm, float(model.scale)

    def forward(
        self, tokens: Tensor, keys: list[Tensor], values: list[Tensor], order: Tensor | None,
        cross_keys: list[Tensor], cross_values: list[Tensor], src_mask: Tensor, beams: int, need_attention: bool,
    ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor | None]:  # fmt: skip
        """tokens (B,) and the state's and encoder output's tensors, as `Transformer.decode` reads
        them -> the output layer's input (B, d_model), the new keys and values of every layer,
        and the last layer's attention, averaged over heads (B, S) (None without need_attention)."""
        x = self.positions(self.embedding(tokens.unsqueeze(1)) * self.scale, keys[0].size(2))  # (B, 1, d)
        new_keys: list[Tensor] = []
        new_values: list[Tensor] = []
        weights: Tensor | None = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, cache, _, weights = layer(
                x, (keys[i], values[i]), None, (cross_keys[i], cross_values[i]), src_mask,
                "cross" if i == last and need_attention else "none", beams, order,
            )  # fmt: skip
            new_keys.append(cache[0])
            new_values.append(cache[1])
        summary = None if weights is None else weights.mean(dim=1).squeeze(1)
        return self.norm(x).squeeze(1), new_keys, new_values, summary


class CompiledTransformer(Seq2Seq):
    """A Transformer that decodes through its compiled `StepProgram`: for a frozen copy that
    only searches (`runtime.quantize_int8`'s int8 model). Under autocast or with gradients,
    which the program does not follow, a step runs eagerly."""

    def __init__(self, model: Transformer, program: torch.jit.ScriptModule, encoder_layers: nn.ModuleList) -> None:
        super().__init__()
        self.model, self.program, self.max_len = model, program, model.max_len
        # The model as it is but for its encoder layers, which are scripted: `encode` runs as the
        # model's, each layer in the interpreter. A shallow copy shares every module and tensor.
        self.encoder = copy.copy(model)
        self.encoder._modules = {**model._modules, "encoder_layers": encoder_layers}

    def encode(self, src: Tensor, src_lengths: Tensor) -> TransformerEncoderOutput:
        if _eager(src):
            return self.model.encode(src, src_lengths)
        return self.encoder.encode(src, src_lengths)

    def init_state(self, encoder_output: Reorderable) -> TransformerState:
        return self.model.init_state(encoder_output)  # type: ignore[arg-type]

    def restrict_output(self, encoder_output: Reorderable, ids: Tensor) -> TransformerEncoderOutput:
        return self.model.restrict_output(encoder_output, ids)  # type: ignore[arg-type]

    def decode_step(
        self, prev_tokens: Tensor, state: TransformerState, encoder_output: TransformerEncoderOutput,  # type: ignore[override]
        need_attention: bool = True,
    ) -> tuple[Tensor, TransformerState, Tensor | None]:  # fmt: skip
        if _eager(prev_tokens):
            return self.model.decode_step(prev_tokens, state, encoder_output, need_attention)
        enc = encoder_output
        hidden, keys, values, weights = self.program(
            prev_tokens, state.keys, state.values, state.order, enc.cross_keys, enc.cross_values, enc.mask, enc.beams,
            need_attention,
        )  # fmt: skip
        output = self.model.output if enc.output is None else enc.output
        return output(hidden), TransformerState(keys, values), weights

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, keep: Tensor | None = None) -> Tensor:
        return self.model(src, src_lengths, tgt_in, keep)

    def attention_maps(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> dict[str, Tensor]:
        return self.model.attention_maps(src, src_lengths, tgt_in)


def _eager(x: Tensor) -> bool:
    """Whether a call must run eagerly: the programs follow neither gradients nor autocast."""
    return torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type)


def compile_decoding(model: Seq2Seq) -> Seq2Seq:
    """`model` with its decoding step compiled where aligna can (a Transformer in eval mode),
    else `model` itself. The model must not be trained afterwards: the program runs its modules
    in eval mode. An ensemble gets its members compiled."""
    if isinstance(model, Ensemble):
        return Ensemble([compile_decoding(m) for m in model.members], model.weights).train(model.training)
    if not isinstance(model, Transformer) or model.training:
        return model
    program = script(StepProgram(model), "the decoding step")
    if program is None:  # warned once: decoding stays eager
        return model
    encoder_layers = nn.ModuleList()
    for layer in model.encoder_layers:
        scripted = script(layer, "an encoder layer")
        if scripted is None:
            return model
        encoder_layers.append(scripted)
    return CompiledTransformer(model, program, encoder_layers)


def script(code: Callable | nn.Module, what: str) -> Any:
    """torch.jit.script(code), or None, with a warning that names `what`, where TorchScript
    cannot compile it (then decoding runs eagerly, which computes the same)."""
    try:
        with warnings.catch_warnings():  # "torch.jit.script is deprecated", at every call: see the module's note
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated.*")
            return torch.jit.script(code)
    except Exception as e:  # noqa: BLE001 - any failure of the compiler leaves eager code, which is correct
        warnings.warn(f"decoding runs eagerly: TorchScript could not compile {what} "
                      f"({str(e).strip().splitlines()[0][:200]})", RuntimeWarning, stacklevel=3)  # fmt: skip
        return None
