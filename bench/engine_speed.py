"""aligna's own decoding against CTranslate2 on the same model, side by side in one run.

    python -m bench.engine_speed runs/multi30k_de_en_transformer --threads 1 2
    python -m bench.engine_speed runs/multi30k_de_en_bahdanau --engines aligna:fp32 aligna:bf16 aligna:int8

For each thread count, search (greedy, beam 5) and batch size (1, 16, 64), the model's test
set (`data.test` of its config) is translated, once untimed and then timed (`--rounds N`: timed N
times, the engines in turn, the fastest kept), by:
- aligna at fp32, bf16 (autocast) and int8 (dynamically quantized Linear layers), and
  `aligna-eager` int8: without the compiled decoding step (`aligna.compiled`), and
  `aligna-fbgemm` int8: every layer on fbgemm's kernel, none on oneDNN's (`runtime.WIDE_OUTPUT`);
- CTranslate2 through aligna (`aligna.load(..., engine="ctranslate2")`: the model exported
  on the fly) at float32 and int8: what an aligna user gets, text in, text out, with aligna's
  exact per-sentence length limits;
- CTranslate2 alone (`translate_batch` on the pre-tokenized test set, no attention, one
  length limit for the batch, as a CTranslate2 user would call it), float32 and int8.
aligna and CTranslate2 through aligna return attention maps with `--attention` only (without
it, as `aligna translate`, no engine computes them). Each row: sentences/s, target tokens/s (`<eos>` not counted), tokenized BLEU, and how many
outputs equal aligna fp32's. Writes bench/results/engine_speed_<model>_cpu.json (or --name).
"""

from __future__ import annotations

import os

# PyTorch and CTranslate2 each bring an OpenMP runtime; with their default busy-waiting, one
# engine's idle threads spin on the cores the other computes on (2 threads measured 2-6x
# slower than 1 here). Passive waiting, set before either library loads, keeps them apart.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from itertools import product
from pathlib import Path

import torch

import aligna
from aligna import runtime
from aligna.ct2 import COMPUTE_TYPES
from aligna.data import read_parallel, reference_sets
from aligna.export import ctranslate2_module, export_ctranslate2
from aligna.metrics import score
from aligna.modeldir import BEST_SCORES, ModelDir, ModelDirError
from bench import decode_speed
from bench.common import config_hash, record_name, write_record

ENGINES = [("aligna", "fp32"), ("aligna", "bf16"), ("aligna", "int8"), ("aligna-eager", "int8"), ("aligna-fbgemm", "int8"),
           ("ctranslate2", "fp32"), ("ctranslate2", "int8"),
           ("ctranslate2-alone", "fp32"), ("ctranslate2-alone", "int8")]  # fmt: skip


class Alone:
    """CTranslate2 as its own users call it: tokens in, tokens out, one call for the set."""

    engine = "ctranslate2-alone"

    def __init__(self, exported: Path, translator, precision: str, threads: int) -> None:
        ctranslate2 = ctranslate2_module()
        self.pipeline, self.config, self.precision = translator.pipeline, translator.config, precision
        self.ct2 = ctranslate2.Translator(str(exported), compute_type=COMPUTE_TYPES[precision], intra_threads=threads)

    def translate_tokens(self, tokens: list[list[str]], beam: int, batch_size: int, alpha: float,
                         shortlist: bool = False) -> list[list[str]]:  # fmt: skip
        results = self.ct2.translate_batch(
            tokens, max_batch_size=batch_size, beam_size=beam, length_penalty=alpha, min_decoding_length=0,
            max_decoding_length=256, use_vmap=shortlist,
        )  # fmt: skip
        return [r.hypotheses[0] for r in results]


def measure(translator, sources: list[str], references: list[list[str]], beam: int, batch_size: int,
            alpha: float, shortlist: bool = False, attention: bool = False) -> tuple[dict, list[str]]:  # fmt: skip
    """As `decode_speed.measure`, for CTranslate2 alone too (which never returns attention)."""
    if not isinstance(translator, Alone):
        return decode_speed.measure(translator, sources, references, beam, batch_size, alpha, shortlist, attention)
    alpha = alpha if beam > 1 else 0.0
    tokens = [translator.pipeline.src_tokens(s) for s in sources]
    translator.translate_tokens(tokens[: 2 * batch_size], beam, batch_size, alpha, shortlist)  # warm-up
    started = time.perf_counter()
    outputs = translator.translate_tokens(tokens, beam, batch_size, alpha, shortlist)
    seconds = time.perf_counter() - started
    vocab = translator.pipeline.tgt_vocab
    hypotheses = [translator.pipeline.detokenize(vocab.encode(t)) for t in outputs]
    n_tokens = sum(len(t) for t in outputs)
    metric = "tok_bleu" if "tok_bleu" in translator.config.eval.metrics else "bleu"
    return {
        "beam": beam, "alpha": alpha, "batch_size": batch_size, "shortlist": shortlist, "attention": False,
        "seconds": seconds,
        "sentences_per_s": len(sources) / seconds, "target_tokens": n_tokens, "target_tokens_per_s": n_tokens / seconds,
        metric: score(hypotheses, references, [metric]).values[metric],
    }, hypotheses  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("model_dir")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--alpha", type=float, default=0.0,
                        help="length penalty of beam search (0: CTranslate2 alone ranks as aligna does)")  # fmt: skip
    parser.add_argument("--engines", nargs="+", default=[f"{e}:{p}" for e, p in ENGINES],
                        help="ENGINE:PRECISION pairs (default: all of them)")  # fmt: skip
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--sentences", type=int, help="only the first N test sentences")
    parser.add_argument("--quality", action="store_true",
                        help="also translate the whole test set at beam 5, alpha 0.6 (the published rows' search) "
                        "with aligna fp32 and CTranslate2 float32 / int8: BLEU and identical outputs")  # fmt: skip
    parser.add_argument("--shortlist", choices=("off", "on", "both"), default="off",
                        help="decode over the model directory's vocabulary shortlist (MODEL_DIR/shortlist.txt, "
                        "`aligna shortlist`; CTranslate2 over the same list, its vocabulary map): off, on, or "
                        "both, each search then measured without and with it (default: off)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each search N times, the engines in turn, and keep each engine's fastest "
                        "round (a shared machine's noise only ever slows a round down; default: 1)")  # fmt: skip
    parser.add_argument("--attention", action="store_true",
                        help="aligna and ctranslate2 return attention maps (as `aligna translate --attention` and "
                             "the server's page ask); default: no engine computes them, as `aligna translate`")
    parser.add_argument("--name", type=record_name, help="record name (default: engine_speed_<model>_cpu)")
    args = parser.parse_args()
    runtime.keep_freed_memory()  # as the aligna command does
    engines = [tuple(e.split(":", 1)) for e in args.engines]
    # One weights file for every engine, even if a training run writes a newer checkpoint meanwhile.
    try:
        weights = str(ModelDir(args.model_dir).weights(args.checkpoint))
    except ModelDirError as e:
        parser.error(str(e))
    reference = aligna.load(args.model_dir, checkpoint=weights, device="cpu", engine="aligna")
    scores_file = ModelDir(args.model_dir) / BEST_SCORES
    best_scores = json.loads(scores_file.read_text()) if args.checkpoint == "best" and scores_file.is_file() else None
    config = reference.config
    if config.data.test is None:
        parser.error(f"{args.model_dir}: its config has no data.test")
    test = read_parallel(config.data.test, "test")
    sources, references = reference_sets(test, config.data.group_references)
    if args.sentences:
        sources, references = sources[: args.sentences], references[: args.sentences]
    exported = None  # CTranslate2 has no RNN: an RNN model is measured with aligna's engines alone
    if any(engine.startswith("ctranslate2") for engine, _ in engines):
        scratch = Path("runs") / "bench-engine-speed" / Path(args.model_dir).name
        exported = export_ctranslate2(args.model_dir, scratch, weights, overwrite=True)
    runs, quality = [], []
    if args.quality and exported is not None:
        all_sources, all_references = reference_sets(test, config.data.group_references)
        torch.set_num_threads(max(args.threads))
        ours = None
        for engine, precision in [("aligna", "fp32"), ("ctranslate2", "fp32"), ("ctranslate2", "int8")]:
            translator = aligna.load(exported if engine == "ctranslate2" else args.model_dir,
                                     "best" if engine == "ctranslate2" else weights, "cpu", precision, engine)  # fmt: skip
            run, hypotheses = decode_speed.measure(translator, all_sources, all_references, 5, 64, 0.6)
            ours = hypotheses if ours is None else ours
            run |= {"engine": engine, "precision": precision, "sentences": len(all_sources), "same_as_aligna_fp32": sum(
                a == b for a, b in zip(hypotheses, ours))}  # fmt: skip
            quality.append(run)
            print(f"quality {engine} {precision}: BLEU {run.get('tok_bleu', run.get('bleu')):.2f}, "
                  f"{run['same_as_aligna_fp32']}/{len(all_sources)} outputs equal aligna fp32's", flush=True)
    shortlists = {"off": [False], "on": [True], "both": [False, True]}[args.shortlist]
    print(f"{'engine':<18} {'prec':>5} {'thr':>3} {'beam':>4} {'batch':>5} {'list':>4} {'sent/s':>8} {'tok/s':>8} "
          f"{'BLEU':>6} {'=fp32':>6}")  # fmt: skip
    for threads in args.threads:
        torch.set_num_threads(threads)
        translators = {}
        for engine, precision in engines:
            if engine in ("aligna", "aligna-eager", "aligna-fbgemm"):
                translators[engine, precision] = translator = aligna.load(args.model_dir, weights, "cpu", precision, "aligna")
                translator.compiled = engine != "aligna-eager"  # type: ignore[attr-defined]
                if engine == "aligna-fbgemm":  # its int8 copy made now, with no output wide enough for oneDNN
                    wide, runtime.WIDE_OUTPUT = runtime.WIDE_OUTPUT, 2**40
                    try:
                        translator.search_model()  # type: ignore[attr-defined]
                    finally:
                        runtime.WIDE_OUTPUT = wide
            elif engine == "ctranslate2":
                translators[engine, precision] = aligna.load(exported, "best", "cpu", precision, "ctranslate2")
            else:
                translators[engine, precision] = Alone(exported, reference, precision, threads)
        for beam, batch_size, shortlist in product(args.beams, args.batch_sizes, shortlists):
            baseline = None
            best, timed = {}, {key: [] for key in translators}  # each engine's fastest round, and every round's time
            for _ in range(args.rounds):  # the engines in turn, so that a slow spell of the machine hits them all
                for key, translator in translators.items():
                    run, hypotheses = measure(translator, sources, references, beam, batch_size, args.alpha, shortlist,
                                              args.attention)  # fmt: skip
                    timed[key].append(round(run["seconds"], 3))
                    if key not in best or run["seconds"] < best[key][0]["seconds"]:
                        best[key] = run, hypotheses
            for (engine, precision), (run, hypotheses) in best.items():
                if (engine, precision) == ("aligna", "fp32"):
                    baseline = hypotheses
                same = sum(a == b for a, b in zip(hypotheses, baseline)) if baseline else None
                run |= {"engine": engine, "precision": precision, "threads": threads, "sentences": len(sources),
                        "same_as_aligna_fp32": same, "rounds_seconds": timed[engine, precision]}  # fmt: skip
                runs.append(run)
                bleu = run.get("tok_bleu", run.get("bleu"))
                print(f"{engine:<18} {precision:>5} {threads:>3} {beam:>4} {batch_size:>5} {'yes' if shortlist else 'no':>4} "
                      f"{run['sentences_per_s']:8.1f} {run['target_tokens_per_s']:8.0f} {bleu:6.2f} "
                      f"{'' if same is None else same:>6}", flush=True)  # fmt: skip
    ct2 = ctranslate2_module() if exported else None
    write_record(args.name or f"engine_speed_{Path(args.model_dir).name}_cpu", {
        "benchmark": "engine_speed", "model_dir": args.model_dir, "checkpoint": args.checkpoint, "weights": weights,
        "weights_scores": best_scores,
        "config_sha256": config_hash(config), "test_set": test.origin, "ctranslate2_version": ct2.__version__ if ct2 else None,
        "attention": args.attention, "runs": runs, "quality": quality,
    })  # fmt: skip


if __name__ == "__main__":
    main()
