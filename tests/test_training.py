import math
import threading
from pathlib import Path

import pytest
import torch
from conftest import reverse_pairs, write_tsv
from safetensors.torch import load_file
from torch import nn

import aligna
from aligna import eventlog, kernels, modeldir, tensorfiles, training
from aligna.config import TrainConfig
from aligna.loss import sequence_loss
from aligna.modeldir import ModelDir
from aligna.runtime import Int8Linear, check_precision
from aligna.training import Trainer, check_one_process_settings, learning_rate, teacher_forcing_ratio, train


def test_toy_reverse_task_is_learned(toy_config, tmp_path):
    config = toy_config(
        model={"emb_dim": 32, "hidden_size": 192, "dropout": 0.0, "rnn": {"cell": "lstm"}},
        train={"batch_tokens": 512, "epochs": 20, "lr": 0.003, "validate_every": 0},
    )
    write_tsv(tmp_path / "train.tsv", reverse_pairs(3000, seed=1))
    train(config, progress=False)
    test = reverse_pairs(200, seed=3)
    translator = aligna.load(config.model_dir)
    hyps = translator.translate([s for s, _ in test])
    exact = sum(h == r for h, (_, r) in zip(hyps, test)) / len(test)
    assert exact >= 0.95, exact
    # Beam search never ends below greedy under the model, and its n-best lists are sorted.
    sources = [s for s, _ in reverse_pairs(100, seed=4, min_len=6, max_len=12)]  # longer than trained on
    greedy = translator.translate_detailed(sources)
    beam = translator.translate_detailed(sources, beam_size=5, nbest=5)
    assert all(b.score >= g.score - 1e-4 for b, g in zip(beam, greedy))
    assert sum(b.score > g.score + 1e-4 for b, g in zip(beam, greedy)) > 0  # and sometimes finds better
    for b in beam:
        scores = [score for _, score in b.nbest]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)


def test_save_then_load_gives_identical_outputs(toy_config):
    config = toy_config(train={"max_steps": 30})
    trainer = Trainer(config, progress=False)
    trainer.train()
    sources = ["a b c", "j i h g f e d", "c"]
    loaded = aligna.load(config.model_dir, checkpoint="latest")
    ours, theirs = trainer.translator.translate_detailed(sources), loaded.translate_detailed(sources)
    assert [t.tokens for t in ours] == [t.tokens for t in theirs]
    assert [t.score for t in ours] == [t.score for t in theirs]
    for (name, a), (_, b) in zip(trainer.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name


def weights(model_dir):
    return load_file(str(ModelDir(model_dir).latest() / modeldir.MODEL))


RESUMABLE = {
    # dropout, scheduled sampling and the plateau schedule all consume state that must survive
    "model": {"dropout": 0.3},
    "train": {
        "max_steps": 40, "validate_every": 10, "teacher_forcing": 0.9, "teacher_forcing_decay": "linear",
        "teacher_forcing_decay_steps": 30, "schedule": "plateau", "plateau_patience": 1,
        "early_stopping_metric": "wer", "batch_tokens": 128, "epochs": 3,
    },
}  # fmt: skip


def test_interrupted_then_resumed_run_ends_with_the_same_weights(toy_config, tmp_path, monkeypatch):
    straight = toy_config(**{**RESUMABLE, "model_dir": str(tmp_path / "straight")})
    Trainer(straight, progress=False).train()

    broken = toy_config(**{**RESUMABLE, "model_dir": str(tmp_path / "broken")})
    real_step, calls = training.train_step, []

    def dies_at_step_27(*args, **kwargs):
        calls.append(1)
        if len(calls) == 27:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", dies_at_step_27)
    with pytest.raises(KeyboardInterrupt):
        Trainer(broken, progress=False).train()
    monkeypatch.setattr(training, "train_step", real_step)
    assert ModelDir(tmp_path / "broken").latest().name == "step-000020"

    resumed = Trainer(broken, resume=True, progress=False)
    assert (resumed.state.step, resumed.state.epoch) == (20, 0) and resumed.state.batch == 20
    resumed.train()
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "broken")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    def scores(history):  # wall-clock times differ between two runs, nothing else may
        return [{k: v for k, v in h.items() if k != "train_seconds"} for h in history]

    history = Trainer(straight, resume=True, progress=False).state.history
    assert scores(resumed.state.history) == scores(history)
    assert [h["train_seconds"] > 0 for h in history] == [True] * len(history)


@pytest.mark.parametrize("error", ["OSError", "SafetensorError"])  # the latter is safetensors' own
def test_a_crash_mid_save_leaves_the_previous_checkpoint(toy_config, monkeypatch, error):
    from safetensors import SafetensorError

    config = toy_config(train={"max_steps": 20, "validate_every": 10})
    real_save, calls = tensorfiles.save_file, []

    def disk_full_on_second_save(tensors, path, *args, **kwargs):  # the first file of the step-20 checkpoint
        calls.append(path)
        if "step-000020" in str(path) and len([c for c in calls if "step-000020" in str(c)]) == 1:
            Path(path).write_bytes(b"half")  # a partial file
            raise OSError(28, "No space left on device") if error == "OSError" else SafetensorError(
                "No space left on device (os error 28)")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(tensorfiles, "save_file", disk_full_on_second_save)
    with pytest.raises(modeldir.ModelDirError, match=r"step-000020 .*No space left on device .*step-000010, is intact"):
        Trainer(config, progress=False).train()
    md = ModelDir(config.model_dir)
    assert md.latest().name == "step-000010"
    assert not [p for p in (md / modeldir.CHECKPOINTS).iterdir() if p.name.startswith(".tmp")]  # cleaned up
    aligna.load(md.path, checkpoint="latest").translate(["a b"])  # still loads
    monkeypatch.setattr(tensorfiles, "save_file", real_save)
    Trainer(config, resume=True, progress=False).train()
    assert md.latest().name == "step-000020"


def test_a_latest_json_that_cannot_be_written_is_named_and_the_checkpoint_is_kept(toy_config, monkeypatch):
    config = toy_config(train={"max_steps": 20, "validate_every": 10})
    real_write, calls = modeldir.atomic_write_text, []

    def disk_full_on_second_pointer(path, text):
        if Path(path).name == modeldir.LATEST:
            calls.append(1)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
        return real_write(path, text)

    monkeypatch.setattr(modeldir, "atomic_write_text", disk_full_on_second_pointer)
    with pytest.raises(modeldir.ModelDirError, match=r"step-000020 is written and intact, but .*latest\.json could not"):
        Trainer(config, progress=False).train()
    monkeypatch.setattr(modeldir, "atomic_write_text", real_write)
    assert ModelDir(config.model_dir).latest().name == "step-000020"  # found among the directories


def test_model_dir_holds_no_pickles(toy_config):
    from aligna.config import ConfigError, config_to_dict

    config = toy_config(train={"max_steps": 10})
    aligna.train(config_to_dict(config), progress=False)  # a mapping, as a YAML file reads
    with pytest.raises(ConfigError, match=r"^data: expected a DataConfig, got a dict: build the config with"):
        aligna.Config(model_dir="x", data={"train": {"tsv": "t.tsv"}})
    allowed = {".safetensors", ".json", ".yaml", ".txt", ".log"}
    raw_arrays = [modeldir.CORPUS_LINES] + [n.format(side=s) for n in (modeldir.CORPUS_IDS, modeldir.CORPUS_OFFSETS)
                                            for s in ("src", "tgt")]  # fmt: skip
    files = [
        p for p in ModelDir(config.model_dir).path.rglob("*")
        if p.is_file() and "tensorboard" not in p.parts and p.name not in (modeldir.MARKER, modeldir.LOCK, modeldir.CORPUS_LOCK)
        and not (p.parent.name == modeldir.CORPUS and p.name in raw_arrays)  # plain numbers, read by np.memmap
    ]
    assert files and all(p.suffix in allowed for p in files), files


def test_existing_run_needs_resume_or_overwrite(toy_config):
    config = toy_config(train={"max_steps": 5})
    train(config, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(config, progress=False)
    changed = toy_config(train={"max_steps": 5}, model={"hidden_size": 64})
    with pytest.raises(ValueError, match=r"model section differs .*\(model\.hidden_size: 32 -> 64\)"):
        Trainer(changed, resume=True, progress=False)
    # a test set, which changes nothing about training, may be added (or mended) on resume
    tested = toy_config(train={"max_steps": 5}, data={"test": {"tsv": config.data.dev.tsv}})
    Trainer(tested, resume=True, progress=False).close()
    Trainer(config, overwrite=True, progress=False)


def test_a_bad_dev_or_test_set_stops_the_run_before_anything_changes(toy_config, tmp_path):
    """Dev and test are read before training, and before --overwrite deletes the old run:
    a typo in data.test used to cost the whole training and then exit 1."""
    from aligna.data import DataError

    config = toy_config(train={"max_steps": 2, "validate_every": 0})
    with pytest.raises(DataError, match="nope.tsv"):
        Trainer(toy_config(data={"test": {"tsv": str(tmp_path / "nope.tsv")}}), progress=False)
    assert not Path(config.model_dir).exists()
    train(config, progress=False)
    before = sorted(p.name for p in Path(config.model_dir).iterdir())
    (tmp_path / "bad.tsv").write_text("a b c\n")  # no tab
    for split in ("dev", "test"):
        with pytest.raises(DataError, match=r"bad\.tsv:1"):
            Trainer(toy_config(data={split: {"tsv": str(tmp_path / "bad.tsv")}}), overwrite=True, progress=False)
    assert sorted(p.name for p in Path(config.model_dir).iterdir()) == before  # the run is still there
    (tmp_path / "blank.tsv").write_text("a b\t\n\tc\n \t \n")  # read, but no pair to score (at the first validation)
    for split in ("dev", "test"):
        with pytest.raises(DataError, match=rf"{split}: .*blank\.tsv: no pair has text on both sides \(3 read\)"):
            Trainer(toy_config(data={split: {"tsv": str(tmp_path / "blank.tsv")}}), overwrite=True, progress=False)
    assert sorted(p.name for p in Path(config.model_dir).iterdir()) == before


def test_a_resumed_run_trains_with_the_optimizer_settings_it_logs(toy_config):
    """Changed betas and weight decay apply after --resume (the checkpoint's stayed, while the
    log and config.yaml said otherwise) and the run's log says what changed; another
    early-stopping metric is refused (the best weights and the patience are by the run's)."""
    train(toy_config(train={"max_steps": 5}), progress=False)
    changed = toy_config(train={"max_steps": 10, "betas": [0.8, 0.99], "weight_decay": 0.1})
    trainer = Trainer(changed, resume=True, progress=False)
    try:
        assert {(g["betas"], g["weight_decay"]) for g in trainer.optimizer.param_groups} == {((0.8, 0.99), 0.1)}
    finally:
        trainer.close()
    log = (Path(changed.model_dir) / "train.log").read_text()
    assert "resuming with changed settings" in log and "train.weight_decay: 0.0 -> 0.1" in log
    with pytest.raises(ValueError, match="early_stopping_metric is wer, but the run .* by loss"):
        Trainer(toy_config(train={"max_steps": 10, "early_stopping_metric": "wer"}), resume=True, progress=False)


def test_early_stopping_stops(toy_config, aligna_log):
    config = toy_config(train={"epochs": 50, "validate_every": 5, "early_stopping_patience": 2, "lr": 1e-9})
    state = Trainer(config, progress=False).train()
    assert state.step < 100 and state.bad_validations == 2
    latest = ModelDir(config.model_dir).latest()
    again = Trainer(config, resume=True, progress=False).train()  # trained on by one window before
    assert again.step == state.step and ModelDir(config.model_dir).latest() == latest
    assert "the run stopped early" in aligna_log.text
    more = toy_config(train={"epochs": 50, "validate_every": 5, "early_stopping_patience": 3, "lr": 1e-9})
    assert Trainer(more, resume=True, progress=False).train().step == state.step + 5  # more patience: on


def test_tensorboard_shows_the_logged_scalars_and_a_full_disk_is_one_warning(toy_config, aligna_log, monkeypatch):
    """torch's SummaryWriter wrote from a thread: on a full disk that thread printed a traceback
    and the next scalar raised the error in the training loop."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = toy_config(train={"max_steps": 40})
    state = Trainer(config, progress=False).train()
    events = EventAccumulator(str(Path(config.model_dir) / modeldir.TENSORBOARD))
    events.Reload()
    assert {"train/loss", "train/lr", "dev/loss", "dev/wer"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [10, 20, 30, 40]  # train.log_every 10
    dev = [(e.step, e.value) for e in events.Scalars("dev/wer")]
    assert dev == [(h["step"], pytest.approx(h["wer"])) for h in state.history] and len(dev) == 2

    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    monkeypatch.setattr(eventlog, "open", lambda *args: open("/dev/full", "ab"), raising=False)  # ENOSPC
    full = toy_config(train={"max_steps": 40}, model_dir=str(Path(config.model_dir).parent / "full"))
    state = Trainer(full, progress=False).train()
    assert state.step == 40 and ModelDir(full.model_dir).latest() is not None  # trained on
    warnings = [line for line in aligna_log.lines if "TensorBoard" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
    assert not thread_errors


def test_resuming_on_changed_training_data_says_it_is_not_exact(toy_config, tmp_path, aligna_log):
    Trainer(toy_config(train={"max_steps": 10}), progress=False).train()
    longer = toy_config(train={"max_steps": 20})
    write_tsv(tmp_path / "train.tsv", reverse_pairs(2000, seed=5))  # the same file, other pairs
    assert Trainer(longer, resume=True, progress=False).train().step == 20
    assert "has changed since the corpus was prepared" in aligna_log.text
    assert "so it is not an exact continuation" in aligna_log.text


def test_validation_ignores_a_decode_shortlist_and_numbers_epochs_from_1(toy_config):
    """decode.shortlist (made from a trained model, after training) stopped the first validation
    with an error, before any checkpoint; and a validation at an epoch's end was numbered as the
    next epoch."""
    config = toy_config(train={"max_steps": 200, "epochs": 2, "validate_every": 0}, decode={"shortlist": True})
    state = Trainer(config, progress=False).train()
    assert [h["epoch"] for h in state.history] == [1, 2] and ModelDir(config.model_dir).latest() is not None


def test_learning_rate_schedules():
    inv = TrainConfig(schedule="inverse_sqrt", lr=1e-3, warmup_steps=100)
    assert learning_rate(50, inv) == pytest.approx(5e-4)
    assert learning_rate(100, inv) == pytest.approx(1e-3)
    assert learning_rate(400, inv) == pytest.approx(5e-4)
    const = TrainConfig(lr=1e-3, warmup_steps=10)
    assert learning_rate(5, const) == pytest.approx(5e-4) and learning_rate(500, const) == 1e-3
    plateau = TrainConfig(schedule="plateau", lr=1e-3, min_lr=1e-4)
    assert learning_rate(10, plateau, 0.5) == pytest.approx(5e-4)
    assert learning_rate(10, plateau, 0.01) == pytest.approx(1e-4)
    warm = TrainConfig(schedule="plateau", lr=1e-3, min_lr=1e-4, warmup_steps=4000)
    assert learning_rate(40, warm) == pytest.approx(1e-5)  # warmup is not floored at min_lr (was 1e-4)
    assert learning_rate(2000, warm, 0.01) == pytest.approx(5e-5)
    linear = TrainConfig(schedule="linear", lr=1e-3, warmup_steps=100)
    assert learning_rate(50, linear, total=1000) == pytest.approx(5e-4)
    assert learning_rate(100, linear, total=1000) == pytest.approx(1e-3)
    assert learning_rate(550, linear, total=1000) == pytest.approx(1e-3 * 451 / 901)
    assert learning_rate(1000, linear, total=1000) == pytest.approx(1e-3 / 901)  # the last update still moves
    with pytest.raises(ValueError, match="total number of updates"):
        learning_rate(5, linear)


def test_plateau_reduces_after_patience():
    p = training.Plateau(factor=0.5, patience=2)
    for value in [1.0, 0.9, 0.95, 0.95]:
        p.update(value, higher_is_better=False)
    assert p.scale == 0.5 and p.best == 0.9


def test_teacher_forcing_decays():
    lin = TrainConfig(teacher_forcing=1.0, teacher_forcing_decay="linear", teacher_forcing_decay_steps=100,
                      teacher_forcing_min=0.2)  # fmt: skip
    assert [teacher_forcing_ratio(s, lin) for s in (0, 50, 100, 500)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    exp = TrainConfig(
        teacher_forcing=1.0, teacher_forcing_decay="exponential", teacher_forcing_decay_steps=10
    )
    assert teacher_forcing_ratio(10, exp) == pytest.approx(0.5)
    sig = TrainConfig(
        teacher_forcing=1.0, teacher_forcing_decay="inverse_sigmoid", teacher_forcing_decay_steps=100
    )
    assert teacher_forcing_ratio(100, sig) == pytest.approx(0.5)
    assert teacher_forcing_ratio(0, sig) > 0.99 and teacher_forcing_ratio(300, sig) < 0.01


def test_label_smoothed_loss_matches_its_definition():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 3, 5), torch.tensor([[1, 4, 0], [2, 3, 3]])  # 0 is <pad>
    eps, logp = 0.1, torch.log_softmax(logits, -1)
    mask = targets != 0
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    smooth = -logp.mean(-1)
    expected = ((1 - eps) * nll + eps * smooth)[mask].sum()
    torch.testing.assert_close(sequence_loss(logits, targets, eps), expected)
    assert math.isclose(float(sequence_loss(logits, targets)), float(nll[mask].sum()), rel_tol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_the_cpu_loss_and_its_gradient_equal_torch_cross_entropy(eps):
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 50) * 4).requires_grad_()
    targets = torch.randint(1, 50, (3, 7))
    targets[0, 5:] = targets[2, 1:] = 0  # padding
    ours = sequence_loss(logits, targets, eps) * 0.3  # backward scales the gradient
    (grad,) = torch.autograd.grad(ours, logits)
    flat = logits.reshape(-1, 50)
    theirs = torch.nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=0, label_smoothing=eps, reduction="sum") * 0.3
    (expected,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad, expected)
    assert torch.all(grad[0, 5:] == 0) and torch.all(grad[2, 1:] == 0)  # padding gets no gradient


def test_the_torch_loss_path_ignores_minus_inf_logits_where_torch_does(monkeypatch):
    """Without the C kernel: a -inf logit in a padded row, or (no smoothing) beside the gold
    token, leaves the loss and gradient finite, as torch's cross-entropy."""
    monkeypatch.setattr(kernels, "USE", False)
    logits = torch.randn(4, 9)
    logits[1, 4] = float("-inf")  # in a padded row
    logits[2, 5] = float("-inf")
    targets = torch.tensor([1, 0, 3, 2])
    x = logits.clone().requires_grad_(True)
    ours = sequence_loss(x, targets)
    (grad,) = torch.autograd.grad(ours, x)
    y = logits.clone().requires_grad_(True)
    theirs = torch.nn.functional.cross_entropy(y, targets, ignore_index=0, reduction="sum")
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad, torch.autograd.grad(theirs, y)[0])


def test_the_cpu_loss_refuses_a_second_backward():
    logits = torch.randn(4, 9, requires_grad=True)
    loss = sequence_loss(logits, torch.tensor([1, 2, 3, 0]), 0.1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs backward once"):
        loss.backward()


def test_dropout_keeps_each_value_with_chance_one_minus_p_and_rescales_it():
    from aligna.model import Dropout

    torch.manual_seed(0)
    layer = Dropout(0.3)
    x = torch.ones(1000, 200, requires_grad=True)
    out = layer(x)
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.7) < 0.005  # 200,000 draws: 4.5 standard deviations
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.7))
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, out.detach())  # the same mask, the same scale
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    if kernels.native():  # float32 masks come from the C kernel, seeded by torch's generator
        torch.manual_seed(1)
        out = layer(torch.ones(50, 40))
        torch.manual_seed(1)
        assert torch.equal(out, kernels.dropout_mask(torch.ones(50, 40), 0.3))
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x)) and Dropout(0.0)(x) is x
    assert layer.eval()(x) is x
    with pytest.raises(ValueError, match="not in"):
        Dropout(1.5)


def test_torch_compile_traces_dropout_in_one_graph():
    """Under torch.compile (train.compile) the mask is torch.rand's, which Dynamo traces; the C
    kernel's call would break the graph at every Dropout."""
    import torch._dynamo

    from aligna.model import Dropout

    model = nn.Sequential(nn.Linear(8, 8), Dropout(0.1), nn.Linear(8, 8), Dropout(0.2)).train()
    explained = torch._dynamo.explain(model)(torch.randn(4, 8))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.parametrize("bias", [True, False])
def test_a_wide_output_layer_on_onednn_computes_what_linear_does(bias, monkeypatch):
    """`model.output_layer`: forward, and every gradient, equal nn.Linear's to float rounding, for
    a 3-D input, a tied weight that also gets another gradient, and without grad; narrow layers,
    few rows, bf16 and autocast take nn.Linear itself."""
    from aligna import model as model_module

    if model_module._ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear")
    calls = []
    real = model_module._ONEDNN_LINEAR
    monkeypatch.setattr(model_module, "_ONEDNN_LINEAR", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    layer = nn.Linear(24, 5000, bias=bias)
    embedding = nn.Embedding(5000, 24)
    layer.weight = embedding.weight  # tied, as a model's output layer and target embedding
    x = torch.randn(3, 20, 24, requires_grad=True)
    ids = torch.randint(0, 5000, (7,))
    target = torch.randn(3, 20, 5000)

    def grads(fn):
        out = fn(layer, x)
        (out * target).sum().backward(inputs=[x, layer.weight, *([layer.bias] if bias else [])])
        (embedding(ids).sum() * 0.5).backward()  # the tied weight's other use
        result = [out.detach(), x.grad, layer.weight.grad, *([layer.bias.grad] if bias else [])]
        x.grad = layer.weight.grad = None
        if bias:
            layer.bias.grad = None
        return result

    mine, theirs = grads(model_module.output_layer), grads(lambda m, v: m(v))
    assert calls == [(60, 24), (60, 5000)]  # the forward product and the input's gradient
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model_module.output_layer(layer, x), layer(x), rtol=1e-4, atol=1e-4)
    calls.clear()
    model_module.output_layer(nn.Linear(24, 100), x)  # narrow
    model_module.output_layer(layer, x[:1, :5])  # 5 rows
    model_module.output_layer(layer.bfloat16(), x.bfloat16())
    assert calls == []


def test_the_onednn_output_layer_trains_a_bias_alone_and_refuses_a_second_derivative():
    from aligna import model as model_module

    if model_module._ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear")
    layer = nn.Linear(16, 5000)
    layer.weight.requires_grad_(False)  # only the bias trains: its gradient was dropped
    x = torch.randn(40, 16)
    model_module.output_layer(layer, x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((5000,), 40.0))
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(model_module.output_layer(layer, x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):  # it came out 0 before
        grad.sum().backward()


def test_a_training_step_scores_every_target_but_padding():
    from aligna.build import build_model
    from aligna.config import ModelConfig, TransformerConfig
    from aligna.data import Batch

    torch.manual_seed(0)
    config = ModelConfig(
        arch="transformer", emb_dim=16, encoder_layers=1, decoder_layers=1, dropout=0.0,
        transformer=TransformerConfig(heads=2, ff_size=32, attention_dropout=0.0, activation_dropout=0.0),
    )  # fmt: skip
    model = build_model(config, 11, 13)  # no dropout anywhere: both passes compute alike
    src = torch.tensor([[5, 6, 7], [8, 9, 0]])
    tgt = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]])  # <sos> .. <eos>, padded
    batch = Batch(src, torch.tensor([3, 2]), tgt[:, :-1], tgt[:, 1:], torch.arange(2))
    expected = sequence_loss(model(batch.src, batch.src_lengths, batch.tgt_in), batch.tgt_out, 0.1) / 6
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, ok = training.train_step(model, [batch], 6, optimizer, TrainConfig(label_smoothing=0.1), 0.0, 1.0)
    assert ok
    torch.testing.assert_close(loss, expected.detach())


def test_checkpoint_averaging_is_the_mean_of_the_last_n(toy_config, capsys):
    from aligna.cli import main

    config = toy_config(train={"max_steps": 40, "validate_every": 10, "keep_checkpoints": 3})
    train(config, progress=False)
    model_dir = ModelDir(config.model_dir).path
    assert main(["average", str(model_dir), "--last", "2"]) == 0
    paths = ModelDir(model_dir).checkpoints()[-2:]
    assert [p.name for p in paths] == ["step-000030", "step-000040"]
    parts = [load_file(str(p / "model.safetensors")) for p in paths]
    averaged = load_file(str(model_dir / modeldir.AVERAGED))
    assert averaged.keys() == parts[0].keys()
    for name in averaged:
        torch.testing.assert_close(averaged[name], (parts[0][name] + parts[1][name]) / 2)
    assert aligna.load(model_dir, checkpoint="averaged").translate(["a b"])
    assert main(["average", str(model_dir), "--last", "5"]) == 1
    assert "keeps 3 checkpoints, fewer than --last 5" in capsys.readouterr().err
    assert main(["average", str(model_dir)]) == 0  # by default every checkpoint the run keeps
    assert "averaged the weights of step-000020, step-000030, step-000040 into" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["rnn", "transformer"])
def test_bf16_autocast_trains_and_decodes_on_cpu(toy_config, arch):
    model = {"arch": arch, "rnn": {"attention": "general"}, "transformer": {"heads": 2, "ff_size": 32}}
    config = toy_config(model=model, train={"max_steps": 8, "precision": "bf16"})
    state = Trainer(config, progress=False).train()
    assert all(math.isfinite(h["loss"]) for h in state.history)
    translator = aligna.load(config.model_dir, checkpoint="latest", precision="bf16")
    assert len(translator.translate(["a b c", "d"])) == 2


@pytest.mark.parametrize(
    "model",
    [
        {"arch": "rnn", "rnn": {"cell": "lstm", "attention": "general"}},
        {"arch": "rnn", "rnn": {"cell": "gru", "attention": "bahdanau"}},
        {"arch": "transformer", "transformer": {"heads": 2, "ff_size": 64}},
    ],
    ids=["lstm-luong", "gru-bahdanau", "transformer"],
)
def test_int8_decoding_quantizes_a_copy_and_agrees_with_fp32(toy_config, model):
    config = toy_config(model=model, train={"max_steps": 40})
    train(config, progress=False)
    fp32 = aligna.load(config.model_dir)
    int8 = aligna.load(config.model_dir, precision="int8")
    searcher = int8.search_model()
    assert searcher is int8.search_model()  # quantized once
    modules = list(searcher.modules())
    assert not [m for m in modules if type(m) in (torch.nn.Linear, torch.nn.LSTM, torch.nn.GRU)]
    # what replaced them: torch's dynamic int8 modules, or aligna's kernel-calling Int8Linear
    assert [m for m in modules if "quantized" in type(m).__module__ or isinstance(m, Int8Linear)]
    assert all(p.dtype == torch.float32 for p in int8.model.parameters())  # the fp32 model is untouched
    torch.manual_seed(0)
    src = torch.randint(4, len(fp32.pipeline.src_vocab), (16, 9))  # (B, S) no padding
    tgt_in = torch.randint(4, len(fp32.pipeline.tgt_vocab), (16, 10))  # (B, T)
    lengths = torch.full((16,), 9)
    with torch.no_grad():
        exact = fp32.model(src, lengths, tgt_in).log_softmax(-1)  # (B, T, V)
        quantized = searcher(src, lengths, tgt_in).log_softmax(-1)
    kl = (exact.exp() * (exact - quantized)).sum(-1)  # (B, T)
    assert float(kl.max()) < 0.01  # int8 weights keep each next-token distribution (measured: < 0.001)
    # Where fp32 has a clear first choice, int8 makes it too (a near-tie may flip either way).
    best, second = exact.topk(2, dim=-1).values.unbind(-1)
    clear = best - second > 0.05  # nats
    assert int(clear.sum()) >= 80  # of 160 (measured: 129 to 152 over the three models)
    assert torch.equal(exact.argmax(-1)[clear], quantized.argmax(-1)[clear])
    pairs = reverse_pairs(60, seed=7)
    sources, references = [s for s, _ in pairs], [[t] for _, t in pairs]
    assert len(int8.translate(sources, beam_size=4)) == len(sources)
    ppl = [t.evaluate(sources, references, ["ppl"]).values["ppl"] for t in (fp32, int8)]
    assert ppl[1] != ppl[0] and ppl[1] == pytest.approx(ppl[0], rel=0.01)  # the int8 model scored it


def test_settings_a_run_cannot_train_are_refused_before_anything_is_written(toy_config):
    """A teacher-forcing ratio that decays below 1 passed the distributed check (only its start
    was looked at) and every rank died at the first update; fp16 with device auto on a machine
    without CUDA failed at the first update too, suggesting int8, which training does not take."""
    check_one_process_settings(TrainConfig())
    for settings, says in (({"teacher_forcing": 0.9}, r"train.teacher_forcing < 1\) trains in one process only"),
                           ({"teacher_forcing_decay": "linear", "teacher_forcing_min": 0.5},
                            "or decaying to train.teacher_forcing_min 0.5")):  # fmt: skip
        with pytest.raises(ValueError, match=says):
            check_one_process_settings(TrainConfig(**settings))
    if not torch.cuda.is_available():
        config = toy_config(train={"precision": "fp16"})
        with pytest.raises(ValueError, match="fp16 needs a CUDA device, and this run trains on cpu: use bf16"):
            Trainer(config, progress=False)
        assert not Path(config.model_dir).exists()


def test_a_log_window_of_skipped_updates_shows_no_loss(toy_config, monkeypatch, aligna_log):
    config = toy_config(train={"max_steps": 10, "log_every": 5, "validate_every": 0, "max_nonfinite_updates": 8})
    real_loss, calls = training.sequence_loss, []

    def nan_first_5(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) <= 5 else loss

    monkeypatch.setattr(training, "sequence_loss", nan_first_5)
    Trainer(config, progress=False).train()
    assert "step 5/10: every update since the last log line was skipped" in aligna_log.text
    assert "loss 0.0000" not in aligna_log.text and "step 10/10 loss" in aligna_log.text


def test_precision_errors_say_what_to_use():
    with pytest.raises(ValueError, match="int8 decodes on a CPU"):
        check_precision(torch.device("cuda"), "int8")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        check_precision(torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="expected one of fp32, bf16, fp16, int8"):
        check_precision(torch.device("cpu"), "fp8")


def test_a_model_too_big_for_memory_is_refused_before_allocating(toy_config, capsys):
    from aligna.cli import main
    from aligna.config import save_config

    config = toy_config(model={"hidden_size": 60000})
    save_config(config, Path(config.model_dir).parent / "big.yaml")
    assert main(["train", str(Path(config.model_dir).parent / "big.yaml"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "model: 28," in err and "GiB for weights, gradients and optimizer state, more than the" in err
    assert "hidden_size 60000" in err and "Traceback" not in err


@pytest.mark.parametrize("name, message", [("cuda:abc", "expected auto, cpu, cuda or cuda:N"),
                                           ("meta", "expected auto, cpu, cuda or cuda:N"),
                                           ("cuda:7", "CUDA is not available|has 1 CUDA device")])  # fmt: skip
def test_device_names_are_checked(name, message):
    from aligna.runtime import resolve_device

    with pytest.raises(ValueError, match=message):
        resolve_device(name)


def test_fp16_loss_scale_overflows_are_the_scalers_not_divergence(toy_config, aligna_log):
    """Steps whose scaled gradients overflow while GradScaler backs its scale off are skipped
    without counting toward train.max_nonfinite_updates (an fp16 run stopped at its start after
    a run of them). A CPU GradScaler whose first 3 scaled losses overflow stands in for fp16 on a GPU."""

    class Overflowing(torch.amp.GradScaler):
        calls = 0

        def scale(self, outputs):
            Overflowing.calls += 1
            scaled = super().scale(outputs)
            return scaled * float("inf") if Overflowing.calls <= 3 else scaled

    trainer = Trainer(toy_config(train={"max_steps": 8, "validate_every": 0, "max_nonfinite_updates": 1}),
                      progress=False)  # fmt: skip
    trainer.scaler = Overflowing("cpu")
    state = trainer.train()
    assert state.step == 8 and state.skipped_updates == 3 and state.nonfinite_in_row == 0
    assert trainer.scaler.get_scale() == 2.0**16 / 8
    assert "fp16 gradients overflowed at loss scale" in aligna_log.text
