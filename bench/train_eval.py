"""Train a config from scratch, score its best checkpoint on the config's test set, and
write a JSON record to bench/results/NAME.json (the README results table is made from these).

    python -m bench.train_eval configs/multi30k_de_en_gru.yaml
    python -m bench.train_eval configs/cmudict_g2p.yaml --set train.epochs=5
    python -m bench.train_eval configs/X.yaml --skip-train   # score a run already in model_dir
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
from bench.common import command_line, config_hash, record_name, write_record


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_eval",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", type=record_name, help="record name (default: the config's name)")
    parser.add_argument("--skip-train", action="store_true", help="score the run already in model_dir")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    name = args.name or config.name or Path(args.config).stem
    if config.data.test is None:
        parser.error(f"{args.config} has no data.test to score")
    setup_logging()
    if not args.skip_train:
        train(config, overwrite=True, progress=False)
    model_dir = Path(config.model_dir)
    state = ModelDir(model_dir).trainer_state()
    best = json.loads((model_dir / "best.json").read_text()) if (model_dir / "best.json").exists() else {}

    translator = aligna.load(model_dir)
    test = read_parallel(config.data.test, "test")
    sources, references = reference_sets(test, config.data.group_references)
    started = time.perf_counter()
    hypotheses = translator.translate(sources)
    decode_seconds = time.perf_counter() - started
    scores = translator.evaluate(sources, references, ["ppl", *config.eval.metrics], hypotheses)
    for metric, value in scores.values.items():
        print(f"{metric:>9} {value:8.2f}  {scores.signatures.get(metric, '')}")
    command = command_line()
    if args.skip_train:  # the training happened before this command: the recipe names it
        command = (
            f"aligna train {args.config}" + "".join(f" --set {o}" for o in args.overrides) + " && " + command
        )
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
