"""Load on `aligna serve`: many concurrent clients, each sending one sentence per request.

    python -m bench.serve_load runs/multi30k_de_en_transformer
    python -m bench.serve_load runs/multi30k_de_en_bahdanau runs/multi30k_de_en_transformer --clients 100 --duration 30
    python -m bench.serve_load runs/toy --clients 10 --duration 5 --src data/toy/test.src --name serve_load_toy
    python -m bench.serve_load runs/quickstart --sample 1 --name serve_load_sampled_cpu

For each mode, dynamic batching on (`--max-batch`, default 32) and off (`--max-batch 1`), a
fresh `python -m aligna serve MODEL_DIR ...` is started on a free loopback port, and
`--clients` asyncio clients (one httpx.AsyncClient) send POST /v1/translate with one
sentence each, back to back, for `--duration` seconds. Sentences come from `--src` in order
(each model gets every sentence in turn; several models are asked in rotation). Reported per
mode: requests/s (the answers that came within `--duration`), latency p50/p95/p99 (of every
answer: the requests still in flight at the end are awaited, and how long that took is the
"drain"), errors (anything but a 200; the run fails if there are any), and the server's
resident memory when ready and after the load (and its peak). Last, the translations of
sentences both modes decoded are compared: batching must not change the output. Writes
bench/results/serve_load_<device>.json (or --name).

The clients run in this process on the same machine as the server, so on a small machine
they take CPU from it: the numbers are what one machine serves to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from aligna.data import read_lines
from bench.common import ROOT, record_name, write_record
from scripts.screenshot import Server  # the page's test and screenshots start it the same way

DEFAULT_SRC = ROOT.parent / "shared" / "data" / "multi30k" / "test_2016_flickr.lc.norm.tok.de.gz"


def rss_bytes(pid: int) -> dict[str, int | None]:
    """The process's resident memory now and at its peak (VmHWM), in bytes (psutil if present)."""
    status: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                status[key] = int(value.split()[0]) * 1024  # "123456 kB"
    except OSError:
        pass
    rss = status.get("VmRSS")
    try:
        import psutil

        rss = psutil.Process(pid).memory_info().rss
    except ImportError:
        pass
    except Exception:  # the process is gone
        rss = None
    return {"rss": rss, "peak": status.get("VmHWM")}


def mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.0f} MiB"


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation, as numpy's default."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


async def load(
    url: str, names: list[str], sources: list[str], clients: int, duration: float, search: dict[str, Any]
) -> dict[str, Any]:
    """`clients` loops sending one sentence per request until `duration` has passed."""
    jobs = ((name, i) for i in range(10**9) for name in names)  # every model gets every sentence in turn
    latencies: list[float] = []
    in_window = 0  # answered before the deadline
    errors: Counter[str] = Counter()
    outputs: dict[tuple[str, int], set[str]] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(120.0)) as http:

        async def client() -> None:
            nonlocal in_window
            while time.perf_counter() < deadline:
                name, i = next(jobs)
                body = {"model": name, "texts": [sources[i % len(sources)]], **search}
                sent = time.perf_counter()
                try:
                    response = await http.post("/v1/translate", json=body)
                except httpx.HTTPError as e:
                    errors[f"{type(e).__name__}: {e}"[:200]] += 1
                    continue
                if response.status_code != 200:
                    errors[f"{response.status_code}: {response.text}"[:200]] += 1
                    continue
                done = time.perf_counter()
                latencies.append(done - sent)
                in_window += done <= deadline
                outputs.setdefault((name, i % len(sources)), set()).add(response.json()["results"][0]["text"])

        started = time.perf_counter()
        deadline = started + duration
        await asyncio.gather(*(client() for _ in range(clients)))
        drain = time.perf_counter() - deadline
    latencies.sort()
    return {
        "seconds": duration,
        "drain_seconds": drain,  # after the deadline, until the requests in flight were answered
        "requests": len(latencies) + sum(errors.values()),
        "ok": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "requests_per_s": in_window / duration,  # successful answers within the window
        "latency_ms": {f"p{q}": 1000 * percentile(latencies, q) for q in (50, 95, 99)}
        | {
            "mean": 1000 * sum(latencies) / max(len(latencies), 1),
            "max": 1000 * latencies[-1] if latencies else None,
        },
        "distinct_sentences": len(outputs),
        "unstable": sum(len(v) > 1 for v in outputs.values()),  # one sentence, several outputs in one mode
    }, outputs


async def warm_up(url: str, names: list[str], sources: list[str], search: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0)) as http:
        for name in names:
            response = await http.post("/v1/translate", json={"model": name, "texts": sources[:2], **search})
            response.raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_load",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model_dirs", nargs="+", help="directories written by `aligna train`, served together"
    )
    parser.add_argument("--src", default=str(DEFAULT_SRC), help="one sentence per line, plain or .gz "
                        "(default: Multi30k test_2016_flickr, lowercased and tokenized German)")  # fmt: skip
    parser.add_argument("--clients", type=int, default=100, help="concurrent clients (default: 100)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per mode (default: 30)")
    parser.add_argument(
        "--max-batch", type=int, default=32, help="the batched mode's --max-batch (default: 32)"
    )
    parser.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="the server's --max-wait-ms (default: 10)"
    )
    parser.add_argument("--beam", type=int, help="beam_size of every request (default: the models' own)")
    parser.add_argument("--sample", type=int, metavar="SEED", help="sample every request with this seed instead of "
                        "searching: the sampled outputs must not change with batching either")  # fmt: skip
    parser.add_argument("--device", default="auto", help="the server's --device (default: auto)")
    parser.add_argument("--threads", type=int, help="the server's --threads (default: torch's choice)")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /readyz")
    parser.add_argument("--name", type=record_name, help="record name (default: serve_load_<device>)")
    args = parser.parse_args()
    if args.clients < 1 or args.duration <= 0 or args.max_batch < 1:
        parser.error("--clients, --duration and --max-batch must be positive")

    sources = [s for s in read_lines(args.src) if s.strip()]
    if not sources:
        parser.error(f"{args.src}: no sentences")
    names: list[str] = []
    for model_dir in args.model_dirs:  # the directories' names, made distinct
        name = Path(model_dir).resolve().name
        names.append(name if name not in names else f"{name}-{len(names) + 1}")
    if args.beam is not None and args.sample is not None:
        parser.error("--beam and --sample exclude each other")
    search = {} if args.beam is None else {"beam_size": args.beam}
    if args.sample is not None:
        search = {"sample": True, "seed": args.sample}
    extra = ["--max-wait-ms", str(args.max_wait_ms), "--device", args.device]
    if args.threads is not None:
        extra += ["--threads", str(args.threads)]

    print(f"serving {', '.join(f'{n} ({d})' for n, d in zip(names, args.model_dirs))}")
    print(f"{args.clients} clients for {args.duration:g} s per mode, single sentences from {args.src} "
          f"({len(sources)} lines), search {search or 'the models default'}")  # fmt: skip
    print(f"{'mode':<10} {'batch':>5} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6} "
          f"{'RSS ready':>10} {'RSS after':>10} {'RSS peak':>10} {'drain s':>7}")  # fmt: skip
    runs, outputs, served = [], {}, []
    device = "cpu"
    for mode, max_batch in (("batched", args.max_batch), ("unbatched", 1)):
        options = [*extra, "--max-batch", str(max_batch), *(o for n in names for o in ("--name", n))]
        server = Server(args.model_dirs, *options)
        try:
            server.wait_ready(args.ready_timeout)
            info = httpx.get(server.url + "/v1/models", timeout=10).json()
            asyncio.run(warm_up(server.url, names, sources, search))
            before = rss_bytes(server.process.pid)
            run, outputs[mode] = asyncio.run(
                load(server.url, names, sources, args.clients, args.duration, search)
            )
            after = rss_bytes(server.process.pid)
        except BaseException:
            print(f"the server's log ends:\n{server.log_text()}", file=sys.stderr)
            raise
        finally:
            server.stop()
        served = [{k: m.get(k) for k in ("name", "architecture", "parameters", "device", "precision")}
                  for m in info.get("models", [])]  # fmt: skip
        device = "gpu" if any("cuda" in str(m["device"]) for m in served) else "cpu"
        run |= {"mode": mode, "max_batch": max_batch, "rss_ready": before["rss"], "rss_after": after["rss"],
                "rss_peak": after["peak"], "server": " ".join(server.command[1:]), "url": server.url}  # fmt: skip
        runs.append(run)
        lat = run["latency_ms"]
        print(f"{mode:<10} {max_batch:>5} {run['requests_per_s']:8.1f} {lat['p50']:8.1f} {lat['p95']:8.1f} "
              f"{lat['p99']:8.1f} {run['errors']:>6} {mib(before['rss']):>10} {mib(after['rss']):>10} "
              f"{mib(after['peak']):>10} {run['drain_seconds']:7.1f}", flush=True)  # fmt: skip
        for kind, n in run["error_kinds"].items():
            print(f"  {n} x {kind}")

    both = outputs["batched"].keys() & outputs["unbatched"].keys()
    differ = sorted(k for k in both if outputs["batched"][k] != outputs["unbatched"][k])
    unstable = sum(r["unstable"] for r in runs)
    print(f"translations: {len(both)} (model, sentence) pairs decoded in both modes, {len(differ)} differ; "
          f"{unstable} gave different outputs within one mode")  # fmt: skip
    for name, i in differ[:5]:
        print(f"  {name} line {i + 1}: {sorted(outputs['batched'][(name, i)])} vs "
              f"{sorted(outputs['unbatched'][(name, i)])}")  # fmt: skip
    write_record(args.name or f"serve_load_{device}", {
        "benchmark": "serve_load", "model_dirs": args.model_dirs, "models": served, "src": str(args.src),
        "clients": args.clients, "duration": args.duration, "search": search, "runs": runs,
        "compared": len(both), "differ": len(differ), "same_translations": not differ,
        "differing": [{"model": n, "line": i + 1, "batched": sorted(outputs["batched"][(n, i)]),
                       "unbatched": sorted(outputs["unbatched"][(n, i)])} for n, i in differ[:20]],
    })  # fmt: skip
    if any(r["errors"] for r in runs):
        sys.exit(f"{sum(r['errors'] for r in runs)} requests failed")


if __name__ == "__main__":
    main()
