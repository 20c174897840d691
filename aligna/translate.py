"""The Python API for a trained model: raw text in, detokenized text out.

import aligna
translator = aligna.load("runs/multi30k_de_en_gru")
translator.translate(["ein hund läuft im schnee ."])  # text as the model was trained on: this one,
# Multi30k's lowercased, tokenized files (configs/*_raw.yaml train on raw text, with subwords)
ensemble = aligna.load_ensemble(["runs/a", "runs/b"])  # models trained on the same data, as one
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .build import build_model
from .compiled import compile_decoding
from .config import Config, ConfigError, DecodeConfig, load_config, replace_validated
from .data import DataError, Examples, ParallelText, Pipeline, encode_pairs, pad_batch
from .ensemble import Ensemble, ensemble_weights
from .loss import corpus_loss
from .metrics import MODEL_METRICS, Scores, check_reference_lists, perplexity, score
from .model import Seq2Seq
from .modeldir import CONFIG, ModelDir
from .runtime import autocast, check_precision, quantize_int8, resolve_device
from .search import search
from .shortlist import FILE as SHORTLIST
from .shortlist import Shortlist
from .tensorfiles import load_weights
from .vocab import SOS_ID, SPM_FILE, TOKENIZER_FILE, VOCAB_FILE

log = logging.getLogger("aligna")


@dataclass
class Translation:
    text: str  # detokenized output
    tokens: list[str]  # output tokens, <eos> not included
    src_tokens: list[str]  # the source tokens the model saw
    score: float  # sum of token log-probabilities under the model, never emitting <pad> or <sos> (`search.never_emit_`)
    attention: Tensor | None  # (rows, len(src_tokens)): a row per output token, and <eos> if emitted
    nbest: list[tuple[str, float]] = field(default_factory=list)  # (text, score) best first, beam search

    @property
    def attention_rows(self) -> list[str]:
        """Labels of the attention rows: the output tokens, then <eos> if it was emitted."""
        rows = 0 if self.attention is None else self.attention.size(0)
        return self.tokens + ["<eos>"] * (rows - len(self.tokens))


class TextTranslator:
    """Text in, text out, whatever engine decodes: tokenizing, cutting inputs to what the
    model takes, options, attention records and scores are shared; an engine supplies
    `_translate_tokens` (and `_corpus_loss` for loss / perplexity). Engines: `Translator`
    (aligna's own search over a PyTorch model) and `ct2.CT2Translator` (CTranslate2, for a
    model exported with `aligna export`)."""

    engine = "aligna"
    samples_each_input = True  # sampling: each input from its own generator (False: the batch from one stream)
    members: tuple[Config, ...] = ()  # an ensemble's members' configs; () for one model
    member_weights: tuple[float, ...] = ()  # an ensemble's weight of each member's probabilities, summing to 1

    def __init__(self, pipeline: Pipeline, config: Config, device: torch.device, precision: str) -> None:
        self.pipeline, self.config, self.device, self.precision = pipeline, config, device, precision

    @property
    def has_attention(self) -> bool:
        """Whether the model (an ensemble: any member) attends to the source: False only for an
        RNN encoder-decoder without attention, whose one context vector is all the decoder sees."""
        return any(c.model.arch != "rnn" or c.model.rnn.attention != "none" for c in self.members or [self.config])

    @property
    def max_len(self) -> int | None:
        """The longest input (and output) the model takes, in tokens (None: no limit)."""
        raise NotImplementedError

    @property
    def parameters(self) -> int:
        raise NotImplementedError

    def _translate_tokens(
        self, src_tokens: list[list[str]], decode: DecodeConfig, attention: bool = True,
        sample_ids: Sequence[int] | None = None,
    ) -> list[Translation | None]:  # fmt: skip
        """Translations of tokenized inputs (None for an input with no tokens), with their
        attention where asked for and the model has it; sampling, input i from the generator of
        (decode.seed, sample_ids[i]) where the engine `samples_each_input` (None: i)."""
        raise NotImplementedError

    def _corpus_loss(self, pairs: ParallelText) -> tuple[float, int]:
        """Mean per-token cross-entropy of the pairs' targets and the number of target tokens."""
        raise NotImplementedError

    def translate(self, texts: Sequence[str], batch_size: int | None = None, **search: object) -> list[str]:
        """Translations of `texts`; `search` overrides decode settings (beam_size=5, ...)."""
        return [t.text for t in self.translate_detailed(texts, batch_size, attention=False, **search)]

    def translate_detailed(
        self, texts: Sequence[str], batch_size: int | None = None, attention: bool = True, *,
        sample_ids: Sequence[int] | None = None, **search_options: object,
    ) -> list[Translation]:  # fmt: skip
        """Translations in input order with tokens, scores and attention; inputs are
        batched by length. `search_options` override the config's decode section.
        attention False: no `Translation.attention` (None), which the search then need not
        compute: the same translations, faster. Sampling (sample=True, seed), engine aligna:
        input i draws from a generator seeded by (seed, sample_ids[i]) alone (sample_ids None:
        (seed, i)), so its sample does not depend on batch_size or on the other inputs' text
        (`sentence_generator`; a server that merges requests gives each input its place in its
        own request); CTranslate2 samples from one stream per process, seeded when the model loads."""
        if isinstance(texts, str):  # each character would be a sentence
            raise TypeError("texts: a list of strings, one per sentence; got one str (use [text])")
        texts = list(texts)  # a generator is read once
        _check_strings(texts, "texts")
        if sample_ids is not None:
            sample_ids = list(sample_ids)
            if len(sample_ids) != len(texts) or not all(isinstance(i, int) and i >= 0 for i in sample_ids):
                raise ValueError(f"sample_ids: one integer >= 0 for each of the {len(texts)} texts")
        if batch_size is not None:
            search_options["batch_size"] = batch_size
        decode = self.decode_config(**search_options)
        src_tokens = [self.pipeline.src_tokens(t) for t in texts]
        limit = self.max_len  # a table of positions ends somewhere
        if limit is not None and any(len(toks) > limit for toks in src_tokens):
            cut = [i + 1 for i, toks in enumerate(src_tokens) if len(toks) > limit]
            log.warning(
                "%d input(s) longer than the %d tokens this model takes (model.transformer.max_positions) "
                "are translated from their first %d tokens: line(s) %s",
                len(cut), limit, limit, ", ".join(map(str, cut[:10])) + (" ..." if len(cut) > 10 else ""),
            )  # fmt: skip
            src_tokens = [toks[:limit] for toks in src_tokens]
        results = self._translate_tokens(src_tokens, decode, attention, sample_ids)
        for r in results:
            if r is not None and not attention:
                r.attention = None  # the search kept it for the coverage penalty alone
        # an input with no tokens: an empty translation, one object each (a caller may edit it)
        return [r if r is not None else Translation("", [], [], 0.0, None, [("", 0.0)] * decode.nbest) for r in results]

    def decode_config(self, **options: object) -> DecodeConfig:
        """The config's decode section with `options` applied and validated, for this engine
        (a ConfigError names the field it cannot do)."""
        decode = replace_validated(self.config.decode, "decode", **options) if options else self.config.decode
        base = self.config.decode  # a setting passed at its config value (a resolved section) changes nothing
        changed = {k: v for k, v in options.items() if getattr(base, k, None) != v}
        unused = _unused_options(decode, changed, self.has_attention)
        if unused:
            raise ConfigError(unused)
        if decode.shortlist:
            self.check_shortlist()
        return decode

    def check_shortlist(self) -> None:
        """Raise a ConfigError if this engine cannot decode over a vocabulary shortlist."""
        raise ConfigError(f"decode.shortlist: the {self.engine} engine has no vocabulary shortlist")

    def attention_maps(self, translation: Translation) -> dict[str, Tensor]:
        """Every attention map of the model for one translation, each (layers, heads, rows,
        cols), rows following `translation.attention_rows`; {} where the engine gives none
        but the map search used."""
        return {}

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
        hypotheses: Sequence[str] | None = None, origin: str = "evaluation pairs", **search_options: object,
    ) -> Scores:  # fmt: skip
        """Metrics of the translations that the config's decode section (with `search_options`
        applied) gives, or of `hypotheses`, against per-sentence reference lists.

        loss / ppl are computed on every (source, reference) pair; pairs with an empty side
        are left out of them, which a warning (once per process) counts; `origin` (the
        file(s)) is named in it. Both the output and the loss come from the model
        at the translator's precision (the int8 copy at int8; under autocast at bf16 and fp16).
        """
        sources = list(sources)
        _check_strings(sources, "sources")
        references = [refs if isinstance(refs, str) else list(refs) for refs in references]
        if len(references) != len(sources) or (hypotheses is not None and len(hypotheses) != len(sources)):
            given = f", {len(hypotheses)} hypotheses" if hypotheses is not None else ""
            raise ValueError(f"{len(sources)} sources, {len(references)} reference lists{given}: give one each")
        if not sources:
            raise ValueError("no sources: there is nothing to score")
        check_reference_lists(references)  # before anything is translated
        for i, refs in enumerate(references):
            _check_strings(refs, f"references[{i}]")
        decoded = [m for m in metrics if m not in MODEL_METRICS]
        scores = Scores()
        if decoded:
            hypotheses = self.translate(sources, **search_options) if hypotheses is None else hypotheses
            scores = score(hypotheses, references, decoded)
        if "loss" in metrics or "ppl" in metrics:
            pairs = ParallelText(
                [s for s, refs in zip(sources, references) for _ in refs],
                [r for refs in references for r in refs],
                origin,
            )
            loss, _ = self._corpus_loss(pairs)
            scores.values.update({"loss": loss, "ppl": perplexity(loss)})
        return scores


class Translator(TextTranslator):
    """aligna's own engine: a PyTorch model searched by `search.search`.

    Safe to call from several threads at once: options are passed per call, nothing is
    stored between calls, search runs under `torch.inference_mode()`, and the model is never
    switched between train and eval mode here (it is put in eval mode once, at construction;
    a trainer that shares it switches it back before validating, see `_eval_model`)."""

    def __init__(
        self,
        model: Seq2Seq,
        pipeline: Pipeline,
        config: Config,
        device: torch.device,
        precision: str = "fp32",
        shortlist: Path | None = None,
        members: Sequence[Config] = (),
    ) -> None:
        super().__init__(pipeline, config, device, precision)  # precision: fp32, bf16 / fp16, int8
        self.model = model
        self.members = tuple(members)  # an ensemble's: each member's config, in member order
        self.shortlist_file = shortlist  # for decode.shortlist, read on first use
        self._shortlist: Shortlist | None = None
        self._int8: Seq2Seq | None = None  # the int8 copy of `model`, made on first use
        self.compiled = True  # the int8 copy's decoding step compiled (`aligna.compiled`); False before its first use: eager
        self._made = threading.Lock()  # guards the int8 copy and the shortlist, made on first use
        model.eval()

    @property
    def max_len(self) -> int | None:
        return self.model.max_len

    @property
    def member_weights(self) -> tuple[float, ...]:  # type: ignore[override]
        return self.model.weights if isinstance(self.model, Ensemble) else ()

    @property
    def parameters(self) -> int:
        from .build import count_parameters

        return count_parameters(self.model)

    def search_model(self) -> Seq2Seq:
        """The model that searches: `model`, or at precision int8 its int8 copy, whose decoding
        step is compiled (`aligna.compiled`)."""
        check_precision(self.device, self.precision)
        if self.precision != "int8":
            return self.model
        with self._made:  # several threads may ask at once; one copy is made
            if self._int8 is None:
                self._int8 = quantize_int8(self.model)
                self._int8 = compile_decoding(self._int8) if self.compiled else self._int8
        return self._int8

    def shortlist(self) -> Shortlist:
        """The model directory's vocabulary shortlist (decode.shortlist), read once."""
        models = list(self.model.members) if isinstance(self.model, Ensemble) else [self.model]
        for i, model in enumerate(models):
            if type(model).restrict_output is Seq2Seq.restrict_output:
                which = f"member {i + 1} of the ensemble, a" if len(models) > 1 else "the"
                raise ConfigError(f"decode.shortlist: {which} {type(model).__name__} model has no vocabulary "
                                  "shortlist (a Transformer has)")  # fmt: skip
        with self._made:
            if self._shortlist is None:
                if self.shortlist_file is None or not self.shortlist_file.is_file():
                    raise ConfigError(
                        f"decode.shortlist: {self.shortlist_file or 'the model'} is missing: make it with "
                        "`aligna shortlist MODEL_DIR`"
                    )
                try:
                    self._shortlist = Shortlist.read(
                        self.shortlist_file, self.pipeline.src_vocab, self.pipeline.tgt_vocab
                    )
                except DataError as e:
                    raise ConfigError(f"decode.shortlist: {e}") from None
        return self._shortlist

    def check_shortlist(self) -> None:
        self.shortlist()

    def _eval_model(self, search: bool = True) -> Seq2Seq:
        """The model to run (its int8 copy for `search` at precision int8), which must be in eval mode."""
        if self.model.training:
            raise RuntimeError("the model is in training mode: call model.eval() before translating with it")
        return self.search_model() if search else self.model

    @torch.inference_mode()
    def _translate_tokens(
        self, src_tokens: list[list[str]], decode: DecodeConfig, attention: bool = True,
        sample_ids: Sequence[int] | None = None,
    ) -> list[Translation | None]:  # fmt: skip
        ids = [self.pipeline.src_vocab.encode(toks) for toks in src_tokens]
        sample_ids = range(len(ids)) if sample_ids is None else sample_ids
        results: list[Translation | None] = [None] * len(src_tokens)
        order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: -len(ids[i]))
        shortlist = self.shortlist() if decode.shortlist else None
        model = self._eval_model()
        for start in range(0, len(order), decode.batch_size):
            chunk = order[start : start + decode.batch_size]
            src = pad_batch([torch.tensor(ids[i]) for i in chunk]).to(self.device)  # (B, S)
            lengths = torch.tensor([len(ids[i]) for i in chunk], device=self.device)
            vocabulary = None if shortlist is None else shortlist.candidates(src)
            generators = None
            if decode.sample:  # input i draws from its own generator: its sample is the seed's and its id's alone
                generators = [sentence_generator(decode.seed, sample_ids[i], self.device) for i in chunk]
            with autocast(self.device, self.precision):
                found = search(model, src, lengths, decode, generators, vocabulary, attention)
            for hyps, i in zip(found.nbest, chunk):
                best = hyps[0]
                results[i] = Translation(
                    text=self.pipeline.detokenize(best.tokens),
                    # every emitted id, <unk> included, so that the attention rows keep their labels
                    tokens=self.pipeline.tgt_vocab.itos_of(best.tokens),
                    src_tokens=src_tokens[i],
                    score=best.log_prob,
                    attention=best.attention,
                    nbest=[(self.pipeline.detokenize(h.tokens), h.score) for h in hyps],
                )
        return results

    @torch.inference_mode()
    def attention_maps(self, translation: Translation) -> dict[str, Tensor]:
        """Every attention map of the model for one translation, each (layers, heads, rows,
        cols); see `Seq2Seq.attention_maps`. Rows follow `translation.attention_rows`. They come
        from a teacher-forced pass of the full-precision model: at int8 they can differ a little
        (about 1e-3) from the map the int8 search used (`translation.attention`)."""
        if not translation.src_tokens:
            return {}
        vocab = self.pipeline
        src = torch.tensor([vocab.src_vocab.encode(translation.src_tokens)], device=self.device)
        rows = len(translation.attention_rows) or len(translation.tokens) + 1
        tgt_in = torch.tensor([[SOS_ID, *vocab.tgt_vocab.encode(translation.tokens)]], device=self.device)[
            :, :rows
        ]
        maps = self._eval_model(search=False).attention_maps(src, torch.tensor([src.size(1)], device=self.device), tgt_in)
        return {name: m[0].float().cpu() for name, m in maps.items()}

    @torch.inference_mode()
    def _corpus_loss(self, pairs: ParallelText) -> tuple[float, int]:
        examples = loss_examples(self.pipeline, pairs, self.model.max_len)
        with autocast(self.device, self.precision):  # the loss of the model that translates, bf16 and fp16 too
            return corpus_loss(self._eval_model(), examples, self.config.train.batch_tokens, self.device)


def sentence_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The random generator that samples input `index` of a call with decode.seed `seed`: one
    per sentence, so that its sample does not depend on batch_size or on the other inputs."""
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (1 << 64)  # distinct per (seed, index)
    return torch.Generator(device).manual_seed(mixed)


def one_line(text: str) -> str:
    """An output as one line, whatever a tokenizer gives back: a line break in a translation
    would shift every later line of a file (translate) or break a line-based client (serve)."""
    return text.replace("\r", " ").replace("\n", " ")


def _check_strings(values: Sequence[object], name: str) -> None:
    """A TypeError naming the first item of `values` that is not a str."""
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{i}]: expected str, got {type(value).__name__}")


_WARNED: set[str] = set()  # warnings this process has given: a dev set's at every validation is said once


def loss_examples(pipeline: Pipeline, pairs: ParallelText, max_len: int | None) -> Examples:
    """The pairs that loss and perplexity are computed over, whichever engine scores them:
    references cut to the model's `max_len` positions (<sos> + the reference), pairs with an
    empty side left out, and a warning that says how many where any are."""
    limit = max_len - 1 if max_len else 1_000_000
    examples = encode_pairs(pipeline, pairs, limit, "truncate", "evaluation")
    if examples.report.empty or examples.report.truncated or examples.report.too_long:
        _warn_once(f"{pairs.origin}: {examples.report} (for loss and perplexity)")
    return examples


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


SAMPLING_ONLY = ("temperature", "top_k", "top_p", "seed")  # decode settings that only sampling reads


def _unused_options(decode: DecodeConfig, options: dict[str, object], has_attention: bool) -> str:
    """Why a decode setting given in `options` would change nothing in the search `decode`
    makes ('' if each one counts): such a setting is an error, not silently dropped."""
    if not decode.sample:
        given = [k for k in SAMPLING_ONLY if k in options]
        if given:
            return f"decode.{given[0]}: applies to sampling only (decode.sample true, --sample)"
    beam = decode.beam_size > 1 and not decode.sample
    if options.get("alpha") and not beam:
        return "decode.alpha: the length penalty ranks beam search's hypotheses; give beam_size > 1 (--beam)"
    if options.get("coverage") and not beam:
        return "decode.coverage: the coverage penalty applies to beam search; give beam_size > 1 (--beam)"
    if options.get("coverage") and not has_attention:
        return "decode.coverage: the coverage penalty reads the attention, and this model has none (model.rnn.attention: none)"
    return ""


def _rounded(value: Any) -> Any:
    return [_rounded(v) for v in value] if isinstance(value, list) else round(float(value), 5)


ENGINES = ("auto", "aligna", "ctranslate2")


def load(
    model_dir: str | Path, checkpoint: str = "best", device: str = "auto", precision: str | None = None,
    engine: str = "auto",
) -> TextTranslator:  # fmt: skip
    """Load a trained model directory, or one written by `aligna export`. `checkpoint`: best,
    latest, averaged, or a path. `precision`: fp32, bf16, fp16, int8; None: fp32, or for an
    export the type its weights were stored in. `engine`: aligna (PyTorch), ctranslate2 (an
    exported directory, or a model directory exported on the fly), auto (ctranslate2 for an
    exported directory, aligna otherwise)."""
    from .export import is_exported

    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    dev = resolve_device(device)
    if is_exported(model_dir):
        if engine == "aligna":
            raise ValueError(f"{model_dir} is a CTranslate2 export: load it with engine ctranslate2 (or auto)")
        if checkpoint != "best":
            raise ValueError(f"{model_dir} is a CTranslate2 export of one checkpoint: --checkpoint does not apply")
        from .ct2 import load_exported

        return load_exported(model_dir, dev, precision)
    md = ModelDir(model_dir)
    md.require()
    if engine == "ctranslate2":
        from .ct2 import load_converted

        return load_converted(model_dir, checkpoint, dev, precision)
    precision = precision or "fp32"
    check_precision(dev, precision)
    config = load_config(md / CONFIG)
    pipeline = Pipeline.load(md.path)
    model = build_model(config.model, len(pipeline.src_vocab), len(pipeline.tgt_vocab))
    load_weights(model, md.weights(checkpoint))
    model.to(dev).eval()
    return Translator(model, pipeline, config, dev, precision, md / SHORTLIST)


def load_ensemble(
    model_dirs: Sequence[str | Path], checkpoint: str | Sequence[str] = "best", device: str = "auto",
    precision: str | None = None, weights: Sequence[float] | None = None,
) -> Translator:  # fmt: skip
    """Several model directories as one model (`ensemble.Ensemble`: the mean of their next-token
    probabilities, or with `weights`, one per directory, their weighted mean), on aligna's engine.
    They must share their tokenizers and vocabularies (trained on the same data with the same
    data section; a ValueError names the file that differs); the decode and eval settings are the
    first directory's. `checkpoint`: one for every directory, or a list of one per directory;
    `precision` as `load`'s."""
    if isinstance(model_dirs, (str, Path)):  # each character would be a directory
        raise TypeError(f"model_dirs: a list of model directories; got one ({model_dirs}): use load() or [dir]")
    dirs = [Path(d) for d in model_dirs]
    if len(dirs) < 2:
        raise ValueError(f"model_dirs: an ensemble needs at least 2 model directories, got {len(dirs)}")
    checkpoints = [checkpoint] * len(dirs) if isinstance(checkpoint, str) else list(checkpoint)
    if len(checkpoints) != len(dirs):
        raise ValueError(f"{len(checkpoints)} checkpoints given for an ensemble of {len(dirs)} models")
    if weights is not None:
        ensemble_weights(weights, len(dirs))  # before loading anything
    members = []
    for model_dir, checkpoint_name in zip(dirs, checkpoints):
        member = load(model_dir, checkpoint_name, device, "fp32", engine="aligna")  # quantized as one model, below
        assert isinstance(member, Translator)
        if members:
            _check_same_pipeline(dirs[0], model_dir)
        members.append(member)
    first = members[0]
    precision = precision or "fp32"
    check_precision(first.device, precision)
    model = Ensemble([m.model for m in members], weights).eval()
    return Translator(model, first.pipeline, first.config, first.device, precision, ModelDir(dirs[0]) / SHORTLIST,
                      [m.config for m in members])  # fmt: skip


def _check_same_pipeline(first: Path, other: Path) -> None:
    """Raise a ValueError naming the first tokenizer or vocabulary file of `other` that is not
    the same as `first`'s."""
    for side in ("src", "tgt"):
        for name in (TOKENIZER_FILE, SPM_FILE, VOCAB_FILE):
            mine, theirs = first / name.format(side=side), other / name.format(side=side)
            if (mine.read_bytes() if mine.is_file() else None) != (theirs.read_bytes() if theirs.is_file() else None):
                raise ValueError(
                    f"{theirs} differs from {mine}: the models of an ensemble must share their tokenizers and "
                    "vocabularies (train them on the same data, with the same data section)"
                )


def average(model_dir: str | Path, last: int | None = None) -> tuple[Path, list[str]]:
    """Average the weights of the `last` newest step checkpoints (None: every one the run
    keeps) into averaged.safetensors: its path, and the checkpoints averaged."""
    translator = load(model_dir, checkpoint="latest", device="cpu", engine="aligna")
    assert isinstance(translator, Translator)
    return ModelDir(model_dir).average(translator.model, last)
