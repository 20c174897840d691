from pathlib import Path

import pytest

from aligna.config import ConfigError, config_from_dict, config_to_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def minimal(**extra):
    return {"model_dir": "x", "data": {"train": {"tsv": "t.tsv"}}, **extra}


def test_defaults_live_in_the_dataclasses():
    config = config_from_dict(minimal())
    assert config.model.rnn.cell == "lstm"
    assert config.train.betas == (0.9, 0.999)
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    load_config(path)


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"model\.hiden_size: unknown key \(did you mean 'hidden_size'\?\)"):
        config_from_dict(minimal(model={"hiden_size": 3}))


def test_bad_choice_names_key_and_allowed_values():
    with pytest.raises(ConfigError, match=r"model\.rnn\.cell: 'lstn' .*allowed values: \['lstm', 'gru'\]"):
        config_from_dict(minimal(model={"rnn": {"cell": "lstn"}}))


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "lr", "fast", r"train\.lr: expected a number"),
        ("train", "lr", -1.0, r"train\.lr: must be > 0"),
        ("train", "epochs", 2.5, r"train\.epochs: expected an integer"),
        ("model", "dropout", 1.5, r"model\.dropout: must be in \[0, 1\)"),
        ("data", "shared_vocab", "yes", r"data\.shared_vocab: expected true or false"),
        ("train", "betas", [0.9], r"train\.betas: expected a list of 2 values"),
    ],
)
def test_bad_values_are_named(section, key, value, message):
    raw = minimal()
    raw.setdefault(section, {})[key] = value
    if section == "data":
        raw["data"] = {**raw["data"], key: value}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"data: missing required key|data\.train: missing required key"):
        config_from_dict({"model_dir": "x", "data": {}})


def test_corpus_needs_files():
    with pytest.raises(ConfigError, match=r"data\.train: src and tgt must be given together"):
        config_from_dict({"model_dir": "x", "data": {"train": {"src": "a"}}})


def test_early_stopping_metric_must_be_computed():
    with pytest.raises(ConfigError, match="early_stopping_metric"):
        config_from_dict(minimal(train={"early_stopping_metric": "bleu"}, eval={"metrics": ["chrf"]}))


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_dir: x\ndata: {train: {tsv: t}}\ntrain: {seed: [1}\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)


def test_overrides_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_dir: x\ndata: {train: {tsv: t.tsv}}\n")
    assert load_config(path, ["train.max_steps=7"]).train.max_steps == 7
    with pytest.raises(ConfigError, match=r"train\.max_step: unknown key"):
        load_config(path, ["train.max_step=7"])
