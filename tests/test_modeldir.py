"""The model directory never loses data: overwrite rules, the lock, damaged files, NaN."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aligna
from aligna import modeldir, training
from aligna.cli import main
from aligna.config import save_config
from aligna.data import DataError
from aligna.modeldir import BusyError, ModelDir, ModelDirError
from aligna.tensorfiles import DamagedFileError, load_weights
from aligna.training import Trainer, TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]


def trained(toy_config, **train_section):
    """A finished toy run with checkpoints at steps 10, 20, 30 (all kept)."""
    config = toy_config(train={"max_steps": 30, "validate_every": 10, "keep_checkpoints": 5, **train_section})
    train(config, progress=False)
    return config, ModelDir(config.model_dir)


# --------------------------------------------------------------------------- overwrite


def test_overwrite_never_clears_the_current_directory_or_a_parent(toy_config, tmp_path, monkeypatch, capsys):
    config, md = trained(toy_config)
    (md / modeldir.MARKER).write_text("{}")  # even with a marker
    for where, cwd in (("the current directory", md.path), ("a parent of the current directory", md.path / "sub")):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        with pytest.raises(ModelDirError, match=f"is {where}; it would have deleted .*config.yaml"):
            Trainer(config, overwrite=True, progress=False)
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "work"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    monkeypatch.chdir(mine)
    path = save_config_file(config, mine / "c.yaml")
    assert main(["train", str(path), "--set", "model_dir=.", "--overwrite", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "holds files that aligna did not write (c.yaml, notes.txt)" in err and "Traceback" not in err
    assert (mine / "notes.txt").read_text() == "mine"


def save_config_file(config, path: Path) -> Path:
    save_config(config, path)
    return path


def test_overwrite_needs_aligna_s_marker(toy_config, tmp_path):
    config, md = trained(toy_config)
    (md / modeldir.MARKER).unlink()  # a directory aligna did not mark as its own
    with pytest.raises(ModelDirError, match=r"no \.aligna marker\); it would have deleted .*checkpoints"):
        Trainer(config, overwrite=True, progress=False)
    assert md.latest().name == "step-000030"
    foreign = toy_config(model_dir=str(tmp_path / "foreign"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("years of work")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(ModelDirError, match=r"holds files that aligna did not write \(thesis.tex\)"):
            Trainer(foreign, progress=False, **flags)
    assert (tmp_path / "foreign" / "thesis.tex").read_text() == "years of work"


def test_a_run_killed_before_its_first_checkpoint_starts_over(toy_config, aligna_log):
    config = toy_config(train={"max_steps": 10, "validate_every": 10})
    trainer = Trainer(config, progress=False)  # directory made, vocabularies written, no checkpoint
    trainer.close()
    md = ModelDir(config.model_dir)
    (md / ".tmp-best.safetensors").write_bytes(b"half")  # left by a kill mid-write
    assert (md / modeldir.CONFIG).is_file() and md.latest() is None
    Trainer(config, resume=True, progress=False).train()
    assert "no checkpoint to resume from" in aligna_log.text and md.latest().name == "step-000010"
    assert not list(md.path.glob(".tmp-*"))


def test_starting_over_clears_only_what_an_early_run_writes(toy_config, tmp_path, aligna_log):
    """A directory without checkpoints starts over, but only if it holds nothing else: after
    `aligna prepare` (which marks it as aligna's) a user's notes and config were deleted."""
    from aligna.corpus import prepare_model_dir

    config = toy_config(train={"max_steps": 10, "validate_every": 10})
    prepare_model_dir(config)
    md = ModelDir(config.model_dir)
    (md / "NOTES.md").write_text("why I ran this")
    (md / "experiment.yaml").write_text("model_dir: .")
    for flags in ({}, {"resume": True}):
        with pytest.raises(ModelDirError, match=r"holds files that a run does not write before its first checkpoint "
                                                r"\(NOTES.md, experiment.yaml\): nothing was deleted"):  # fmt: skip
            Trainer(config, progress=False, **flags)
    assert (md / "NOTES.md").read_text() == "why I ran this" and (md / "experiment.yaml").is_file()
    (md / "NOTES.md").unlink()
    (md / "experiment.yaml").unlink()
    Trainer(config, progress=False).train()  # the prepared corpus is kept and used
    assert md.latest().name == "step-000010"


def test_a_typo_in_the_training_data_stops_overwrite_before_it_clears(toy_config, tmp_path):
    config, md = trained(toy_config)
    before = sorted(str(p.relative_to(md.path)) for p in md.path.rglob("*"))
    typo = toy_config(data={"train": {"tsv": str(tmp_path / "trian.tsv")}})
    with pytest.raises(DataError, match=r"train: file not found: .*trian\.tsv"):
        Trainer(typo, overwrite=True, progress=False)
    assert sorted(str(p.relative_to(md.path)) for p in md.path.rglob("*")) == before


def test_best_weights_that_are_gone_are_not_replaced_by_others(toy_config):
    """best.json says a validation chose best.safetensors: without it, "best" used to load the
    latest checkpoint silently."""
    config, md = trained(toy_config)
    (md / modeldir.BEST).unlink()
    with pytest.raises(ModelDirError, match=r"best.safetensors is missing, though best.json says a validation chose it"):
        aligna.load(config.model_dir)
    assert aligna.load(config.model_dir, checkpoint="latest") is not None
    (md / modeldir.TEST_SCORES).write_text("{}")  # only a run that trained to its end writes it
    shutil.rmtree(md / modeldir.CHECKPOINTS)
    (md / modeldir.LATEST).unlink()
    with pytest.raises(FileExistsError, match=r"holds a trained model \(.*test_scores.json\)"):
        Trainer(config, progress=False)


# --------------------------------------------------------------------------- the lock


def test_a_busy_directory_is_refused_and_left_alone(toy_config):
    config, md = trained(toy_config)
    holder = Trainer(config, resume=True, progress=False)  # holds the lock until closed
    before = sorted(p.name for p in md.path.rglob("*"))
    for flags in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(BusyError, match=rf"in use by another training run \(pid {os.getpid()} on "):
            Trainer(config, progress=False, **flags)
    assert sorted(p.name for p in md.path.rglob("*")) == before
    holder.close()
    Trainer(config, resume=True, progress=False).close()


def test_the_lock_holds_across_processes_and_dies_with_its_holder(toy_config, capsys):
    config, md = trained(toy_config)
    script = (
        "import sys, time; from aligna.modeldir import ModelDir, TrainingLock\n"
        "lock = TrainingLock(ModelDir(sys.argv[1])); lock.acquire(); print('locked', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", script, str(md.path)], stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        path = save_config_file(config, md.path.parent / "c.yaml")
        assert main(["train", str(path), "--overwrite", "--no-progress"]) == 1
        assert f"pid {holder.pid} on" in capsys.readouterr().err
        assert md.latest().name == "step-000030"
    finally:
        holder.kill()
        holder.wait()
    Trainer(config, resume=True, progress=False).close()  # the kernel dropped the dead holder's lock


# --------------------------------------------------------------------------- damaged files


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "garble":
        path.write_bytes(os.urandom(len(data)))
    else:  # 64 bytes inside the tensor data, after the header
        header = 8 + int.from_bytes(data[:8], "little")
        offset = header + (len(data) - header) // 2
        data[offset : offset + 64] = bytes(64)
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "file, how",
    [("model.safetensors", "overwrite64"), ("optimizer.safetensors", "truncate"), ("trainer.json", "garble")],
)
def test_resume_skips_a_damaged_checkpoint_and_says_so(toy_config, aligna_log, file, how):
    config, md = trained(toy_config)
    damage(md.latest() / file, how)
    (md / modeldir.LATEST).write_text("{not json")  # the pointer is for people; nothing depends on it
    trainer = Trainer(config, resume=True, progress=False)
    trainer.close()
    assert trainer.state.step == 20
    assert f"step-000030/{file}" in aligna_log.text and "resuming from" in aligna_log.text
    assert (md / modeldir.CHECKPOINTS / "damaged-step-000030").is_dir()  # set aside, not deleted


def rewrite_trainer_state(checkpoint: Path, **fields) -> None:
    """Change trainer.json as another aligna version might write it, and its manifest with it
    (so the checkpoint's files are intact)."""
    state = json.loads((checkpoint / modeldir.TRAINER).read_text())
    (checkpoint / modeldir.TRAINER).write_text(json.dumps({**state, **fields}))
    manifest = json.loads((checkpoint / modeldir.MANIFEST).read_text())
    path = checkpoint / modeldir.TRAINER
    manifest["files"][modeldir.TRAINER] = {"bytes": path.stat().st_size, "sha256": modeldir.file_sha256(path)}
    (checkpoint / modeldir.MANIFEST).write_text(json.dumps(manifest))


def test_an_intact_checkpoint_that_does_not_fit_is_left_where_it_is(toy_config):
    """A checkpoint whose files match its manifest but that this aligna cannot read (a trainer
    state from a newer version) is not damaged: it is neither set aside nor, at the next try,
    deleted with the whole run (which a second --resume did, once both were set aside)."""
    config, md = trained(toy_config)
    for checkpoint in md.checkpoints():
        rewrite_trainer_state(checkpoint, from_the_future=1)
    before = sorted(str(p.relative_to(md.path)) for p in md.path.rglob("*"))
    for _ in range(2):
        with pytest.raises(ModelDirError, match=r"step-000030: not a checkpoint of this run .*from_the_future.*"
                                                r"its files are intact .*left as it is"):  # fmt: skip
            Trainer(config, resume=True, progress=False)
    assert sorted(str(p.relative_to(md.path)) for p in md.path.rglob("*")) == before


def test_a_trained_model_without_checkpoints_is_never_cleared_without_overwrite(toy_config):
    """A user who deleted checkpoints/ to save space keeps best.safetensors: a new run into the
    directory, or --resume, is refused (it used to be taken for a run killed before its first
    checkpoint, and cleared)."""
    config, md = trained(toy_config)
    for checkpoint in md.checkpoints():
        shutil.rmtree(checkpoint)
    for flags in ({}, {"resume": True}):
        with pytest.raises(FileExistsError, match=r"holds a trained model \(best.safetensors, best.json\) but no "
                                                  r"checkpoint .*nothing was deleted"):  # fmt: skip
            Trainer(config, progress=False, **flags)
    assert (md / modeldir.BEST).is_file() and (md / modeldir.CONFIG).is_file()
    Trainer(config, overwrite=True, progress=False).close()  # --overwrite still starts over
    assert not (md / modeldir.BEST).exists()


def test_a_checkpoint_set_aside_twice_keeps_both_copies(toy_config, aligna_log):
    config, md = trained(toy_config)
    damage(md.latest() / modeldir.MODEL, "overwrite64")
    first = (md.latest() / modeldir.MODEL).read_bytes()
    shutil.copytree(md.latest(), md / modeldir.CHECKPOINTS / "damaged-step-000030")  # set aside before
    Trainer(config, resume=True, progress=False).close()
    kept = sorted(p.name for p in (md / modeldir.CHECKPOINTS).glob("damaged-*"))
    assert kept == ["damaged-step-000030", "damaged-step-000030.1"]
    assert (md / modeldir.CHECKPOINTS / "damaged-step-000030.1" / modeldir.MODEL).read_bytes() == first


def test_resume_stops_when_no_checkpoint_is_intact(toy_config):
    config, md = trained(toy_config)
    for path in md.checkpoints():
        damage(path / modeldir.MODEL, "overwrite64")
    with pytest.raises(ModelDirError, match=r"no intact checkpoint to resume from .*checksum mismatch"):
        Trainer(config, resume=True, progress=False)


@pytest.mark.parametrize("how", ["truncate", "garble", "overwrite64"])
def test_damaged_weights_are_named_errors_for_translate_and_average(toy_config, tmp_path, capsys, how):
    config, md = trained(toy_config)
    damage(md / modeldir.BEST, how)
    damage(md.latest() / modeldir.MODEL, how)
    src = tmp_path / "in.txt"
    src.write_text("a b c\n")
    for argv in (["translate", str(md.path), "-i", str(src)], ["average", str(md.path), "--last", "2"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.splitlines()) == 1
        assert ("best.safetensors" in err or "step-000030/model.safetensors" in err), err
    with pytest.raises(DamagedFileError, match="best.safetensors"):
        aligna.load(md.path)


def test_foreign_and_malformed_files_are_named(toy_config, tmp_path, capsys):
    config, md = trained(toy_config)
    other = toy_config(model_dir=str(tmp_path / "other"), model={"hidden_size": 48}, train={"max_steps": 10})
    train(other, progress=False)
    src = tmp_path / "in.txt"
    src.write_text("a b\n")
    cases = {
        str(ModelDir(other.model_dir) / modeldir.BEST): "weights do not fit this model",
        str(tmp_path / "in.txt"): "not a readable safetensors file",
        str(tmp_path / "nowhere"): "no such file or directory",
    }
    for checkpoint, message in cases.items():
        assert main(["translate", str(md.path), "-i", str(src), "--checkpoint", checkpoint]) == 1
        assert message in capsys.readouterr().err
    (md / "tgt_vocab.txt").write_bytes(b"\xff\xfe garbage")
    (md / "src_tokenizer.json").write_text("{")
    assert main(["translate", str(md.path), "-i", str(src)]) == 1
    err = capsys.readouterr().err
    assert "src_tokenizer.json: not a tokenizer description" in err and "Traceback" not in err
    assert main(["translate", str(tmp_path / "missing"), "-i", str(src)]) == 1
    assert "is not an aligna model directory (it does not exist)" in capsys.readouterr().err


def test_checkpoints_carry_checksums_of_every_file(toy_config):
    _, md = trained(toy_config)
    for path in md.checkpoints():
        manifest = json.loads((path / modeldir.MANIFEST).read_text())["files"]
        assert sorted(manifest) == sorted([modeldir.MODEL, modeldir.OPTIMIZER, modeldir.TRAINER])
        md.verify(path)


# --------------------------------------------------------------------------- non-finite values


def test_a_nan_weight_stops_the_run_and_keeps_the_good_checkpoints(toy_config):
    config, md = trained(toy_config, keep_checkpoints=2)
    kept = [p.name for p in md.checkpoints()]
    more = toy_config(train={"max_steps": 200, "validate_every": 10, "keep_checkpoints": 2})
    trainer = Trainer(more, resume=True, progress=False)
    with torch.no_grad():
        list(trainer.model.parameters())[-1].view(-1)[0] = float("nan")  # the output bias: every loss
    with pytest.raises(TrainingDiverged, match=r"stopped at step 40: 10 updates in a row .*step-000030, is kept"):
        trainer.train()
    assert [p.name for p in md.checkpoints()] == kept and trainer.state.skipped_updates == 10
    for path in md.checkpoints():
        model = aligna.load(md.path, checkpoint=str(path)).model
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_updates_are_skipped_and_counted(toy_config, monkeypatch):
    config = toy_config(train={"max_steps": 12, "validate_every": 0, "max_nonfinite_updates": 3})
    real_loss, real_step, unchanged = training.sequence_loss, training.train_step, {}

    def nan_on_updates_5_and_6(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(unchanged) in (4, 5) else loss

    def step(model, *args, **kwargs):
        before = [p.detach().clone() for p in model.parameters()]
        out = real_step(model, *args, **kwargs)
        unchanged[len(unchanged) + 1] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        return out

    monkeypatch.setattr(training, "sequence_loss", nan_on_updates_5_and_6)
    monkeypatch.setattr(training, "train_step", step)
    trainer = Trainer(config, progress=False)
    state = trainer.train()
    trainer.close()
    assert state.step == 12 and state.skipped_updates == 2 and state.nonfinite_in_row == 0
    assert [n for n, same in unchanged.items() if same] == [5, 6]  # skipped; every other update moved
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_loading_checks_the_weights_digest(toy_config, tmp_path):
    _, md = trained(toy_config)
    model = aligna.load(md.path).model
    damage(md / modeldir.BEST, "overwrite64")
    with pytest.raises(DamagedFileError, match="checksum mismatch"):
        load_weights(model, md / modeldir.BEST)


def test_nbest_gives_a_block_for_an_empty_line(toy_config, tmp_path, capsys):
    _, md = trained(toy_config)
    src = tmp_path / "in.txt"
    src.write_text("a b\n\n   \nc\n")
    capsys.readouterr()
    assert main(["translate", str(md.path), "-i", str(src), "--beam", "3", "--nbest", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ||| ")[0] for line in lines] == [str(i) for i in range(4) for _ in range(3)]


def _one_buffer(model: torch.nn.Module) -> None:
    """Make every LSTM's parameters views of one flat buffer, as cuDNN keeps them on a GPU."""
    for module in model.modules():
        if isinstance(module, torch.nn.LSTM):
            params = list(module.parameters())
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            offset = 0
            for p in params:
                p.data = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()


@pytest.mark.parametrize("arch", ["rnn", "transformer"])
def test_weights_round_trip_with_tied_and_flattened_parameters(toy_config, tmp_path, arch):
    """An LSTM on a GPU keeps its weights in one buffer (safetensors' save_model refused them);
    tied embeddings are stored once and load into both names."""
    from aligna.build import build_model
    from aligna.tensorfiles import save_weights, tied_names

    model_config = toy_config(model={"arch": arch, "share_embeddings": arch == "transformer", "tie_embeddings": True,
                                     "rnn": {"cell": "lstm"}}, data={"shared_vocab": True}).model  # fmt: skip
    torch.manual_seed(0)
    model = build_model(model_config, 20, 20)
    _one_buffer(model)
    state = model.state_dict()
    tied = tied_names(state)
    assert tied  # the output layer is the target embedding
    save_weights(model, tmp_path / "w.safetensors")
    with open(tmp_path / "w.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert set(header) - {"__metadata__"} == set(state) - set(tied)  # each tied group once
    for flattened in (False, True):
        fresh = build_model(model_config, 20, 20)
        if flattened:
            _one_buffer(fresh)
        load_weights(fresh, tmp_path / "w.safetensors")
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
