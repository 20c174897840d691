"""Translation speed: greedy and beam search at several batch sizes, on a config's test set.

    python -m bench.decode_speed runs/multi30k_de_en_bahdanau runs/multi30k_de_en_transformer
    python -m bench.decode_speed runs/multi30k_de_en_transformer --beams 1 --batch-sizes 64 --no-cache
    python -m bench.decode_speed runs/multi30k_de_en_bahdanau --precisions fp32 bf16 int8
    python -m bench.decode_speed runs/multi30k_de_en_transformer --torch-linear --rounds 3

For each model directory, each beam size and each batch size, the whole test set
(`data.test` of the model's config) is translated once untimed (warm-up) and then timed:
sentences/s, output tokens/s (target tokens, `<eos>` not counted) and the tokenized BLEU of
the output. `--no-cache` adds, for Transformers, the same search with an uncached decoder
that re-runs the whole prefix at every step (what the key/value cache saves), and checks
that both give the same output. `--torch-linear` adds the same search with a wide fp32 output
layer on torch's nn.Linear (MKL) instead of oneDNN's kernel (`aligna.model.output_layer`), and
counts the outputs that differ (float rounding); `--rounds N` times every variant N times,
interleaved, for ratios on a noisy machine. Writes bench/results/decode_speed_<device>.json
(or --name).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import torch
from torch import Tensor

import aligna
from aligna import model as model_module
from aligna.data import read_parallel, reference_sets
from aligna.metrics import score
from aligna.model import Reorderable, Seq2Seq
from aligna.runtime import PRECISIONS, keep_freed_memory
from aligna.transformer import Transformer, TransformerEncoderOutput
from bench.common import config_hash, record_name, write_record


@dataclass
class Prefix(Reorderable):
    tokens: Tensor  # (B, t) the tokens fed so far


class Uncached(Seq2Seq):
    """A Transformer decoded without its key/value cache: each step runs the decoder over
    the whole prefix again, O(t) work for the t-th token instead of O(1)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def encode(self, src: Tensor, src_lengths: Tensor) -> TransformerEncoderOutput:
        return self.model.encode(src, src_lengths)

    def init_state(self, encoder_output: TransformerEncoderOutput) -> Prefix:  # type: ignore[override]
        return Prefix(encoder_output.mask.new_zeros(encoder_output.mask.size(0), 0, dtype=torch.long))

    def decode_step(self, prev_tokens: Tensor, state: Prefix, encoder_output: TransformerEncoderOutput,  # type: ignore[override]
                    need_attention: bool = True):  # fmt: skip
        tokens = torch.cat([state.tokens, prev_tokens.unsqueeze(1)], dim=1)  # (B, t + 1)
        empty = self.model.init_state(encoder_output)
        logits, _, weights, _ = self.model.decode(tokens, empty, encoder_output, "last" if need_attention else "none")
        return logits[:, -1], Prefix(tokens), None if weights is None else weights[:, -1]


def measure(
    translator: aligna.Translator, sources: list[str], references: list[list[str]], beam: int, batch_size: int,
    alpha: float, shortlist: bool = False, attention: bool = False,
) -> tuple[dict, list[str]]:  # fmt: skip
    """Translate `sources` once untimed (the first 2 batches) and once timed. attention: the
    translations carry attention maps (`aligna translate --attention`, the server's page), else
    not (`aligna translate`, `evaluate`), and the search need not compute it."""
    search = {"beam_size": beam, "alpha": alpha if beam > 1 else 0.0, **({"shortlist": True} if shortlist else {})}
    translator.translate(sources[: 2 * batch_size], batch_size=batch_size, **search)  # warm-up
    started = time.perf_counter()
    found = translator.translate_detailed(sources, batch_size=batch_size, attention=attention, **search)
    seconds = time.perf_counter() - started
    hypotheses = [t.text for t in found]
    tokens = sum(len(t.tokens) for t in found)
    metric = "tok_bleu" if "tok_bleu" in translator.config.eval.metrics else "bleu"
    return {
        "beam": beam,
        "alpha": search["alpha"],
        "batch_size": batch_size,
        "shortlist": shortlist,
        "attention": attention,
        "seconds": seconds,
        "sentences_per_s": len(sources) / seconds,
        "target_tokens": tokens,
        "target_tokens_per_s": tokens / seconds,
        metric: score(hypotheses, references, [metric]).values[metric],
    }, hypotheses


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode_speed",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dirs", nargs="+")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--alpha", type=float, default=0.0, help="GNMT length penalty for beam search")
    parser.add_argument("--no-cache", action="store_true", help="also time Transformers without the KV cache")
    parser.add_argument("--torch-linear", action="store_true",
                        help="also time a wide fp32 output layer on torch's nn.Linear (MKL) instead of oneDNN")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="time each variant this many times, interleaved")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32"],
                        help="fp32 (exact), bf16 / fp16 autocast, int8 weights (CPU)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--name", type=record_name, help="record name (default: decode_speed_<device>)")
    args = parser.parse_args()
    keep_freed_memory()  # as the aligna command does
    runs = []
    print(
        f"{'model':<32} {'prec':>5} {'cache':>6} {'linear':>6} {'beam':>4} {'batch':>5} {'sent/s':>8} {'tok/s':>8} "
        f"{'BLEU':>6}"
    )
    for model_dir in args.model_dirs:
        translator = aligna.load(model_dir, checkpoint=args.checkpoint, device=args.device)
        config = translator.config
        if config.data.test is None:
            parser.error(f"{model_dir}: its config has no data.test")
        test = read_parallel(config.data.test, "test")
        sources, references = reference_sets(test, config.data.group_references)
        cached = "yes" if isinstance(translator.model, Transformer) else "-"
        variants = [(cached, "onednn", translator.model)]  # (KV cache, output layer, model)
        if args.no_cache and isinstance(translator.model, Transformer):
            variants.append(("no", "onednn", Uncached(translator.model).eval()))
        if args.torch_linear:
            variants.append((cached, "torch", translator.model))
        for precision, beam, batch_size in product(args.precisions, args.beams, args.batch_sizes):
            translator.precision = precision
            outputs = {}
            for round_, (cache, linear, model) in product(range(1, args.rounds + 1), variants):
                translator.model = model
                wide = model_module.WIDE_FP32_FEATURES
                model_module.WIDE_FP32_FEATURES = wide if linear == "onednn" else 1 << 62  # never wide enough
                try:
                    run, outputs[cache, linear] = measure(translator, sources, references, beam, batch_size, args.alpha)
                finally:
                    model_module.WIDE_FP32_FEATURES = wide
                run |= {"model_dir": model_dir, "config_sha256": config_hash(config), "precision": precision,
                        "arch": config.model.arch, "kv_cache": cache, "output_layer": linear, "round": round_,
                        "test_set": test.origin}  # fmt: skip
                runs.append(run)
                bleu = run.get("tok_bleu", run.get("bleu"))
                print(
                    f"{Path(model_dir).name:<32} {precision:>5} {cache:>6} {linear:>6} {beam:>4} {batch_size:>5} "
                    f"{run['sentences_per_s']:8.1f} {run['target_tokens_per_s']:8.0f} {bleu:6.2f}",
                    flush=True,
                )
            for other in outputs.keys() - {(cached, "onednn")}:
                changed = sum(a != b for a, b in zip(outputs[cached, "onednn"], outputs[other]))
                if changed:
                    print(f"  outputs of {other} differ from the first variant's in {changed} sentences (float rounding)")
            translator.model = variants[0][2]
    device = "cpu" if args.device == "cpu" else "gpu"
    write_record(args.name or f"decode_speed_{device}", {
        "benchmark": "decode_speed", "threads": torch.get_num_threads(), "runs": runs,
    })  # fmt: skip


if __name__ == "__main__":
    main()
