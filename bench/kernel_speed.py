"""The C kernels (`aligna.kernels`) alone, at each thread count: the training loss over a batch's
(tokens x vocabulary) logits, and a beam search step's log-softmax with its best candidates.

    python -m bench.kernel_speed                      # 1 and 2 threads, the tiny Transformer's sizes
    python -m bench.kernel_speed --threads 1 2 4 --rounds 20

The kernels split their rows among torch's threads, so 1 thread is the loop as it ran before
the split: each row of the record against its 1-thread row is the gain of the split. Times are
the fastest of --rounds calls, after glibc is told to keep freed memory (as training does), on
random logits of the given sizes.
"""

from __future__ import annotations

import argparse
import time

import torch

from aligna import kernels
from aligna.runtime import keep_freed_memory
from bench.common import record_name, write_record


def fastest(call, rounds: int, fresh=None) -> float:
    """The fastest of `rounds` calls, in ms; `fresh()` makes each call's input, untimed."""
    best = float("inf")
    for _ in range(rounds):
        args = fresh() if fresh else ()
        started = time.perf_counter()
        call(*args)
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def measure(threads: int, rows: int, vocab: int, batch: int, beam: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g) * 3
    targets = torch.randint(1, vocab, (rows,), generator=g)
    targets[::9] = 0  # padding
    step = torch.randn(batch * beam, vocab, generator=g) * 3
    scores = torch.randn(batch * beam, generator=g)
    return {
        "threads": threads,
        "loss_ms": fastest(lambda: kernels.cross_entropy(logits, targets, 0.1, 0), rounds),
        "beam_step_ms": fastest(lambda x: kernels.log_softmax_top_(x, scores, beam, 2 * beam), rounds,
                                lambda: (step.clone(),)),  # fmt: skip
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kernel_speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=3800, help="target tokens of a training batch")
    parser.add_argument("--vocab", type=int, default=7743, help="the tiny Transformer's joint vocabulary")
    parser.add_argument("--batch", type=int, default=64, help="sentences of a beam search step")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--name", type=record_name, default="kernel_speed_cpu")
    args = parser.parse_args()
    if not kernels.native():
        raise SystemExit("the C kernels are not built or not vectorized here: nothing to measure")
    keep_freed_memory()
    runs = [measure(t, args.rows, args.vocab, args.batch, args.beam, args.rounds) for t in args.threads]
    for run in runs:
        print(f"{run['threads']} thread(s): loss over {args.rows} x {args.vocab} logits {run['loss_ms']:.1f} ms, "
              f"beam step {args.batch} x {args.beam} rows {run['beam_step_ms']:.2f} ms")  # fmt: skip
    write_record(args.name, {"benchmark": "kernel_speed", "rows": args.rows, "vocab": args.vocab,
                             "batch": args.batch, "beam": args.beam, "rounds": args.rounds, "runs": runs})  # fmt: skip


if __name__ == "__main__":
    main()
