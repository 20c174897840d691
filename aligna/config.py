"""One typed configuration, validated once when the YAML is read.

Every default lives in the dataclasses below and nowhere else. Every number field declares its
allowed range in its annotation (``Annotated[int, Range(1, 256)]``), every constrained string
its pattern (`Match`), and every section checks all its fields when it is constructed: from
YAML (`load_config`), from a dict (`config_from_dict`, `replace_validated`) or in Python
(``TrainConfig(lr=-1)``). A bad value raises `ConfigError` naming the dotted key
(``train.lr``), the value (cut to a short form) and what is allowed.

YAML is read by `yamlsafe`, which refuses duplicate keys and aliases that expand past its
`MAX_NODES` values (a "billion laughs" file); files over 1 MiB are refused here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from .yamlsafe import YAMLProblem, load_yaml

Metric = Literal["loss", "ppl", "bleu", "chrf", "tok_bleu", "exact", "wer", "per", "wer_nostress", "per_nostress"]

MAX_FILE_BYTES = 1 << 20  # a config file is a few kB
MAX_WIDTH = 65_536  # emb_dim, hidden_size, ff_size, attention_size
MAX_STEPS = 10**9  # any count of updates
MAX_VOCAB = 10_000_000
MAX_SEED = 2**32 - 1  # epoch_batches seeds torch with seed * 100_003 + epoch (must fit 64 bits)


class ConfigError(ValueError):
    """A configuration problem; the message names the file (if any) and the dotted key."""


@dataclass(frozen=True)
class Range:
    """The numbers a field allows: low <= x <= high, or low < x / x < high where open."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:  # False for NaN
        above = self.low < x if self.low_open else self.low <= x
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def describe(self, integers: bool) -> str:
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        kind = "integers" if integers else "numbers"
        return f"{kind} in {left}{_number_text(self.low)}, {_number_text(self.high)}{right}"

    def check(self, value: float, key: str, integers: bool) -> None:
        if value not in self:
            finite = isinstance(value, int) or math.isfinite(value)
            problem = "is out of range" if finite else "is not a finite number"
            raise _FieldError(
                key, f"{_show(value, typed=False)} {problem}; allowed: {self.describe(integers)}"
            )


@dataclass(frozen=True)
class Match:
    """The strings a field allows: those `pattern` matches in full, `allowed` in words."""

    pattern: str
    allowed: str

    def check(self, value: str, key: str, integers: bool = False) -> None:
        if not re.fullmatch(self.pattern, value):
            raise _FieldError(key, f"{_show(value)} is not allowed; allowed: {self.allowed}")


# Ranges shared by several fields.
Rate = Annotated[float, Range(0, 1, high_open=True)]  # dropout, label smoothing, Adam's betas
Probability = Annotated[float, Range(0, 1)]
Width = Annotated[int, Range(1, MAX_WIDTH)]
Layers = Annotated[int, Range(1, 256)]
Seed = Annotated[int, Range(0, MAX_SEED)]
FilePath = Annotated[str, Match(r"(?s).*\S.*", "a non-empty path")]


# --------------------------------------------------------------------------- sections


class _Section:
    """Base of every section: construction converts each field to its annotated type and
    checks it (type, `Range`, `Match`, choices), then `_check_together` relates fields."""

    def __post_init__(self) -> None:
        for name, tp in _hints(type(self)).items():
            value = getattr(self, name)
            converted = _convert(tp, value, name)
            if converted is not value:  # e.g. 1 -> 1.0, a list -> a tuple
                object.__setattr__(self, name, converted)
        self._check_together()

    def _check_together(self) -> None:
        """Checks between fields; a section with such rules overrides this."""


@dataclass(frozen=True)
class CorpusConfig(_Section):
    """One split: a pair of line-aligned files (`src`, `tgt`) or one TSV file (`tsv`).

    Files may be plain text or gzip (``.gz``), UTF-8, one sentence per line. A TSV line is
    ``source<TAB>target``.
    """

    src: FilePath | None = None
    tgt: FilePath | None = None
    tsv: FilePath | None = None

    def _check_together(self) -> None:
        pair = self.src is not None or self.tgt is not None
        if pair and self.tsv is not None:
            raise ValueError("give either src and tgt, or tsv, not both")
        if pair and (self.src is None or self.tgt is None):
            raise ValueError("src and tgt must be given together")
        if not pair and self.tsv is None:
            raise ValueError("give src and tgt (two files) or tsv (one file)")

    @property
    def paths(self) -> list[str]:
        return [self.tsv] if self.tsv is not None else [self.src, self.tgt]  # type: ignore[list-item]


@dataclass(frozen=True)
class TokenizerConfig(_Section):
    """How one side's text becomes tokens, and which tokens enter the vocabulary."""

    type: Literal["char", "word", "bpe", "unigram"] = "word"
    lowercase: bool = False
    vocab_size: Annotated[int, Range(8, MAX_VOCAB)] = 8000  # sentencepiece model size (bpe / unigram only)
    # sentencepiece: share of characters the model covers
    character_coverage: Annotated[float, Range(0, 1, low_open=True)] = 1.0
    min_freq: Annotated[int, Range(1, 10**9)] = 1  # tokens seen fewer times in training data map to <unk>
    # most frequent tokens kept (0: no limit), specials not counted
    max_size: Annotated[int, Range(0, MAX_VOCAB)] = 0

    def unused_settings(self) -> str:
        """Why a sentencepiece setting given to a word or char tokenizer would change nothing
        ('' if none is): refused when a vocabulary is built, not when a run's saved config
        is read (a run made before this check still loads)."""
        if self.type in ("char", "word"):
            default = TokenizerConfig.__dataclass_fields__
            for key, hint in (("vocab_size", "; max_size caps a word or char vocabulary"), ("character_coverage", "")):
                if getattr(self, key) != default[key].default:
                    return f"{key}: applies to the subword tokenizers (type bpe or unigram), not to type {self.type}{hint}"
        return ""


@dataclass(frozen=True)
class DataConfig(_Section):
    train: CorpusConfig
    dev: CorpusConfig | None = None
    test: CorpusConfig | None = None
    src_lang: str = "src"
    tgt_lang: str = "tgt"
    src_tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tgt_tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shared_vocab: bool = False  # one vocabulary (and one subword model) for both sides
    max_len: Annotated[int, Range(1, 100_000)] = 100  # tokens per side, <sos>/<eos> not counted
    too_long: Literal["filter", "truncate"] = "filter"
    # Pairs sharing a source are one example with several references (CMUdict G2P).
    group_references: bool = False

    def check_new_vocabulary(self) -> None:
        """Refuse tokenizer settings that building a vocabulary would ignore (a ConfigError
        naming the key); a run's saved config is not held to it, so an older run still loads."""
        for side in ("src_tokenizer", "tgt_tokenizer"):
            unused = getattr(self, side).unused_settings()
            if unused:
                raise ConfigError(f"data.{side}.{unused}")


@dataclass(frozen=True)
class RNNConfig(_Section):
    """The recurrent encoder-decoder (Sutskever et al. 2014; Cho et al. 2014), with or
    without attention (Bahdanau et al. 2015; Luong et al. 2015)."""

    cell: Literal["lstm", "gru"] = "lstm"
    bidirectional: bool = False  # encoder only
    # Sutskever et al. 2014: the encoder reads each source sentence backwards, so that its first
    # words, which the first target words depend on, are the last it reads before C
    reverse_source: bool = False
    # Cho et al. 2014: the context vector C enters every decoder step and the output layer.
    feed_context: bool = False
    # none: the fixed context vector only. bahdanau: additive, before the recurrence.
    # dot / general / concat: Luong's scores, after the recurrence.
    attention: Literal["none", "bahdanau", "dot", "general", "concat"] = "none"
    attention_size: Annotated[int, Range(0, MAX_WIDTH)] = 0  # hidden size of additive scores (0: hidden_size)
    input_feeding: bool = True  # Luong: h~_{t-1} joins the next decoder input
    # LSTM: the forget gate's initial bias (Jozefowicz et al. 2015: 1, so that the cell
    # remembers from the first update); torch's own init leaves it near 0.
    forget_bias: Annotated[float, Range(-10, 10)] = 1.0
    # every weight but the embeddings drawn from U(-init_range, init_range) (Luong et al.
    # 2015: 0.1); 0: torch's U(+-1/sqrt(fan_in)). Embeddings keep N(0, 1) either way.
    init_range: Annotated[float, Range(0, 10)] = 0.0

    def _check_together(self) -> None:
        _check(
            not (self.feed_context and self.attention != "none"),
            "feed_context",
            "only applies without attention (attention gives every step its own context)",
        )
        _check(
            not (self.reverse_source and self.bidirectional),
            "reverse_source",
            "a bidirectional encoder reads the source both ways already",
        )
        _check(
            not (self.attention == "dot" and self.bidirectional),
            "attention",
            "dot needs equal encoder and decoder sizes; a bidirectional encoder doubles them (use general)",
        )


@dataclass(frozen=True)
class TransformerConfig(_Section):
    """The Transformer (Vaswani et al. 2017); its d_model is `model.emb_dim`."""

    heads: Annotated[int, Range(1, 1024)] = 8
    ff_size: Width = 2048  # inner size of the position-wise feed-forward network
    attention_dropout: Rate = 0.1  # on attention weights
    activation_dropout: Rate = 0.0  # inside the feed-forward network
    activation: Literal["relu", "gelu"] = "relu"
    pre_norm: bool = True  # LayerNorm before each sublayer (False: after, as in the paper)
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"
    # longest sequence a learned position table covers
    max_positions: Annotated[int, Range(1, 1_000_000)] = 1024
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) (section 3.4)


@dataclass(frozen=True)
class ModelConfig(_Section):
    arch: Literal["rnn", "transformer"] = "rnn"
    emb_dim: Width = 256  # embedding size; the Transformer's d_model
    hidden_size: Width = 512  # RNN state size, per direction for a bidirectional encoder
    encoder_layers: Layers = 2
    decoder_layers: Layers = 2
    dropout: Rate = 0.3  # on embeddings, between layers, on residuals and outputs
    tie_embeddings: bool = False  # the output projection shares the target embedding
    share_embeddings: bool = False  # source and target share one embedding (needs data.shared_vocab)
    rnn: RNNConfig = field(default_factory=RNNConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    def _check_together(self) -> None:
        if self.arch == "transformer":
            _check(
                self.emb_dim % self.transformer.heads == 0,
                "emb_dim",
                f"must be divisible by transformer.heads ({self.transformer.heads})",
            )


@dataclass(frozen=True)
class TrainConfig(_Section):
    seed: Seed = 42
    # per batch: sentences x longest sentence, on each side
    batch_tokens: Annotated[int, Range(1, 100_000_000)] = 4096
    # batches per update and process: an update takes accumulate x processes batches
    accumulate: Annotated[int, Range(1, 4096)] = 1
    epochs: Annotated[int, Range(1, 1_000_000)] = 10
    max_steps: Annotated[int, Range(0, MAX_STEPS)] = 0  # stop after this many updates (0: run all epochs)
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: Annotated[float, Range(0, 1, low_open=True)] = 1e-3
    betas: tuple[Rate, Rate] = (0.9, 0.999)
    weight_decay: Probability = 0.0
    # constant | inverse_sqrt (linear warmup, then lr * sqrt(warmup / step)) | plateau |
    # linear (warmup, then straight down to lr / (total - warmup + 1) at the run's last update: for a fixed budget)
    schedule: Literal["constant", "inverse_sqrt", "plateau", "linear"] = "constant"
    warmup_steps: Annotated[int, Range(0, MAX_STEPS)] = 0
    # plateau: lr *= factor after `plateau_patience` validations without improvement, down to min_lr
    plateau_factor: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = 0.5
    plateau_patience: Annotated[int, Range(1, 1_000_000)] = 2
    min_lr: Annotated[float, Range(0, 1)] = 1e-6  # plateau: at most lr
    clip_grad_norm: Annotated[float, Range(0, 1e6)] = 1.0  # 0: no clipping
    label_smoothing: Rate = 0.0
    # Teacher forcing: the chance of feeding the gold previous token (1.0: always, the fast
    # path); below 1 the model's own prediction is fed otherwise (scheduled sampling,
    # Bengio et al. 2015), decaying from `teacher_forcing` to `teacher_forcing_min`.
    teacher_forcing: Probability = 1.0
    teacher_forcing_decay: Literal["none", "linear", "exponential", "inverse_sigmoid"] = "none"
    teacher_forcing_decay_steps: Annotated[int, Range(1, MAX_STEPS)] = 10000
    teacher_forcing_min: Probability = 0.0  # at most teacher_forcing
    # updates between validations (0: once per epoch)
    validate_every: Annotated[int, Range(0, MAX_STEPS)] = 1000
    log_every: Annotated[int, Range(1, MAX_STEPS)] = 100
    early_stopping_metric: Metric = "loss"
    # validations without improvement (0: never stop early)
    early_stopping_patience: Annotated[int, Range(0, 1_000_000)] = 0
    # most recent step checkpoints kept (checkpoints/step-N), beside best.safetensors
    keep_checkpoints: Annotated[int, Range(1, 1_000_000)] = 3
    # updates in a row whose loss or gradient is not finite (each is skipped) before the run stops
    max_nonfinite_updates: Annotated[int, Range(1, 1_000_000)] = 10
    device: Annotated[str, Match(r"auto|cpu|cuda(:[0-9]{1,4})?", "auto, cpu, cuda or cuda:N")] = "auto"
    num_threads: Annotated[int, Range(0, 4096)] = 0  # torch CPU threads (0: torch's default)
    # fp32 is exact; bf16 / fp16 autocast (mixed precision) is for GPUs (fp16 with loss
    # scaling, CUDA only); bf16 also runs on CPUs: on one with AMX, 1.6x faster than fp32 for
    # the d256 Transformer, 1.05x for the tiny one (bench/results/train_speed_*_amx.json).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False  # torch.compile the training forward pass

    def _check_together(self) -> None:
        _at_most(self, "teacher_forcing_min", "teacher_forcing")
        if self.schedule == "plateau":  # min_lr means nothing to the other schedules
            _at_most(self, "min_lr", "lr")
        _check(
            not (self.precision == "fp16" and self.device == "cpu"), "precision", "fp16 needs a CUDA device"
        )


@dataclass(frozen=True)
class DecodeConfig(_Section):
    """Search settings: the defaults of `translate` and `evaluate`. Validation during
    training always decodes greedily (fast and comparable across checks)."""

    # output length limit: a * source_length + b tokens
    max_len_a: Annotated[float, Range(0, 100)] = 1.5
    max_len_b: Annotated[int, Range(0, 100_000)] = 10
    batch_size: Annotated[int, Range(1, 100_000)] = 64  # sentences per batch
    beam_size: Annotated[int, Range(1, 256)] = 1  # 1: greedy search
    nbest: Annotated[int, Range(1, 256)] = 1  # hypotheses returned per sentence (beam search, <= beam_size)
    # GNMT length penalty ((5 + |y|) / 6)^alpha; 0: rank by log-probability
    alpha: Annotated[float, Range(0, 10)] = 0.0
    coverage: Annotated[float, Range(0, 10)] = 0.0  # GNMT coverage penalty weight (models with attention)
    min_len: Annotated[int, Range(0, 100_000)] = 0  # no <eos> before this many tokens
    no_repeat_ngram: Annotated[int, Range(0, 100)] = 0  # forbid repeating any n-gram of this size (0: off)
    sample: bool = False  # sample instead of searching
    # greedy / beam search over a vocabulary shortlist (MODEL_DIR/shortlist.txt, `aligna shortlist`):
    # the output layer computed over each batch's candidate target tokens only
    shortlist: bool = False
    # sampling: softmax(logits / temperature)
    temperature: Annotated[float, Range(0.01, 100)] = 1.0  # lower: softmax overflows to NaN
    top_k: Annotated[int, Range(0, MAX_VOCAB)] = 0  # sampling: only the k most probable tokens (0: all)
    # sampling: only the most probable tokens holding this much mass
    top_p: Annotated[float, Range(0, 1, low_open=True)] = 1.0
    # sampling: random seed; input i of a call samples from a generator seeded by (seed, i) alone
    seed: Seed = 1

    def _check_together(self) -> None:
        _at_most(self, "nbest", "beam_size")
        _check(
            not (self.sample and self.beam_size > 1),
            "sample",
            "sampling and beam_size > 1 exclude each other",
        )
        _check(
            not (self.sample and self.shortlist),
            "shortlist",
            "a vocabulary shortlist applies to greedy and beam search, not to sampling",
        )
        _check(
            not (self.sample and self.no_repeat_ngram),
            "no_repeat_ngram",
            "n-gram blocking applies to greedy and beam search, not to sampling",
        )


@dataclass(frozen=True)
class EvalConfig(_Section):
    # bleu/chrf: sacreBLEU on detokenized text; tok_bleu: BLEU on already tokenized,
    # lowercased text (the form of published Multi30k results); wer/per: word and
    # phoneme error rate (G2P); exact: percent of outputs equal to a reference;
    # loss/ppl: per-token cross-entropy and perplexity.
    metrics: tuple[Metric, ...] = ("bleu", "chrf")


@dataclass(frozen=True)
class Config(_Section):
    # Checkpoints, logs and vocabularies (see modeldir); never empty.
    model_dir: FilePath
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = ""

    def _check_together(self) -> None:
        metric = self.train.early_stopping_metric
        if metric not in ("loss", "ppl") and metric not in self.eval.metrics:
            raise ConfigError(
                f"train.early_stopping_metric: {metric!r} is not computed; "
                f"add it to eval.metrics {list(self.eval.metrics)} or use loss"
            )
        if self.model.share_embeddings and not self.data.shared_vocab:
            raise ConfigError("model.share_embeddings: needs data.shared_vocab: true (one vocabulary)")
        # one vocabulary is built by one rule, and subwords by one model trained on both sides
        src_tok, tgt_tok = self.data.src_tokenizer, self.data.tgt_tokenizer
        subwords = {src_tok.type, tgt_tok.type} & {"bpe", "unigram"}
        for key in [f.name for f in dataclasses.fields(src_tok)] if subwords else ["min_freq", "max_size"]:
            src, tgt = getattr(src_tok, key), getattr(tgt_tok, key)
            if self.data.shared_vocab and src != tgt:
                what = "one subword model and vocabulary" if subwords else "one vocabulary"
                raise ConfigError(f"data.tgt_tokenizer.{key}: {tgt!r}, but the shared vocabulary (data.shared_vocab) "
                                  f"is {what} built by one rule: set it as data.src_tokenizer.{key} ({src!r})")
        if self.data.dev is None and (
            self.train.early_stopping_patience > 0 or self.train.schedule == "plateau"
        ):
            raise ConfigError("data.dev: early stopping and the plateau schedule need a dev set")
        t = self.model.transformer
        if self.model.arch == "transformer" and t.positions == "learned" and self.data.max_len + 1 > t.max_positions:
            raise ConfigError(
                f"model.transformer.max_positions: {t.max_positions} learned positions cannot hold data.max_len "
                f"{self.data.max_len} tokens and <sos>; use at least {self.data.max_len + 1} or a smaller max_len"
            )


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read and validate a YAML config; `overrides` are ``dotted.key=value`` strings."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a directory, not a config file")
    if not path.exists():  # a pipe (<(...)) is read as a file
        raise ConfigError(f"config file not found: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{size} bytes; a config file may have at most {MAX_FILE_BYTES} bytes")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"not UTF-8 text (byte {e.start})") from None
        raw = _yaml(text)
        if not isinstance(raw, dict):
            raise ConfigError("the top level must be a mapping of sections")
        return config_from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _unshared(value: Any) -> Any:
    """A copy in which no two places share a mapping or list. A YAML alias (`test: *held_out`)
    is the very object of its anchor, and deepcopy keeps that: an override of one place
    would change the other too (`--set data.test.tsv=...` would move dev as well)."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each ``a.b.c=value`` set: a list or mapping parsed as YAML,
    any other value as `_Typed` (its field's type says how it reads)."""
    raw = _unshared(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {_show(item, typed=False)}: expected dotted.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {_show(item, typed=False)}: {_key(part)} is not a section")
        try:
            parsed = _yaml(value)
        except ConfigError as e:
            raise ConfigError(f"override {_show(item, typed=False)}: {e}") from None
        node[leaf] = parsed if isinstance(parsed, (list, dict)) else _Typed(value, parsed)
    return raw


class _Typed(str):
    """A --set value as typed, and as YAML reads it (`parsed`). The field's type picks: a
    string field takes the text as typed (YAML 1.1 would make `no` False and cut `runs/x #1`
    at the comment), a number field the number the text spells (YAML 1.1 reads `010` as octal
    8 and `1:30` as 90), a true/false, list or optional field YAML's reading, and so does a
    string in YAML's quotes."""

    parsed: Any

    def __new__(cls, text: str, parsed: Any) -> _Typed:
        typed = super().__new__(cls, text)
        typed.parsed = parsed
        return typed


def _yaml(text: str) -> Any:
    try:
        return load_yaml(text)
    except YAMLProblem as e:
        raise ConfigError(str(e)) from None


def config_from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, "")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain dict (lists instead of tuples) that `config_from_dict` reads back."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def replace_validated(section: Any, where: str, **changes: Any) -> Any:
    """A copy of a config section with `changes`, validated as if read from YAML
    (`where`, e.g. "decode", names the section in errors: ``decode.beam_size``)."""
    return _build(type(section), config_to_dict(section) | changes, where)


def save_config(config: Config, path: str | Path) -> None:
    """Written to a temporary name and renamed: a reader (another process of a distributed run
    checking its resume) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), "utf-8")
    os.replace(tmp, path)


def field_type(section: type, name: str) -> Any:
    """The annotated type of field `name` of a section class, its `Range` or `Match` included."""
    return _hints(section)[name]


def check_value(tp: Any, value: Any) -> Any:
    """`value` converted to type `tp` and checked like a config field (type, `Range`, `Match`,
    choices), for values given outside a config, e.g. command-line options. The error
    message names no key: the caller puts its own (an option name) in front."""
    try:
        return _convert(tp, value, "")
    except _FieldError as e:
        raise ConfigError(e.message) from None


# --------------------------------------------------------------------------- building


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _FieldError(key, message)


def _at_most(section: Any, key: str, limit: str) -> None:
    """A range that depends on another field: `key` <= `limit`."""
    value, bound = getattr(section, key), getattr(section, limit)
    _check(value <= bound, key, f"must be <= {limit} ({bound}); got {value}")


class _FieldError(ConfigError):
    """A bad field value, raised on construction; `_build` puts the section's dotted path
    in front of `key`."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key, self.message = key, message


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build section `cls` from mapping `raw`; `where` is the dotted path for errors."""
    label = where or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a mapping of keys, got {_show(raw)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key)[:100], fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; allowed keys: {', '.join(fields)}"
            raise ConfigError(f"{_join(where, _key(key))}: unknown key{hint}")
    values = {}
    for name, f in fields.items():
        if name in raw:
            section, value = _section_type(hints[name]), raw[name]
            if section and isinstance(value, _Typed):  # --set data.test=null
                value = value.parsed
            values[name] = (
                _build(section, value, _join(where, name)) if section and value is not None else value
            )
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: missing required key")
    try:
        return cls(**values)
    except _FieldError as e:
        raise ConfigError(f"{_join(where, e.key)}: {e.message}") from None
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{label}: {e}") from None


def _section_type(tp: Any) -> type | None:
    """The section class of a field typed `Section` or `Section | None`, else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    inner = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp
    return inner if dataclasses.is_dataclass(inner) else None


def _convert(tp: Any, value: Any, key: str) -> Any:
    """`value` as type `tp`, checked against the rules in its annotation; `key` names it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        value = _convert(args[0], value, key)
        for rule in tp.__metadata__:
            rule.check(value, key, args[0] is int)
        return value
    if origin in (typing.Union, types.UnionType):
        if (value is None or isinstance(value, _Typed) and value.parsed is None) and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if isinstance(value, _Typed):  # a --set value: as typed for a string or a number, else as YAML reads it
        text_field = tp is str or origin is Literal and all(isinstance(a, str) for a in args)
        quoted = isinstance(value.parsed, str) and value.lstrip().startswith(('"', "'"))  # YAML's quotes
        value = str(value) if (text_field and not quoted) or tp in (int, float) else value.parsed
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):  # a section built in code: from its class, or the whole config from a mapping
            raise _FieldError(key, f"expected a {tp.__name__}, got a dict: build the config with "
                                   f"config_from_dict(mapping), or this section with {tp.__name__}(**mapping)")  # fmt: skip
        if not isinstance(value, tp):
            raise _FieldError(key, f"expected a mapping of keys, got {_show(value)}")
        return value
    if origin is Literal:
        if value not in args:
            raise _FieldError(key, f"{_show(value)} is not allowed; allowed values: {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _FieldError(key, f"expected a list, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _FieldError(key, f"expected a list of {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise _FieldError(key, f"expected true or false, got {_show(value)}")
        return value
    if tp is int or tp is float:
        return _number(value, key, tp is int)
    if tp is str:
        if not isinstance(value, str):
            raise _FieldError(key, f"expected a string, got {_show(value)}")
        if "\0" in value:
            raise _FieldError(key, f"{_show(value)} holds a NUL character, which no name or path may")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _FieldError(key, f"{_show(value)} holds a lone surrogate: not Unicode text") from None
        return value
    raise TypeError(f"{key}: unsupported config type {tp}")  # a bug in this module


def _number(value: Any, key: str, integer: bool) -> int | float:
    """`value` as an int or a float. YAML 1.1 reads ``1e-3`` (no dot) as a string, so strings
    that spell a number count; an integer field takes an integral float (``1e7``)."""
    expected = f"expected {'an integer' if integer else 'a number'}, got {_show(value)}"
    number = value
    if isinstance(value, str):
        number = _parse_number(value)
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise _FieldError(key, expected)
    if not integer:
        try:
            return float(number)
        except OverflowError:  # an int past 1e308
            raise _FieldError(key, f"{_show(value)} is not a finite number") from None
    if isinstance(number, float) and math.isfinite(number):
        if not number.is_integer():
            raise _FieldError(key, expected)
        return int(number)
    return number  # a float here is NaN or infinite: the field's Range says so


def _parse_number(text: str) -> int | float | None:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:  # also: an int of over 4300 digits
            pass
    return None


# --------------------------------------------------------------------------- messages


_REPR = reprlib.Repr()  # cuts long strings and big containers while it writes them
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 60, 60, 3
MAX_SHOWN = 80  # characters of a value quoted in a message


def _show(value: Any, typed: bool = True) -> str:
    """`value` for a message: its repr cut to at most MAX_SHOWN characters, then its type
    (with `typed`, or when cut) and its size (when cut)."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int of over 4300 digits, which Python will not write out
        text = "..."
    if len(text) > MAX_SHOWN:
        text = text[: MAX_SHOWN - 3] + "..."
    kind = type(value).__name__
    if "..." in text:  # reprlib or the line above cut something
        size = _size(value)
        return f"{text} ({kind}, {size})" if size else f"{text} ({kind})"
    return f"{text} ({kind})" if typed else text


def _size(value: Any) -> str | None:
    if isinstance(value, (str, bytes)):
        return f"{len(value)} characters"
    if isinstance(value, (list, tuple, dict, set)):
        return f"{len(value)} items"
    if isinstance(value, int) and value:
        return f"{int(math.log10(abs(value))) + 1} digits"
    return None


def _key(key: Any) -> str:
    """A key the user wrote, for a message: as written when short and printable."""
    if isinstance(key, str) and 0 < len(key) <= 40 and key.isprintable() and key == key.strip():
        return key
    return _show(key, typed=not isinstance(key, str))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
