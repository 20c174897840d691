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

import torch
from torch import Tensor, nn

from .build import build_model
from .checkpoint import AVERAGED, BEST, average_checkpoints, latest_checkpoint, list_checkpoints, load_weights
from .config import Config, DecodeConfig, load_config, replace_validated
from .data import ParallelText, Pipeline, encode_pairs, pad_batch
from .loss import corpus_loss
from .metrics import Scores, perplexity, score
from .model import Seq2Seq
from .search import search
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
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
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
        decode = self.decode_config(**search_options)
        batch_size = batch_size or decode.batch_size
        src_tokens = [self.pipeline.src_tokens(t) for t in texts]
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
        empty = Translation("", [], [], 0.0, None, [("", 0.0)])  # an input with no tokens
        return [r if r is not None else empty for r in results]

    def decode_config(self, **options: object) -> DecodeConfig:
        """The config's decode section with `options` applied and validated."""
        return replace_validated(self.config.decode, "decode", **options) if options else self.config.decode

    @torch.no_grad()
    def attention_maps(self, translation: Translation) -> dict[str, Tensor]:
        """Every attention map of the model for one translation, each (layers, heads, rows,
        cols); see `Seq2Seq.attention_maps`. Rows follow `translation.attention_rows`."""
        vocab = self.pipeline
        src = torch.tensor([vocab.src_vocab.encode(translation.src_tokens)], device=self.device)
        rows = len(translation.attention_rows) or len(translation.tokens) + 1
        tgt_in = torch.tensor([[SOS_ID, *vocab.tgt_vocab.encode(translation.tokens)]], device=self.device)[
            :, :rows
        ]
        self.model.eval()
        maps = self.model.attention_maps(src, torch.tensor([src.size(1)], device=self.device), tgt_in)
        return {name: m[0].float().cpu() for name, m in maps.items()}

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
            examples = encode_pairs(self.pipeline, pairs, 1_000_000, "filter", "evaluation")
            if examples.report.empty:
                log.info("%s (left out of loss and perplexity)", examples.report)
            loss, _ = corpus_loss(self.search_model(), examples, self.config.train.batch_tokens, self.device)
            scores.values.update({"loss": loss, "ppl": perplexity(loss)})
        return scores


def load(
    model_dir: str | Path, checkpoint: str = "best", device: str = "auto", precision: str = "fp32"
) -> Translator:
    """Load a trained model directory. `checkpoint`: best, latest, averaged, or a path."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not an aligna model directory (no config.yaml)")
    config = load_config(config_path)
    pipeline = Pipeline.load(model_dir)
    model = build_model(config.model, len(pipeline.src_vocab), len(pipeline.tgt_vocab))
    load_weights(model, _weights_path(model_dir, checkpoint))
    dev = resolve_device(device)
    check_precision(dev, precision)
    model.to(dev).eval()
    return Translator(model, pipeline, config, dev, precision)


def average(model_dir: str | Path, last: int) -> Path:
    """Average the weights of the `last` newest step checkpoints into averaged.safetensors."""
    model_dir = Path(model_dir)
    translator = load(model_dir, checkpoint="latest", device="cpu")
    paths = list_checkpoints(model_dir)[-last:]
    if len(paths) < last:
        raise ValueError(
            f"{model_dir} keeps {len(paths)} checkpoints, fewer than --last {last} "
            "(train.keep_checkpoints sets how many are kept)"
        )
    average_checkpoints(translator.model, paths, model_dir / AVERAGED)
    log.info("averaged %s into %s", ", ".join(p.name for p in paths), model_dir / AVERAGED)
    return model_dir / AVERAGED


def _weights_path(model_dir: Path, checkpoint: str) -> Path:
    if checkpoint == "averaged":
        if not (model_dir / AVERAGED).is_file():
            raise FileNotFoundError(f"{model_dir} has no {AVERAGED}: run `aligna average {model_dir}` first")
        return model_dir / AVERAGED
    if checkpoint == "best" and (model_dir / BEST).is_file():
        return model_dir / BEST
    if checkpoint in ("best", "latest"):  # no validation has run yet: the latest weights
        latest = latest_checkpoint(model_dir)
        if latest is None:
            raise FileNotFoundError(f"{model_dir} holds no trained weights yet")
        return latest / "model.safetensors"
    path = Path(checkpoint)
    return path / "model.safetensors" if path.is_dir() else path
