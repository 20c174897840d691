"""Export a trained Transformer to CTranslate2, OpenNMT's C++ inference engine.

    aligna export runs/de_en --to ctranslate2 runs/de_en-ct2 --quantization int8

The converter fills CTranslate2's public spec (`TransformerSpec`) from aligna's weights; the
exported directory holds CTranslate2's files (model.bin, config.json, *_vocabulary.json) and
aligna's own text ends beside them (config.yaml, tokenizers, vocabularies) and
`aligna_export.json`, which says what was exported from where. `aligna.load`, `aligna
translate` / `evaluate` and `aligna serve` take such a directory (`ct2.CT2Translator`).

How aligna's Transformer maps onto the spec:
- Attention: self-attention's W^Q and [W^K; W^V] fuse into one (3d, d) projection, cross-
  attention keeps W^Q apart from the fused [W^K; W^V] (aligna's `kv_proj` is already that).
- Positions: aligna's sinusoidal table interleaves sin and cos (PE[p, 2i] = sin, PE[p, 2i+1]
  = cos), CTranslate2's built-in one does not, so the model carries aligna's own table
  (`SINUSOID_ROWS` positions); learned positions carry their table.
- Pre-norm models carry the final LayerNorm of each stack; post-norm models have none.
  LayerNorm epsilon is PyTorch's 1e-5 (CTranslate2's default differs).
- Special tokens: `<sos>` starts the decoder, `<eos>` ends it, `<unk>`; sources go in
  without framing, as aligna feeds them.
- Attention weights: the last decoder layer's cross-attention averaged over all heads,
  the map aligna's own search returns.

CTranslate2 has no RNN decoder: an RNN model is refused, with what to use instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .build import build_model, count_parameters
from .config import Config, load_config
from .data import Pipeline
from .modeldir import CONFIG, MARKER, ModelDir, ModelDirError
from .shortlist import FILE as SHORTLIST
from .shortlist import VMAP, Shortlist
from .tensorfiles import atomic_write_text, file_sha256, load_weights, read_json
from .transformer import Transformer, sinusoids
from .vocab import EOS, SOS, SPECIALS, UNK

EXPORT_INFO = "aligna_export.json"  # marks a directory `aligna export` wrote, and says what it holds
SINUSOID_ROWS = 1024  # positions of the exported sinusoidal table: the longest input and output
QUANTIZATIONS = ("int8", "int8_float32", "int16", "float16", "bfloat16", "int8_float16", "int8_bfloat16", "float32")


class ExportError(ValueError):
    """A model that cannot be exported, or an output directory that must not be written."""


def ctranslate2_module():
    """The ctranslate2 package, or an error that says how to install it."""
    try:
        import ctranslate2
    except ImportError:
        raise ExportError(
            "CTranslate2 is not installed: pip install 'aligna[ct2]' (or pip install ctranslate2)"
        ) from None
    return ctranslate2


def is_exported(path: str | Path) -> bool:
    return (Path(path) / EXPORT_INFO).is_file()


def export_info(path: str | Path) -> dict[str, Any]:
    """The description `export_ctranslate2` wrote into an exported directory."""
    info = read_json(Path(path) / EXPORT_INFO)
    where = Path(path) / EXPORT_INFO
    if not isinstance(info, dict) or info.get("format") != "ctranslate2":
        raise ExportError(f"{where}: not an aligna export description")
    for key in ("max_positions", "parameters"):
        value = info.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ExportError(f"{where}: {key} must be a positive integer, not {value!r}: export the model again")
    return info


def export_ctranslate2(
    model_dir: str | Path, out: str | Path, checkpoint: str = "best", quantization: str | None = None,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write the CTranslate2 model of `model_dir`'s Transformer (the weights `load` would
    pick for `checkpoint`) to `out`. The directory appears complete or not at all: it is
    written beside `out` and renamed into place. An existing `out` is replaced only with
    `overwrite` and only if it is an earlier export (never a directory aligna did not write)."""
    ctranslate2_module()
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ExportError(f"--quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    md = ModelDir(model_dir)
    md.require()
    out = Path(out).absolute()  # "." or "..": the staging directory goes beside it, not into it
    _check_target(out, md, overwrite)
    config = load_config(md / CONFIG)
    if config.model.arch != "transformer":
        raise ExportError(
            f"{md.path}: CTranslate2 has no RNN encoder-decoder, so an RNN model ({config.model.rnn.cell}, "
            f"attention {config.model.rnn.attention}) cannot be exported; decode it with aligna itself, "
            "where --precision int8 is the fast CPU path"
        )
    pipeline = Pipeline.load(md.path)
    model = build_model(config.model, len(pipeline.src_vocab), len(pipeline.tgt_vocab))
    weights = md.weights(checkpoint)
    load_weights(model, weights)
    assert isinstance(model, Transformer)
    spec = transformer_spec(model, config, pipeline)
    spec.validate()
    spec.optimize(quantization=quantization)

    out.parent.mkdir(parents=True, exist_ok=True)
    old: Path | None = None
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would keep the export from other users
        spec.save(str(staging))
        pipeline.save(staging)
        shutil.copyfile(md / CONFIG, staging / CONFIG)
        if (md / SHORTLIST).is_file():  # the same shortlist, as CTranslate2's vocabulary map of the export's names
            shortlist = Shortlist.read(md / SHORTLIST, pipeline.src_vocab, pipeline.tgt_vocab)
            shortlist.write(staging / VMAP, ct2_tokens(pipeline.src_vocab.itos), ct2_tokens(pipeline.tgt_vocab.itos))
        import ctranslate2

        info = {
            "format": "ctranslate2",
            "ctranslate2_version": ctranslate2.__version__,
            "aligna_version": __version__,
            "quantization": quantization or "float32",
            "model_dir": str(md.path.resolve()),
            "weights": str(Path(weights).resolve()),
            "weights_sha256": file_sha256(Path(weights)),
            "parameters": count_parameters(model),
            "max_positions": model.max_len or SINUSOID_ROWS,
            "token_names": TOKEN_NAMES,
        }
        atomic_write_text(staging / EXPORT_INFO, json.dumps(info, indent=1) + "\n")
        if out.exists():  # an earlier export, checked above: set aside, deleted once the new one is in
            old = Path(tempfile.mkdtemp(prefix=f".old-{out.name}-", dir=out.parent))
            out.rename(old / out.name)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            if not out.exists():  # the earlier export back in its place
                (old / out.name).rename(out)
            if not any(old.iterdir()):
                old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_target(out: Path, md: ModelDir, overwrite: bool) -> None:
    target, model = out.resolve(), md.path.resolve()
    if target == model or model in target.parents:
        raise ExportError(f"{out}: the export must not go into the model directory {md.path}")
    if target in model.parents:  # replacing it would delete the training run
        raise ExportError(f"{out}: it holds the model directory {md.path}; export somewhere else")
    if (out / MARKER).exists():
        raise ExportError(f"{out} is a training run's model directory; export somewhere else")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not is_exported(out):
            raise ExportError(f"{out} exists and is not an earlier aligna export; it is left alone")
        if not overwrite:
            raise ExportError(f"{out} holds an earlier export: add --overwrite to replace it")


def transformer_spec(model: Transformer, config: Config, pipeline: Pipeline):
    """CTranslate2's TransformerSpec filled with `model`'s weights."""
    from ctranslate2.specs import common_spec, transformer_spec

    m, t = config.model, config.model.transformer
    activation = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU}[t.activation]
    spec = transformer_spec.TransformerSpec.from_config(
        (m.encoder_layers, m.decoder_layers), t.heads, pre_norm=t.pre_norm, activation=activation,
        alignment_layer=-1, alignment_heads=0,  # 0: the mean of every head, as aligna's search
    )  # fmt: skip
    state = {name: p.detach().float().cpu().numpy() for name, p in model.state_dict().items()}
    rows = model.max_len or SINUSOID_ROWS
    if t.positions == "sinusoidal":
        table = sinusoids(torch.arange(rows), m.emb_dim).numpy()
        src_table = tgt_table = table
    else:
        src_table, tgt_table = state["src_positions.table.weight"], state["tgt_positions.table.weight"]

    enc, dec = spec.encoder, spec.decoder
    enc.scale_embeddings = dec.scale_embeddings = t.scale_embeddings
    enc.embeddings[0].weight = state["src_embedding.weight"]
    enc.position_encodings.encodings = src_table
    dec.embeddings.weight = state["tgt_embedding.weight"]
    dec.position_encodings.encodings = tgt_table
    if t.pre_norm:
        _norm(enc.layer_norm, state, "encoder_norm")
        _norm(dec.layer_norm, state, "decoder_norm")
    _linear(dec.projection, state, "output")
    for i, layer in enumerate(enc.layer):
        scope = f"encoder_layers.{i}"
        _attention(layer.self_attention, state, f"{scope}.self_attention", fused_qkv=True)
        _norm(layer.self_attention.layer_norm, state, f"{scope}.attention_block.norm")
        _feed_forward(layer.ffn, state, scope)
    for i, layer in enumerate(dec.layer):
        scope = f"decoder_layers.{i}"
        _attention(layer.self_attention, state, f"{scope}.self_attention", fused_qkv=True)
        _norm(layer.self_attention.layer_norm, state, f"{scope}.self_block.norm")
        _attention(layer.attention, state, f"{scope}.cross_attention", fused_qkv=False)
        _norm(layer.attention.layer_norm, state, f"{scope}.cross_block.norm")
        _feed_forward(layer.ffn, state, scope)

    spec.config.unk_token, spec.config.bos_token, spec.config.eos_token = UNK, SOS, EOS
    spec.config.decoder_start_token = SOS
    spec.config.layer_norm_epsilon = 1e-5  # torch.nn.LayerNorm's
    spec.register_source_vocabulary(ct2_tokens(pipeline.src_vocab.itos))
    spec.register_target_vocabulary(ct2_tokens(pipeline.tgt_vocab.itos))
    return spec


# The naming `ct2_tokens` gives; an export without it (written before it existed) named every
# token as aligna does, which is the same unless an ordinary token is spelled like a special.
TOKEN_NAMES = 1


def ct2_tokens(itos: Sequence[str]) -> list[str]:
    """The token strings of an exported vocabulary (id -> string): aligna's, except that an
    ordinary token spelled like a special (the text "<eos>" at an ordinary id, which aligna
    keeps an ordinary token) gets a name of its own, "<eos>#57": CTranslate2 looks tokens up
    by their strings, and would read it as the special. The CTranslate2 engine hands tokens
    over by these names (`ct2.CT2Translator`)."""
    names = list(itos)
    taken = set(names)
    for i in range(len(SPECIALS), len(names)):
        if names[i] in SPECIALS:
            name = f"{names[i]}#{i}"
            while name in taken:
                name += "#"
            names[i] = name
            taken.add(name)
    return names


def _linear(spec, state: dict, scope: str) -> None:
    spec.weight, spec.bias = state[f"{scope}.weight"], state[f"{scope}.bias"]


def _norm(spec, state: dict, scope: str) -> None:
    spec.gamma, spec.beta = state[f"{scope}.weight"], state[f"{scope}.bias"]


def _feed_forward(spec, state: dict, scope: str) -> None:
    _linear(spec.linear_0, state, f"{scope}.feed_forward.w1")
    _linear(spec.linear_1, state, f"{scope}.feed_forward.w2")
    _norm(spec.layer_norm, state, f"{scope}.ff_block.norm")


def _attention(spec, state: dict, scope: str, fused_qkv: bool) -> None:
    """Self-attention: linear[0] = [W^Q; W^K; W^V]; cross-attention: linear[0] = W^Q,
    linear[1] = [W^K; W^V]; the last one is W^O."""
    import numpy as np

    query, kv = f"{scope}.query_proj", f"{scope}.kv_proj"
    if fused_qkv:
        spec.linear[0].weight = np.concatenate([state[f"{query}.weight"], state[f"{kv}.weight"]])
        spec.linear[0].bias = np.concatenate([state[f"{query}.bias"], state[f"{kv}.bias"]])
    else:
        _linear(spec.linear[0], state, query)
        _linear(spec.linear[1], state, kv)
    _linear(spec.linear[-1], state, f"{scope}.out_proj")


__all__ = ["EXPORT_INFO", "ExportError", "ModelDirError", "export_ctranslate2", "export_info", "is_exported"]
