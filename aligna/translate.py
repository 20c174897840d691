"""The Python API for a trained model: raw text in, detokenized text out.

import aligna
translator = aligna.load("runs/multi30k_de_en_gru")
translator.translate(["Ein Hund läuft im Schnee."])
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .build import build_model
from .config import Config, DecodeConfig, load_config, replace_validated
from .data import ParallelText, Pipeline, encode_pairs, pad_batch
from .loss import corpus_loss
from .metrics import Scores, perplexity, score
from .model import Seq2Seq
from .modeldir import CONFIG, ModelDir
from .search import search
from .tensorfiles import load_weights
from .vocab import SOS_ID

log = logging.getLogger("aligna")


@dataclass
class Translation:
    text: str  # detokenized output
    tokens: list[str]  # output tokens, <eos> not included
    src_tokens: list[str]  # the source tokens the model saw
    score: float  # sum of token log-probabilities under the model
    attention: Tensor | None  # (rows, len(src_tokens)): a row per output token, and <eos> if emitted
    nbest: list[tuple[str, float]] = field(default_factory=list)  # (text, score) best first, beam search

    @property
    def attention_rows(self) -> list[str]:
        """Labels of the attention rows: the output tokens, then <eos> if it was emitted."""
        rows = 0 if self.attention is None else self.attention.size(0)
        return self.tokens + ["<eos>"] * (rows - len(self.tokens))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name[:40]!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # decoding: exact, autocast, autocast, int8 weights


def check_precision(device: torch.device, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (on a CPU use bf16 or int8)")
    if precision == "int8" and device.type != "cpu":
        raise ValueError("precision int8 decodes on a CPU (on a GPU use bf16 or fp16)")


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision (bf16 / fp16) on `device`; fp32 and int8 turn it off."""
    check_precision(device, precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=precision in ("bf16", "fp16"))


def quantize_int8(model: Seq2Seq) -> Seq2Seq:
    """A copy of `model` for CPU decoding with int8 weights: every nn.Linear, nn.LSTM and
    nn.GRU is replaced by PyTorch's dynamically quantized version (weights int8 per tensor,
    activations quantized on the fly per batch), as CTranslate2 does for CPU inference.
    Embeddings, layer norms and the search itself stay fp32. A decode step reads a quarter of
    the fp32 weight bytes, which is what bounds small-batch decoding on a CPU. Activations get
    one scale per batch, so unlike fp32 a sentence's output can differ slightly with the
    sentences it is batched with."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as e:  # torch.ao.quantization is deprecated and may leave a future torch
        raise RuntimeError(
            f"precision int8 needs torch.ao.quantization, which torch {torch.__version__} lacks"
        ) from e
    with warnings.catch_warnings():  # its deprecation notices, once per module, say nothing to a user
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        return quantize_dynamic(model, {nn.Linear, nn.LSTM, nn.GRU}, dtype=torch.qint8).eval()


class Translator:
    """A model with its tokenizers and vocabularies, ready to translate and evaluate."""

    def __init__(
        self,
        model: Seq2Seq,
        pipeline: Pipeline,
        config: Config,
        device: torch.device,
        precision: str = "fp32",
    ) -> None:
        self.model, self.pipeline, self.config, self.device = model, pipeline, config, device
        self.precision = precision  # fp32, bf16 / fp16 autocast, or int8 weights for decoding
        self._int8: Seq2Seq | None = None  # the int8 copy of `model`, made on first use

    def search_model(self) -> Seq2Seq:
        """The model that searches: `model`, or its int8 copy when precision is int8."""
        check_precision(self.device, self.precision)
        if self.precision != "int8":
            return self.model
        if self._int8 is None:
            self._int8 = quantize_int8(self.model)
        return self._int8

    def translate(self, texts: Sequence[str], batch_size: int | None = None, **search: object) -> list[str]:
        """Translations of `texts`; `search` overrides decode settings (beam_size=5, ...)."""
        return [t.text for t in self.translate_detailed(texts, batch_size, **search)]

    @torch.no_grad()
    def translate_detailed(
        self, texts: Sequence[str], batch_size: int | None = None, **search_options: object
    ) -> list[Translation]:
        """Translations in input order with tokens, scores and attention; inputs are
        batched by length. `search_options` override the config's decode section."""
        if batch_size is not None:
            search_options["batch_size"] = batch_size
        decode = self.decode_config(**search_options)
        batch_size = decode.batch_size
        src_tokens = [self.pipeline.src_tokens(t) for t in texts]
        limit = self.model.max_len  # a table of learned positions ends somewhere
        if limit is not None and any(len(toks) > limit for toks in src_tokens):
            cut = [i + 1 for i, toks in enumerate(src_tokens) if len(toks) > limit]
            log.warning(
                "%d input(s) longer than the %d tokens this model takes (model.transformer.max_positions) "
                "are translated from their first %d tokens: line(s) %s",
                len(cut), limit, limit, ", ".join(map(str, cut[:10])) + (" ..." if len(cut) > 10 else ""),
            )  # fmt: skip
            src_tokens = [toks[:limit] for toks in src_tokens]
        ids = [self.pipeline.src_vocab.encode(toks) for toks in src_tokens]
        results: list[Translation | None] = [None] * len(texts)
        order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: -len(ids[i]))
        generator = torch.Generator(self.device).manual_seed(decode.seed) if decode.sample else None
        was_training = self.model.training
        self.model.eval()
        model = self.search_model()
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src = pad_batch([torch.tensor(ids[i]) for i in chunk]).to(self.device)  # (B, S)
            lengths = torch.tensor([len(ids[i]) for i in chunk], device=self.device)
            with autocast(self.device, self.precision):
                found = search(model, src, lengths, decode, generator)
            for hyps, i in zip(found.nbest, chunk):
                best = hyps[0]
                results[i] = Translation(
                    text=self.pipeline.detokenize(best.tokens),
                    tokens=self.pipeline.tgt_vocab.decode(best.tokens),
                    src_tokens=src_tokens[i],
                    score=best.log_prob,
                    attention=best.attention,
                    nbest=[(self.pipeline.detokenize(h.tokens), h.score) for h in hyps],
                )
        self.model.train(was_training)
        empty = Translation("", [], [], 0.0, None, [("", 0.0)] * decode.nbest)  # an input with no tokens
        return [r if r is not None else empty for r in results]

    def decode_config(self, **options: object) -> DecodeConfig:
        """The config's decode section with `options` applied and validated."""
        return replace_validated(self.config.decode, "decode", **options) if options else self.config.decode

    @torch.no_grad()
    def attention_maps(self, translation: Translation) -> dict[str, Tensor]:
        """Every attention map of the model for one translation, each (layers, heads, rows,
        cols); see `Seq2Seq.attention_maps`. Rows follow `translation.attention_rows`."""
        if not translation.src_tokens:
            return {}
        vocab = self.pipeline
        src = torch.tensor([vocab.src_vocab.encode(translation.src_tokens)], device=self.device)
        rows = len(translation.attention_rows) or len(translation.tokens) + 1
        tgt_in = torch.tensor([[SOS_ID, *vocab.tgt_vocab.encode(translation.tokens)]], device=self.device)[
            :, :rows
        ]
        self.model.eval()
        maps = self.model.attention_maps(src, torch.tensor([src.size(1)], device=self.device), tgt_in)
        return {name: m[0].float().cpu() for name, m in maps.items()}

    def attention_record(self, translation: Translation, every_map: bool = False) -> dict[str, Any]:
        """The attention of one translation as plain JSON-able data::

            {"src_tokens": [...], "tgt_tokens": [... output tokens, "<eos>"],
             "weights": [[...]] (a row per target token, a column per source token: the map
                        search used, the last layer's cross-attention averaged over heads;
                        None for a model without attention),
             "maps": {kind: {"rows": [...], "cols": [...], "weights": [layer][head][row][col]}}}

        "maps" (only with `every_map`) holds every map the model has: "cross" and, for a
        Transformer, "encoder" and "decoder" self-attention. Weights are rounded to 5 digits."""
        weights = None if translation.attention is None else _rounded(translation.attention.tolist())
        record: dict[str, Any] = {
            "src_tokens": list(translation.src_tokens),
            "tgt_tokens": translation.attention_rows if weights is not None else list(translation.tokens),
            "weights": weights,
        }
        if every_map:
            inputs = ["<sos>", *translation.tokens][: len(translation.attention_rows)]
            labels = {"cross": (translation.attention_rows, translation.src_tokens),
                      "encoder": (translation.src_tokens, translation.src_tokens),
                      "decoder": (translation.attention_rows, inputs)}  # fmt: skip
            record["maps"] = {
                kind: {"rows": list(labels[kind][0]), "cols": list(labels[kind][1]), "weights": _rounded(m.tolist())}
                for kind, m in self.attention_maps(translation).items()
            }
        return record

    def evaluate(
        self, sources: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str],
        hypotheses: Sequence[str] | None = None, **search_options: object,
    ) -> Scores:  # fmt: skip
        """Metrics of greedy output (or of `hypotheses`) against per-sentence reference lists.

        loss / ppl are computed on every (source, reference) pair; empty pairs are left
        out of them and counted in the log. With precision int8, both the output and the
        loss come from the int8 model.
        """
        decoded = [m for m in metrics if m not in ("loss", "ppl")]
        scores = Scores()
        if decoded:
            hypotheses = self.translate(sources, **search_options) if hypotheses is None else hypotheses
            scores = score(hypotheses, references, decoded)
        if "loss" in metrics or "ppl" in metrics:
            pairs = ParallelText(
                [s for s, refs in zip(sources, references) for _ in refs],
                [r for refs in references for r in refs],
                "evaluation pairs",
            )
            limit = self.model.max_len  # tgt_in is <sos> + the reference
            examples = encode_pairs(
                self.pipeline, pairs, limit - 1 if limit else 1_000_000, "truncate" if limit else "filter", "evaluation"
            )
            if examples.report.empty:
                log.info("%s (left out of loss and perplexity)", examples.report)
            loss, _ = corpus_loss(self.search_model(), examples, self.config.train.batch_tokens, self.device)
            scores.values.update({"loss": loss, "ppl": perplexity(loss)})
        return scores


def _rounded(value: Any) -> Any:
    return [_rounded(v) for v in value] if isinstance(value, list) else round(float(value), 5)


def load(
    model_dir: str | Path, checkpoint: str = "best", device: str = "auto", precision: str = "fp32"
) -> Translator:
    """Load a trained model directory. `checkpoint`: best, latest, averaged, or a path."""
    md = ModelDir(model_dir)
    md.require()
    dev = resolve_device(device)
    check_precision(dev, precision)
    config = load_config(md / CONFIG)
    pipeline = Pipeline.load(md.path)
    model = build_model(config.model, len(pipeline.src_vocab), len(pipeline.tgt_vocab))
    load_weights(model, md.weights(checkpoint))
    model.to(dev).eval()
    return Translator(model, pipeline, config, dev, precision)


def average(model_dir: str | Path, last: int) -> Path:
    """Average the weights of the `last` newest step checkpoints into averaged.safetensors."""
    if last < 1:
        raise ValueError(f"--last: {last} is out of range; allowed: integers >= 1")
    translator = load(model_dir, checkpoint="latest", device="cpu")
    return ModelDir(model_dir).average(translator.model, last)
