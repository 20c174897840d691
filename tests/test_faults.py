"""Fault and fuzz checks: a training run killed anywhere resumes to the weights it would
have reached, and translate writes one output line (or n-best block) per input line
whatever Unicode it is given.

Kill tests: tiny training runs are SIGKILLed, either inside a checkpoint save (wrappers
around os.replace, os.rename, os.fsync, shutil.rmtree and safetensors' writers kill the
process before or after their k-th call inside the model directory: at random calls, and
at every call of one save in turn) or after a random delay, and continued with
`aligna train CONFIG --resume` until one exits 0. Their final weights and validation
history must equal those of an uninterrupted run. Each run is a child process running
`aligna.cli.main(["train", ...])`, forked from a server process that has imported torch
and aligna once (a fresh interpreter spends ~3 s importing them). The kill plans come
from random.Random(SEED): set ALIGNA_FAULT_SEED to explore others; a failure's message
lists its plan and what each run did.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import reverse_pairs, write_tsv
from hypothesis import example, given, settings
from hypothesis import strategies as st

import aligna
from aligna import translate as translate_module
from aligna.cli import main
from aligna.config import config_from_dict
from aligna.training import Trainer, train

ROOT = Path(__file__).resolve().parents[1]  # the checkout under test, put first on PYTHONPATH
SEED = int(os.environ.get("ALIGNA_FAULT_SEED", "1871"))
STEPS, VALIDATE_EVERY = 80, 5  # 16 validations and checkpoints; epoch 1 ends at step 52
SWEEP_STEPS = 15  # the runs killed at every point of their 2nd of 3 saves (keep_checkpoints 1)
KILLS = 4  # in the chain killed at random times
RUN_TIMEOUT = 120  # seconds for one training run; a hang fails the test instead of blocking CI
TRANSLATE_TIMEOUT = 60  # seconds for one translate call (they take well under one)

# --------------------------------------------------------------------------- kill tests

# Reads one JSON request per line: {argv, model_dir, log, and a kill plan: site/k/when
# (site "any": the k-th call of any site), or delay (seconds), or neither; counts: where
# to write the calls of each site and their order}. Forks a child that runs
# `aligna.cli.main(argv)` with its output in `log`, kills it as planned, and answers
# {"rc": exit code (-9: SIGKILL), "seconds": its run time, "timed_out"}.
SERVER = r"""
import json, os, shutil, signal, sys, time, traceback

RUN_TIMEOUT = float(sys.argv[1])
plan, counts, trace, root = {}, {}, [], "/nonexistent"


def inside(path):
    try:
        path = os.path.realpath(os.fspath(path))
    except TypeError:
        return False
    return path == root or path.startswith(root + os.sep)


def fd_inside(fd):
    fd = fd if isinstance(fd, int) else fd.fileno()
    try:
        return inside(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return True  # no /proc: count every fsync


def arg(index, name):
    return lambda args, kwargs: inside(args[index] if len(args) > index else kwargs.get(name, ""))


def patch(owner, name, site, applies):
    real = getattr(owner, name)

    def patched(*args, **kwargs):
        if not applies(args, kwargs):
            return real(*args, **kwargs)
        counts[site] = counts.get(site, 0) + 1
        trace.append(site)
        number = len(trace) if plan.get("site") == "any" else counts[site]
        hit = plan.get("site") in (site, "any") and number == plan["k"]
        if hit and plan["when"] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, patched)


import safetensors.torch  # noqa: E402

patch(os, "replace", "os.replace", arg(0, "src"))
patch(os, "rename", "os.rename", arg(0, "src"))
patch(os, "fsync", "os.fsync", lambda args, kwargs: fd_inside(args[0] if args else kwargs["fd"]))
patch(shutil, "rmtree", "shutil.rmtree", arg(0, "path"))
patch(safetensors.torch, "save_file", "safetensors.save_file", arg(1, "filename"))
patch(safetensors.torch, "save_model", "safetensors.save_model", arg(1, "filename"))

import torch  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401  (the first optimizer imports it otherwise)

import aligna.cli  # noqa: E402
import aligna.training  # noqa: E402,F401

try:  # what aligna.eventlog imports at the first logged scalar
    import tensorboard.compat.proto.event_pb2  # noqa: F401
    import tensorboard.summary.writer.record_writer  # noqa: F401
except ImportError:
    pass


def child(request):
    global plan, root
    plan, root = request, os.path.realpath(request["model_dir"])
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    rc = 1
    try:
        rc = aligna.cli.main(request["argv"])
    except BaseException:
        traceback.print_exc()
    finally:
        if request.get("counts"):
            with open(request["counts"], "w") as f:
                json.dump({"counts": counts, "trace": trace}, f)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


while True:
    line = sys.stdin.readline()
    if not line:
        break
    request = json.loads(line)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(request)
    kill_at = started + request.get("delay", RUN_TIMEOUT)
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if not killed and time.monotonic() >= kill_at:
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.005)
    reply = {"rc": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - started}
    reply["timed_out"] = killed and "delay" not in request
    print(json.dumps(reply), flush=True)
os._exit(0)  # no interpreter teardown: it takes seconds with torch loaded
"""


def fault_config(work: Path, name: str, steps: int = STEPS, keep: int = 2) -> Path:
    """A tiny run whose resume needs every kind of state: dropout, scheduled sampling and
    the plateau schedule consume RNG and scheduler state; keep_checkpoints prunes."""
    raw = {
        "model_dir": str(work / name),
        "data": {"train": {"tsv": str(work / "train.tsv")}, "dev": {"tsv": str(work / "dev.tsv")}},
        "model": {
            "emb_dim": 16, "hidden_size": 32, "encoder_layers": 1, "decoder_layers": 1, "dropout": 0.3,
            "rnn": {"cell": "gru", "attention": "general"},
        },
        "train": {
            "batch_tokens": 256, "epochs": 3, "max_steps": steps, "validate_every": VALIDATE_EVERY,
            "log_every": 10, "keep_checkpoints": keep, "num_threads": 1, "device": "cpu",
            "teacher_forcing": 0.9, "teacher_forcing_decay": "linear", "teacher_forcing_decay_steps": 60,
            "schedule": "plateau", "plateau_patience": 1,
        },
        "eval": {"metrics": ["wer"]},
    }  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@dataclass
class Run:
    plan: dict  # site/k/when, or delay (seconds); empty: no kill
    resume: bool
    log: Path
    rc: int | None = None
    seconds: float = 0.0

    def __str__(self) -> str:
        if self.plan.get("site") == "any":
            kill = f"kill {self.plan['when']} file operation {self.plan['k']}, {self.plan['call']}"
        elif "site" in self.plan:
            kill = f"kill {self.plan['when']} call {self.plan['k']} of {self.plan['site']}"
        elif "delay" in self.plan:
            kill = f"kill after {self.plan['delay']:.2f} s"
        else:
            kill = "no kill"
        outcome = "SIGKILL" if self.rc == -signal.SIGKILL else f"exit {self.rc}"
        return f"{'--resume' if self.resume else 'fresh'} [{kill}] -> {outcome} after {self.seconds:.2f} s"


@dataclass
class Chain:
    name: str
    model_dir: Path
    config: Path
    runs: list[Run] = field(default_factory=list)
    error: str | None = None  # why the chain did not end in a run that exited 0

    def describe(self) -> str:
        lines = [f"seed {SEED} (ALIGNA_FAULT_SEED), chain {self.name!r}:"]
        lines += [f"  run {i}: {run}" for i, run in enumerate(self.runs)]
        return "\n".join(lines + ([f"  {self.error}"] if self.error else []))

    def kills(self) -> int:
        return sum(run.rc == -signal.SIGKILL for run in self.runs)


class Server:
    """A process that has imported aligna and forks training runs on request."""

    def __init__(self, script: Path, env: dict[str, str]) -> None:
        self.log = script.parent / f"{script.stem}-{threading.get_ident()}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(RUN_TIMEOUT)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, env=env, cwd=script.parent, text=True,
            )  # fmt: skip

    def run(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the fork server died (exit code {self.proc.wait()}):\n{tail(self.log)}")
        return json.loads(reply)


class FaultLab:
    """Reference runs and chains of killed runs, two at a time (one per CPU core)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        write_tsv(work / "train.tsv", reverse_pairs(2000, seed=1))
        write_tsv(work / "dev.tsv", reverse_pairs(40, seed=2))
        path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.server_script = work / "fork_server.py"
        self.server_script.write_text(SERVER, encoding="utf-8")
        self.servers: list[Server] = []
        self.local = threading.local()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=2)
        # started in this order, two at a time; a job waits for the reference it needs
        self.reference: Future = self.pool.submit(self._reference, "reference")
        self.sweep_reference: Future = self.pool.submit(self._reference, "sweep_reference", SWEEP_STEPS, 1)
        self.chains = {
            "early": self.pool.submit(self._early_chain),
            "sites": self.pool.submit(self._site_chain),
            "wall clock": self.pool.submit(self._wall_clock_chain),
        }
        self.sweep = [self.pool.submit(self._sweep, part) for part in (0, 1)]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for server in self.servers:
            server.proc.stdin.close()  # the server exits at the end of its input
        for server in self.servers:
            server.proc.wait(timeout=30)
            server.proc.stdout.close()

    def train(self, chain: Chain, plan: dict, counts: Path | None = None) -> Run:
        """One run of `chain`: fresh if it is the first, else --resume."""
        if getattr(self.local, "server", None) is None:  # one server per worker thread
            self.local.server = Server(self.server_script, self.env)
            with self.lock:
                self.servers.append(self.local.server)
        log = self.work / f"{chain.model_dir.name}-{len(chain.runs)}.log"
        run = Run(plan, resume=bool(chain.runs), log=log)
        chain.runs.append(run)
        argv = ["train", str(chain.config), "--no-progress"] + (["--resume"] if run.resume else [])
        request = {"argv": argv, "model_dir": str(chain.model_dir), "log": str(run.log), **plan}
        if counts is not None:
            request["counts"] = str(counts)
        reply = self.local.server.run(request)
        run.rc, run.seconds = reply["rc"], reply["seconds"]
        if reply["timed_out"]:
            chain.error = f"run {len(chain.runs) - 1} took over {RUN_TIMEOUT} s:\n{tail(run.log)}"
        return run

    def _chain(
        self, name: str, plans: list[dict], all_fire: bool, steps: int = STEPS, keep: int = 2
    ) -> Chain:
        """Train with each kill plan in turn, resuming after each kill, then once more without one."""
        slug = name.replace(" ", "_")
        chain = Chain(name, self.work / slug, fault_config(self.work, slug, steps, keep))
        for plan in [*plans, {}]:
            run = self.train(chain, plan)
            if chain.error:
                break
            if run.rc == 0:
                if plan and all_fire:
                    chain.error = "a planned kill did not fire: the run ended first"
                break
            if run.rc != -signal.SIGKILL:
                chain.error = f"run {len(chain.runs) - 1} failed with exit code {run.rc}:\n{tail(run.log)}"
                break
        return chain

    def _reference(self, name: str, steps: int = STEPS, keep: int = 2) -> tuple[Chain, dict]:
        """An uninterrupted run; its calls of each kill site: {"counts": {site: n}, "trace": [site, ...]}."""
        chain = Chain(name, self.work / name, fault_config(self.work, name, steps, keep))
        run = self.train(chain, {}, counts=self.work / f"{name}-calls.json")
        assert run.rc == 0, f"the {name} run failed:\n{tail(run.log)}"
        return chain, json.loads((self.work / f"{name}-calls.json").read_text())

    def _early_chain(self) -> Chain:
        """Killed twice before the first checkpoint exists: in the run's first safetensors
        write (weights are written before any checkpoint is complete), then right after
        its first rename."""
        plans = [
            {"site": "safetensors.save_file", "k": 1, "when": "before"},
            {"site": "os.replace", "k": 1, "when": "after"},
        ]
        return self._chain("early", plans, all_fire=True)

    def _site_chain(self) -> Chain:
        """A kill at each site in turn, in random order, before or after a call whose number
        is drawn at random: the first after ~3 validations' worth of calls (a checkpoint
        exists: the early chain covers the case without one), later ones within the first
        1/(2 x kills) of a run's calls, so every planned kill fires before the run could end."""
        counts = self.reference.result()[1]["counts"]
        rng = random.Random(f"{SEED}-sites")
        validations = STEPS // VALIDATE_EVERY
        sites = sorted(site for site, n in counts.items() if n >= 3)
        assert sites, f"no kill site is called in every few checkpoints: call counts {counts}"
        kills = len(sites)
        whens = rng.sample(["before", "after"] * kills, kills)
        plans = []
        for i, site in enumerate(rng.sample(sites, kills)):
            n = counts[site]
            span = max(1, n // (2 * kills))
            low = math.ceil(3 * n / validations) if i == 0 else 1
            plans.append({"site": site, "k": rng.randint(low, low + span - 1), "when": whens[i]})
        return self._chain("sites", plans, all_fire=True)

    def _wall_clock_chain(self) -> Chain:
        """KILLS kills at random times: the first 35-60% into the reference run's time (past
        its first checkpoint), later ones 5-35% into a resumed run."""
        seconds = self.reference.result()[0].runs[0].seconds
        rng = random.Random(f"{SEED}-wall-clock")
        plans = [{"delay": rng.uniform(0.35, 0.6) * seconds}]
        plans += [{"delay": rng.uniform(0.05, 0.35) * seconds} for _ in range(KILLS - 1)]
        return self._chain("wall clock", plans, all_fire=False)

    def _sweep(self, part: int) -> list[Chain]:
        """Short runs killed once each, before and after every call of the middle third of
        their calls: the second of three saves, which also prunes the first checkpoint (a
        stretch as long as a save holds each of its steps, wherever it starts); half of
        them, by `part`."""
        trace = self.sweep_reference.result()[1]["trace"]
        calls = range(len(trace) // 3 + 1, len(trace) * 2 // 3 + 1)  # numbered from 1
        points = [(k, when) for k in calls for when in ("before", "after")][part::2]
        chains = []
        for k, when in points:
            plan = {"site": "any", "k": k, "when": when, "call": trace[k - 1]}
            chains.append(self._chain(f"sweep {when} {k}", [plan], all_fire=True, steps=SWEEP_STEPS, keep=1))
        return chains


def tail(log: Path, lines: int = 25) -> str:
    if not log.is_file():
        return "(no log)"
    return "\n".join(log.read_text("utf-8", errors="replace").splitlines()[-lines:])


def final_weights(model_dir: Path, checkpoint: str) -> dict[str, torch.Tensor]:
    return aligna.load(model_dir, checkpoint=checkpoint, device="cpu").model.state_dict()


def validation_history(config: Path) -> list[dict]:
    """Validation records of a finished run; wall-clock times differ between runs, nothing else may."""
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(aligna.load_config(config), resume=True, progress=False)
        return [{k: v for k, v in h.items() if k != "train_seconds"} for h in trainer.state.history or []]
    finally:
        torch.set_num_threads(threads)  # the config's num_threads: 1 must not slow later tests


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork and SIGKILL")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = FaultLab(tmp_path_factory.mktemp("faults"))
    yield lab
    lab.close()


def outcome(chain: Chain, history: bool = True) -> dict:
    out = {checkpoint: final_weights(chain.model_dir, checkpoint) for checkpoint in ("latest", "best")}
    return {**out, "history": validation_history(chain.config)} if history else out


@pytest.fixture(scope="module")
def reference(lab):
    return outcome(lab.reference.result()[0])


def check_chain(chain: Chain, reference: dict, history: bool = True) -> None:
    if chain.error:
        pytest.fail(chain.describe(), pytrace=False)
    assert chain.runs[-1].rc == 0 and chain.kills() >= 1, chain.describe()
    ours = outcome(chain, history)
    for checkpoint in ("latest", "best"):
        assert ours[checkpoint].keys() == reference[checkpoint].keys(), chain.describe()
        differ = [
            name for name, t in ours[checkpoint].items() if not torch.equal(t, reference[checkpoint][name])
        ]
        assert not differ, (
            f"{checkpoint} weights differ from the uninterrupted run's in {differ}\n{chain.describe()}"
        )
    if history:
        assert len(reference["history"]) == STEPS // VALIDATE_EVERY
        assert ours["history"] == reference["history"], chain.describe()


@needs_fork
def test_killed_inside_checkpoint_saves_resumes_to_identical_weights(lab, reference):
    check_chain(lab.chains["sites"].result(), reference)


@needs_fork
def test_killed_at_random_times_resumes_to_identical_weights(lab, reference):
    check_chain(lab.chains["wall clock"].result(), reference)


@needs_fork
def test_killed_before_the_first_checkpoint_resumes_from_the_start(lab, reference):
    """`--resume` on the directory of a run killed before its first checkpoint starts over."""
    check_chain(lab.chains["early"].result(), reference)


@needs_fork
def test_killed_at_every_point_of_a_save_resumes_to_identical_weights(lab):
    reference = outcome(lab.sweep_reference.result()[0], history=False)
    chains = [chain for part in lab.sweep for chain in part.result()]
    assert len(chains) >= 10, [chain.name for chain in chains]  # a save makes a dozen or so calls
    for chain in sorted(chains, key=lambda chain: chain.runs[0].plan["k"]):
        check_chain(chain, reference, history=False)


# --------------------------------------------------------------------------- translate fuzz

# Characters that break line handling when treated carelessly: \r (one trailing \r is a
# Windows line end, stripped by design), NUL, vertical tab, form feed, the separators
# \x1c-\x1f and \x85, \u2028, \u2029 (line breaks to str.splitlines), a BOM (stripped at
# the start of the file by design), zero-width, combining and right-to-left characters,
# emoji (astral), "▁" (the char tokenizer's space), and the symbols the models know.
AWKWARD = (
    "\r\x00\t\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u200b\u200d\u2028\u2029\u202e"
    "\u3000\ufeff\ufffd\u0301\u0308\u2581\U0001f600\U0001f1fa\U0001f1f8\U0010ffff"
)
CHARACTER = st.one_of(
    st.sampled_from("abcdefghij  "),
    st.sampled_from(AWKWARD),
    st.characters(codec="utf-8", exclude_characters="\n"),  # anything but a surrogate or a line feed
)
# A line is (text, repeat): the input line is text * repeat, so that a failing example
# with a line thousands of characters long still prints short.
SHORT = st.tuples(st.text(CHARACTER, max_size=40), st.just(1))
LONG = st.tuples(st.text(CHARACTER, min_size=1, max_size=8), st.integers(100, 1000))
PLAIN = st.tuples(st.sampled_from(["", " ", " \t\u3000", "\ufeff", "\r", "\ufeffa b", "a b c\r"]), st.just(1))
LINES = st.lists(st.one_of(SHORT, SHORT, LONG, PLAIN), min_size=1, max_size=6)
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None)
EXAMPLES = [  # always tried: what a line reader may get wrong, and a line longer than any position table
    [("", 1), ("a b c", 1), (" \t\u3000", 1), ("\ufeff", 1)],
    [
        ("\ufeffa b\r", 1),
        ("x\x00y\x0bz\x0c", 1),
        ("c\x1cd\x1de\x1ef\x85g\u2028h\u2029i", 1),
        ("e\u0301 \U0001f600", 1),
    ],
    [("a ", 2000), ("j i h", 1)],
]

# The barely trained RNNs may never emit <eos>: their output length is capped so that a
# line of thousands of tokens does not mean thousands of decoding steps. The Transformer
# keeps the default cap (1.5 x source + 10): longer than its position table for some inputs.
SHORT_OUTPUT = {"max_len_a": 0.0, "max_len_b": 30}
FUZZ_MODELS = {
    "word-rnn": {"model": {"rnn": {"cell": "lstm", "attention": "general"}}, "decode": SHORT_OUTPUT},
    "bpe-gru": {
        "data": {
            "src_tokenizer": {"type": "bpe", "vocab_size": 20},
            "tgt_tokenizer": {"type": "unigram", "vocab_size": 20},
        },
        "model": {"rnn": {"cell": "gru", "attention": "bahdanau"}},
        "decode": SHORT_OUTPUT,
    },
    "char-transformer-learned-positions": {
        # data.max_len fits the table (63 + <sos>); inputs longer than it still come at translation time
        "data": {"src_tokenizer": {"type": "char"}, "tgt_tokenizer": {"type": "char"}, "max_len": 63},
        "model": {
            "arch": "transformer",
            "transformer": {"heads": 2, "ff_size": 32, "positions": "learned", "max_positions": 64},
        },
    },
}  # fmt: skip


class FuzzModels:
    """Tiny trained models of the reverse task, each loaded once."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.translators: dict[str, aligna.Translator] = {}

    def __repr__(self) -> str:  # printed in hypothesis' falsifying examples
        return "FuzzModels(...)"


@pytest.fixture(scope="module")
def fuzz_models(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add overhead (and stall on a busy machine)
    models = FuzzModels(tmp_path_factory.mktemp("fuzz"))
    write_tsv(models.work / "train.tsv", reverse_pairs(1000, seed=1))
    try:
        yield train_fuzz_models(models)
    finally:
        torch.set_num_threads(threads)


def train_fuzz_models(models: FuzzModels) -> FuzzModels:
    for name, sections in FUZZ_MODELS.items():
        raw = {
            "model_dir": str(models.work / name),
            "data": {"train": {"tsv": str(models.work / "train.tsv")}, **sections.get("data", {})},
            "model": {"emb_dim": 16, "hidden_size": 32, "encoder_layers": 1, "decoder_layers": 1,
                      "dropout": 0.0, **sections["model"]},
            "train": {
                "batch_tokens": 512, "max_steps": 30, "validate_every": 0, "device": "cpu", "num_threads": 1,
            },
            "decode": sections.get("decode", {}),
        }  # fmt: skip
        train(config_from_dict(raw), progress=False)
        models.translators[raw["model_dir"]] = aligna.load(raw["model_dir"], device="cpu")
    return models


@contextlib.contextmanager
def time_limit(seconds: float, spec: list[tuple[str, int]]):
    """TimeoutError after `seconds` (on POSIX, in the main thread), so a runaway search fails
    the test instead of stalling CI."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"translate took over {seconds} s on lines {spec}")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def translate_cli(
    models: FuzzModels, name: str, spec: list[tuple[str, int]], options: list[str]
) -> list[bytes]:
    """`aligna translate MODEL -i IN -o OUT OPTIONS` in-process on the lines of `spec`, the
    model loaded once -> the output lines (split on b"\\n" only)."""
    lines = [text * repeat for text, repeat in spec]
    source, target = models.work / "input.txt", models.work / "output.txt"
    source.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    target.unlink(missing_ok=True)
    command = ["translate", str(models.work / name), "-i", str(source), "-o", str(target), *options]
    err = io.StringIO()
    with (
        pytest.MonkeyPatch.context() as mp,
        contextlib.redirect_stderr(err),
        time_limit(TRANSLATE_TIMEOUT, spec),
    ):
        mp.setattr(translate_module, "load", lambda model_dir, *args, **kwargs: models.translators[model_dir])
        rc = main(command)
    assert rc == 0, f"aligna {' '.join(command[2:])} exit {rc} on lines {spec}:\n{err.getvalue()}"
    output = target.read_bytes()
    assert output.endswith(b"\n") or not lines, f"no final newline: {output[-80:]!r}, lines {spec}"
    return output.split(b"\n")[:-1]


@pytest.mark.parametrize("name", FUZZ_MODELS)
@FUZZ
@example(spec=EXAMPLES[0])
@example(spec=EXAMPLES[1])
@example(spec=EXAMPLES[2])
@given(spec=LINES)
def test_translate_writes_one_line_per_input_line(fuzz_models, name, spec):
    output = translate_cli(fuzz_models, name, spec, [])
    assert len(output) == len(spec), f"{len(output)} output lines for {len(spec)} input lines {spec}"


@pytest.mark.parametrize("name", FUZZ_MODELS)
@FUZZ
@example(spec=EXAMPLES[0])
@example(spec=EXAMPLES[1])
@example(spec=EXAMPLES[2])
@given(spec=LINES)
def test_nbest_writes_n_numbered_lines_per_input_line(fuzz_models, name, spec):
    output = translate_cli(fuzz_models, name, spec, ["--beam", "3", "--nbest", "3"])
    numbers = []
    for line in output:
        match = re.fullmatch(rb"(\d+) \|\|\| (.*) \|\|\| (\S+)", line)
        assert match, f"not `i ||| text ||| score`: {line[:200]!r}, lines {spec}"
        float(match.group(3))
        numbers.append(int(match.group(1)))
    expected = [i for i in range(len(spec)) for _ in range(3)]
    assert numbers == expected, f"n-best line numbers {numbers} for lines {spec}"
