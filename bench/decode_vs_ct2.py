"""aligna's CPU decoding of a Transformer against CTranslate2's, side by side in one process.

    python -m bench.decode_vs_ct2 runs/multi30k_de_en_transformer
    python -m bench.decode_vs_ct2 runs/multi30k_de_en_transformer --baseline /tmp/base --sentences 500

Translates the first `--sentences` test sentences with aligna fp32, aligna int8 and
CTranslate2 int8 (the same checkpoint, exported on the fly), greedy and beam 5, at batch 1
and 64, under one thread. The variants of each case run back to back, so a machine busy
with something else slows them alike; ratios are to CTranslate2 int8. `--baseline DIR`
adds another copy of aligna, importable from DIR as the package `aligna_base` (e.g. the
main branch's aligna/ copied to DIR/aligna_base), as "before" rows, and counts the
sentences whose output differs from it. Writes bench/results/decode_vs_ct2.json (or --name).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Any

import torch

import aligna
from aligna.data import read_parallel, reference_sets
from bench.common import write_record

CASES = [(1, 1), (1, 64), (5, 1), (5, 64)]  # (beam, batch)


def timed(translator: Any, sources: list[str], beam: int, batch: int) -> tuple[float, list[str], int]:
    translator.translate(sources[: min(len(sources), 2 * batch)], batch_size=batch, beam_size=beam)  # warm-up
    started = time.perf_counter()
    found = translator.translate_detailed(sources, batch_size=batch, beam_size=beam, alpha=0.0)
    seconds = time.perf_counter() - started
    return seconds, [t.text for t in found], sum(len(t.tokens) for t in found)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode_vs_ct2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir")
    parser.add_argument("--checkpoint", default="latest")
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--baseline", help="a directory holding the package aligna_base (before)")
    parser.add_argument("--cases", nargs="+", default=[f"{b}x{n}" for b, n in CASES], help="BEAMxBATCH")
    parser.add_argument("--name", default="decode_vs_ct2")
    args = parser.parse_args()
    torch.set_num_threads(1)  # CT2Translator takes its intra_threads from here
    load = dict(checkpoint=args.checkpoint, device="cpu")
    variants: dict[str, Any] = {}
    if args.baseline:
        sys.path.insert(0, args.baseline)
        base = importlib.import_module("aligna_base")
        variants |= {f"before {p}": base.load(args.model_dir, precision=p, **load) for p in ("fp32", "int8")}
    variants |= {f"aligna {p}": aligna.load(args.model_dir, precision=p, **load) for p in ("fp32", "int8")}
    variants["ct2 int8"] = aligna.load(args.model_dir, engine="ctranslate2", precision="int8", **load)
    config = variants["aligna fp32"].config
    sources, _ = reference_sets(read_parallel(config.data.test, "test"), config.data.group_references)
    sources = sources[: args.sentences]
    runs = []
    print(f"{len(sources)} sentences, 1 thread; ratio = sentences/s over CTranslate2 int8's")
    print(f"{'case':<12} {'variant':<12} {'sent/s':>8} {'tok/s':>8} {'ratio':>6} {'differs':>8}")
    for case in args.cases:
        beam, batch = (int(x) for x in case.split("x"))
        results = {name: timed(t, sources, beam, batch) for name, t in variants.items()}
        reference = results["ct2 int8"][0]
        for name, (seconds, texts, tokens) in results.items():
            before = results.get(name.replace("aligna", "before"))
            differs = sum(a != b for a, b in zip(texts, before[1])) if before and name.startswith("aligna") else None
            print(f"{'beam ' + str(beam) + ' b' + str(batch):<12} {name:<12} {len(sources) / seconds:8.1f} "
                  f"{tokens / seconds:8.0f} {reference / seconds:6.2f} {'' if differs is None else differs:>8}",
                  flush=True)  # fmt: skip
            runs.append({"variant": name, "beam": beam, "batch_size": batch, "seconds": seconds,
                         "sentences_per_s": len(sources) / seconds, "target_tokens": tokens,
                         "ratio_to_ct2_int8": reference / seconds, "outputs_differ_from_before": differs})  # fmt: skip
    write_record(args.name, {"benchmark": "decode_vs_ct2", "model_dir": args.model_dir, "checkpoint": args.checkpoint,
                             "sentences": len(sources), "threads": 1, "runs": runs})  # fmt: skip


if __name__ == "__main__":
    main()
