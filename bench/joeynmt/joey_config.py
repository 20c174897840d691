"""aligna config -> JoeyNMT 2.3.0 config: what JoeyNMT is given to train and decode as aligna does.

The data JoeyNMT reads (aligna's training pairs, dev and test text, vocabularies and
sentencepiece models, under runs/peer/work/NAME-HASH/), its batch size (matched to aligna's
batches), its one output length limit, and its config: model, training, testing. Whatever
JoeyNMT cannot express raises `Unsupported`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import torch
import yaml

from aligna.config import (
    Config,
    DataConfig,
    DecodeConfig,
    ModelConfig,
    TokenizerConfig,
    TrainConfig,
    config_to_dict,
    load_config,
)
from aligna.data import Examples, ParallelText, Pipeline, encode_pairs, epoch_batches, read_parallel
from aligna.modeldir import CONFIG
from aligna.vocab import SPECIALS, VOCAB_FILE, Vocabulary
from bench.common import ROOT

PEER = ROOT / "runs" / "peer"
JOEYNMT = "2.3.0"
TOK_BLEU = {"tokenize": "none", "lowercase": True, "force": True}  # aligna's tok_bleu


class Unsupported(ValueError):
    """An aligna setting that JoeyNMT cannot express."""


def rel(path: Path) -> str:
    """`path` relative to the repository root when it lies inside it (configs stay short)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --------------------------------------------------------------------------- the data JoeyNMT reads


@dataclass
class Workspace:
    """runs/peer/work/NAME-HASH/: PREFIX.LANG plain text (train, dev, test), JoeyNMT
    vocabulary files and sentencepiece models, all from aligna's data pipeline."""

    dir: Path
    pipeline: Pipeline
    pipeline_source: str
    examples: Examples  # the training pairs aligna keeps
    src_vocab: Path
    tgt_vocab: Path

    def spm_model(self, side: str) -> Path | None:
        path = self.dir / f"{side}.spm.model"
        return path if path.is_file() else None


def data_hash(data: DataConfig) -> str:
    return hashlib.sha256(json.dumps(config_to_dict(data), sort_keys=True).encode()).hexdigest()[:12]


def write_split(prefix: Path, data: DataConfig, src: Sequence[str], tgt: Sequence[str]) -> None:
    """PREFIX.SRC_LANG and PREFIX.TGT_LANG, one sentence a line, whitespace normalized (JoeyNMT
    splits words on single spaces and lines with str.splitlines, and drops empty lines)."""
    for lang, lines in ((data.src_lang, src), (data.tgt_lang, tgt)):
        clean = [" ".join(line.split()) for line in lines]
        if not all(clean):
            raise Unsupported(
                f"{prefix.name}: line {clean.index('') + 1} is empty; JoeyNMT would misalign it"
            )
        prefix.with_name(f"{prefix.name}.{lang}").write_text("\n".join(clean) + "\n", encoding="utf-8")


def write_vocab(vocab: Vocabulary, path: Path) -> Path:
    """A JoeyNMT voc_file: aligna's tokens in aligna's order, without aligna's specials."""
    path.write_text("".join(t + "\n" for t in vocab.itos[len(SPECIALS) :]), encoding="utf-8")
    return path


def same_vocabulary(model_dir: Path, data: DataConfig) -> bool:
    """Does `model_dir` hold an aligna model whose vocabularies `data` would rebuild?"""
    if not ((model_dir / CONFIG).is_file() and (model_dir / VOCAB_FILE.format(side="tgt")).is_file()):
        return False
    saved = load_config(model_dir / CONFIG).data
    return all(
        getattr(saved, k) == getattr(data, k)
        for k in ("train", "src_tokenizer", "tgt_tokenizer", "shared_vocab")
    )


def load_pipeline(config: Config, train: ParallelText, work: Path) -> tuple[Pipeline, str]:
    """aligna's tokenizers and vocabularies: the trained model's, an earlier copy, or new."""
    model_dir = Path(config.model_dir)
    if same_vocabulary(model_dir, config.data):
        pipeline, source = Pipeline.load(model_dir), f"{config.model_dir} (the aligna model's own)"
    elif (work / VOCAB_FILE.format(side="tgt")).is_file():
        return Pipeline.load(work), f"{rel(work)} (saved by an earlier run of this script)"
    else:
        pipeline = Pipeline.build(config.data, train)
        source = "rebuilt by aligna's Pipeline.build (the code and options of aligna train)"
    pipeline.save(work)
    return pipeline, source


def prepare_workspace(config: Config) -> Workspace:
    data = config.data
    work = PEER / "work" / f"{config.name or 'config'}-{data_hash(data)}"
    work.mkdir(parents=True, exist_ok=True)
    train = read_parallel(data.train, "train")
    pipeline, source = load_pipeline(config, train, work)
    examples = encode_pairs(pipeline, train, data.max_len, data.too_long, "train")
    write_split(
        work / "train", data, [train.src[i] for i in examples.line], [train.tgt[i] for i in examples.line]
    )
    for split in ("dev", "test"):
        corpus = getattr(data, split)
        if corpus is not None:
            text = read_parallel(corpus, split)
            write_split(work / split, data, text.src, text.tgt)
    if data.shared_vocab:
        src_vocab = tgt_vocab = write_vocab(pipeline.src_vocab, work / "joey_vocab.txt")
    else:
        src_vocab = write_vocab(pipeline.src_vocab, work / "joey_src_vocab.txt")
        tgt_vocab = write_vocab(pipeline.tgt_vocab, work / "joey_tgt_vocab.txt")
    return Workspace(work, pipeline, source, examples, src_vocab, tgt_vocab)


# --------------------------------------------------------------------------- batch sizes


def aligna_batch_tokens(examples: Examples, batch_tokens: int, seed: int) -> list[int]:
    """Target tokens (<eos> included) of each batch of aligna's first epoch."""
    return [sum(len(examples.tgt[i]) - 1 for i in b) for b in epoch_batches(examples, batch_tokens, seed, 0)]


def joey_batch_tokens(src: Sequence[int], tgt: Sequence[int], batch_size: int, seed: int) -> list[int]:
    """Target tokens (<eos> included) of each batch JoeyNMT's TokenBatchSampler draws in an
    epoch: sentences in random order, a batch closes once sentences x longest (source + 1
    or target + 1) reaches `batch_size`."""
    order = torch.randperm(len(src), generator=torch.Generator().manual_seed(seed)).tolist()
    batches, tokens, longest, count = [], 0, 0, 0
    for i in order:
        longest, tokens, count = max(longest, src[i] + 1, tgt[i] + 1), tokens + tgt[i] + 1, count + 1
        if longest * count >= batch_size:
            batches.append(tokens)
            tokens, longest, count = 0, 0, 0
    return batches + ([tokens] if count else [])


def match_batches(examples: Examples, cfg: TrainConfig, rule: str) -> dict[str, Any]:
    """JoeyNMT's batch_size: aligna's number (nominal), or the smallest one whose batches
    hold at least as many target tokens on average as aligna's (matched)."""
    src, tgt = [len(s) for s in examples.src], [len(t) - 2 for t in examples.tgt]
    aligna_batches = aligna_batch_tokens(examples, cfg.batch_tokens, cfg.seed)
    target = mean(aligna_batches)
    size = cfg.batch_tokens
    if rule == "matched":
        low, high = 1, 16 * cfg.batch_tokens
        while low < high:  # the mean grows with batch_size
            middle = (low + high) // 2
            if mean(joey_batch_tokens(src, tgt, middle, cfg.seed + 1)) < target:
                low = middle + 1
            else:
                high = middle
        size = low
    joey_batches = joey_batch_tokens(src, tgt, size, cfg.seed + 1)
    return {
        "rule": rule,
        "aligna_batch_tokens": cfg.batch_tokens,
        "aligna_batches_per_epoch": len(aligna_batches),
        "aligna_mean_target_tokens_per_batch": target,
        "joeynmt_batch_size": size,
        "joeynmt_batches_per_epoch": len(joey_batches),
        "joeynmt_mean_target_tokens_per_batch": mean(joey_batches),
    }


def joey_max_output_length(pipeline: Pipeline, sources: Sequence[str], decode: DecodeConfig) -> int:
    """JoeyNMT's one length limit: the largest of aligna's a * |x| + b over `sources`."""
    return max(int(decode.max_len_a * len(pipeline.src_ids(s)) + decode.max_len_b) for s in sources)


# --------------------------------------------------------------------------- the JoeyNMT config


def joey_side(lang: str, tok: TokenizerConfig, vocab: Path, spm_model: Path | None) -> dict[str, Any]:
    side = {
        "lang": lang,
        "lowercase": tok.lowercase,
        "normalize": False,
        "max_length": -1,
        "voc_file": rel(vocab),
    }
    if tok.type in ("word", "char"):
        return side | {"level": tok.type}
    assert spm_model is not None  # bpe and unigram: aligna saved the sentencepiece model
    return side | {
        "level": "bpe",
        "tokenizer_type": "sentencepiece",
        "tokenizer_cfg": {"model_file": rel(spm_model)},
    }


def joey_data(config: Config, ws: Workspace, splits: Sequence[str], dev_subset: int) -> dict[str, Any]:
    d = config.data
    out: dict[str, Any] = {split: rel(ws.dir / split) for split in splits}
    out |= {
        "dataset_type": "plain",
        "src": joey_side(d.src_lang, d.src_tokenizer, ws.src_vocab, ws.spm_model("src")),
        "trg": joey_side(d.tgt_lang, d.tgt_tokenizer, ws.tgt_vocab, ws.spm_model("tgt")),
    }
    return out | ({"sample_dev_subset": dev_subset} if dev_subset else {})


def joey_transformer(m: ModelConfig) -> dict[str, Any]:
    t = m.transformer
    if t.positions != "sinusoidal":
        raise Unsupported("model.transformer.positions: JoeyNMT has sinusoidal positions only")

    def stack(layers: int) -> dict[str, Any]:
        return {
            "type": "transformer", "num_layers": layers, "num_heads": t.heads, "hidden_size": m.emb_dim,
            "ff_size": t.ff_size, "dropout": m.dropout, "layer_norm": "pre" if t.pre_norm else "post",
            "activation": t.activation,
            "embeddings": {"embedding_dim": m.emb_dim, "scale": t.scale_embeddings, "dropout": m.dropout},
        }  # fmt: skip

    return {
        "initializer": "xavier_uniform", "bias_initializer": "zeros",
        "embed_initializer": "normal", "embed_init_weight": m.emb_dim**-0.5,  # aligna's N(0, d^-1/2)
        "tied_embeddings": m.share_embeddings, "tied_softmax": m.tie_embeddings,
        "encoder": stack(m.encoder_layers), "decoder": stack(m.decoder_layers),
    }  # fmt: skip


def joey_rnn(m: ModelConfig) -> dict[str, Any]:
    r = m.rnn
    scorer = {"bahdanau": "bahdanau", "concat": "bahdanau", "general": "luong"}.get(r.attention)
    if scorer is None:
        raise Unsupported(f"model.rnn.attention {r.attention!r}: JoeyNMT's RNN decoder attends with "
                          "bahdanau (additive) or luong (general) scores only")  # fmt: skip
    if not r.bidirectional:
        raise Unsupported("model.rnn.bidirectional: JoeyNMT's RNN encoder needs two directions")
    if r.attention_size not in (0, m.hidden_size):
        raise Unsupported("model.rnn.attention_size: JoeyNMT's additive attention has hidden_size units")
    if m.tie_embeddings and m.emb_dim != m.hidden_size:
        raise Unsupported("model.tie_embeddings: JoeyNMT's RNN decoder ties only when emb_dim == hidden_size")
    bound = m.hidden_size**-0.5  # torch's default init of RNN weights, uniform(-1/sqrt(H), 1/sqrt(H))

    def embeddings() -> dict[str, Any]:
        return {"embedding_dim": m.emb_dim, "scale": False, "dropout": m.dropout}

    return {
        "initializer": "uniform", "init_weight": bound, "bias_initializer": "uniform", "bias_init_weight": bound,
        "embed_initializer": "normal", "embed_init_weight": 1.0,  # torch's nn.Embedding default
        "tied_embeddings": m.share_embeddings, "tied_softmax": m.tie_embeddings,
        "encoder": {
            "type": "recurrent", "rnn_type": r.cell, "embeddings": embeddings(), "hidden_size": m.hidden_size,
            "bidirectional": True, "dropout": m.dropout, "num_layers": m.encoder_layers,
        },
        "decoder": {
            "type": "recurrent", "rnn_type": r.cell, "embeddings": embeddings(), "hidden_size": m.hidden_size,
            "dropout": m.dropout, "hidden_dropout": m.dropout, "num_layers": m.decoder_layers,
            "attention": scorer, "input_feeding": r.attention == "bahdanau" or r.input_feeding,  # c_t into the GRU
            "init_hidden": "bridge",
        },
    }  # fmt: skip


def joey_model(m: ModelConfig) -> dict[str, Any]:
    return joey_transformer(m) if m.arch == "transformer" else joey_rnn(m)


def check_comparable(config: Config) -> None:
    """Raise Unsupported for what JoeyNMT cannot express, before any work is done."""
    joey_model(config.model), joey_schedule(config.train), joey_metric(config.train)
    if config.train.teacher_forcing < 1:
        raise Unsupported("train.teacher_forcing < 1: JoeyNMT has no scheduled sampling")
    if config.data.too_long != "filter":
        raise Unsupported("data.too_long: JoeyNMT can filter long pairs but not truncate them")
    if config.data.src_lang == config.data.tgt_lang:
        raise Unsupported("data.src_lang and data.tgt_lang must differ: JoeyNMT names its files by them")


def check_trains_alike(config: Config) -> None:
    """Before training both sides: JoeyNMT's fp16 is CUDA autocast only, so on the CPU both
    must run fp32. (Decoding, and the record of runs made before, only state precision.)"""
    if config.train.precision != "fp32" and config.train.device != "cuda":
        raise Unsupported("train.precision: JoeyNMT has no CPU mixed precision; compare with fp32")


def joey_schedule(cfg: TrainConfig) -> dict[str, Any]:
    """JoeyNMT's learning-rate schedule; learning_rate_min is where JoeyNMT stops training."""
    if cfg.schedule == "inverse_sqrt":
        return {"scheduling": "warmupinversesquareroot", "learning_rate_warmup": max(cfg.warmup_steps, 1),
                "learning_rate_min": 1e-8}  # fmt: skip
    if cfg.schedule == "constant" and not cfg.warmup_steps:  # decay by 1.0 each epoch
        return {"scheduling": "exponential", "decrease_factor": 1.0, "learning_rate_min": 1e-8}
    # JoeyNMT 2.3.0's warmupexponentialdecay omits the optimizer and its plateau passes
    # verbose=, which torch 2.13 no longer takes: both fail when built.
    raise Unsupported(f"train.schedule {cfg.schedule!r} with warmup_steps {cfg.warmup_steps}: JoeyNMT "
                      "2.3.0 runs inverse_sqrt and a constant rate without warmup only")  # fmt: skip


def joey_metric(cfg: TrainConfig) -> str:
    metric = {"tok_bleu": "bleu", "bleu": "bleu", "chrf": "chrf", "loss": "loss", "ppl": "ppl"}.get(
        cfg.early_stopping_metric
    )
    if metric is None:
        raise Unsupported(
            f"train.early_stopping_metric {cfg.early_stopping_metric!r} has no JoeyNMT counterpart"
        )
    return metric


def joey_training(
    cfg: TrainConfig, batch_size: int, epochs: int, updates: int, validation_freq: int, overwrite: bool
) -> dict[str, Any]:
    out = {
        "optimizer": cfg.optimizer, "adam_betas": list(cfg.betas), "learning_rate": cfg.lr,
        "weight_decay": cfg.weight_decay, **joey_schedule(cfg),
        "loss": "crossentropy", "label_smoothing": cfg.label_smoothing, "normalization": "tokens",
        "batch_type": "token", "batch_size": batch_size, "batch_multiplier": 1, "shuffle": True,
        "epochs": epochs, "validation_freq": validation_freq, "logging_freq": math.gcd(validation_freq, 10),
        "early_stopping_metric": joey_metric(cfg), "keep_best_ckpts": cfg.keep_checkpoints,
        "print_valid_sents": [0], "overwrite": overwrite,
    }  # fmt: skip
    if cfg.clip_grad_norm > 0:
        out["clip_grad_norm"] = cfg.clip_grad_norm
    return out | ({"updates": updates} if updates else {})


def joey_testing(decode: DecodeConfig, max_output_length: int, metric: str) -> dict[str, Any]:
    return {
        "batch_size": decode.batch_size, "batch_type": "sentence", "beam_size": 1, "beam_alpha": decode.alpha,
        "n_best": 1, "max_output_length": max_output_length, "min_output_length": decode.min_len,
        "eval_metrics": ["bleu", "chrf"] if metric == "chrf" else ["bleu"], "sacrebleu_cfg": TOK_BLEU,
        "generate_unk": True, "return_prob": "none",
    }  # fmt: skip


def joey_config(
    config: Config, ws: Workspace, model_dir: Path, *, splits: Sequence[str], batch_size: int, epochs: int,
    updates: int = 0, validation_freq: int, max_output_length: int, device: str, dev_subset: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The JoeyNMT 2.3.0 config of `config`'s model, data and training."""
    return {
        "name": config.name or "aligna_peer", "joeynmt_version": JOEYNMT, "model_dir": rel(model_dir),
        "use_cuda": device.startswith("cuda"), "fp16": False, "random_seed": config.train.seed,
        "data": joey_data(config, ws, splits, dev_subset),
        "training": joey_training(config.train, batch_size, epochs, updates, validation_freq, overwrite),
        "testing": joey_testing(config.decode, max_output_length, joey_metric(config.train)),
        "model": joey_model(config.model),
    }  # fmt: skip


def write_yaml(data: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def joey_translate_config(
    trained: dict[str, Any], joey_dir: Path, test: Path, max_output_length: int, min_len: int, device: str
) -> dict[str, Any]:
    """A trained JoeyNMT model's config, reading its own vocabularies and sentencepiece
    models, decoding `test` with no length penalty."""
    cfg = copy.deepcopy(trained)
    cfg |= {"model_dir": rel(joey_dir), "use_cuda": device.startswith("cuda")}
    data = cfg["data"]
    for key in ("train", "dev", "sample_dev_subset"):
        data.pop(key, None)
    data["test"] = rel(test)
    for side, vocab in (("src", "src_vocab.txt"), ("trg", "trg_vocab.txt")):
        data[side]["voc_file"] = rel(joey_dir / vocab)
        tokenizer = data[side].get("tokenizer_cfg", {})
        if "model_file" in tokenizer:  # JoeyNMT copied it into the model directory
            tokenizer["model_file"] = rel(joey_dir / Path(tokenizer["model_file"]).name)
    cfg["testing"] |= {
        "max_output_length": max_output_length,
        "beam_alpha": 0.0,
        "min_output_length": min_len,
    }
    return cfg
