"""Peer benchmark: aligna against JoeyNMT 2.3.0 with the same model size, data and batches.

    python bench/joeynmt_peer.py train-speed configs/multi30k_de_en_transformer.yaml [--steps 30] [--threads 2]
    python bench/joeynmt_peer.py train configs/multi30k_de_en_transformer.yaml [--max-steps N] [--overwrite]
    python bench/joeynmt_peer.py train CONFIG --existing runs/peer/joeynmt/NAME   # curve of a run made before
    python bench/joeynmt_peer.py translate-speed configs/multi30k_de_en_transformer.yaml \\
        [--joey-model runs/peer/joeynmt/multi30k_de_en_transformer] [--batch-sizes 1 16 64] [--beams 1 5] \\
        [--precisions fp32 bf16]
    ... --venv /work/joey_venv     # use this JoeyNMT virtualenv (default runs/peer/joeynmt-venv, made if missing)
    ... --set train.batch_tokens=2000 --name tmp_try   # aligna config overrides; record name

Run from the repository root with aligna's venv. aligna runs in this process; JoeyNMT runs in
its own virtualenv through bench/peer_joeynmt_driver.py. The JoeyNMT config is derived from
the aligna config (`joey_config`) and everything JoeyNMT reads is written under
runs/peer/work/NAME-HASH/. Records go to bench/results/peer_joeynmt_{train_speed,train,
translate_speed}_NAME.json.

- train-speed: --steps timed updates after --warmup untimed ones, on the first batches of
  epoch 1, for each side. Timed: the update alone (forward, loss, backward, clipping,
  optimizer and scheduler step) with its batch already built: aligna through
  bench/train_speed.py `measure`, JoeyNMT by the driver calling TrainManager's own step code.
  JoeyNMT's time to fetch each batch from its DataLoader (sampling, tokenizing, collating)
  is reported apart. Target tokens count non-pad target tokens, <eos> included, on both.
- train: full JoeyNMT training into runs/peer/joeynmt/NAME/. The record has the dev BLEU
  (tok_bleu) of every validation against `seconds` since the training loop started (JoeyNMT's
  "EPOCH 1" log line; validation time included) and `train_seconds` (validation left out:
  the driver logs each validation's duration), and the same curve of the aligna run in the
  config's model_dir when there is one (`seconds` since its "training: N batches per epoch"
  log line, `train_seconds` from the validation history in its latest checkpoint).
- translate-speed: decodes data.test with aligna's trained model (config.model_dir, best
  weights) and a trained JoeyNMT model, for each (beam, batch size): seconds without model
  loading (tokenizing and detokenizing included), sentences/s, output tokens/s, tok_bleu;
  aligna in each of --precisions (fp32, bf16 autocast, int8 weights), JoeyNMT in fp32 (its only
  CPU mode).

Made equal: the training pairs (those aligna keeps after its max_len filter, whitespace
normalized), the vocabularies (aligna's own, written as JoeyNMT voc_files: taken from
config.model_dir when it holds a model with the same data settings, else rebuilt with
aligna's Pipeline.build, which trains the same sentencepiece model), the sentencepiece model
file, the model sizes, optimizer, betas, weight decay, peak learning rate and warmup,
gradient-norm clipping, label smoothing, loss per target token, seed, fp32, greedy
validation with 64 sentences per batch, tok_bleu (sacrebleu tokenize=none, lowercase), no
length penalty and no minimum length in translate-speed, threads (--threads).

What still differs:

Data and vocabulary
- JoeyNMT puts its own specials first (<unk> <pad> <s> </s>): same tokens and sizes, other ids.
- JoeyNMT's venv has sentencepiece 0.2.1 (JoeyNMT 2.3.0 needs an API that 0.2.2 removed);
  it reads the same model file.
- BPE: JoeyNMT restricts sentencepiece to the vocabulary (SetVocabulary), so a piece never seen
  in training is split into known pieces; aligna maps it to <unk>. Rare on dev and test.
- JoeyNMT tokenizes each sentence whenever a batch is drawn (twice: sampler and collate);
  aligna once before training.
Batching
- aligna sorts sentences into length buckets and fills a batch while sentences x longest
  sentence (either side) stays within batch_tokens. JoeyNMT has no buckets: sentences in random
  order join a batch until sentences x longest (source + 1 or target + 1) reaches batch_size,
  the crossing sentence included, so its batches carry far more padding. --joey-batch matched
  (default) picks JoeyNMT's batch_size by simulating its sampler on the same lengths so that the
  mean number of real target tokens per update equals aligna's (so also the updates per epoch;
  about twice aligna's number on Multi30k); --joey-batch nominal gives it aligna's number.
  Both numbers and the per-update means are in every record.
Transformer
- JoeyNMT has one dropout per stack: 0.3 also on attention weights and inside the
  feed-forward network, where aligna uses attention_dropout and activation_dropout (0.1).
- JoeyNMT's output layer has no bias; its LayerNorms use eps 1e-6 (aligna 1e-5).
- Init: xavier_uniform matrices and N(0, d_model^-1/2) embeddings on both; JoeyNMT zeroes
  the biases, aligna keeps torch's default bias init.
RNN with attention (multi30k_de_en_bahdanau)
- JoeyNMT's recurrent decoder always attends after the recurrence (Luong's layout), whatever
  the scorer: s_t = GRU([E y_{t-1}; h~_{t-1}], s_{t-1}) (input feeding), c_t = attention with
  query s_t, h~_t = tanh(W [s_t; c_t]), logits = W_o h~_t. aligna's Bahdanau decoder queries
  with s_{t-1}, feeds c_t into the GRU and predicts from [s_t; c_t; E y_{t-1}]. The additive
  scorer, the sizes (embeddings 256, biGRU 512 encoder, GRU 512 decoder, attention 512) and the
  tanh bridge from the final encoder states are the same; the parameter counts differ (both
  in the records; 13.0M JoeyNMT vs 20.6M aligna, mostly aligna's wider output layer). Dropout 0.5 acts on JoeyNMT's [E y; h~] input and on [s_t; c_t] before W.
  (aligna's concat and general scorers use the Luong layout, as JoeyNMT does.)
- Init: JoeyNMT uniform(+-1/sqrt(hidden)) weights and biases and N(0, 1) embeddings, near
  torch's defaults, which aligna keeps (an LSTM also gets JoeyNMT's forget-gate bias 1).
- JoeyNMT needs a bidirectional encoder and a decoder with attention (bahdanau, general or
  concat); tied output embeddings need emb_dim == hidden_size there.
Training
- Label smoothing: JoeyNMT gives eps/(V-2) to every non-gold, non-pad token (KL divergence
  against a materialized tokens x V distribution); aligna eps/V to every token.
- Learning rate: JoeyNMT steps its scheduler after each update, so update 1 runs at the peak
  learning_rate and update n at the rate of step n-1. A constant rate is JoeyNMT's
  exponential schedule with decay 1.0. learning_rate_min is 1e-8 so that JoeyNMT's stop on a
  low rate never fires during warmup. aligna's plateau schedule and a constant rate with
  warmup have no working JoeyNMT 2.3.0 counterpart (its plateau and warmupexponentialdecay
  schedulers fail to build with torch 2.13).
- JoeyNMT has no early stopping: it trains all epochs (or --max-steps); aligna stops after
  early_stopping_patience validations without improvement.
- aligna validates once per epoch (validate_every 0); JoeyNMT every validation_freq updates:
  its updates in epoch 1 as simulated (or --validate-every); later epochs may differ by one.
- aligna computes dev loss, ppl, tok_bleu, bleu, chrF and saves a checkpoint at every
  validation (safetensors); JoeyNMT computes loss, ppl, accuracy and BLEU and saves (torch.save,
  with the optimizer) only validations among its keep_best_ckpts best.
- Teacher forcing below 1 (scheduled sampling) and bf16/fp16 have no JoeyNMT counterpart here.
Decoding
- Length limit: aligna a * |x| + b tokens per sentence (<eos> included, decode.max_len_a/b);
  JoeyNMT one max_output_length for all sentences, set to the largest a * |x| + b over the
  sentences decoded: never shorter, and longer for a short sentence that never ends.
- JoeyNMT keeps its batches in file order; aligna sorts by length before batching.
- Beam search: aligna ends a sentence when it has k finished hypotheses (or its limit),
  JoeyNMT when all k live beams end in <eos>. JoeyNMT never emits <s> or <pad> and turns an
  empty output into <unk>; aligna returns "".
- JoeyNMT's Transformer decoder recomputes the whole prefix at every step; aligna keeps a
  key/value cache.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from statistics import mean
from typing import Any

import sacrebleu
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, config_hash, machine, write_record  # noqa: E402
from train_speed import measure  # noqa: E402

import aligna  # noqa: E402
from aligna.config import (  # noqa: E402
    Config,
    DataConfig,
    DecodeConfig,
    ModelConfig,
    TokenizerConfig,
    TrainConfig,
    config_to_dict,
    load_config,
    save_config,
)
from aligna.data import Examples, ParallelText, Pipeline, encode_pairs, epoch_batches, read_parallel  # noqa: E402
from aligna.modeldir import BEST, CONFIG, TRAIN_LOG, ModelDir  # noqa: E402
from aligna.plotting import plot_lines  # noqa: E402
from aligna.translate import Translator  # noqa: E402
from aligna.vocab import (  # noqa: E402
    SPECIALS,
    VOCAB_FILE,  # noqa: E402
    Vocabulary,
)

PEER = ROOT / "runs" / "peer"
DRIVER = Path(__file__).resolve().with_name("peer_joeynmt_driver.py")
RESULT_PREFIX = "PEER_RESULT "  # the driver's result line (peer_joeynmt_driver.RESULT_PREFIX)
JOEYNMT, TORCH = "2.3.0", "2.13.0"
TOK_BLEU = {"tokenize": "none", "lowercase": True, "force": True}  # aligna's tok_bleu


class Unsupported(ValueError):
    """An aligna setting that JoeyNMT cannot express."""


def rel(path: Path) -> str:
    """`path` relative to the repository root when it lies inside it (configs stay short)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --------------------------------------------------------------------------- JoeyNMT's venv


def joeynmt_version(python: Path) -> str | None:
    """The JoeyNMT version that `python` can import and train with, or None."""
    probe = (
        "import importlib.metadata as m, joeynmt.training, sentencepiece as s; "
        "assert hasattr(s.SentencePieceProcessor, 'SetVocabulary'); print(m.version('joeynmt'))"
    )
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_venv(venv: Path) -> Path:
    """The python of a virtualenv with JoeyNMT 2.3.0, made (or completed) if needed."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} for JoeyNMT {JOEYNMT}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if joeynmt_version(python) != JOEYNMT:
        print(f"{venv}: installing torch=={TORCH} and joeynmt=={JOEYNMT}")
        pip = str(venv / "bin" / "pip")
        subprocess.run([pip, "install", f"torch=={TORCH}"], check=True)
        # JoeyNMT 2.3.0 imports importlib_metadata without declaring it, and calls
        # SentencePieceProcessor.SetVocabulary, which sentencepiece 0.2.2 removed.
        requirements = [f"joeynmt=={JOEYNMT}", "importlib-metadata", "sentencepiece<0.2.2"]
        subprocess.run([pip, "install", *requirements], check=True)
        if joeynmt_version(python) != JOEYNMT:
            raise SystemExit(f"{venv}: JoeyNMT {JOEYNMT} still does not import")
    return python


def run_driver(
    python: Path, command: str, config: Path, options: Sequence[str], threads: int, log: Path
) -> dict[str, Any]:
    """Run one driver command in JoeyNMT's venv; its log (stderr) goes to `log`."""
    cmd = [str(python), str(DRIVER), command, rel(config), *options]
    env = dict(os.environ)
    if threads:
        cmd += ["--threads", str(threads)]
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("w", encoding="utf-8") as stderr:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8").splitlines()[-25:])
        raise SystemExit(f"JoeyNMT failed (exit {done.returncode}): {' '.join(cmd)}\n{tail}\nlog: {rel(log)}")
    results = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not results:
        raise SystemExit(f"JoeyNMT printed no result: {' '.join(cmd)}; log: {rel(log)}")
    return json.loads(results[-1].removeprefix(RESULT_PREFIX))


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


# --------------------------------------------------------------------------- logs -> curves


def stamped(log: Path) -> list[tuple[float, str]]:
    """(unix time, rest of line) of every line of a Python log that starts with its asctime."""
    out = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            out.append((datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp(), line[24:]))
        except ValueError:
            continue
    return out


def joey_curve(model_dir: Path) -> dict[str, Any]:
    """Dev tok_bleu of each validation (validations.txt) against seconds since JoeyNMT's
    "EPOCH 1" line: `seconds` of wall clock when the validation ended, `train_seconds` the
    same less all validation time (the driver logs each validation's duration)."""
    lines = stamped(model_dir / "train.log")
    start = next(t for t, text in lines if text.endswith(" - EPOCH 1"))
    rows = [dict(f.split(": ", 1) for f in line.split("\t") if ": " in f)
            for line in (model_dir / "validations.txt").read_text(encoding="utf-8").splitlines()]  # fmt: skip
    bleu = {int(r["Steps"]): float(r["bleu"]) for r in rows}
    points, validating = [], 0.0
    for t, text in lines:
        found = re.search(r"peer driver: validation at step (\d+) took ([\d.]+) s", text)
        if found:
            step, validating = int(found.group(1)), validating + float(found.group(2))
            points.append({"step": step, "seconds": t - start, "train_seconds": t - start - validating,
                           "tok_bleu": bleu[step]})  # fmt: skip
    log = "\n".join(text for _, text in lines)
    saved = re.findall(r"Checkpoint saved in .*?(\d+)\.ckpt", log)
    params = re.search(r"Total params: (\d+)", log)
    epochs = re.findall(r" - EPOCH (\d+)$", log, flags=re.M)
    return {
        "setup_seconds": start - lines[0][0],  # reading data, vocabularies, building the model
        "loop_seconds": lines[-1][0] - start,  # training and validation
        "validation_seconds": validating,
        "steps": int(saved[-1]) if saved else None,
        "epochs": int(epochs[-1]) if epochs else None,
        "parameters": int(params.group(1)) if params else None,
        "points": points,
        "best": max(points, key=lambda p: p["tok_bleu"]) if points else None,
    }


def aligna_curve(model_dir: Path, config: Config) -> dict[str, Any] | None:
    """The same curve for an aligna run: `seconds` from its train.log (since the "training:"
    line), `train_seconds` from the validation history of its latest checkpoint, where the
    trainer records it. `same_config`: was that run trained with `config`?"""
    log = model_dir / TRAIN_LOG
    if not log.is_file():
        return None
    lines = stamped(log)
    starts = [t for t, text in lines if text.startswith("INFO training: ")]
    if not starts:
        return None
    state = ModelDir(model_dir).trainer_state()
    train_seconds = {h["step"]: h.get("train_seconds") for h in state.get("history") or []}
    points = []
    for t, text in lines:
        found = re.match(r"INFO step (\d+) dev: (.*)", text)
        if found:
            step, values = int(found.group(1)), dict(re.findall(r"(\w+)=(\S+)", found.group(2)))
            points.append({"step": step, "seconds": t - starts[0], "train_seconds": train_seconds.get(step),
                           "tok_bleu": float(values["tok_bleu"]) if "tok_bleu" in values else None})  # fmt: skip
    ends = [t for t, text in lines if text.startswith("INFO trained ")]
    scored = [p for p in points if p["tok_bleu"] is not None]
    saved = model_dir / CONFIG
    return {
        "model_dir": rel(model_dir),
        "same_config": saved.is_file() and config_hash(load_config(saved)) == config_hash(config),
        "finished": bool(ends),
        "resumed": len(starts) > 1,  # then `seconds` include the pause
        "loop_seconds": ends[-1] - starts[0] if ends else None,
        "points": points,
        "best": max(scored, key=lambda p: p["tok_bleu"]) if scored else None,
    }


# --------------------------------------------------------------------------- sub-commands


def config_name(config: Config, path: str) -> str:
    return config.name or Path(path).stem


def train_speed_command(args: argparse.Namespace, config: Config, python: Path) -> None:
    check_trains_alike(config)
    ws = prepare_workspace(config)
    batching = match_batches(ws.examples, config.train, args.joey_batch)
    with tempfile.TemporaryDirectory(dir=ws.dir, prefix="speed-") as tmp:
        save_config(config, Path(tmp) / "aligna.yaml")  # measure() reads a config file
        aligna_run = measure(str(Path(tmp) / "aligna.yaml"), args.steps, args.warmup, args.device)
        aligna_run["config"] = args.config
        cfg = joey_config(
            config, ws, Path(tmp) / "joeynmt", splits=["train"], batch_size=batching["joeynmt_batch_size"],
            epochs=1, validation_freq=10**9, max_output_length=config.data.max_len, device=args.device,
        )  # fmt: skip
        joey = run_driver(python, "speed", write_yaml(cfg, Path(tmp) / "joeynmt.yaml"),
                          ["--steps", str(args.steps), "--warmup", str(args.warmup)], args.threads,
                          ws.dir / "train_speed.log")  # fmt: skip
    ratio = aligna_run["target_tokens_per_s"] / joey["target_tokens_per_s"]
    print(f"\n{'target tokens/s':>36} {'tokens':>8} {'seconds':>8} {'parameters':>11}")
    print(f"{'aligna, update':<22}{aligna_run['target_tokens_per_s']:>14,.0f} {aligna_run['target_tokens']:>8} "
          f"{aligna_run['seconds']:>8.2f} {aligna_run['parameters']:>11,}")  # fmt: skip
    print(f"{'JoeyNMT, update':<22}{joey['target_tokens_per_s']:>14,.0f} {joey['target_tokens']:>8} "
          f"{joey['seconds']:>8.2f} {joey['parameters']:>11,}")  # fmt: skip
    print(f"{'JoeyNMT, update + data':<22}{joey['with_data_target_tokens_per_s']:>14,.0f}")
    print(f"aligna / JoeyNMT (update): {ratio:.2f}x")
    print(f"batches: aligna batch_tokens {batching['aligna_batch_tokens']} "
          f"({batching['aligna_mean_target_tokens_per_batch']:.0f} target tokens on average), JoeyNMT batch_size "
          f"{batching['joeynmt_batch_size']} ({batching['joeynmt_mean_target_tokens_per_batch']:.0f})")  # fmt: skip
    write_record(
        args.name or f"peer_joeynmt_train_speed_{config_name(config, args.config)}",
        {
            "benchmark": "peer_joeynmt_train_speed",
            "config": args.config, "overrides": args.overrides, "config_sha256": config_hash(config),
            "arch": config.model.arch, "device": args.device,
            "threads": {"aligna": torch.get_num_threads(), "joeynmt": joey["torch_threads"]},
            "measured": "target tokens (non-pad, <eos> included) per second of the update alone (forward, "
                        "loss, backward, clipping, optimizer and scheduler step; the batch already built), "
                        f"{args.steps} updates after {args.warmup} untimed, first batches of epoch 1; "
                        "joeynmt.with_data_* adds its DataLoader time (sampling, tokenizing, collating)",
            "batching": batching,
            "aligna": aligna_run,
            "joeynmt": joey,
            "ratio_aligna_over_joeynmt": ratio,
            "joeynmt_config": cfg,
            "vocabulary": ws.pipeline_source,
            "differences": "see the docstring of bench/joeynmt_peer.py",
        },
    )  # fmt: skip


def train_command(args: argparse.Namespace, config: Config, python: Path) -> None:
    if config.data.dev is None:
        raise Unsupported("train needs data.dev: the record is dev BLEU over time")
    if not args.existing:
        check_trains_alike(config)
    name = config_name(config, args.config)
    ws = prepare_workspace(config)
    batching = match_batches(ws.examples, config.train, args.joey_batch)
    if args.existing:  # a JoeyNMT run trained (or stopped) before: its curve, no training
        model_dir = Path(args.existing)
        if not (model_dir / "validations.txt").is_file():
            raise SystemExit(f"{rel(model_dir)}: no JoeyNMT validations.txt there")
        cfg = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8"))
        validation_freq = cfg["training"]["validation_freq"]
        run, process_seconds = {"torch_threads": args.threads or None, "seconds": None}, None
    else:
        model_dir = PEER / "joeynmt" / name
        if model_dir.exists() and not args.overwrite:
            raise SystemExit(f"{rel(model_dir)} exists: pass --overwrite to train it again")
        dev = read_parallel(config.data.dev, "dev")
        validation_freq = args.validate_every or batching["joeynmt_batches_per_epoch"]  # about one epoch
        cfg = joey_config(
            config, ws, model_dir, splits=["train", "dev"], batch_size=batching["joeynmt_batch_size"],
            epochs=args.epochs or config.train.epochs, updates=args.max_steps or config.train.max_steps,
            validation_freq=validation_freq,
            max_output_length=joey_max_output_length(ws.pipeline, dev.src, config.decode),
            device=args.device, dev_subset=args.dev_subset, overwrite=args.overwrite,
        )  # fmt: skip
        path = write_yaml(cfg, ws.dir / f"{name}.train.yaml")
        print(
            f"JoeyNMT trains into {rel(model_dir)} (config {rel(path)}); follow {rel(model_dir / 'train.log')}"
        )
        started = time.time()
        run = run_driver(python, "train", path, [], args.threads, ws.dir / "train.stderr.log")
        process_seconds = time.time() - started
    joey, peer = joey_curve(model_dir), aligna_curve(Path(config.model_dir), config)
    print(
        f"\nJoeyNMT: {joey['steps']} updates, {joey['epochs']} epochs, training loop {joey['loop_seconds']:.0f} s"
    )
    print(f"{'step':>7} {'seconds':>9} {'train_seconds':>13} {'tok_bleu':>8}")
    for p in joey["points"]:
        print(f"{p['step']:>7} {p['seconds']:>9.0f} {p['train_seconds']:>13.0f} {p['tok_bleu']:>8.2f}")
    if peer:
        print(f"aligna ({peer['model_dir']}, same config: {peer['same_config']}, finished: {peer['finished']}): "
              f"best {peer['best']}")  # fmt: skip
    record_name = args.name or f"peer_joeynmt_train_{name}"
    plot = RESULTS / f"{record_name}.png"
    curves = {"JoeyNMT 2.3.0": joey["points"]} | ({"aligna": peer["points"]} if peer else {})
    plot_lines(
        {
            n: ([p["train_seconds"] / 60 for p in ps], [p["tok_bleu"] for p in ps])
            for n, ps in ((n, [p for p in ps if p["train_seconds"] is not None]) for n, ps in curves.items())
        },
        plot, "training minutes (validation not counted)", "dev tok BLEU (greedy)",
        title=f"{name}: time to quality\n{machine()['cpu']}, {run['torch_threads']} thread(s), "
        f"aligna {config.train.precision}, JoeyNMT fp32", categorical=False,
    )  # fmt: skip
    write_record(
        record_name,
        {
            "benchmark": "peer_joeynmt_train",
            "config": args.config, "overrides": args.overrides, "config_sha256": config_hash(config),
            "arch": config.model.arch, "device": args.device, "joeynmt_threads": run["torch_threads"],
            "metric": "tok_bleu on the dev set, greedy: sacrebleu tokenize=none lowercase (both sides)",
            "seconds": "wall clock since the training loop started (JoeyNMT's 'EPOCH 1' log line, aligna's "
                       "'training:' line), validation and checkpoints included; train_seconds: the same "
                       "without validation (JoeyNMT: less each logged validation time; aligna: its "
                       "trainer's train_seconds, update time only)",
            "plot": rel(plot),
            "joeynmt_model_dir": rel(model_dir),
            "joeynmt_existing_run": bool(args.existing),
            "aligna_precision": config.train.precision,
            "joeynmt_process_seconds": process_seconds,
            "joeynmt_train_seconds": run["seconds"],
            "joeynmt": joey,
            "aligna": peer,
            "batching": batching,
            "validation_freq": validation_freq,
            "joeynmt_config": cfg,
            "vocabulary": ws.pipeline_source,
            "differences": "see the docstring of bench/joeynmt_peer.py",
        },
    )  # fmt: skip


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


def aligna_translate(
    translator: Translator, sources: list[str], beam: int, batch_size: int
) -> dict[str, Any]:
    started = time.perf_counter()
    out = translator.translate_detailed(sources, batch_size, beam_size=beam, nbest=1, alpha=0.0, sample=False)
    seconds = time.perf_counter() - started
    return {"beam": beam, "batch_size": batch_size, "seconds": seconds, "sentences": len(out),
            "output_tokens": sum(len(t.tokens) for t in out), "hypotheses": [t.text for t in out]}  # fmt: skip


def speed_row(run: dict[str, Any], references: list[str]) -> dict[str, Any]:
    bleu = sacrebleu.corpus_bleu(run["hypotheses"], [references], tokenize="none", lowercase=True, force=True)
    return {
        "seconds": run["seconds"],
        "sentences_per_s": run["sentences"] / run["seconds"],
        "target_tokens_per_s": run["output_tokens"] / run["seconds"],
        "output_tokens": run["output_tokens"],
        "tok_bleu": bleu.score,
    }


def translate_speed_command(args: argparse.Namespace, config: Config, python: Path) -> None:
    joey_dir = Path(args.joey_model or PEER / "joeynmt" / config_name(config, args.config))
    if not (joey_dir / "config.yaml").is_file():
        raise SystemExit(f"{rel(joey_dir)}: no JoeyNMT model (config.yaml) there")
    if config.data.test is None:
        raise Unsupported(f"{args.config} has no data.test to decode")
    translator = aligna.load(config.model_dir, device=args.device)
    test = read_parallel(config.data.test, "test")
    sources, references = test.src[: args.limit or None], test.tgt[: args.limit or None]
    decode = translator.config.decode
    limit = joey_max_output_length(translator.pipeline, sources, decode)
    work = PEER / "work" / f"{config_name(config, args.config)}-{data_hash(config.data)}"
    work.mkdir(parents=True, exist_ok=True)
    write_split(work / f"test{args.limit or ''}", config.data, sources, references)
    trained = yaml.safe_load((joey_dir / "config.yaml").read_text(encoding="utf-8"))
    cfg = joey_translate_config(
        trained, joey_dir, work / f"test{args.limit or ''}", limit, decode.min_len, args.device
    )
    path = write_yaml(cfg, work / "translate.yaml")
    aligna_runs = {}
    for precision in args.precisions:  # aligna in each precision; JoeyNMT 2.3.0 decodes in fp32 on a CPU
        translator.precision = precision
        aligna_runs[precision] = [
            aligna_translate(translator, sources, b, n) for b in args.beams for n in args.batch_sizes
        ]
    options = ["--beams", *map(str, args.beams), "--batch-sizes", *map(str, args.batch_sizes)]
    joey = run_driver(python, "translate", path, options, args.threads, work / "translate.log")
    rows = []
    print(f"\n{'aligna':>6} {'beam':>4} {'batch':>5} {'aligna sent/s':>13} {'JoeyNMT sent/s':>14} {'ratio':>6} "
          f"{'aligna tok/s':>12} {'JoeyNMT tok/s':>13} {'aligna BLEU':>11} {'JoeyNMT BLEU':>12}")  # fmt: skip
    for precision, runs in aligna_runs.items():
        for a, j in zip(runs, joey["runs"]):
            assert (a["beam"], a["batch_size"]) == (j["beam"], j["batch_size"])
            row = {"aligna_precision": precision, "beam": a["beam"], "batch_size": a["batch_size"],
                   "aligna": speed_row(a, references), "joeynmt": speed_row(j, references)}  # fmt: skip
            row["ratio_sentences_per_s"] = (
                row["aligna"]["sentences_per_s"] / row["joeynmt"]["sentences_per_s"]
            )
            rows.append(row)
            al, jo = row["aligna"], row["joeynmt"]
            print(f"{precision:>6} {row['beam']:>4} {row['batch_size']:>5} {al['sentences_per_s']:>13.1f} "
                  f"{jo['sentences_per_s']:>14.1f} {row['ratio_sentences_per_s']:>5.2f}x "
                  f"{al['target_tokens_per_s']:>12.0f} {jo['target_tokens_per_s']:>13.0f} "
                  f"{al['tok_bleu']:>11.2f} {jo['tok_bleu']:>12.2f}")  # fmt: skip
    best = Path(config.model_dir) / BEST
    write_record(
        args.name or f"peer_joeynmt_translate_speed_{config_name(config, args.config)}",
        {
            "benchmark": "peer_joeynmt_translate_speed",
            "config": args.config, "overrides": args.overrides, "config_sha256": config_hash(config),
            "arch": config.model.arch, "device": args.device,
            "threads": {"aligna": torch.get_num_threads(), "joeynmt": joey["torch_threads"]},
            "test_set": test.origin, "sentences": len(sources),
            "aligna_model_dir": config.model_dir,
            "aligna_weights": BEST if best.is_file() else "latest checkpoint",
            "aligna_parameters": sum(p.numel() for p in translator.model.parameters()),
            "joeynmt_model_dir": rel(joey_dir),
            "joeynmt_weights": "best.ckpt" if (joey_dir / "best.ckpt").exists() else "latest checkpoint",
            "joeynmt_parameters": joey["parameters"],
            "measured": "seconds to translate the test set without loading the model (tokenizing, "
                        "batching, search, detokenizing); target tokens = output tokens without <eos>",
            "max_output_length": {"aligna": f"{decode.max_len_a} * |x| + {decode.max_len_b} per sentence",
                                  "joeynmt": limit},
            "precision": {"aligna": args.precisions, "joeynmt": "fp32"},
            "length_penalty": 0.0, "min_output_length": decode.min_len,
            "metric": "tok_bleu: sacrebleu.corpus_bleu(hyps, [refs], tokenize='none', lowercase=True)",
            "rows": rows,
            "differences": "see the docstring of bench/joeynmt_peer.py",
        },
    )  # fmt: skip


# --------------------------------------------------------------------------- main


def main() -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("config", help="an aligna config, e.g. configs/multi30k_de_en_transformer.yaml")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="aligna config override (both sides follow it)")  # fmt: skip
    common.add_argument("--venv", type=Path, default=PEER / "joeynmt-venv",
                        help="JoeyNMT's virtualenv, made if missing (default runs/peer/joeynmt-venv)")  # fmt: skip
    common.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads on both sides (0: torch's default)"
    )
    common.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    common.add_argument("--joey-batch", choices=["matched", "nominal"], default="matched",
                        help="JoeyNMT batch_size: same real target tokens per update, or aligna's number")  # fmt: skip
    common.add_argument("--name", help="record name (default peer_joeynmt_COMMAND_CONFIGNAME)")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    speed = commands.add_parser("train-speed", parents=[common], help="training tokens/s of both")
    speed.add_argument("--steps", type=int, default=30)
    speed.add_argument("--warmup", type=int, default=3)
    train_cmd = commands.add_parser("train", parents=[common], help="train JoeyNMT; dev BLEU over time")
    train_cmd.add_argument("--max-steps", type=int, default=0, help="stop after this many updates")
    train_cmd.add_argument("--epochs", type=int, default=0, help="default: the config's train.epochs")
    train_cmd.add_argument("--validate-every", type=int, default=0, help="updates (default: about one epoch)")
    train_cmd.add_argument(
        "--dev-subset", type=int, default=0, help="validate on N random dev sentences (smoke tests)"
    )
    train_cmd.add_argument("--overwrite", action="store_true", help="replace runs/peer/joeynmt/NAME")
    train_cmd.add_argument("--existing", metavar="JOEY_DIR",
                           help="no training: record the curve of a JoeyNMT run already in JOEY_DIR (finished "
                                "or stopped) against the aligna run in the config's model_dir")  # fmt: skip
    decode = commands.add_parser("translate-speed", parents=[common], help="decoding speed and BLEU of both")
    decode.add_argument(
        "--joey-model", help="a trained JoeyNMT model (default: runs/peer/joeynmt/NAME, from train)"
    )
    decode.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    decode.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    decode.add_argument("--limit", type=int, default=0, help="decode only the first N test sentences")
    decode.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "int8"], default=["fp32"],
                        help="aligna's decoding precision(s): bf16 autocast is faster on CPUs with bf16 units, "
                             "int8 (weights quantized) faster still on a CPU")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = load_config(args.config, args.overrides)
        check_comparable(config)
        python = ensure_venv(args.venv)
        {
            "train-speed": train_speed_command,
            "train": train_command,
            "translate-speed": translate_speed_command,
        }[args.command](args, config, python)
    except Unsupported as e:
        parser.error(f"not comparable with JoeyNMT: {e}")


if __name__ == "__main__":
    main()
