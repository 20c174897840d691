"""The commands of `python -m bench.joeynmt`: train-speed, train and translate-speed, each
writing its record to bench/results/ (what they measure, and what still differs from JoeyNMT,
is the docstring of bench/joeynmt/__init__.py)."""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import sacrebleu
import torch
import yaml

import aligna
from aligna.config import Config, load_config, save_config
from aligna.data import read_parallel
from aligna.modeldir import BEST, CONFIG, TRAIN_LOG, ModelDir
from aligna.plotting import plot_lines
from aligna.translate import Translator
from bench import joeynmt as package
from bench.common import RESULTS, config_hash, machine, record_name, write_record
from bench.joeynmt.joey_config import (
    PEER,
    Unsupported,
    check_comparable,
    check_trains_alike,
    data_hash,
    joey_config,
    joey_max_output_length,
    joey_translate_config,
    match_batches,
    prepare_workspace,
    rel,
    write_split,
    write_yaml,
)
from bench.joeynmt.joey_venv import ensure_venv, run_driver
from bench.train_speed import measure

DIFFERENCES = "see the docstring of bench/joeynmt/__init__.py"


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
            "differences": DIFFERENCES,
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
            "differences": DIFFERENCES,
        },
    )  # fmt: skip



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
            "differences": DIFFERENCES,
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
    common.add_argument("--name", type=record_name, help="record name (default peer_joeynmt_COMMAND_CONFIGNAME)")
    parser = argparse.ArgumentParser(
        prog="python -m bench.joeynmt",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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

