"""Where a Transformer's CPU decoding spends its time, by piece of the decode step.

    python -m bench.decode_profile runs/multi30k_de_en_transformer
    python -m bench.decode_profile runs/multi30k_de_en_transformer --precisions fp32 int8 --sentences 200

For each precision and each case (greedy batch 1, beam 5 batch 1, beam 5 batch 64), the
first `--sentences` test sentences are translated twice, under one thread:

1. with wall-clock timers around `encode`, every `decode_step` and every module of the
   decoder (forward hooks; a module's time is its own, its children's taken out), which
   splits a search into: encoder, per-step decoder pieces (attention projections, the
   cache and attention arithmetic, feed-forward, layer norms, output projection), and
   what is left of the search loop itself (log_softmax, top-k, the beam's bookkeeping and
   the cache reorder). The hooks cost a few microseconds per module call themselves,
   so the pieces add up to a little more than an unhooked run.
2. under torch.profiler, which counts the operators a step dispatches and the time spent
   inside them: the wall time of a step minus the time inside operators is Python and
   dispatch overhead.

3. (Transformers) the linear layers a step calls, alone, one after another on the step's rows:
   the time the step's matrix products take by themselves, to which everything else adds.

At int8 a Transformer's step is compiled (`aligna.compiled`): its modules run inside one
TorchScript program, which the hooks of 1. cannot see into, so the step is one piece;
`--eager` profiles the eager int8 step instead, module by module.

Prints the tables and writes bench/results/decode_profile.json (or --name).
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import aligna
from aligna.compiled import CompiledTransformer
from aligna.config import ConfigError, DecodeConfig
from aligna.data import pad_batch, read_parallel, reference_sets
from aligna.model import Seq2Seq
from aligna.modeldir import ModelDirError
from aligna.runtime import keep_freed_memory
from aligna.search import search
from bench.common import record_name, write_record

CASES = {"greedy b1": (1, 1), "beam5 b1": (5, 1), "beam5 b64": (5, 64)}  # name: (beam, batch)


def batches(translator: Any, sources: list[str], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The sources as the translator batches them: ids, longest first, padded."""
    ids = [translator.pipeline.src_ids(s) for s in sources]
    ids = sorted((i for i in ids if i), key=len, reverse=True)
    return [
        (pad_batch([torch.tensor(i) for i in ids[s : s + batch_size]]),
         torch.tensor([len(i) for i in ids[s : s + batch_size]]))
        for s in range(0, len(ids), batch_size)
    ]  # fmt: skip


def piece_of(name: str) -> str:
    """A decoder module's name -> the piece it is counted under (layers merged)."""
    name = re.sub(r"decoder_layers\.\d+\.", "", re.sub(r"^decoder_layers\.\d+$", "layer", name))
    return {
        "": "decode_step: embed, positions, masks, cache plumbing",
        "layer": "decoder layer: residuals, new keys into the cache",
    }.get(name, name)


@contextmanager
def timed_modules(model: Seq2Seq, totals: dict[str, float], counts: dict[str, int]):
    """Accumulate each decoder module's own wall time (children excluded) into `totals`,
    and encode / decode_step wall time under "encode" / "decode_step (all)"."""
    stack: list[list[float]] = []  # [start, children's time] of each module being run
    handles = []

    def pre(_module: nn.Module, _args: Any) -> None:
        stack.append([time.perf_counter(), 0.0])

    def post(name: str):
        def hook(_module: nn.Module, _args: Any, _out: Any) -> None:
            start, children = stack.pop()
            spent = time.perf_counter() - start
            totals[piece_of(name)] += spent - children
            counts[piece_of(name)] += 1
            if stack:
                stack[-1][1] += spent
        return hook

    for name, module in model.named_modules():
        if name.startswith(("decoder_layers", "decoder_norm", "output")):
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post(name)))
    encode, decode_step = model.encode, model.decode_step

    def timed(label: str, f):
        def run(*args: Any, **kwargs: Any) -> Any:
            stack.append([time.perf_counter(), 0.0])
            out = f(*args, **kwargs)
            start, children = stack.pop()
            spent = time.perf_counter() - start
            totals[label] += spent - children if label != "encode" else spent
            counts[label] += 1
            return out
        return run

    model.encode = timed("encode", encode)  # type: ignore[method-assign]
    model.decode_step = timed(piece_of(""), decode_step)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        del model.encode, model.decode_step


def run_search(model: Seq2Seq, data: list, beam: int, attention: bool) -> float:
    cfg = DecodeConfig(beam_size=beam, batch_size=data[0][0].size(0))
    started = time.perf_counter()
    with torch.inference_mode():
        for src, lengths in data:
            search(model, src, lengths, cfg, attention=attention)
    return time.perf_counter() - started


def pieces(model: Seq2Seq, data: list, beam: int, attention: bool) -> tuple[float, dict[str, float], dict[str, int]]:
    """Wall time of the searches, and of each piece (seconds)."""
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    with timed_modules(model, totals, counts):
        wall = run_search(model, data, beam, attention)
    totals["search loop: log_softmax, top-k, beam bookkeeping, cache reorder"] = wall - sum(totals.values())
    return wall, dict(totals), dict(counts)


def operators(model: Seq2Seq, data: list, beam: int, top: int, attention: bool) -> dict[str, Any]:
    """torch.profiler over the searches: operators dispatched per decode step, time inside
    them, and the top operators by own time."""
    steps = [0]
    decode_step = model.decode_step

    def counted(*args: Any, **kwargs: Any) -> Any:
        steps[0] += 1
        return decode_step(*args, **kwargs)

    model.decode_step = counted  # type: ignore[method-assign]
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            run_search(model, data, beam, attention)
            wall = time.perf_counter() - started
    finally:
        del model.decode_step
    events = prof.key_averages()
    calls = sum(e.count for e in events)
    inside = sum(e.self_cpu_time_total for e in events) / 1e6
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {
        "wall_s": wall,
        "decode_steps": steps[0],
        "ops_per_step": calls / max(steps[0], 1),
        "inside_ops_s": inside,
        "top": [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6} for e in rows],
    }


def linear_floor(model: Seq2Seq, rows: int, repeats: int = 100, rounds: int = 7) -> tuple[int, float] | None:
    """The linear layers a Transformer's decode step calls (each decoder layer's projections,
    not the encoder-decoder keys and values, which are projected once per sentence, and the
    output layer), called alone one after another on `rows` rows: how many, and their time
    per step in microseconds (the best of `rounds` rounds: on a shared machine noise only
    adds), the floor that the step's other operators and Python add to."""
    if not hasattr(model, "decoder_layers"):
        return None
    layers = [m for name, m in model.named_modules()
              if (name.startswith("decoder_layers.") and name.endswith(("_proj", ".w1", ".w2"))
                  and not name.endswith("cross_attention.kv_proj")) or name == "output"]  # fmt: skip
    inputs = [torch.randn(rows, 1, m.in_features) for m in layers]
    with torch.inference_mode():
        for _ in range(20):
            for m, x in zip(layers, inputs):
                m(x)
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(repeats):
                for m, x in zip(layers, inputs):
                    m(x)
            best = min(best, time.perf_counter() - started)
    return len(layers), 1e6 * best / repeats


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode_profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir")
    parser.add_argument("--checkpoint", default="latest")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--sentences", type=int, default=128, help="first N test sentences (default 128)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--top", type=int, default=12, help="operators listed (default 12)")
    parser.add_argument("--eager", action="store_true",
                        help="int8: profile the eager step, module by module, not the compiled one")  # fmt: skip
    parser.add_argument("--attention", action="store_true",
                        help="the searches keep attention maps (as `aligna translate --attention`); default: not")
    parser.add_argument("--name", type=record_name, default="decode_profile")
    args = parser.parse_args()
    keep_freed_memory()  # as the aligna command does
    torch.set_num_threads(1)
    runs = []
    for precision in args.precisions:
        try:
            translator = aligna.load(args.model_dir, checkpoint=args.checkpoint, device="cpu", precision=precision)
        except (ModelDirError, ConfigError) as e:
            parser.error(str(e))
        model = translator.search_model()
        if args.eager and isinstance(model, CompiledTransformer):
            model = model.model  # the int8 model itself, its step run module by module
        sources, _ = reference_sets(read_parallel(translator.config.data.test, "test"), False)
        sources = sources[: args.sentences]
        for case in args.cases:
            beam, batch = CASES[case]
            data = batches(translator, sources, batch)
            run_search(model, data[:2], beam, args.attention)  # warm-up
            wall, totals, counts = pieces(model, data, beam, args.attention)
            ops = operators(model, data, beam, args.top, args.attention)
            steps = ops["decode_steps"]
            print(f"\n== {precision} {case}: {len(sources)} sentences, {wall:.2f} s hooked "
                  f"({ops['wall_s']:.2f} s profiled), {steps} decode steps, "
                  f"{ops['ops_per_step']:.0f} operators per step, "
                  f"{1e6 * (ops['wall_s'] - ops['inside_ops_s']) / max(steps, 1):.0f} us/step outside operators "
                  f"({100 * (1 - ops['inside_ops_s'] / ops['wall_s']):.0f}% of the profiled run)")  # fmt: skip
            print(f"  {'piece':<62} {'ms':>8} {'%':>5} {'us/step':>8}")
            for piece, seconds in sorted(totals.items(), key=lambda p: -p[1]):
                print(f"  {piece:<62} {1e3 * seconds:8.1f} {100 * seconds / wall:5.1f} {1e6 * seconds / max(steps, 1):8.1f}")
            print(f"  {'operator (profiled, own time)':<62} {'ms':>8} {'calls':>7}")
            for row in ops["top"]:
                print(f"  {row['op']:<62} {1e3 * row['self_s']:8.1f} {row['calls']:7d}")
            floor = linear_floor(getattr(model, "model", model), batch * beam)
            if floor:
                print(f"  the step's {floor[0]} linear layers alone, one after another on {batch * beam} row(s): "
                      f"{floor[1]:.0f} us per step; the whole step, unhooked: "
                      f"{1e6 * ops['wall_s'] / max(steps, 1):.0f} us (profiled)")  # fmt: skip
            runs.append({"precision": precision, "case": case, "beam": beam, "batch_size": batch,
                         "sentences": len(sources), "wall_s": wall, "pieces_s": totals, "piece_calls": counts,
                         "profiler": ops, "linear_layers_alone_us_per_step": floor and floor[1]})  # fmt: skip
    write_record(args.name, {"benchmark": "decode_profile", "model_dir": args.model_dir, "threads": 1,
                             "attention": args.attention, "runs": runs})  # fmt: skip


if __name__ == "__main__":
    main()
