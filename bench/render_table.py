"""Render the README results table from the JSON records in bench/results/.

    python -m bench.render_table            # rewrite the table in README.md
    python -m bench.render_table --check    # exit 1 if README.md is out of date

Only records are shown: a row without a record cannot appear.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
LABELS = {
    "tok_bleu": "tok BLEU",
    "bleu": "sacreBLEU",
    "chrf": "chrF",
    "wer": "WER %",
    "per": "PER %",
    "ppl": "PPL",
}


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _machine(m: dict) -> str:
    cpu = m["cpu"] + (f" ({m['isa']})" if "isa" in m else "")  # older records did not say
    return f"{m['device'] if m['device'] != 'cpu' else cpu}, {m['cores']} cores, torch {m['torch']}"


def _trained_on(record: dict) -> str:
    """The machine a published record was scored on, and the devices it trained on where those
    were not that machine's CPU (a lent GPU)."""
    devices = [d for d in record.get("train_devices", []) if d != "cpu"]
    where = _machine(record["machine"])
    return f"trained on {' + '.join(record['train_devices'])}, scored on {where}" if devices else where


def _search(beam: int, alpha: float | None = None) -> str:
    return ("greedy" if beam == 1 else f"beam {beam}") + (f", alpha {alpha}" if alpha else "")


def _scores(metrics: dict[str, float]) -> str:
    return " · ".join(f"{LABELS.get(k, k)} {v:.1f}" for k, v in metrics.items() if k != "loss")


def _command(record: dict) -> str:
    """What reproduces a record: its `reproduce` where the command alone does not (a model to
    train first, another checkout), else the command that wrote it."""
    return record.get("reproduce", record["command"])


def _config(record: dict) -> str:
    return record["config"] + "".join(f" `{o}`" for o in record["overrides"])


def quality_rows(records: list[dict]) -> list[str]:
    rows = [
        "| model | test set | scores (greedy) | train time | train tok/s | machine | reproduce |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        scores = _scores(r["metrics"])
        threads = f" ({_threads(r['train_threads'])})" if r.get("train_threads") else ""
        note = f" ({r['train_note']})" if r.get("train_note") else ""
        rows.append(
            f"| {r['name']} | {Path(r['test_set'].split(' / ')[0]).name} | {scores} | "
            f"{r['train_seconds'] / 60:.0f} min, {r['train_steps']} steps{note} | "
            f"{r['train_target_tokens_per_s']:,.0f}{threads} | {_machine(r['machine'])} | `{_command(r)}` |"
        )
    return rows


def speed_rows(record: dict) -> list[str]:
    rows = [
        f"`{_command(record)}` at commit {record['git_commit'][:7]} (the configs as they were then) on "
        f"{_machine(record['machine'])}:",
        "",
        "| config | parameters | batch tokens | train target tok/s |",
        "|---|---|---|---|",
    ]
    for run in record["runs"]:
        rows.append(
            f"| {run['config']} | {run['parameters'] / 1e6:.1f} M | {run['batch_tokens']} | "
            f"{run['target_tokens_per_s']:,.0f} |"
        )
    return rows


def speed_against_rows(record: dict) -> list[str]:
    rows = [
        f"`{_command(record)}` on {_machine(record['machine'])}: commit {record['baseline_commit'][:7]} against "
        f"{record['git_commit'][:7]}, each in its own process, {len(record['rounds']) // 2} rounds alternating, "
        "the fastest round of each:",
        "",
        f"| config | {record['baseline_commit'][:7]} target tok/s | {record['git_commit'][:7]} target tok/s | speed-up |",
        "|---|---|---|---|",
    ]
    for s in record["summary"]:
        rows.append(
            f"| {s['config']} | {s['baseline_tokens_per_s']:,.0f} | {s['tokens_per_s']:,.0f} | {s['speedup']:.2f}x |"
        )
    return rows + (["", record["note"]] if record.get("note") else [])


def kernel_rows(record: dict) -> list[str]:
    """The C kernels alone by thread count (1 thread: the loop before it split its rows)."""
    one = next((r for r in record["runs"] if r["threads"] == 1), None)
    rows = [
        f"`{_command(record)}` on {_machine(record['machine'])}: the C kernels alone, the fastest of "
        f"{record['rounds']} calls (1 thread is the loop before it split its rows among torch's threads):",
        "",
        f"| threads | training loss, {record['rows']:,} x {record['vocab']:,} logits | "
        f"beam step, {record['batch']} x {record['beam']} rows, log-softmax and best candidates |",
        "|---|---|---|",
    ]
    for run in record["runs"]:
        gain = [f" ({one[k] / run[k]:.2f}x)" if one and run is not one else "" for k in ("loss_ms", "beam_step_ms")]
        rows.append(f"| {run['threads']} | {run['loss_ms']:.1f} ms{gain[0]} | {run['beam_step_ms']:.2f} ms{gain[1]} |")
    return rows


def decode_rows(record: dict) -> list[str]:
    rows = [
        f"`{_command(record)}` on {_machine(record['machine'])}, {_threads(record['threads'])}:",
        "",
        "| model | precision | KV cache | search | batch | sentences/s | target tok/s | BLEU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in record["runs"]:
        search = _search(run["beam"], run.get("alpha"))
        bleu = run.get("tok_bleu", run.get("bleu"))
        rows.append(
            f"| {Path(run['model_dir']).name} | {run.get('precision', 'fp32')} | {run['kv_cache']} | {search} | "
            f"{run['batch_size']} | "
            f"{run['sentences_per_s']:,.1f} | {run['target_tokens_per_s']:,.0f} | {bleu:.1f} |"
        )
    return rows


def output_layer_rows(record: dict) -> list[str]:
    """A decode_speed record with --torch-linear: per search and batch, the median sentences/s
    of the output layer on oneDNN and on torch's nn.Linear, and the ratio of each round."""
    rows = [
        f"`{_command(record)}` on {_machine(record['machine'])}, {_threads(record['threads'])}:",
        "",
        "| model | search | batch | rows of the output layer (a full batch) | oneDNN sentences/s | nn.Linear sentences/s | speed-up (median) | speed-up by round |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    groups: dict[tuple, dict[str, dict[int, float]]] = {}
    for run in record["runs"]:
        key = (Path(run["model_dir"]).name, run["beam"], run["batch_size"])
        groups.setdefault(key, {}).setdefault(run["output_layer"], {})[run["round"]] = run["sentences_per_s"]
    for (model, beam, batch), by in groups.items():
        fast, slow = by["onednn"], by["torch"]
        ratios = [fast[k] / slow[k] for k in sorted(fast) if k in slow]
        rows.append(
            f"| {model} | {_search(beam)} | {batch} | {beam * batch} | {statistics.median(fast.values()):,.1f} | "
            f"{statistics.median(slow.values()):,.1f} | {statistics.median(ratios):.2f}x | "
            f"{' / '.join(f'{x:.2f}' for x in ratios)} |"
        )
    return rows


def _weights(record: dict) -> str:
    best = record.get("weights_scores")
    where = Path(record.get("weights", record["checkpoint"])).name
    return f"{where}: step {best['step']}, dev tok BLEU {best['tok_bleu']:.2f}" if best else where


def engine_rows(record: dict) -> list[str]:
    """One row per search, batch and threads; a column per engine and precision (sentences/s,
    and in brackets how many outputs equal aligna fp32's where that is not all)."""
    engines = list(dict.fromkeys((r["engine"], r["precision"]) for r in record["runs"]))
    listed = any(r.get("shortlist") for r in record["runs"])  # a column saying which rows used the shortlist
    cells: dict[tuple, dict] = {}
    for r in record["runs"]:
        cells.setdefault((r["threads"], r["beam"], r["batch_size"], r.get("shortlist", False)), {})[
            r["engine"], r["precision"]] = r  # fmt: skip
    n = record["runs"][0]["sentences"]
    rounds = len(record["runs"][0].get("rounds_seconds", [None]))
    peers = [p for p in [("ctranslate2", "int8"), ("ctranslate2-alone", "int8")] if p in engines]
    rows = [
        f"`{_command(record)}` on {_machine(record['machine'])}"
        + (f", CTranslate2 {record['ctranslate2_version']}" if peers else "") + ", "
        f"{n} sentences of {Path(record['test_set'].split(' / ')[0]).name}, model {record['model_dir']} "
        f"({_weights(record)}). Sentences/s"
        + (f" (the fastest of {rounds} rounds, the engines in turn)" if rounds > 1 else "")
        + f", BLEU in brackets; where not all {n} outputs "
        "equal aligna fp32's, how many do:",
        *(["", f"Shortlist: {record['shortlist']}."] if listed and record.get("shortlist") else []),
        *(["", f"Note: {record['note']}."] if record.get("note") else []),
        "",
        "| threads | search | batch | " + ("shortlist | " if listed else "")
        + " | ".join(f"{e} {p}" for e, p in engines) + " |"
        + "".join(f" aligna int8 / {'CT2 alone' if e == 'ctranslate2-alone' else 'CT2'} int8 |" for e, _ in peers),
        "|---|---|---|" + ("---|" if listed else "") + "---|" * (len(engines) + len(peers)),
    ]
    for (threads, beam, batch, shortlist), found in cells.items():
        parts = []
        for key in engines:
            r = found.get(key)
            if r is None:
                parts.append("-")
                continue
            bleu = r.get("tok_bleu", r.get("bleu"))
            same = r.get("same_as_aligna_fp32")
            parts.append(f"{r['sentences_per_s']:,.1f} ({bleu:.1f})" + (f", {same} same" if same not in (None, n) else ""))
        ours = found.get(("aligna", "int8"))
        ratios = []
        for peer in peers:
            theirs = found.get(peer)
            ratios.append(f"{ours['sentences_per_s'] / theirs['sentences_per_s']:.2f}x" if ours and theirs else "-")
        rows.append(f"| {threads} | {_search(beam)} | {batch} | " + (f"{'yes' if shortlist else 'no'} | " if listed else "")
                    + " | ".join(parts + ratios) + " |")  # fmt: skip
    if record.get("quality"):
        q = record["quality"]
        rows += ["", f"The whole test set ({q[0]['sentences']} sentences), beam 5, alpha 0.6, batch 64: "
                 + "; ".join(f"{r['engine']} {r['precision']} tok BLEU {r.get('tok_bleu', r.get('bleu')):.2f}"
                             f" ({r['same_as_aligna_fp32']} outputs equal aligna fp32's)" for r in q) + "."]  # fmt: skip
    return rows


def corpus_rows(records: list[dict]) -> list[str]:
    rows = [
        "| corpus | pairs | training data | prepare | prepare peak RSS | train peak RSS | start to first update | "
        "code | machine | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["pairs"], r["mode"] != "baseline")):
        prep = r.get("prepare")
        train = r["train"]
        kind = "in memory (before `aligna prepare`)" if r["mode"] == "baseline" else "memory-mapped corpus"
        rows.append(
            f"| Multi30k x{r['repeat']} | {r['pairs']:,} | {kind} | "
            + (f"{prep['seconds']:.0f} s | {prep['peak_rss_mib']:,.0f} MiB | " if prep else "- | - | ")
            + f"{train['peak_rss_mib']:,.0f} MiB | {train['first_update_seconds']:.1f} s | {r['tree_commit'][:7]} | "
            f"{_machine(r['machine'])} | `{_command(r)}` |"
        )
    return rows


def distributed_rows(record: dict) -> list[str]:
    rows = [
        f"`{_command(record)}` on {_machine(record['machine'])}:",
        "",
        "| processes | threads each | updates | target tokens | seconds | target tok/s | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        rows.append(
            f"| {r['processes']} | {r['threads_per_process']} | {r['updates']} | {r['target_tokens']:,} | "
            f"{r['seconds']:.1f} | {r['target_tokens_per_s']:,.0f} | {r['speedup']:.2f}x |"
        )
    return rows


def peer_speed_rows(records: list[dict]) -> list[str]:
    rows = [
        "| config | parameters aligna / JoeyNMT | threads | aligna tok/s | JoeyNMT tok/s | ratio | machine | reproduce |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        a, j = r["aligna"], r["joeynmt"]
        rows.append(
            f"| {_config(r)} | {a['parameters'] / 1e6:.1f} M / {j['parameters'] / 1e6:.1f} M | {r['threads']['aligna']} | "
            f"{a['target_tokens_per_s']:,.0f} | {j['target_tokens_per_s']:,.0f} | "
            f"{r['ratio_aligna_over_joeynmt']:.2f}x | {_machine(r['machine'])} | `{_command(r)}` |"
        )
    return rows


def peer_translate_rows(record: dict) -> list[str]:
    rows = [
        f"{_config(record)}: aligna {record['aligna_parameters'] / 1e6:.1f} M parameters ({record['aligna_model_dir']}), "
        f"JoeyNMT {record['joeynmt_parameters'] / 1e6:.1f} M ({record['joeynmt_model_dir']}); "
        f"{record['sentences']} test sentences, {_threads(record['threads']['aligna'])} each, "
        f"{_machine(record['machine'])}; `{_command(record)}`",
        "",
        "| aligna precision | search | batch | aligna sent/s | JoeyNMT sent/s (fp32) | ratio | aligna tok/s | "
        "JoeyNMT tok/s | aligna BLEU | JoeyNMT BLEU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        a, j = r["aligna"], r["joeynmt"]
        rows.append(
            f"| {r.get('aligna_precision', 'fp32')} | {_search(r['beam'])} | {r['batch_size']} | {a['sentences_per_s']:,.1f} | "
            f"{j['sentences_per_s']:,.1f} | {r['ratio_sentences_per_s']:.2f}x | {a['target_tokens_per_s']:,.0f} | "
            f"{j['target_tokens_per_s']:,.0f} | {a['tok_bleu']:.1f} | {j['tok_bleu']:.1f} |"
        )
    return rows


def peer_curve_rows(record: dict) -> list[str]:
    a, j = record["aligna"], record["joeynmt"]
    rows = [
        f"`{_command(record)}` on {_machine(record['machine'])}; aligna {record.get('aligna_precision', 'fp32')} "
        f"({a['model_dir']}), JoeyNMT fp32 ({record['joeynmt_model_dir']}):",
        "",
        "| updates | aligna train min | aligna dev tok BLEU | JoeyNMT train min | JoeyNMT dev tok BLEU |",
        "|---|---|---|---|---|",
    ]
    ours = {p["step"]: p for p in a["points"]}
    for p in j["points"]:
        o = ours.get(p["step"])
        mine = f"{o['train_seconds'] / 60:.1f} | {o['tok_bleu']:.2f}" if o and o["train_seconds"] else "- | -"
        rows.append(f"| {p['step']} | {mine} | {p['train_seconds'] / 60:.1f} | {p['tok_bleu']:.2f} |")
    return [*rows, "", f"![{record['name']}]({record['plot']})"]


def chosen_on_dev(grid: list[dict], names: dict[str, str]) -> list[str]:
    """What a dev grid chose: the names of its keys (`names`: key -> name) that took more than
    one value in it (bench.published words its records' chosen_by with it too)."""
    return [name for key, name in names.items() if len({json.dumps(g.get(key)) for g in grid}) > 1]


def _chosen_on_dev(record: dict) -> str:
    """' (X chosen on dev)', X what the record's dev grid varied: the weights, the member weights
    of an ensemble, alpha, or both; '' where it varied nothing (no --tune, or one choice)."""
    varied = chosen_on_dev(record.get("dev_grid") or [],
                           {"weights": "weights", "member_weights": "member weights", "alpha": "alpha"})  # fmt: skip
    if not varied:
        return ""
    return f" ({'both' if len(varied) > 1 else varied[0]} chosen on dev)"


def published_rows(records: list[dict]) -> list[str]:
    rows = [
        "| row | test set | aligna | published | target | met | all scores | weights, search | train | reproduce |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        scores = _scores(r["metrics"])
        for metric, v in r["verdicts"].items():
            verdict = f"yes (+{v['margin']:.2f})" if v["met"] else f"no ({v['margin']:.2f})"
            rows.append(
                f"| {r['row']} | {Path(r['test_set'].split(' / ')[0]).name} | {LABELS.get(metric, metric)} "
                f"{v['aligna']:.2f} | {v['published']} | {v['target']} | {verdict} | {scores} | "
                f"{r['weights']}; {r['search']}{_chosen_on_dev(r)} | "
                f"{r['train_seconds'] / 60:.0f} min, {r['train_steps']} steps, "
                f"{r['train_precision']}, {_trained_on(r)} | `{r['reproduce']}` |"
            )
    notes = [f"- {r['row']}: {r['note']}" for r in records if r.get("note")]
    return rows + (["", *notes] if notes else [])


def quickstart_rows(records: list[dict]) -> list[str]:
    rows = [
        "| `./quickstart.sh` in all | install | training | test tok BLEU / BLEU / chrF | machine | command |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        t = r["test"]
        rows.append(
            f"| {r['seconds'] / 60:.1f} min | {r['install_seconds']} s | {r['train_seconds']:.0f} s, "
            f"{r['train_steps']} updates, {r['train_target_tokens_per_s']:,.0f} target tokens/s | "
            f"{t['tok_bleu']:.2f} / {t['bleu']:.2f} / {t['chrf']:.2f} | {_machine(r['machine'])} | `{_command(r)}` |"
        )
    return rows


def _serve_search(search: dict) -> str:
    """A serve_load record's search: the models' default, a beam, or sampling with a seed."""
    if search.get("sample"):
        return f"sampling, seed {search['seed']}"
    return f"beam {search['beam_size']}" if "beam_size" in search else "the models' default"


def serve_load_rows(records: list[dict]) -> list[str]:
    rows = [
        "| models | search | server threads | batching | clients | requests/s | p50 / p95 / p99 ms | errors | "
        "RSS ready -> after | same output | machine | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        models = ", ".join(f"{m['name']} ({m['architecture']}, {m['parameters'] / 1e6:.1f} M)" for m in r["models"])
        for run in r["runs"]:
            lat = run["latency_ms"]
            threads = run["server"].split("--threads ")[1].split()[0] if "--threads " in run["server"] else "default"
            batching = f"max batch {run['max_batch']}" if run["max_batch"] > 1 else "off (max batch 1)"
            rows.append(
                f"| {models} | {_serve_search(r['search'])} | {threads} | {batching} | {r['clients']} | "
                f"{run['requests_per_s']:.1f} | "
                f"{lat['p50']:,.0f} / {lat['p95']:,.0f} / {lat['p99']:,.0f} | {run['errors']} | "
                f"{run['rss_ready'] / 2**20:.0f} -> {run['rss_after'] / 2**20:.0f} MiB | "
                f"{'yes' if r['same_translations'] else 'NO'} ({r['compared']}) | {_machine(r['machine'])} | "
                f"`{_command(r)}` |"
            )
    return rows


def render() -> str:
    records = [json.loads(p.read_text()) for p in sorted((ROOT / "bench" / "results").glob("*.json"))]
    quality = [r for r in records if "metrics" in r and r.get("benchmark") != "published"]
    speed = [r for r in records if r.get("benchmark") == "train_speed"]
    lengths = [r for r in records if r.get("benchmark") == "length_buckets"]
    parts = [START, ""]
    quickstart = [r for r in records if r.get("benchmark") == "quickstart"]
    if quickstart:
        parts += ["The quickstart from a fresh clone, timed from the outside (`bench/results/quickstart_*.json`; "
                  "test_2016_flickr, greedy):", "", *quickstart_rows(quickstart), ""]  # fmt: skip
    parts += ["Quality (each row is `bench/results/<model>.json`):", ""]
    parts += quality_rows(quality) if quality else ["(no records yet)"]
    published = [r for r in records if r.get("benchmark") == "published"]
    if published:
        parts += ["", "Against published results (`bench/results/published_*.json`; what each published number "
                  "measured is in `bench/published.py` and in the record):", "", *published_rows(published)]  # fmt: skip
    parts += ["", "Training speed (`bench/results/train_speed_*.json`):"]
    for r in speed:
        parts += ["", *speed_rows(r)]
    for r in [r for r in records if r.get("benchmark") == "train_speed_against"]:
        parts += ["", *speed_against_rows(r)]
    for r in [r for r in records if r.get("benchmark") == "kernel_speed"]:
        parts += ["", *kernel_rows(r)]
    if not speed:
        parts += ["", "(no records yet)"]
    scaling = [r for r in records if r["name"].startswith("corpus_scale")]
    if scaling:
        parts += ["", "Data that scales: `configs/quickstart.yaml` as of each row's code commit (then a GRU without "
                  "attention) on Multi30k repeated N times, "
                  "`train.max_steps: 1`, no dev set, 1 thread; peak RSS of the largest process "
                  "(`bench/results/corpus_scale_*.json`):", "", *corpus_rows(scaling)]  # fmt: skip
    for r in [r for r in records if r.get("benchmark") == "distributed_speed"]:
        parts += ["", f"Training on several processes, DDP under torchrun, each process with the config's batch "
                  f"tokens (`bench/results/{r['name']}.json`):", "", *distributed_rows(r)]  # fmt: skip
    peers = [r for r in records if r.get("benchmark") == "peer_joeynmt_train_speed"]
    if peers:
        parts += ["", "Training speed against JoeyNMT 2.3.0, same data, same batches, fp32, target tokens/s of "
                  "the update (`bench/results/peer_joeynmt_train_speed_*.json`; what differs is listed in "
                  "`bench/joeynmt/__init__.py`):", "", *peer_speed_rows(peers)]  # fmt: skip
    for r in [r for r in records if r.get("benchmark") == "peer_joeynmt_train"]:
        parts += ["", f"Time to quality against JoeyNMT 2.3.0, same data and batches, dev BLEU by training "
                  f"time without validation (`bench/results/{r['name']}.json`):", "", *peer_curve_rows(r)]  # fmt: skip
    for r in [r for r in records if r.get("benchmark") == "decode_speed"]:
        if any(run.get("output_layer") == "torch" for run in r["runs"]):
            parts += ["", f"fp32 search with a wide output layer (`aligna.model.output_layer`) on oneDNN against torch's "
                      f"nn.Linear (MKL), interleaved rounds (`bench/results/{r['name']}.json`; {r['note']}):", "",
                      *output_layer_rows(r)]  # fmt: skip
            continue
        parts += ["", f"Translation speed (`bench/results/{r['name']}.json`; BLEU is tok BLEU where the "
                  "model scores tokenized text):", "", *decode_rows(r)]  # fmt: skip
    for r in [r for r in records if r.get("benchmark") == "engine_speed"]:
        if not any(run["engine"].startswith("ctranslate2") for run in r["runs"]):  # an RNN: CTranslate2 has none
            parts += ["", f"aligna's engines on an RNN, which CTranslate2 cannot run (`bench/results/{r['name']}.json`; "
                      "compare engines within a row):", "", *engine_rows(r)]  # fmt: skip
            continue
        attention = ("aligna and `ctranslate2` return attention maps" if r.get("attention", True)
                     else "no engine computes attention maps (as `aligna translate` without `--attention`)")
        parts += ["", f"aligna against CTranslate2 on the same model (`bench/results/{r['name']}.json`; "
                  "`ctranslate2` is the exported model behind aligna's text ends, `ctranslate2-alone` its own "
                  "`translate_batch` on pre-tokenized input, without attention and with its default length "
                  f"limit of 256; {attention}; on this 2-core machine a second thread slowed small batches for "
                  "every engine, so compare engines within a row):", "", *engine_rows(r)]  # fmt: skip
    for r in [r for r in records if r.get("benchmark") == "peer_joeynmt_translate_speed"]:
        parts += ["", f"Translation speed against JoeyNMT 2.3.0, same test set, same length limit, no length "
                  f"penalty (`bench/results/{r['name']}.json`):", "", *peer_translate_rows(r)]  # fmt: skip
    serving = [r for r in records if r.get("benchmark") == "serve_load"]
    if serving:
        parts += ["", "Serving under load: `aligna serve` on loopback, each client sending one test_2016_flickr "
                  "sentence per request back to back, dynamic batching on and off, the clients on the same "
                  "machine (`bench/results/serve_load_*.json`). The models are `configs/multi30k_de_en_{transformer,"
                  "bahdanau}.yaml` trained for 60 updates (the command trains them first): their size and output "
                  "lengths are real, their quality is not the point here; and the quickstart's Transformer, "
                  "sampled (each sampled request was decoded alone before d6135a9, as with batching off):", "",
                  *serve_load_rows(serving)]  # fmt: skip
    for r in lengths:
        parts += [
            "",
            f"Score by source length, {Path(r['test_set'].split(' / ')[0]).name} "
            f"({r['metric']}, {r['search']}; `{_command(r)}`, `bench/results/{r['name']}.json`)"
            + (f"; {r['note']}:" if r.get("note") else ":"),
            "",
        ]
        parts += [r["table"], "", f"![{r['name']}]({r['plot']})"]
    return "\n".join([*parts, "", END])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.render_table", description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    updated = head + render() + tail
    if args.check:
        sys.exit(0 if updated == text else 1)
    README.write_text(updated, encoding="utf-8")
    print("README.md results table updated")


if __name__ == "__main__":
    main()
