import argparse
import dataclasses
import math
import re
import tempfile
import time
import tracemalloc
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aligna.cli import SEARCH_OPTIONS, _parser, _search_options, main
from aligna.config import (
    Config,
    ConfigError,
    DecodeConfig,
    Range,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    replace_validated,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
MINIMAL = "model_dir: x\ndata: {train: {tsv: t.tsv}}\n"


def minimal(**extra):
    return {"model_dir": "x", "data": {"train": {"tsv": "t.tsv"}}, **extra}


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


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
    with pytest.raises(ConfigError, match=r"model\.zzz: unknown key; allowed keys: arch, emb_dim, "):
        config_from_dict(minimal(model={"zzz": 3}))


def test_bad_choice_names_key_and_allowed_values():
    with pytest.raises(ConfigError, match=r"model\.rnn\.cell: 'lstn' .*allowed values: \['lstm', 'gru'\]"):
        config_from_dict(minimal(model={"rnn": {"cell": "lstn"}}))


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "lr", "fast", r"train\.lr: expected a number"),
        ("train", "lr", -1.0, r"train\.lr: -1\.0 is out of range; allowed: numbers in \(0, 1\]"),
        ("train", "epochs", 2.5, r"train\.epochs: expected an integer"),
        ("model", "dropout", 1.5, r"model\.dropout: 1\.5 is out of range; allowed: numbers in \[0, 1\)"),
        ("data", "shared_vocab", "yes", r"data\.shared_vocab: expected true or false"),
        ("train", "betas", [0.9], r"train\.betas: expected a list of 2 values"),
        (
            "train",
            "betas",
            [0.9, 1.0],
            r"train\.betas\[1\]: 1\.0 is out of range; allowed: numbers in \[0, 1\)",
        ),
    ],
)
def test_bad_values_are_named(section, key, value, message):
    raw = minimal()
    raw.setdefault(section, {})[key] = value
    if section == "data":
        raw["data"] = {**raw["data"], key: value}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


# The values users hit (the issue), written as YAML: key, value, what the error says.
@pytest.mark.parametrize(
    "line, message",
    [
        ("train: {warmup_steps: -100}", r"train\.warmup_steps: -100 is out of range; allowed: integers in \[0, 1000000000\]$"),
        ("train: {early_stopping_patience: -1}", r"train\.early_stopping_patience: -1 is out of range; allowed: integers in \[0, "),
        ("train: {clip_grad_norm: -5}", r"train\.clip_grad_norm: -5\.0 is out of range; allowed: numbers in \[0, 1000000\]"),
        ("train: {min_lr: -1}", r"train\.min_lr: -1\.0 is out of range; allowed: numbers in \[0, 1\]"),
        ("train: {schedule: plateau, lr: 0.01, min_lr: 0.1}", r"train\.min_lr: must be <= lr \(0\.01\); got 0\.1$"),
        ("train: {teacher_forcing: 0.5, teacher_forcing_min: 0.7}", r"train\.teacher_forcing_min: must be <= teacher_forcing \(0\.5\); got 0\.7$"),
        ("train: {plateau_patience: -2}", r"train\.plateau_patience: -2 is out of range; allowed: integers in \[1, "),
        ("decode: {max_len_a: 1e300}", r"decode\.max_len_a: 1e\+300 is out of range; allowed: numbers in \[0, 100\]"),
        ("train: {num_threads: -3}", r"train\.num_threads: -3 is out of range; allowed: integers in \[0, 4096\]"),
        ("train: {device: 'cuda:abc'}", r"train\.device: 'cuda:abc' \(str\) is not allowed; allowed: auto, cpu, cuda or cuda:N"),
        ("model: {hidden_size: 1e7}", r"model\.hidden_size: 10000000 is out of range; allowed: integers in \[1, 65536\]"),
        ("model: {emb_dim: 100000000000000000000000000}", r"model\.emb_dim: 1000.* is out of range; allowed: integers in \[1, 65536\]"),
        ("decode: {batch_size: 0}", r"decode\.batch_size: 0 is out of range; allowed: integers in \[1, 100000\]"),
        ("decode: {beam_size: 2, nbest: 3}", r"decode\.nbest: must be <= beam_size \(2\); got 3$"),
        ("decode: {top_p: 0}", r"decode\.top_p: 0\.0 is out of range; allowed: numbers in \(0, 1\]"),
        ("train: {lr: .nan}", r"train\.lr: nan is not a finite number; allowed: numbers in \(0, 1\]"),
        ("train: {lr: .inf}", r"train\.lr: inf is not a finite number"),
        ("decode: {alpha: -.inf}", r"decode\.alpha: -inf is not a finite number"),
        ("train: {epochs: .nan}", r"train\.epochs: nan is not a finite number; allowed: integers in \[1, "),
        ("train: {lr: 1e999}", r"train\.lr: inf is not a finite number"),
        ("train: {lr: 10000000000000000000000000000000000000000000000000000000000000000000000000000"
         "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
         "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
         "000000000000000000000000000000000000000000000000000000000000000000000}",
         r"line 3: an integer of \d+ characters"),
        ("train: {epochs: 2.5}", r"train\.epochs: expected an integer, got 2\.5 \(float\)"),
        ("train: {epochs: '2.5'}", r"train\.epochs: expected an integer, got '2\.5' \(str\)"),
    ],
)  # fmt: skip
def test_values_that_make_no_sense_are_refused(tmp_path, line, message):
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, MINIMAL + line + "\n")
    assert str(e.value).startswith(f"{tmp_path / 'c.yaml'}: ")
    assert "\n" not in str(e.value)
    assert len(str(e.value)) < 300
    assert re.search(message, str(e.value)), str(e.value)


def test_a_shared_vocabulary_has_one_rule(tmp_path):
    """With shared_vocab the source side's min_freq and max_size built the one vocabulary, and the
    target's were ignored without a word: a config that sets them apart is refused."""
    text = ("model_dir: x\ndata: {train: {tsv: t.tsv}, shared_vocab: true, src_tokenizer: {min_freq: 1},"
            " tgt_tokenizer: {min_freq: 3}}\n")
    with pytest.raises(ConfigError, match=r"data\.tgt_tokenizer\.min_freq: 3, but the shared vocabulary .*\(1\)"):
        load_text(tmp_path, text)
    load_text(tmp_path, text.replace("shared_vocab: true", "shared_vocab: false"))


def test_a_shared_vocabulary_has_one_subword_model(tmp_path):
    """A joint subword model is trained only when both sides' settings are equal: other settings
    trained two models in silence."""
    text = ("model_dir: x\ndata: {train: {tsv: t.tsv}, shared_vocab: true, src_tokenizer: {type: bpe, vocab_size: 20},"
            " tgt_tokenizer: {type: bpe, vocab_size: 18}}\n")
    with pytest.raises(ConfigError, match=r"data\.tgt_tokenizer\.vocab_size: 18, but .* one subword model .*\(20\)"):
        load_text(tmp_path, text)
    with pytest.raises(ConfigError, match=r"data\.tgt_tokenizer\.type: 'word', but"):
        load_text(tmp_path, text.replace("{type: bpe, vocab_size: 18}", "{type: word}"))
    load_text(tmp_path, text.replace("vocab_size: 18", "vocab_size: 20"))
    load_text(tmp_path, "model_dir: x\ndata: {train: {tsv: t.tsv}, shared_vocab: true, tgt_tokenizer: {lowercase: true}}\n")


def test_empty_model_dir_is_refused():
    # '' is the current directory: `train --overwrite` would delete it.
    for model_dir in ("", "  "):
        with pytest.raises(
            ConfigError, match=r"^model_dir: '\s*' \(str\) is not allowed; allowed: a non-empty path"
        ):
            config_from_dict({**minimal(), "model_dir": model_dir})
    with pytest.raises(ConfigError, match=r"data\.train\.tsv: '' \(str\) is not allowed"):
        config_from_dict({"model_dir": "x", "data": {"train": {"tsv": ""}}})


def test_yaml_1_1_number_strings_are_numbers(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string.
    config = load_text(
        tmp_path, MINIMAL + "train: {lr: 1e-3, epochs: 1e3, min_lr: '1e-7'}\ndecode: {max_len_a: 2}\n"
    )
    assert config.train.lr == 0.001 and type(config.train.lr) is float
    assert config.train.epochs == 1000 and type(config.train.epochs) is int
    assert config.train.min_lr == 1e-7
    assert config.decode.max_len_a == 2.0 and type(config.decode.max_len_a) is float
    # min_lr (default 1e-6) only bounds the plateau schedule, so a smaller lr needs no min_lr.
    assert load_text(tmp_path, MINIMAL + "train: {lr: 1.0e-7}\n").train.lr == 1e-7


def test_devices_that_are_allowed():
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert config_from_dict(minimal(train={"device": device})).train.device == device
    for device in ("cuda:", "cuda:-1", "cuda:abc", "gpu", "CPU", " cpu"):
        with pytest.raises(ConfigError, match=r"train\.device: .* is not allowed"):
            config_from_dict(minimal(train={"device": device}))


def test_python_api_checks_ranges_too():
    with pytest.raises(ConfigError, match=r"^lr: -1\.0 is out of range; allowed: numbers in \(0, 1\]$"):
        TrainConfig(lr=-1)
    with pytest.raises(ConfigError, match=r"^hidden_size: expected an integer"):
        dataclasses.replace(config_from_dict(minimal()).model, hidden_size="big")
    with pytest.raises(ConfigError, match=r"^nbest: must be <= beam_size \(1\); got 2$"):
        DecodeConfig(nbest=2)
    with pytest.raises(ConfigError, match=r"^decode\.beam_size: 0 is out of range"):
        replace_validated(DecodeConfig(), "decode", beam_size=0)
    with pytest.raises(ConfigError, match=r"^decode\.beams: unknown key \(did you mean 'beam_size'\?\)"):
        replace_validated(DecodeConfig(), "decode", beams=2)
    assert replace_validated(DecodeConfig(), "decode", beam_size=5, nbest=5).nbest == 5
    assert TrainConfig(lr=1, betas=[0.5, 0.5]).betas == (0.5, 0.5)  # converted like YAML values


def _numeric_fields(cls=Config, where=""):
    """(dotted key, annotated type) of every int / float in every section, tuple items included."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = args[0] if typing.get_origin(tp) in (typing.Union, type(int | None)) else tp
        if dataclasses.is_dataclass(inner):
            yield from _numeric_fields(inner, f"{where}{f.name}.")
        elif typing.get_origin(tp) is tuple:
            for i, item in enumerate(typing.get_args(tp)):
                if item in (int, float) or typing.get_origin(item) is typing.Annotated:
                    yield f"{where}{f.name}[{i}]", item
        elif tp in (int, float) or typing.get_args(tp)[:1] in ((int,), (float,)):  # Annotated[int, ...]
            yield f"{where}{f.name}", tp


NUMERIC = list(_numeric_fields())


def test_every_number_field_has_a_range():
    assert len(NUMERIC) > 50
    for key, tp in NUMERIC:
        assert typing.get_origin(tp) is typing.Annotated, f"{key} has no Range"
        assert any(isinstance(rule, Range) for rule in tp.__metadata__), f"{key} has no Range"
        assert all(math.isfinite(r.high) for r in tp.__metadata__ if isinstance(r, Range)), key


@pytest.mark.parametrize("key, tp", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_every_range_is_enforced(key, tp):
    (rule,) = [r for r in tp.__metadata__ if isinstance(r, Range)]
    raw = minimal()
    *sections, leaf = key.split(".")
    node = raw
    for part in sections:
        node = node.setdefault(part, {})
    too_big = int(rule.high) + 1
    if leaf.endswith("]"):  # betas[1]
        name, index = leaf[:-1].split("[")
        node[name] = [0.5, 0.5]
        node[name][int(index)] = too_big
        pattern = rf"^{re.escape(key)}: {too_big}(\.0)? is out of range; allowed: "
    else:
        node[leaf] = too_big
        pattern = rf"^{re.escape(key)}: {too_big}(\.0)? is out of range; allowed: "
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(raw)


def test_duplicate_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: line 4: duplicate key 'train' \(first on line 3\)$"):
        load_text(tmp_path, MINIMAL + "train: {lr: 0.1}\ntrain: {lr: 0.2}\n")
    with pytest.raises(ConfigError, match=r"line 5: duplicate key 'lr' \(first on line 4\)"):
        load_text(tmp_path, MINIMAL + "train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"line 3: duplicate key 'lr'"):
        load_text(tmp_path, MINIMAL + "train: {lr: 0.1, epochs: 3, lr: 0.2}\n")
    # A merge key may be overridden: that is what it is for.
    config = load_text(tmp_path, MINIMAL + "train: {<<: {lr: 0.1, epochs: 3}, lr: 0.2}\n")
    assert (config.train.lr, config.train.epochs) == (0.2, 3)


BOMB = (
    "".join(
        f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
        for prev, name in zip(["", *"abcdefgh"], "abcdefghi")
    )
    + "model_dir: *i\n"
)


def test_alias_bomb_is_refused_quickly_in_little_memory(tmp_path):
    assert len(BOMB) < 500  # 9^9 "lol"s once expanded
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match=r"anchors and aliases expand to over 100000 values") as e:
            load_text(tmp_path, BOMB)
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 1 and peak < 20_000_000 and len(str(e.value)) < 200


def test_aliases_that_stay_small_are_fine_and_cycles_are_refused(tmp_path):
    config = load_text(tmp_path, "model_dir: x\ndata: {train: &c {tsv: t.tsv}, dev: *c, test: *c}\n")
    assert config.data.dev == config.data.test == config.data.train
    path = tmp_path / "c.yaml"  # an override of one place an anchor is used changes that place only
    path.write_text("model_dir: x\ndata: {train: {tsv: t.tsv}, dev: &h {tsv: dev.tsv}, test: *h,\n"
                    "  src_tokenizer: &k {type: bpe}, tgt_tokenizer: *k}\n")  # fmt: skip
    config = load_config(path, ["data.test.tsv=test.tsv", "data.tgt_tokenizer.type=char"])
    assert (config.data.dev.tsv, config.data.test.tsv) == ("dev.tsv", "test.tsv")  # dev was the test set too
    assert (config.data.src_tokenizer.type, config.data.tgt_tokenizer.type) == ("bpe", "char")
    with pytest.raises(ConfigError, match=r"line 3: an alias inside its own anchor"):
        load_text(tmp_path, MINIMAL + "name: &a [1, *a]\n")
    with pytest.raises(ConfigError, match=r"line 3: an alias inside its own anchor"):
        load_text(tmp_path, MINIMAL + "train: &t {x: *t}\n")


def test_big_files_and_deep_nesting_are_refused(tmp_path):
    with pytest.raises(
        ConfigError, match=r"c\.yaml: \d+ bytes; a config file may have at most 1048576 bytes"
    ):
        load_text(tmp_path, MINIMAL + "name: " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"nested too deeply"):
        load_text(tmp_path, MINIMAL + "name: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(ConfigError, match=r"line 3: an integer of 90001 characters"):
        load_text(tmp_path, MINIMAL + "name: 1" + ":1" * 45000 + "\n")  # base 60: slow to convert
    path = tmp_path / "c.yaml"
    path.write_bytes(MINIMAL.encode() + b"name: \xff\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not UTF-8 text \(byte \d+\)"):
        load_config(path)


def test_explicitly_tagged_values_that_cannot_be_read_name_their_line(tmp_path):
    """PyYAML's constructors raise KeyError, IndexError, TypeError... for these: tracebacks."""
    cases = [
        ("train: {compile: !!bool maybe}", r"line 3: 'maybe' is not a valid !!bool"),
        ("name: !!int ''", r"line 3: '' is not a valid !!int"),
        ("name: !!float '_'", r"line 3: '_' is not a valid !!float"),
        ("name: !!timestamp soon", r"line 3: 'soon' is not a valid !!timestamp"),
        ("name: 2024-02-30", r"line 3: '2024-02-30' is not a valid !!timestamp \(day is out of range for month\)"),
        ("name: !!set [a]", r"line 3: not a valid !!set"),
        ("model:\n  dropout: !!set [x]", r"line 4: not a valid !!set"),  # inside a mapping: filled later
    ]
    for text, message in cases:
        with pytest.raises(ConfigError, match=r"c\.yaml: " + message):
            load_text(tmp_path, MINIMAL + text + "\n")
    load_text(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"override 'train.compile=!!bool maybe': line 1: 'maybe' is not a valid !!bool"):
        load_config(tmp_path / "c.yaml", ["train.compile=!!bool maybe"])


def test_quoted_values_are_cut(tmp_path):
    long = "y" * 100_000
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, MINIMAL + f"train: {{lr: {long}}}\n")
    assert re.search(
        r"train\.lr: expected a number, got 'y+\.\.\.y+' \(str, 100000 characters\)$", str(e.value)
    )
    assert len(str(e.value)) < 130 + len(str(tmp_path))
    with pytest.raises(ConfigError) as e:
        config_from_dict(minimal(train={long: 1}))
    assert re.search(
        r"train\.'y+\.\.\.y+' \(str, 100000 characters\): unknown key; allowed keys: seed,", str(e.value)
    )
    assert len(str(e.value)) < 800
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, MINIMAL + f"eval: {{metrics: [{', '.join(['bleu'] * 20000)}, {long}]}}\n")
    assert re.search(
        r"eval\.metrics\[20000\]: 'y+\.\.\.y+' \(str, 100000 characters\) is not allowed", str(e.value)
    )
    with pytest.raises(
        ConfigError,
        match=r"model: expected a mapping of keys, got \[0, 1, 2, 3, 4, 5, \.\.\.\] \(list, 10000 items\)",
    ):
        config_from_dict(minimal(model=list(range(10_000))))
    load_text(tmp_path, MINIMAL)
    with pytest.raises(
        ConfigError, match=r"override 'x+\.\.\.x+' \(str, 10000 characters\): expected dotted.key=value$"
    ):
        load_config(tmp_path / "c.yaml", ["x" * 10_000])


def test_overrides_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL)
    assert load_config(path, ["train.max_steps=7"]).train.max_steps == 7
    assert load_config(path, ["train.lr=1e-4"]).train.lr == 1e-4
    with pytest.raises(ConfigError, match=r"train\.max_step: unknown key"):
        load_config(path, ["train.max_step=7"])
    with pytest.raises(ConfigError, match=r"train\.warmup_steps: -1 is out of range"):
        load_config(path, ["train.warmup_steps=-1"])
    with pytest.raises(ConfigError, match=r"override 'model=\{a: 1, a: 2\}': line 1: duplicate key 'a'"):
        load_config(path, ["model={a: 1, a: 2}"])
    with pytest.raises(
        ConfigError, match=r"override 'name=&a \[\*a\]': line 1: an alias inside its own anchor"
    ):
        load_config(path, ["name=&a [*a]"])
    with pytest.raises(ConfigError, match=r"override 'model_dir.x=1': model_dir is not a section"):
        load_config(path, ["model_dir.x=1"])


def test_override_values_read_as_their_field_types(tmp_path):
    """--set text reads as the field's type, not as YAML 1.1 would: a number as it is spelled
    (not octal 010 = 8 or base-60 1:30 = 90), a string as typed (not `no` = False, nor cut at
    ` #`); YAML's quotes, null, true/false and lists keep their meaning."""
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL)
    config = load_config(path, ["train.seed=010", "data.src_lang=no", "name=2024-01-01", "model_dir=runs/x #1",
                                "train.lr=.5", "decode.shortlist=yes", "eval.metrics=[wer, per]"])  # fmt: skip
    assert (config.train.seed, config.data.src_lang, config.name) == (10, "no", "2024-01-01")
    assert (config.model_dir, config.train.lr, config.decode.shortlist) == ("runs/x #1", 0.5, True)
    assert config.eval.metrics == ("wer", "per")
    assert load_config(path, ["data.tgt_lang='de'"]).data.tgt_lang == "de"
    assert load_config(path, ["data.dev=null", "data.test=~"]).data.dev is None
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got '1:30'"):
        load_config(path, ["train.epochs=1:30"])
    for override, message in (('model_dir="a\\0b"', "holds a NUL character"), ('name="\\ud800"', "lone surrogate")):
        with pytest.raises(ConfigError, match=message):
            load_config(path, [override])


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
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(bad))}: not valid YAML: .* \(line 3, column \d+\)$"
    ):
        load_config(bad)


# --------------------------------------------------------------------------- fuzzing

KEYS = [k.split("[")[0] for k, _ in NUMERIC] + [
    "model_dir", "name", "data", "data.train", "data.train.src", "data.dev", "data.src_tokenizer.type",
    "model", "model.arch", "model.rnn.attention", "model.rnn.bidirectional", "train", "train.device",
    "train.betas", "train.schedule", "train.precision", "train.early_stopping_metric", "decode.sample",
    "eval.metrics", "eval", "decode",
]  # fmt: skip
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(),
    st.integers(-(10**400), 10**400),
    st.floats(),  # nan and inf included
    st.sampled_from(["1e-3", "1e7", "cuda:abc", "", " ", "auto", "lstm", "plateau", "bleu", "-1", "0x10"]),
    st.text(max_size=20),
    st.integers(0, 50_000).map(lambda n: "x" * n),
    st.recursive(
        st.none() | st.integers(-5, 5) | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
        max_leaves=10,
    ),
)
SNIPPETS = [
    "",
    "model_dir: again\n",  # a duplicate key
    "train: {lr: 0.5}\n",  # a duplicate section, most likely
    BOMB.replace("model_dir: *i\n", "name: *i\n"),
    "name: &a [1, *a]\n",
    "x: &x {lr: 0.1}\ntrain: *x\n",
    "decode: &d {beam_size: 2}\n",
    "name: 2001-02-30\n",
    "name: !!python/name:os.system\n",
    "[1, 2]: 3\n",
    "\t bad: indentation\n",
]


def _set(raw: dict, key: str, value: object) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return
    node[leaf] = value


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(
    changes=st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=30), JUNK), max_size=4),
    snippet=st.just("") | st.sampled_from(SNIPPETS),
)
def test_fuzzed_configs_load_or_fail_with_one_named_line(changes, snippet):
    raw = minimal()
    for key, value in changes:
        _set(raw, key, value)
    text = yaml.safe_dump(raw, sort_keys=False) + snippet
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "c.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            assert isinstance(load_config(path), Config)
        except ConfigError as e:
            message = str(e)
            assert message.startswith(f"{path}: ")
            assert "\n" not in message and len(message) < 700, message


# --------------------------------------------------------------------------- command-line options


@pytest.mark.parametrize(
    "argv, message",
    [
        (["translate", "nope", "--batch-size", "-1"], r"argument --batch-size: -1 is out of range; allowed: integers in \[1, 100000\]"),
        (["translate", "nope", "--beam", "0"], r"argument --beam: 0 is out of range; allowed: integers in \[1, 256\]"),
        (["translate", "nope", "--nbest", "1000"], r"argument --nbest: 1000 is out of range"),
        (["translate", "nope", "--beam", "2.5"], r"argument --beam: expected an integer"),
        (["translate", "nope", "--top-p", "nan"], r"argument --top-p: nan is not a finite number; allowed: numbers in \(0, 1\]"),
        (["translate", "nope", "--temperature", "0"], r"argument --temperature: 0\.0 is out of range"),
        (["translate", "nope", "--alpha", "-1"], r"argument --alpha: -1\.0 is out of range; allowed: numbers in \[0, 10\]"),
        (["translate", "nope", "--top-k", "-5"], r"argument --top-k: -5 is out of range"),
        (["translate", "nope", "--seed", "-1"], r"argument --seed: -1 is out of range"),
        (["translate", "nope", "--device", "cuda:abc"], r"argument --device: 'cuda:abc' \(str\) is not allowed"),
        (["evaluate", "nope", "--min-len", "-1"], r"argument --min-len: -1 is out of range"),
        (["compare", "a", "b", "--no-repeat-ngram", "-1"], r"argument --no-repeat-ngram: -1 is out of range"),
        (["compare", "a", "b", "--buckets", "10,5"], r"argument --buckets: expected increasing edges"),
        (["compare", "a", "b", "--buckets", "0,5"], r"argument --buckets: 0 is out of range"),
        (["compare", "a", "b", "--buckets", "5,x"], r"argument --buckets: expected an integer, got 'x'"),
        (["average", "nope", "--last", "0"], r"argument --last: 0 is out of range; allowed: integers in \[1, "),
        (["prepare-synthetic", "copy", "out", "--sizes", "1,2"], r"argument --sizes: expected three sizes"),
        (["prepare-synthetic", "copy", "out", "--sizes", "1,-2,3"], r"argument --sizes: -2 is out of range"),
        (["prepare-synthetic", "copy", "out", "--min-len", "0"], r"argument --min-len: 0 is out of range"),
        (["prepare-synthetic", "copy", "out", "--symbols", "99"], r"argument --symbols: 99 is out of range; allowed: integers in \[1, 52\]"),
        (["prepare-synthetic", "copy", "out", "--seed", "-1"], r"argument --seed: -1 is out of range"),
    ],
)  # fmt: skip
def test_bad_options_end_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:  # argparse: before any model is loaded
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"aligna {argv[0]}: error: ") and re.search(message, err), err


def test_prepare_synthetic_needs_min_len_below_max_len(tmp_path, capsys):
    assert main(["prepare-synthetic", "copy", str(tmp_path), "--min-len", "9", "--max-len", "3"]) == 1
    assert "aligna prepare-synthetic: error: --min-len 9 is above --max-len 3" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_search_options_include_batch_size_and_name_the_flag():
    args = argparse.Namespace(**dict.fromkeys(SEARCH_OPTIONS))
    args.batch_size, args.beam_size, args.top_p = 8, 4, "0.5"
    assert _search_options(args) == {"batch_size": 8, "beam_size": 4, "top_p": 0.5}
    parsed = _parser().parse_args(["translate", "m", "--batch-size", "16", "--nbest", "2"])
    assert _search_options(parsed) == {"batch_size": 16, "nbest": 2}
    args.batch_size = -1
    with pytest.raises(
        ConfigError, match=r"^--batch-size: -1 is out of range; allowed: integers in \[1, 100000\]$"
    ):
        _search_options(args)
    args.batch_size, args.beam_size = 8, 0
    with pytest.raises(ConfigError, match=r"^--beam: 0 is out of range"):
        _search_options(args)


def test_learned_positions_must_hold_the_longest_sentence():
    raw = minimal(model={"arch": "transformer", "transformer": {"positions": "learned", "max_positions": 50}})
    with pytest.raises(ConfigError, match=r"max_positions: 50 learned positions cannot hold data.max_len 100"):
        config_from_dict(raw)
    config_from_dict({**raw, "data": {**raw["data"], "max_len": 49}})
