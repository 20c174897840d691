"""Translating with CTranslate2: a model exported by `aligna export` behind aligna's text ends.

    translator = aligna.load("runs/de_en-ct2")              # an exported directory
    translator = aligna.load("runs/de_en", engine="ctranslate2")  # exported on the fly

aligna tokenizes, cuts inputs to what the model takes and detokenizes (`TextTranslator`);
CTranslate2 searches. aligna's decode options map onto CTranslate2's so that both engines
search the same way:

- batches: inputs sorted by length and cut into `batch_size` sentences, as aligna does, each
  one `translate_batch` call;
- length limit: aligna's is per sentence (a * |x| + b, `<eos>` included), CTranslate2's per
  call; a call gets its batch's longest limit, and the few sentences whose search reached
  their own limit are decoded again with it, so every limit is exact;
- beam search: CTranslate2 returns all `beam_size` finished hypotheses (only the best where
  that is all aligna needs and the call's limit is every sentence's own), ranked by raw
  log-probability (length_penalty 0), and aligna ranks them by GNMT's length penalty
  ((5 + |y|) / 6)^alpha, which CTranslate2 lacks (its own is |y|^alpha). The best hypothesis
  is aligna's; below it, an n-best list with alpha > 0 can differ where hypotheses end at the
  length limit: aligna ranks all of those, CTranslate2 returns at most `beam_size`;
- min_len and sampling (temperature, top_k, top_p) map one to one (with min_len, CTranslate2's
  scores come from the distribution renormalized without `<eos>`, aligna's from the model's);
  CTranslate2 seeds its
  sampler once, so the seed is the config's, set when the model loads, and sampled calls
  from a fresh load repeat as a sequence;
- the coverage penalty (CTranslate2's is not GNMT's) and n-gram blocking (CTranslate2's
  gives other outputs than aligna's) are errors, not silently dropped;
- attention maps are asked of CTranslate2 (`return_attention`) only where the caller reads
  them (`translate_detailed(attention=True)`: `aligna translate --attention`, the server's
  attention modes), as aligna's own search computes them only then.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, DecodeConfig, load_config
from .data import ParallelText, Pipeline
from .export import TOKEN_NAMES, ExportError, ct2_tokens, ctranslate2_module, export_ctranslate2, export_info
from .modeldir import CONFIG
from .search import NEVER, length_penalty, max_lengths
from .shortlist import VMAP
from .translate import TextTranslator, Translation, loss_examples
from .vocab import EOS, EOS_ID, PAD_ID, SOS_ID

COMPUTE_TYPES = {"fp32": "float32", "int8": "int8", "bf16": "bfloat16", "fp16": "float16"}


class CT2Translator(TextTranslator):
    """An exported Transformer decoded by CTranslate2 (`precision` picks its compute type:
    fp32 float32, int8 int8, bf16 bfloat16, fp16 float16, where the device supports it;
    None: the type the weights were stored in)."""

    engine = "ctranslate2"
    samples_each_input = False  # one random stream per process, seeded when the model loads

    def __init__(
        self, path: str | Path, pipeline: Pipeline, config: Config, info: dict[str, Any], device: torch.device,
        precision: str | None = None, threads: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(pipeline, config, device, precision)
        ctranslate2 = ctranslate2_module()
        compute = COMPUTE_TYPES.get(precision) if precision else "default"  # default: as stored
        supported = ctranslate2.get_supported_compute_types(device.type)
        if compute != "default" and compute not in supported:
            raise ValueError(
                f"precision {precision}: CTranslate2 on {device.type} computes in "
                f"{', '.join(sorted(supported))}, not {compute}"
            )
        self.info = info
        # Tokens go to CTranslate2 by the export's names (`export.ct2_tokens`) and come back by them.
        self.src_names = ct2_tokens(pipeline.src_vocab.itos)
        self.tgt_names = ct2_tokens(pipeline.tgt_vocab.itos)
        self.tgt_ids = {name: i for i, name in enumerate(self.tgt_names)}
        renamed = self.src_names != pipeline.src_vocab.itos or self.tgt_names != pipeline.tgt_vocab.itos
        if renamed and info.get("token_names") != TOKEN_NAMES:
            raise ExportError(
                f"{path}: exported by an aligna that named an ordinary token spelled like a special (such as "
                "the text <eos>) as the special itself, which CTranslate2 then reads as the special: export again"
            )
        self.has_vmap = (Path(path) / VMAP).is_file()  # for decode.shortlist (use_vmap)
        # CTranslate2 seeds each worker's sampler once, from the global seed at its first use:
        # a run of sampled calls from a fresh load is reproducible, one call alone is not.
        self.seed = config.decode.seed
        ctranslate2.set_random_seed(self.seed)
        self.ct2 = ctranslate2.Translator(
            str(path), device=device.type, device_index=device.index or 0, compute_type=compute,
            intra_threads=threads or torch.get_num_threads(), inter_threads=1,
        )  # fmt: skip
        kind = self.ct2.compute_type
        self.precision = "int8" if kind.startswith("int8") else {v: k for k, v in COMPUTE_TYPES.items()}.get(kind, kind)
        self._sampling = threading.Lock()  # sampled calls one at a time: one random stream

    @property
    def max_len(self) -> int | None:
        return int(self.info["max_positions"])

    @property
    def parameters(self) -> int:
        return int(self.info["parameters"])

    def check_shortlist(self) -> None:
        if not self.has_vmap:
            raise ConfigError(
                f"decode.shortlist: this CTranslate2 model has no {VMAP}: make the model directory's shortlist "
                "(`aligna shortlist MODEL_DIR`) before exporting it"
            )

    def decode_config(self, **options: object) -> DecodeConfig:
        """As the aligna engine's, and refusing what CTranslate2 decodes otherwise (a
        ConfigError, which the server answers with 422, before any job is queued)."""
        decode = super().decode_config(**options)
        self.check_options(decode)
        return decode

    def check_options(self, decode: DecodeConfig) -> None:
        """A ConfigError for a decode setting that CTranslate2 cannot keep as aligna means it."""
        if decode.coverage:
            raise ConfigError(
                "decode.coverage: CTranslate2's coverage penalty is not aligna's (GNMT's); "
                "use engine aligna for it, or coverage 0"
            )
        if decode.no_repeat_ngram:
            raise ConfigError(
                "decode.no_repeat_ngram: CTranslate2 blocks repeated n-grams differently from aligna "
                "(other outputs); use engine aligna for it, or no_repeat_ngram 0"
            )
        if decode.sample and decode.seed != self.seed:
            raise ConfigError(
                f"decode.seed: CTranslate2 seeds its sampler once, when the model loads (with seed {self.seed}, "
                "the config's decode.seed), so a seed per request cannot be kept"
            )

    def options(self, decode: DecodeConfig, attention: bool = True) -> dict[str, Any]:
        """CTranslate2's translate_batch options for aligna's decode settings (which
        `decode_config` made and checked)."""
        beam = decode.beam_size if not decode.sample else 1
        options: dict[str, Any] = dict(
            beam_size=beam, num_hypotheses=beam, length_penalty=0.0, min_decoding_length=decode.min_len,
            max_input_length=0, return_end_token=True, return_scores=True, return_attention=attention,
            suppress_sequences=[[self.tgt_names[i]] for i in NEVER],  # as aligna's search, never <pad> or <sos>
        )  # fmt: skip
        if decode.shortlist:
            options["use_vmap"] = True
        if decode.sample:
            options.update(sampling_topk=decode.top_k, sampling_topp=decode.top_p,
                           sampling_temperature=decode.temperature)  # fmt: skip
        return options

    def _translate_tokens(
        self, src_tokens: list[list[str]], decode: DecodeConfig, attention: bool = True,
        sample_ids: Sequence[int] | None = None,
    ) -> list[Translation | None]:  # fmt: skip
        options = self.options(decode, attention)
        lengths = torch.tensor([len(t) for t in src_tokens])
        limits = max_lengths(lengths, decode.max_len_a, decode.max_len_b, self.max_len).tolist()
        order = sorted((i for i in range(len(src_tokens)) if src_tokens[i]), key=lambda i: -len(src_tokens[i]))
        found: dict[int, Any] = {}
        batch_limit: dict[int, int] = {}
        # Where aligna needs only the best hypothesis by log P (nbest 1, alpha 0), CTranslate2 may stop
        # a sentence once its best candidate ends (num_hypotheses 1), as aligna's search does, in a
        # call whose length limit is each sentence's own; elsewhere the hypotheses tell whether one
        # went past its own limit, so all are asked for.
        best_only = dict(options, num_hypotheses=1) if decode.nbest == 1 and not decode.alpha else options
        with self._sampling if decode.sample else nullcontext():
            for start in range(0, len(order), decode.batch_size):
                chunk = order[start : start + decode.batch_size]
                batch_limit.update(dict.fromkeys(chunk, max(limits[i] for i in chunk)))
                exact = all(limits[i] == batch_limit[i] for i in chunk)
                self._decode(chunk, src_tokens, batch_limit[chunk[0]], best_only if exact else options, found)
            # A sentence whose search reached its own limit in a batch with a longer one may
            # have gone on where aligna stops: again, with its own limit (rare once trained).
            over = [i for i in order if batch_limit[i] > limits[i] and max(map(len, found[i][0].hypotheses)) >= limits[i]]
            for limit in sorted({limits[i] for i in over}):
                self._decode([i for i in over if limits[i] == limit], src_tokens, limit, best_only, found)
        results: list[Translation | None] = [None] * len(src_tokens)
        for i in order:
            results[i] = self._translation(*found[i], src_tokens[i], decode)
        return results

    def _names(self, tokens: list[str]) -> list[str]:
        """A source sentence's tokens by the export's names: each as aligna reads it (an
        unknown one as <unk>, text spelled like a special as the ordinary token it is)."""
        return [self.src_names[i] for i in self.pipeline.src_vocab.encode(tokens)]

    def _decode(self, chunk: list[int], src_tokens: list[list[str]], limit: int, options: dict, found: dict) -> None:
        sources = [self._names(src_tokens[i]) for i in chunk]
        # min_len beyond a call's limit: no <eos> before the limit, so the sentence runs to it, as aligna's does
        options = dict(options, min_decoding_length=min(options["min_decoding_length"], limit))
        batch = self.ct2.translate_batch(sources, max_decoding_length=limit, **options)
        first: list[Any] = [None] * len(chunk)
        if options["beam_size"] > 1 and options["return_attention"]:
            # CTranslate2 4.8 gives a beam hypothesis the first attention row of another sentence
            # of the batch; every hypothesis starts from <sos>, so one greedy step has the right one.
            steps = self.ct2.translate_batch(sources, beam_size=1, max_decoding_length=1, min_decoding_length=0,
                                             max_input_length=0, return_attention=True)  # fmt: skip
            first = [step.attention[0][0] if step.attention[0] else None for step in steps]
        found.update(zip(chunk, zip(batch, first)))

    def _translation(self, result: Any, first: list[float] | None, src_tokens: list[str], decode: DecodeConfig) -> Translation:
        """aligna's Translation of one CTranslate2 result (and the right first attention row of
        a beam search): hypotheses ranked by GNMT's length penalty."""
        ranked = []
        attentions = result.attention or [None] * len(result.hypotheses)  # empty where not asked for
        for tokens, log_prob, attention in zip(result.hypotheses, result.scores, attentions):
            if first is not None and attention:
                attention = [first, *attention[1:]]
            steps = len(tokens)  # <eos> included when emitted, as aligna's lp(Y) counts
            ids = [self.tgt_ids[t] for t in (tokens[:-1] if tokens and tokens[-1] == EOS else tokens)]
            ranked.append((log_prob / length_penalty(steps, decode.alpha), log_prob, ids, attention))
        ranked.sort(key=lambda h: -h[0])
        ranked = ranked[: decode.nbest]
        _, log_prob, ids, attention = ranked[0]
        itos = self.pipeline.tgt_vocab.itos
        return Translation(
            text=self.pipeline.detokenize(ids),
            tokens=[itos[i] for i in ids],
            src_tokens=src_tokens,
            score=float(log_prob),
            attention=torch.tensor(attention, dtype=torch.float32) if attention else None,
            nbest=[(self.pipeline.detokenize(i), float(s)) for s, _, i, _ in ranked],
        )

    def _corpus_loss(self, pairs: ParallelText) -> tuple[float, int]:
        """CTranslate2's `score_batch` over the pairs aligna's engine would score (same
        cutting and filtering): mean per-token cross-entropy, `<eos>` included."""
        examples = loss_examples(self.pipeline, pairs, self.max_len)
        sources = [[self.src_names[i] for i in s.tolist()] for s in examples.src]
        targets = [[self.tgt_names[i] for i in t.tolist() if i not in (SOS_ID, EOS_ID, PAD_ID)] for t in examples.tgt]
        if not sources:
            return 0.0, 0
        scored = self.ct2.score_batch(sources, targets, max_batch_size=self.config.train.batch_tokens,
                                      batch_type="tokens", max_input_length=0)  # fmt: skip
        total = -sum(sum(r.log_probs) for r in scored)
        tokens = sum(len(r.log_probs) for r in scored)
        return total / max(tokens, 1), tokens


def load_exported(path: str | Path, device: torch.device, precision: str | None, threads: int | None = None) -> CT2Translator:
    """A directory written by `aligna export --to ctranslate2`."""
    path = Path(path)
    info = export_info(path)
    config = load_config(path / CONFIG)
    return CT2Translator(path, Pipeline.load(path), config, info, device, precision, threads)


def load_converted(
    model_dir: str | Path, checkpoint: str, device: torch.device, precision: str | None, threads: int | None = None
) -> CT2Translator:
    """A model directory exported on the fly into a temporary directory, gone once loaded."""
    scratch = Path(tempfile.mkdtemp(prefix="aligna-ct2-"))
    try:
        out = export_ctranslate2(model_dir, scratch / "model", checkpoint)
        return load_exported(out, device, precision, threads)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
