"""Train a config from scratch, score its best checkpoint on the config's test set, and
write a JSON record to bench/results/NAME.json (the README results table is made from these).

    python -m bench.train_eval configs/multi30k_de_en_gru.yaml
    python -m bench.train_eval configs/cmudict_g2p.yaml --set train.epochs=5
    python -m bench.train_eval configs/X.yaml --skip-train   # score a run already in model_dir

A model_dir that holds a run is trained over only with --overwrite (several rows may share a
directory); --skip-train refuses a run trained with other model or data settings. The test set
is decoded greedily, whatever the config's decode section says.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import aligna
from aligna.config import load_config
from aligna.data import read_parallel, reference_sets
from aligna.modeldir import ModelDir
from aligna.training import setup_logging, train
from bench.common import (
    checked_run,
    command_line,
    config_hash,
    prepare_steps,
    record_name,
    train_command,
    write_record,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_eval",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", type=record_name, help="record name (default: the config's name)")
    parser.add_argument("--skip-train", action="store_true", help="score the run already in model_dir")
    parser.add_argument("--overwrite", action="store_true", help="train over a run already in model_dir")
    args = parser.parse_args()
    try:
        run(args, parser)
    except (ValueError, FileExistsError) as e:  # ConfigError, a model directory that holds a run: the message says what
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    config = load_config(args.config, args.overrides)
    name = args.name or config.name or Path(args.config).stem
    if config.data.test is None:
        parser.error(f"{args.config} has no data.test to score")
    setup_logging()
    model_dir = Path(config.model_dir)
    if args.skip_train:
        checked_run(model_dir, config, args.config)
    else:
        train(config, overwrite=args.overwrite, progress=False)
    state = ModelDir(model_dir).trainer_state()
    best = json.loads((model_dir / "best.json").read_text()) if (model_dir / "best.json").exists() else {}

    translator = aligna.load(model_dir)
    test = read_parallel(config.data.test, "test")
    sources, references = reference_sets(test, config.data.group_references)
    started = time.perf_counter()
    hypotheses = translator.translate(sources, beam_size=1, sample=False)  # greedy, as the record says
    decode_seconds = time.perf_counter() - started
    scores = translator.evaluate(sources, references, ["ppl", *config.eval.metrics], hypotheses)
    for metric, value in scores.values.items():
        print(f"{metric:>9} {value:8.2f}  {scores.signatures.get(metric, '')}")
    command = command_line()
    if args.skip_train:  # the training happened before this command: the recipe names it, its data made first
        command = train_command(args.config, config, args.overrides) + " && " + command
    elif prepare_steps(config):
        command = " && ".join([*prepare_steps(config), command])
    write_record(
        name,
        {
            "reproduce": command,
            "config": args.config,
            "overrides": args.overrides,
            "config_sha256": config_hash(config),
            "arch": config.model.arch,
            "test_set": test.origin,
            "search": "greedy",
            "metrics": scores.values,
            "signatures": scores.signatures,
            "train_steps": state["step"],
            "train_epochs_done": state["epoch"] + (state["batch"] > 0),
            "best_step": best.get("step"),
            "train_seconds": state["train_seconds"],
            "train_target_tokens": state["tokens"],
            "train_target_tokens_per_s": state["tokens"] / max(state["train_seconds"], 1e-9),
            "train_threads": config.train.num_threads or None,
            "test_sentences": len(sources),
            "greedy_decode_seconds": decode_seconds,
            "dev_history": state.get("history") or [],  # every validation: step, train_seconds, scores
        },
    )


if __name__ == "__main__":
    main()
