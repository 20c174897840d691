"""Training under torchrun: DDP with gloo on the CPU, several processes and "machines"."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import reverse_pairs, write_tsv
from safetensors.torch import load_file

import aligna
from aligna.config import config_from_dict
from aligna.training import Trainer, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")


@pytest.fixture
def config_file(tmp_path):
    """make(name, **train) -> a config file training a small GRU on the reverse task."""
    train_tsv = write_tsv(tmp_path / "train.tsv", reverse_pairs(400, seed=1))
    dev_tsv = write_tsv(tmp_path / "dev.tsv", reverse_pairs(20, seed=2))

    def make(name: str, **train_section) -> Path:
        raw = {
            "model_dir": str(tmp_path / name),
            "data": {"train": {"tsv": str(train_tsv)}, "dev": {"tsv": str(dev_tsv)}},
            "model": {"emb_dim": 16, "hidden_size": 32, "encoder_layers": 1, "decoder_layers": 1, "dropout": 0.0,
                      "rnn": {"cell": "gru", "attention": "bahdanau"}},
            "train": {"batch_tokens": 128, "epochs": 1, "max_steps": 6, "validate_every": 3, "log_every": 2,
                      "num_threads": 1, **train_section},
            "eval": {"metrics": ["wer"]},
        }  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return make


def torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = ("--standalone",), **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", *extra, "--nproc_per_node", str(nproc),
               "-m", "aligna", *args, "--no-progress"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """The exit status and everything the job printed (log lines go to stdout, through tqdm)."""
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def weights(model_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_two_processes_equal_one_process_accumulating_two_batches(config_file, tmp_path):
    """An update over 2 processes (1 batch each) is the update of 1 process over the same 2
    batches with train.accumulate 2: same batches, loss divided by the tokens of both."""
    code, err = finish(torchrun("train", str(config_file("ddp"))))
    assert code == 0, err
    assert err.count("model written to") == 1  # rank 0 speaks for the job
    one = Path(train(config_from_dict(yaml.safe_load(config_file("one", accumulate=2).read_text())), progress=False))
    for step in (3, 6):
        assert_same(weights(tmp_path / "ddp", step), weights(one, step))
    assert aligna.load(tmp_path / "ddp").translate(["1 2 3"])  # an ordinary model directory
    # rank 0 refuses a run in the way; rank 1, left waiting for it, says so in a line, no traceback
    code, err = finish(torchrun("train", str(config_file("ddp"))))
    assert code != 0 and err.count("already holds a run") == 1, err
    assert "rank 1 stopped: waiting for rank 0's decision failed" in err and "[rank1]: Traceback" not in err, err


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker process `rank` (its environment says RANK=rank)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_a_killed_rank_ends_the_job_and_resume_completes_it(config_file, tmp_path):
    settings = {"max_steps": 24, "validate_every": 4, "epochs": 20}
    reference = config_file("whole", **settings)
    code, err = finish(torchrun("train", str(reference)))
    assert code == 0, err
    interrupted = config_file("killed", **settings)
    job = torchrun("train", str(interrupted))
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-000008"
    deadline = time.monotonic() + 180
    while not checkpoint.exists() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.02)
    victim = _rank_pid(job.pid, rank=1)
    assert victim is not None and job.poll() is None, "the job ended before a rank could be killed"
    os.kill(victim, signal.SIGKILL)
    code, err = finish(job)
    assert code != 0
    assert "SIGKILL" in err or "Signal 9" in err, err[-2000:]
    code, err = finish(torchrun("train", str(interrupted), "--resume"))
    assert code == 0, err
    assert "resumed from" in err
    assert_same(weights(tmp_path / "killed", 24), weights(tmp_path / "whole", 24))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_train_to_the_end(config_file, tmp_path):
    path = config_file("nodes")
    rendezvous = ("--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}",
                  "--rdzv_id", "aligna-test")  # fmt: skip
    nodes = [torchrun("train", str(path), nproc=1, extra=rendezvous) for _ in range(2)]
    results = [finish(node) for node in nodes]
    for code, err in results:
        assert code == 0, err
    assert sum(err.count("model written to") for _, err in results) == 1
    assert (tmp_path / "nodes" / "checkpoints" / "step-000006").is_dir()


def test_nodes_given_other_settings_stop_at_once_and_say_so(config_file, tmp_path):
    """A node started with other train settings would take other batches and call the
    collectives in another order: a hang until the timeout. It is refused at the start."""
    path = config_file("mixed")
    rendezvous = ("--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}",
                  "--rdzv_id", "aligna-mixed")  # fmt: skip
    nodes = [torchrun("train", str(path), *extra, nproc=1, extra=rendezvous)
             for extra in ((), ("--set", "train.batch_tokens=256"))]  # fmt: skip
    results = [finish(node, timeout=120) for node in nodes]
    assert all(code != 0 for code, _ in results)
    assert any("other model or train settings than rank 0 (rank(s) 1)" in err for _, err in results)


def test_each_rank_draws_its_own_dropout_masks(config_file, tmp_path):
    """The weights start equal on every rank; the random streams after that do not (every rank
    drew the same dropout masks)."""
    path = config_file("masks", max_steps=3, validate_every=3)
    raw = yaml.safe_load(path.read_text())
    raw["model"]["dropout"] = 0.3
    path.write_text(yaml.safe_dump(raw))
    code, err = finish(torchrun("train", str(path)))
    assert code == 0, err
    streams = load_file(str(tmp_path / "masks" / "checkpoints" / "step-000003" / "optimizer.safetensors"))
    assert not torch.equal(streams["rng.cpu"], streams["rng.rank1.cpu"])


def test_resuming_with_another_world_size_says_why(config_file, tmp_path):
    code, err = finish(torchrun("train", str(config_file("pair", max_steps=6, epochs=2))))
    assert code == 0, err
    again = config_from_dict(yaml.safe_load(config_file("pair", max_steps=9, epochs=2).read_text()))
    with pytest.raises(ValueError, match="trained by 2 process.*this job has 1"):
        Trainer(again, resume=True, progress=False)


def test_an_epoch_smaller_than_an_update_is_refused(config_file):
    config = config_from_dict(yaml.safe_load(config_file("tiny", accumulate=4096).read_text()))
    trainer = Trainer(config, progress=False)
    with pytest.raises(ValueError, match="fewer than one update takes"):
        trainer.train()


def test_a_rank_leaves_the_group_with_the_others_only_when_its_run_ended_well(config_file, monkeypatch):
    """train() lets go of the DDP wrapper (which holds the process group) before leaving the
    group, and waits for the other ranks (a barrier) only on a run that ended well: after a
    failure the others may never come."""
    from aligna import distributed, training

    trainers, calls = [], []
    close = training.Trainer.close
    monkeypatch.setattr(training.Trainer, "close", lambda self: trainers.append(self) or close(self))
    monkeypatch.setattr(distributed, "leave", lambda together=False: calls.append(
        (together, trainers[-1].train_model is trainers[-1].model)))  # fmt: skip
    train(config_from_dict(yaml.safe_load(config_file("well").read_text())), progress=False)
    wrapper = object()  # as DDP, around the model
    monkeypatch.setattr(training.Trainer, "train", lambda self: setattr(self, "train_model", wrapper) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(config_from_dict(yaml.safe_load(config_file("failed").read_text())), progress=False)
    assert calls == [(True, True), (False, True)]
