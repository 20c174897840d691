"""The long-sentence experiment: models with and without attention, scored by source length.

    python -m bench.long_sentences multi30k [--train]   # no attention vs Bahdanau vs Luong, Multi30k de->en
    python -m bench.long_sentences reverse [--train]    # the same, and Luong concat, on reversing 10-60 symbols
    python -m bench.long_sentences multi30k --model Bahdanau=runs/multi30k_de_en_bahdanau_s7 ...

Loads each config's trained model_dir, or the directory `--model NAME=DIR` names for that
row (another seed, another dropout); with --train, trains the configs that have none yet;
translates the task's test set greedily, scores it within source-length buckets, prints
the table, and writes bench/results/length_TASK.json and .png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import aligna
from aligna.compare import compare_by_length
from aligna.config import load_config
from aligna.data import read_parallel, reference_sets
from aligna.modeldir import ModelDir
from aligna.synthetic import write_task
from aligna.training import setup_logging, train
from bench.common import (
    RESULTS,
    ROOT,
    checked_run,
    command_line,
    config_hash,
    overrides_of,
    train_command,
    write_record,
)

TASKS = {
    "multi30k": {
        "configs": {"no attention": "multi30k_de_en_gru", "Bahdanau": "multi30k_de_en_bahdanau",
                    "Luong general": "multi30k_de_en_luong"},
        "edges": [10, 15, 20, 25],
        "metric": "tok_bleu",
    },
    "reverse": {
        "configs": {"no attention": "reverse_none", "Bahdanau": "reverse_bahdanau", "Luong general": "reverse_luong",
                    "Luong concat": "reverse_luong_concat"},
        "edges": [20, 30, 40, 50],
        "metric": "exact",
    },
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.long_sentences",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--train", action="store_true", help="train the models that have no checkpoint yet")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for the models trained here, e.g. train.epochs=4")  # fmt: skip
    parser.add_argument("--model", dest="models", action="append", default=[], metavar="NAME=DIR",
                        help="the trained model directory of row NAME in place of its config's model_dir")  # fmt: skip
    args = parser.parse_args()
    task = TASKS[args.task]
    dirs = {}
    for item in args.models:
        name, sep, directory = item.partition("=")
        if not sep or name not in task["configs"]:
            parser.error(f"--model {item!r}: expected NAME=DIR with NAME one of {', '.join(task['configs'])}")
        if ModelDir(directory).latest() is None:
            parser.error(f"--model {item!r}: {directory} has no trained model")
        dirs[name] = directory
    setup_logging()
    if args.task == "reverse" and not (ROOT / "data/reverse/test.tsv").exists():
        write_task(ROOT / "data/reverse", "reverse", 10, 60, symbols=26)
    translators, configs = {}, {}
    for name, stem in task["configs"].items():
        if name in dirs:
            translators[name] = aligna.load(dirs[name])
            configs[name] = translators[name].config
            continue
        config = load_config(ROOT / "configs" / f"{stem}.yaml", args.overrides)
        if ModelDir(config.model_dir).latest() is None:
            if not args.train:
                parser.error(
                    f"{config.model_dir} has no trained model: run with --train, or `aligna train configs/{stem}.yaml`"
                )
            train(config, progress=False)
        else:  # a run trained before: with this config's model and data (--set included), or refused
            checked_run(Path(config.model_dir), config, f"configs/{stem}.yaml")
        translators[name], configs[name] = aligna.load(config.model_dir), config
    first = next(iter(configs.values()))
    test = read_parallel(first.data.test, "test")  # type: ignore[arg-type]
    sources, references = reference_sets(test, first.data.group_references)
    result = compare_by_length(translators, sources, references, task["edges"], task["metric"], beam_size=1, sample=False)
    # how each model was trained: its config file with the --set options that give its saved config
    trainings = {}
    for n, stem in task["configs"].items():
        path = f"configs/{stem}.yaml"
        trainings[n] = train_command(path, translators[n].config,
                                     overrides_of(translators[n].config, load_config(ROOT / path)))  # fmt: skip
    print(f"{result.metric} by source length in tokens (sentences per bucket in brackets), {test.origin}\n")
    print(result.table())
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot = RESULTS / f"length_{args.task}.png"
    result.plot(plot, title=f"{args.task}: {result.metric} by source length")
    write_record(
        f"length_{args.task}",
        {
            "benchmark": "length_buckets",
            "reproduce": " && ".join([*trainings.values(), command_line()]),
            "test_set": test.origin,
            "search": "greedy",
            "metric": result.metric,
            "edges": result.edges,
            "models": {
                n: {
                    "config": f"configs/{task['configs'][n]}.yaml",
                    **({"model_dir": dirs[n]} if n in dirs else {}),
                    # the config the model was trained with (saved in its model_dir, overrides included)
                    "config_sha256": config_hash(translators[n].config),
                    "trained_by": trainings[n],
                    "epochs": translators[n].config.train.epochs,
                    "seed": translators[n].config.train.seed,
                    **m,
                }
                for n, m in result.models.items()
            },  # fmt: skip
            "table": result.table(),
            "plot": str(plot.relative_to(ROOT)),
        },
    )


if __name__ == "__main__":
    main()
