"""One typed configuration, validated once when the YAML is read.

Every default lives in the dataclasses below and nowhere else. `load_config` turns a YAML
mapping into a frozen `Config`; an unknown key, a missing key or a bad value raises
`ConfigError` naming the dotted key (``train.lr``), what was given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Metric = Literal["loss", "ppl", "bleu", "chrf", "tok_bleu", "exact", "wer", "per"]


class ConfigError(ValueError):
    """A configuration problem; the message names the file (if any) and the dotted key."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class CorpusConfig:
    """One split: a pair of line-aligned files (`src`, `tgt`) or one TSV file (`tsv`).

    Files may be plain text or gzip (``.gz``), UTF-8, one sentence per line. A TSV line is
    ``source<TAB>target``.
    """

    src: str | None = None
    tgt: str | None = None
    tsv: str | None = None

    def __post_init__(self) -> None:
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
class TokenizerConfig:
    """How one side's text becomes tokens, and which tokens enter the vocabulary."""

    type: Literal["char", "word", "bpe", "unigram"] = "word"
    lowercase: bool = False
    vocab_size: int = 8000  # sentencepiece model size (bpe / unigram only)
    character_coverage: float = 1.0  # sentencepiece: share of characters the model covers
    min_freq: int = 1  # tokens seen fewer times in training data map to <unk>
    max_size: int = 0  # most frequent tokens kept (0: no limit), specials not counted

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 8, "vocab_size", "must be >= 8")
        _check(0 < self.character_coverage <= 1, "character_coverage", "must be in (0, 1]")
        _check(self.min_freq >= 1, "min_freq", "must be >= 1")
        _check(self.max_size >= 0, "max_size", "must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    train: CorpusConfig
    dev: CorpusConfig | None = None
    test: CorpusConfig | None = None
    src_lang: str = "src"
    tgt_lang: str = "tgt"
    src_tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tgt_tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shared_vocab: bool = False  # one vocabulary (and one subword model) for both sides
    max_len: int = 100  # tokens per side, <sos>/<eos> not counted
    too_long: Literal["filter", "truncate"] = "filter"
    # Pairs sharing a source are one example with several references (CMUdict G2P).
    group_references: bool = False

    def __post_init__(self) -> None:
        _check(self.max_len >= 1, "max_len", "must be >= 1")


@dataclass(frozen=True)
class RNNConfig:
    """The recurrent encoder-decoder (Sutskever et al. 2014; Cho et al. 2014), with or
    without attention (Bahdanau et al. 2015; Luong et al. 2015)."""

    cell: Literal["lstm", "gru"] = "lstm"
    bidirectional: bool = False  # encoder only
    # Cho et al. 2014: the context vector C enters every decoder step and the output layer.
    feed_context: bool = False
    # none: the fixed context vector only. bahdanau: additive, before the recurrence.
    # dot / general / concat: Luong's scores, after the recurrence.
    attention: Literal["none", "bahdanau", "dot", "general", "concat"] = "none"
    attention_size: int = 0  # hidden size of additive scores (0: hidden_size)
    input_feeding: bool = True  # Luong: h~_{t-1} joins the next decoder input

    def __post_init__(self) -> None:
        _check(self.attention_size >= 0, "attention_size", "must be >= 0")
        _check(
            not (self.feed_context and self.attention != "none"),
            "feed_context",
            "only applies without attention (attention gives every step its own context)",
        )
        _check(
            not (self.attention == "dot" and self.bidirectional),
            "attention",
            "dot needs equal encoder and decoder sizes; a bidirectional encoder doubles them (use general)",
        )


@dataclass(frozen=True)
class TransformerConfig:
    """The Transformer (Vaswani et al. 2017); its d_model is `model.emb_dim`."""

    heads: int = 8
    ff_size: int = 2048  # inner size of the position-wise feed-forward network
    attention_dropout: float = 0.1  # on attention weights
    activation_dropout: float = 0.0  # inside the feed-forward network
    activation: Literal["relu", "gelu"] = "relu"
    pre_norm: bool = True  # LayerNorm before each sublayer (False: after, as in the paper)
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"
    max_positions: int = 1024  # longest sequence a learned position table covers
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) (section 3.4)

    def __post_init__(self) -> None:
        for key in ("heads", "ff_size", "max_positions"):
            _check(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("attention_dropout", "activation_dropout"):
            _check(0 <= getattr(self, key) < 1, key, "must be in [0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["rnn", "transformer"] = "rnn"
    emb_dim: int = 256  # embedding size; the Transformer's d_model
    hidden_size: int = 512  # RNN state size, per direction for a bidirectional encoder
    encoder_layers: int = 2
    decoder_layers: int = 2
    dropout: float = 0.3  # on embeddings, between layers, on residuals and outputs
    tie_embeddings: bool = False  # the output projection shares the target embedding
    share_embeddings: bool = False  # source and target share one embedding (needs data.shared_vocab)
    rnn: RNNConfig = field(default_factory=RNNConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    def __post_init__(self) -> None:
        for key in ("emb_dim", "hidden_size", "encoder_layers", "decoder_layers"):
            _check(getattr(self, key) >= 1, key, "must be >= 1")
        _check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        if self.arch == "transformer":
            _check(
                self.emb_dim % self.transformer.heads == 0,
                "emb_dim",
                f"must be divisible by transformer.heads ({self.transformer.heads})",
            )


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 42
    batch_tokens: int = 4096  # per batch: sentences x longest sentence, on each side
    epochs: int = 10
    max_steps: int = 0  # stop after this many updates (0: run all epochs)
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    # constant | inverse_sqrt (linear warmup, then lr * sqrt(warmup / step)) | plateau
    schedule: Literal["constant", "inverse_sqrt", "plateau"] = "constant"
    warmup_steps: int = 0
    plateau_factor: float = 0.5  # plateau: lr *= factor after `plateau_patience` bad checks
    plateau_patience: int = 2
    min_lr: float = 1e-6
    clip_grad_norm: float = 1.0  # 0: no clipping
    label_smoothing: float = 0.0
    # Teacher forcing: the chance of feeding the gold previous token (1.0: always, the fast
    # path); below 1 the model's own prediction is fed otherwise (scheduled sampling,
    # Bengio et al. 2015), decaying from `teacher_forcing` to `teacher_forcing_min`.
    teacher_forcing: float = 1.0
    teacher_forcing_decay: Literal["none", "linear", "exponential", "inverse_sigmoid"] = "none"
    teacher_forcing_decay_steps: int = 10000
    teacher_forcing_min: float = 0.0
    validate_every: int = 1000  # updates between validations (0: once per epoch)
    log_every: int = 100
    early_stopping_metric: Metric = "loss"
    early_stopping_patience: int = 0  # validations without improvement (0: never stop early)
    keep_checkpoints: int = 3  # most recent step checkpoints kept beside best and last
    # updates in a row whose loss or gradient is not finite (each is skipped) before the run stops
    max_nonfinite_updates: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = 0  # torch CPU threads (0: torch's default)
    # fp32 is exact; bf16 / fp16 autocast (mixed precision) is for GPUs (fp16 with loss
    # scaling, CUDA only); bf16 also runs on CPUs, faster on those with bf16 units.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False  # torch.compile the training forward pass

    def __post_init__(self) -> None:
        _check(self.batch_tokens >= 1, "batch_tokens", "must be >= 1")
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.max_steps >= 0, "max_steps", "must be >= 0")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(all(0 <= b < 1 for b in self.betas), "betas", "must be in [0, 1)")
        _check(0 < self.plateau_factor < 1, "plateau_factor", "must be in (0, 1)")
        _check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        _check(0 <= self.teacher_forcing <= 1, "teacher_forcing", "must be in [0, 1]")
        _check(
            0 <= self.teacher_forcing_min <= self.teacher_forcing,
            "teacher_forcing_min",
            "must be in [0, teacher_forcing]",
        )
        _check(self.teacher_forcing_decay_steps >= 1, "teacher_forcing_decay_steps", "must be >= 1")
        _check(self.validate_every >= 0, "validate_every", "must be >= 0")
        _check(self.log_every >= 1, "log_every", "must be >= 1")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _check(self.max_nonfinite_updates >= 1, "max_nonfinite_updates", "must be >= 1")
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            "must be auto, cpu, cuda or cuda:N",
        )
        _check(
            not (self.precision == "fp16" and self.device == "cpu"), "precision", "fp16 needs a CUDA device"
        )


@dataclass(frozen=True)
class DecodeConfig:
    """Search settings: the defaults of `translate` and `evaluate`. Validation during
    training always decodes greedily (fast and comparable across checks)."""

    max_len_a: float = 1.5  # output length limit: a * source_length + b tokens
    max_len_b: int = 10
    batch_size: int = 64  # sentences per batch
    beam_size: int = 1  # 1: greedy search
    nbest: int = 1  # hypotheses returned per sentence (beam search, <= beam_size)
    alpha: float = 0.0  # GNMT length penalty ((5 + |y|) / 6)^alpha; 0: rank by log-probability
    coverage: float = 0.0  # GNMT coverage penalty weight (models with attention)
    min_len: int = 0  # no <eos> before this many tokens
    no_repeat_ngram: int = 0  # forbid repeating any n-gram of this size (0: off)
    sample: bool = False  # sample instead of searching
    temperature: float = 1.0  # sampling: softmax(logits / temperature)
    top_k: int = 0  # sampling: only the k most probable tokens (0: all)
    top_p: float = 1.0  # sampling: only the most probable tokens holding this much mass
    seed: int = 1  # sampling: random seed

    def __post_init__(self) -> None:
        _check(self.max_len_a >= 0 and self.max_len_b >= 0, "max_len_a", "a and b must be >= 0")
        for key in ("batch_size", "beam_size", "nbest"):
            _check(getattr(self, key) >= 1, key, "must be >= 1")
        _check(self.nbest <= self.beam_size, "nbest", "must be <= beam_size")
        _check(
            not (self.sample and self.beam_size > 1),
            "sample",
            "sampling and beam_size > 1 exclude each other",
        )
        _check(self.alpha >= 0, "alpha", "must be >= 0")
        _check(self.coverage >= 0, "coverage", "must be >= 0")
        _check(self.min_len >= 0, "min_len", "must be >= 0")
        _check(self.no_repeat_ngram >= 0, "no_repeat_ngram", "must be >= 0")
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(self.top_k >= 0, "top_k", "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")


@dataclass(frozen=True)
class EvalConfig:
    # bleu/chrf: sacreBLEU on detokenized text; tok_bleu: BLEU on already tokenized,
    # lowercased text (the form of published Multi30k results); wer/per: word and
    # phoneme error rate (G2P); exact: percent of outputs equal to a reference;
    # loss/ppl: per-token cross-entropy and perplexity.
    metrics: tuple[Metric, ...] = ("bleu", "chrf")


@dataclass(frozen=True)
class Config:
    model_dir: str
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = ""

    def __post_init__(self) -> None:
        metric = self.train.early_stopping_metric
        if metric not in ("loss", "ppl") and metric not in self.eval.metrics:
            raise ConfigError(
                f"train.early_stopping_metric: {metric!r} is not computed; "
                f"add it to eval.metrics {list(self.eval.metrics)} or use loss"
            )
        if self.model.share_embeddings and not self.data.shared_vocab:
            raise ConfigError("model.share_embeddings: needs data.shared_vocab: true (one vocabulary)")
        if self.data.dev is None and (
            self.train.early_stopping_patience > 0 or self.train.schedule == "plateau"
        ):
            raise ConfigError("data.dev: early stopping and the plateau schedule need a dev set")


# --------------------------------------------------------------------------- loading


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _FieldError(key, message)


class _FieldError(ValueError):
    """Raised by __post_init__ checks; `_build` prefixes the section's dotted path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read and validate a YAML config; `overrides` are ``dotted.key=value`` strings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return config_from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each ``a.b.c=value`` set (value parsed as YAML)."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return raw


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
    (`where`, e.g. "decode", names the section in errors)."""
    return _build(type(section), config_to_dict(section) | changes, where)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), "utf-8")


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from mapping `raw`; `where` is the dotted path for errors."""
    label = where or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a mapping of keys, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{_join(where, key)}: unknown key{hint}; allowed keys: {sorted(fields)}")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _convert(hints[name], raw[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: missing required key")
    try:
        return cls(**values)
    except _FieldError as e:
        raise ConfigError(f"{_join(where, e.key)}: {e}") from None
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{label}: {e}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {_show(value)} is not allowed; allowed values: {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"{where}: unsupported config type {tp}")  # a bug in this module


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"
