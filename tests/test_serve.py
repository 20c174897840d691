"""aligna serve: the HTTP API (FastAPI TestClient), the batching worker, the page's files,
a schema fuzz, and the real CLI in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from conftest import reverse_pairs, write_tsv  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import aligna  # noqa: E402
from aligna.batching import BatchWorker, WorkerStopped  # noqa: E402
from aligna.cli import main  # noqa: E402
from aligna.config import config_from_dict, config_to_dict  # noqa: E402
from aligna.serve import ModelsResponse, Settings, TranslateResponse, create_app  # noqa: E402
from aligna.training import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a b c d", "e f g", "h i j a b c", "b"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Three tiny models on the reverse task: a GRU with Bahdanau attention, a 2-layer
    2-head Transformer, and a GRU without attention."""
    tmp = tmp_path_factory.mktemp("serve")
    train_tsv = write_tsv(tmp / "train.tsv", reverse_pairs(600, seed=1))
    dev_tsv = write_tsv(tmp / "dev.tsv", reverse_pairs(20, seed=2))
    models = {
        "rnn": {"rnn": {"cell": "gru", "attention": "bahdanau"}},
        "tf": {"arch": "transformer", "encoder_layers": 2, "decoder_layers": 2,
               "transformer": {"heads": 2, "ff_size": 32}},
        "plain": {"rnn": {"cell": "gru"}},
    }  # fmt: skip
    dirs = {}
    for name, model in models.items():
        config = config_from_dict({
            "model_dir": str(tmp / name),
            "data": {"train": {"tsv": str(train_tsv)}, "dev": {"tsv": str(dev_tsv)}},
            "model": {"emb_dim": 16, "hidden_size": 32, "encoder_layers": 1, "decoder_layers": 1, "dropout": 0.0,
                      **model},
            "train": {"batch_tokens": 256, "epochs": 1, "max_steps": 30 if name != "plain" else 2,
                      "validate_every": 0, "log_every": 100},
            "eval": {"metrics": ["wer"]},
        })  # fmt: skip
        dirs[name] = Path(train(config, progress=False))
    return dirs


@pytest.fixture(scope="module")
def translators(model_dirs):
    return {name: aligna.load(path, device="cpu") for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def client(translators):
    with TestClient(create_app(translators, Settings(max_wait_ms=1))) as c:
        yield c


def post(client, body, **kwargs):
    return client.post("/v1/translate", json=body, **kwargs)


def assert_same_record(got, expected, tolerance: float = 1e-4) -> None:
    """The same JSON structure, numbers equal to `tolerance` (weights are rounded to 5 decimals:
    a float-rounding difference may move the last one), everything else exactly."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys()
        for key in expected:
            assert_same_record(got[key], expected[key], tolerance)
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_same_record(g, e, tolerance)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=tolerance)
    else:
        assert got == expected


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and "\n" not in body["error"]
    return body


# --------------------------------------------------------------------------- endpoints


def test_health_ready_and_models(client, translators):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == {n: "ready" for n in translators}
    body = client.get("/v1/models").json()
    ModelsResponse.model_validate(body)
    info = {m["name"]: m for m in body["models"]}
    assert set(info) == {"rnn", "tf", "plain"}
    assert info["rnn"]["architecture"] == "rnn+bahdanau" and info["rnn"]["has_attention"] and info["rnn"]["heads"] is None
    assert info["tf"]["architecture"] == "transformer" and info["tf"]["heads"] == 2
    assert info["tf"]["layers"] == {"encoder": 2, "decoder": 2}
    assert info["plain"]["architecture"] == "rnn" and not info["plain"]["has_attention"]
    for name, t in translators.items():
        assert info[name]["decode"] == config_to_dict(t.config.decode)
        assert info[name]["parameters"] == sum(p.numel() for p in t.model.parameters())
        assert info[name]["src_tokenizer"] == "word" and info[name]["device"] == "cpu"
    assert body["limits"]["max_beam"] == 16 and body["limits"]["max_texts"] == 64


def test_not_ready_without_workers(translators):
    client = TestClient(create_app(translators))  # no `with`: the lifespan (and its workers) never started
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    assert error_of(post(client, {"model": "rnn", "texts": ["a b"]}), 503)["error"]


def test_openapi_docs_and_page(client):
    schema = client.get("/openapi.json").json()
    assert "/v1/translate" in schema["paths"] and "/v1/models" in schema["paths"]
    fields = schema["components"]["schemas"]["TranslateRequest"]["properties"]
    assert {"model", "texts", "beam_size", "nbest", "attention", "seed", "max_len_a"} <= set(fields)
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="model"', 'id="source"', 'id="beam"', 'id="nbest"', 'id="translate"', 'id="results"',
                    'id="heatmap"', 'id="kind"', 'id="layer"', 'id="head"', 'id="status"'):  # fmt: skip
        assert element in page.text
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
        assert "http://" not in response.text and "https://" not in response.text  # works offline
    assert "https://" not in page.text and "http://" not in page.text


# --------------------------------------------------------------------------- translations


@pytest.mark.parametrize("options", [
    {}, {"beam_size": 3, "nbest": 2}, {"beam_size": 3, "alpha": 0.6, "coverage": 0.2},
    {"beam_size": 2, "no_repeat_ngram": 2}, {"min_len": 4, "max_len_a": 0.5, "max_len_b": 6},
    {"sample": True, "seed": 3, "top_k": 5, "temperature": 0.8}, {"sample": True, "seed": 4, "top_p": 0.7},
])  # fmt: skip
def test_translations_equal_the_python_api(client, translators, options):
    for name in ("rnn", "tf"):
        response = post(client, {"model": name, "texts": TEXTS, **options})
        assert response.status_code == 200, response.text
        body = TranslateResponse.model_validate(response.json())
        assert body.model == name and len(body.results) == len(TEXTS)
        expected = translators[name].translate_detailed(TEXTS, **options)
        for got, want in zip(body.results, expected):
            assert got.text == want.text and got.tokens == want.tokens and got.src_tokens == want.src_tokens
            assert got.score == pytest.approx(want.score, abs=1e-4)
            assert [e.text for e in got.nbest] == [t for t, _ in want.nbest]
            # the server's search computes no attention, the API's does: scores equal to float rounding
            assert [e.score for e in got.nbest] == pytest.approx([s for _, s in want.nbest], abs=1e-4)
            assert got.attention is None


def test_one_model_needs_no_name(translators):
    with TestClient(create_app({"only": translators["rnn"]})) as client:
        body = post(client, {"texts": ["a b c"]}).json()
        assert body["model"] == "only" and body["results"][0]["text"] == translators["rnn"].translate(["a b c"])[0]


def test_empty_texts_and_control_characters(client, translators):
    body = post(client, {"model": "rnn", "texts": ["", "   ", "a b"], "beam_size": 3, "nbest": 2}).json()
    for empty in body["results"][:2]:
        assert empty["text"] == "" and empty["tokens"] == [] and empty["nbest"] == [{"text": "", "score": 0.0}] * 2
    assert body["results"][2]["text"] == translators["rnn"].translate(["a b"], beam_size=3, nbest=2)[0]
    assert post(client, {"model": "rnn", "texts": []}).json() == {"model": "rnn", "results": []}
    texts = ["a\nb\rc", "d\x00e\tf\x1b", "é ü \u2028 \U0001f600", "\ufeffa"]
    results = post(client, {"model": "rnn", "texts": texts}).json()["results"]
    assert len(results) == len(texts)
    for r in results:
        assert "\n" not in r["text"] and "\r" not in r["text"]
        assert all("\n" not in e["text"] for e in r["nbest"])


def test_attention_modes(client, translators):
    rnn = post(client, {"model": "rnn", "texts": ["a b c d", ""], "attention": "cross"}).json()["results"]
    record = rnn[0]["attention"]
    assert record["src_tokens"] == ["a", "b", "c", "d"] and "maps" not in record
    assert len(record["weights"]) == len(record["tgt_tokens"]) and all(len(row) == 4 for row in record["weights"])
    assert record["tgt_tokens"][: len(rnn[0]["tokens"])] == rnn[0]["tokens"]
    assert rnn[1]["attention"] == {"src_tokens": [], "tgt_tokens": [], "weights": None}

    tf = post(client, {"model": "tf", "texts": ["a b c", "e f g h i"], "attention": "all"}).json()["results"]
    for r in tf:
        a = r["attention"]
        rows, cols = len(a["tgt_tokens"]), len(a["src_tokens"])
        assert len(a["weights"]) == rows and {len(row) for row in a["weights"]} == {cols}
        assert set(a["maps"]) == {"cross", "encoder", "decoder"}
        shapes = {"cross": (rows, cols), "encoder": (cols, cols), "decoder": (rows, rows)}
        for kind, m in a["maps"].items():
            assert len(m["weights"]) == 2 and all(len(heads) == 2 for heads in m["weights"])  # layers x heads
            assert (len(m["rows"]), len(m["cols"])) == shapes[kind]
            grid = m["weights"][1][0]
            assert (len(grid), len(grid[0])) == shapes[kind]
            assert all(abs(sum(row) - 1) < 1e-3 for row in grid)
        expected = translators["tf"].attention_record(translators["tf"].translate_detailed([r["src_tokens"] and " ".join(r["src_tokens"])])[0], every_map=True)  # fmt: skip
        assert_same_record(a, expected)  # decoded alone: other padding, so float rounding may differ

    rnn_all = post(client, {"model": "rnn", "texts": ["a b"], "attention": "all"}).json()["results"][0]["attention"]
    assert set(rnn_all["maps"]) == {"cross"} and len(rnn_all["maps"]["cross"]["weights"]) == 1
    plain = post(client, {"model": "plain", "texts": ["a b"], "attention": "all"}).json()["results"][0]["attention"]
    assert plain["weights"] is None and plain["maps"] == {}


def test_an_ensemble_is_served_as_one_model(model_dirs):
    """DIR,DIR: the ensemble's translations, scores and mean attention are the Python API's;
    /v1/models describes it and its members."""
    ensemble = aligna.load_ensemble([model_dirs["rnn"], model_dirs["tf"]], device="cpu")
    without_attention = aligna.load_ensemble([model_dirs["plain"], model_dirs["plain"]], device="cpu")
    with TestClient(create_app({"ens": ensemble, "blind": without_attention}, Settings(max_wait_ms=1))) as client:
        body = client.get("/v1/models").json()
        ModelsResponse.model_validate(body)
        info = {m["name"]: m for m in body["models"]}
        assert info["ens"]["architecture"] == "ensemble" and info["ens"]["attention"] == "mean"
        assert info["ens"]["has_attention"] and info["ens"]["layers"] is None and info["ens"]["heads"] is None
        assert [m["architecture"] for m in info["ens"]["members"]] == ["rnn+bahdanau", "transformer"]
        assert [m["weight"] for m in info["ens"]["members"]] == [0.5, 0.5]
        assert info["ens"]["members"][1]["heads"] == 2 and info["ens"]["members"][0]["layers"] == {"encoder": 1, "decoder": 1}
        assert info["ens"]["parameters"] == sum(p.numel() for p in ensemble.model.parameters())
        assert info["blind"]["attention"] == "none" and not info["blind"]["has_attention"]

        options = {"beam_size": 3, "nbest": 2}
        results = post(client, {"model": "ens", "texts": TEXTS, "attention": "cross", **options}).json()["results"]
        expected = ensemble.translate_detailed(TEXTS, **options)
        for got, want in zip(results, expected):
            assert got["text"] == want.text and got["score"] == pytest.approx(want.score, abs=1e-4)
            assert [e["text"] for e in got["nbest"]] == [t for t, _ in want.nbest]
            assert_same_record(got["attention"], ensemble.attention_record(want))
            assert all(abs(sum(row) - 1) < 1e-3 for row in got["attention"]["weights"])  # a mean of distributions
        every = post(client, {"model": "ens", "texts": ["a b c"], "attention": "all"}).json()["results"][0]["attention"]
        assert every["maps"] == {} and every["weights"]  # no layers or heads of its own: the mean map only
        blind = post(client, {"model": "blind", "texts": ["a b c"], "attention": "cross"}).json()["results"][0]
        assert blind["attention"]["weights"] is None


# --------------------------------------------------------------------------- errors and limits


def test_unknown_and_missing_model(client):
    body = error_of(post(client, {"model": "../rnn", "texts": ["a"]}), 404)
    assert body["field"] == "model" and body["models"] == ["plain", "rnn", "tf"] and "'../rnn'" in body["error"]
    body = error_of(post(client, {"texts": ["a"]}), 422)  # several models: say which
    assert body["field"] == "model" and body["models"] == ["plain", "rnn", "tf"]


def test_a_shortlist_the_model_lacks_is_422(client):
    body = error_of(post(client, {"model": "rnn", "texts": ["a"], "shortlist": True}), 422)
    assert body["field"] == "shortlist" and "has no vocabulary shortlist (a Transformer has)" in body["error"]
    body = error_of(post(client, {"model": "tf", "texts": ["a"], "shortlist": True}), 422)
    assert body["field"] == "shortlist" and "shortlist.txt is missing" in body["error"]
    assert "/" not in body["error"].split(" is missing")[0]  # the server's paths stay in its log


def test_public_messages_cut_paths_to_their_last_part():
    from aligna.serve import public

    assert public("decode.shortlist: /srv/models/de_en/shortlist.txt is missing") == (
        "decode.shortlist: shortlist.txt is missing"
    )
    assert public("tokens/s 1/2 and a / b") == "tokens/s 1/2 and a / b"


def test_limits_hold_for_the_model_defaults_and_all_maps(model_dirs, translators):
    """A search setting the request leaves to the model's config is held to the server's limit
    too, and attention "all" is refused where every map of every layer and head of its texts
    could come to more weights than --max-map-numbers."""
    import dataclasses

    wide = aligna.load(model_dirs["rnn"], device="cpu")
    wide.config = dataclasses.replace(wide.config, decode=dataclasses.replace(wide.config.decode, beam_size=8))
    limits = Settings(max_wait_ms=1, max_beam=4, max_map_numbers=3000)
    with TestClient(create_app({"wide": wide, "tf": translators["tf"]}, limits)) as client:
        body = error_of(post(client, {"model": "wide", "texts": ["a b"]}), 422)
        assert body["field"] == "beam_size" and "8 (model 'wide''s decode default) is over" in body["error"]
        assert post(client, {"model": "wide", "texts": ["a b"], "beam_size": 2}).status_code == 200
        assert post(client, {"model": "tf", "texts": ["a b c"], "attention": "all"}).status_code == 200
        body = error_of(post(client, {"model": "tf", "texts": ["a b c d e f g h i j"] * 3, "attention": "all"}), 422)
        assert body["field"] == "attention" and "--max-map-numbers" in body["error"]
        assert post(client, {"model": "tf", "texts": ["a b c d e f g h i j"] * 3, "attention": "cross"}).status_code == 200


def test_limits(translators):
    limits = Settings(max_body_bytes=2000, max_texts=3, max_chars=20, max_beam=4, max_output_len=30)
    with TestClient(create_app({"rnn": translators["rnn"]}, limits)) as client:
        body = error_of(client.post("/v1/translate", content=b'{"texts": ["' + b"a " * 1500 + b'"]}'), 413)
        assert body["field"] == "body" and "2000 bytes" in body["error"]
        chunks = (b'{"texts": ["' + b"a " * 1500 + b'"]}'[i : i + 100] for i in range(0, 3014, 100))
        error_of(client.post("/v1/translate", content=chunks), 413)  # chunked, no Content-Length
        cases = [
            ({"texts": ["a"] * 4}, "texts", "at most 3"),
            ({"texts": ["a", "b " * 11]}, "texts[1]", "at most 20"),
            ({"texts": ["a"], "beam_size": 5}, "beam_size", "<= 4"),
            ({"texts": ["a"], "beam_size": 4, "nbest": 5}, "nbest", "decode.nbest: must be <= beam_size (4)"),
            ({"texts": ["a"], "nbest": 2}, "nbest", "beam_size"),  # the config's beam_size is 1
            ({"texts": ["a"], "max_len_b": 31}, "max_len_b", "<= 30"),
            ({"texts": ["a"], "min_len": 10**30}, "min_len", "<= 30"),
            ({"texts": ["a"], "alpha": -1}, "alpha", "decode.alpha: -1.0 is out of range; allowed: numbers in [0, 10]"),
            ({"texts": ["a"], "alpha": 1e6}, "alpha", "[0, 10]"),
            ({"texts": ["a"], "top_p": 0}, "top_p", "decode.top_p: 0.0 is out of range; allowed: numbers in (0, 1]"),
            ({"texts": ["a"], "beam_size": 0}, "beam_size", "decode.beam_size: 0 is out of range"),
            ({"texts": ["a"], "beam_size": 2, "sample": True}, "sample", "exclude each other"),
            ({"texts": ["a"], "sample": True, "temperature": 1e-300}, "temperature", "allowed: numbers in [0.01, 100]"),
            ({"texts": ["a"], "sample": True, "seed": 2**64}, "seed", "out of range"),
            ({"texts": ["a"], "max_len_a": 100}, "max_len_a", "<= 4.0 (--max-len-a)"),
        ]
        for request, field, words in cases:
            body = error_of(post(client, request), 422)
            assert body["field"] == field and words in body["error"], (request, body)


def test_malformed_bodies_are_422(client):
    cases = [
        (b'{"model": "rnn", "texts": ["a",}', "body", "invalid JSON"),
        (b"", "body", "missing"),
        (b"[1, 2]", "body", "dictionary"),
        (b'"texts"', "body", "dictionary"),
        (b'{"model": "rnn", "texts": ["\xff\xfe"]}', "body", "invalid UTF-8 at byte 28 (bytes ff)"),
        (b'{"model": "rnn", "texts": ["a"], "alpha": NaN}', "alpha", "finite"),
        (b'{"model": "rnn", "texts": ["a"], "top_p": Infinity}', "top_p", "finite"),
        (b'{"model": "rnn", "texts": ["\\ud800"]}', "texts[0]", "surrogate"),
    ]
    for content, field, words in cases:
        body = error_of(client.post("/v1/translate", content=content, headers={"content-type": "application/json"}), 422)
        assert body["field"] == field and words in body["error"], (content, body)
    wrong_types = [
        ({"model": "rnn"}, "texts"), ({"model": "rnn", "texts": "a b"}, "texts"),
        ({"model": "rnn", "texts": [1]}, "texts[0]"), ({"model": "rnn", "texts": [None]}, "texts[0]"),
        ({"model": "rnn", "texts": ["a"], "beam_size": "5"}, "beam_size"),
        ({"model": "rnn", "texts": ["a"], "beam_size": 2.5}, "beam_size"),
        ({"model": "rnn", "texts": ["a"], "sample": 1}, "sample"),
        ({"model": "rnn", "texts": ["a"], "attention": "some"}, "attention"),
        ({"model": 3, "texts": ["a"]}, "model"),
        ({"model": "rnn", "texts": ["a"], "beam": 5}, "beam"),  # unknown keys are errors, not ignored
    ]
    for request, field in wrong_types:
        body = error_of(post(client, request), 422)
        assert body["field"] == field, (request, body)
    deep = b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # json.loads: RecursionError (FastAPI: 400)
    body = error_of(client.post("/v1/translate", content=deep, headers={"content-type": "application/json"}), 422)
    assert body["field"] == "body" and "cannot be parsed as JSON (nested too deeply)" in body["error"]
    many = error_of(post(client, {"model": "rnn", "texts": list(range(5000))}), 422)  # one error per text
    assert many["field"] == "texts[0]" and len(many["errors"]) == 20 and many["more_errors"] == 4980
    form = error_of(client.post("/v1/translate", data={"texts": "a"}), 422)
    assert "Content-Type: application/json" in form["error"]
    assert error_of(client.get("/v1/nothing"), 404)["error"]
    assert error_of(client.get("/v1/translate"), 405)["error"]


def test_api_key(translators, tmp_path):
    with TestClient(create_app({"rnn": translators["rnn"]}, Settings(api_key="s3cret key"))) as client:
        for path in ("/healthz", "/readyz", "/", "/static/app.js"):
            assert client.get(path).status_code == 200, path
        for path in ("/v1/models", "/openapi.json", "/docs"):
            body = error_of(client.get(path), 401)
            assert "missing" in body["error"] and body["field"] == "authorization"
        assert client.get("/v1/models").headers["www-authenticate"] == "Bearer"
        assert "wrong" in error_of(post(client, {"texts": ["a"]}, headers={"Authorization": "Bearer nope"}), 401)["error"]
        error_of(post(client, {"texts": ["a"]}, headers={"Authorization": "Basic s3cret key"}), 401)
        good = {"Authorization": "Bearer s3cret key"}
        assert client.get("/v1/models", headers=good).status_code == 200
        assert post(client, {"texts": ["a b"]}, headers=good).status_code == 200
        assert client.get("/openapi.json", headers={"authorization": "bearer s3cret key"}).status_code == 200
    from aligna.serve import read_api_key

    (tmp_path / "key").write_text("  k3y\n")
    assert read_api_key(str(tmp_path / "key")) == "k3y"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_api_key(str(tmp_path / "empty"))


def test_limits_that_are_decode_settings_are_checked_as_those():
    """--max-batch over decode.batch_size's range started a server that failed every request."""
    with pytest.raises(ValueError, match=r"max_batch: 200000 is out of range; allowed: integers in \[1, 100000\]"):
        Settings(max_batch=200_000)
    with pytest.raises(ValueError, match="max_len_a: -1"):
        Settings(max_len_a=-1)


def test_cors_only_when_asked(translators):
    origin = {"Origin": "http://example.org"}
    with TestClient(create_app({"rnn": translators["rnn"]})) as client:
        assert "access-control-allow-origin" not in client.get("/v1/models", headers=origin).headers
    with TestClient(create_app({"rnn": translators["rnn"]}, Settings(cors_origins=("http://example.org",)))) as client:
        assert client.get("/v1/models", headers=origin).headers["access-control-allow-origin"] == "http://example.org"
        preflight = client.options("/v1/translate", headers={**origin, "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200


def test_decoding_failure_is_500_and_the_server_goes_on(translators, monkeypatch):
    translator = translators["rnn"]
    original = translator.translate_detailed

    def failing(texts, *args, **kwargs):
        if "boom" in texts:
            raise RuntimeError("simulated failure")
        return original(texts, *args, **kwargs)

    with TestClient(create_app({"rnn": translator}, Settings(max_wait_ms=1))) as client:
        monkeypatch.setattr(translator, "translate_detailed", failing)
        body = error_of(post(client, {"texts": ["boom"]}), 500)
        assert "RuntimeError" in body["error"] and "simulated" not in body["error"]
        assert post(client, {"texts": ["a b"]}).status_code == 200
        assert client.get("/healthz").status_code == 200


# --------------------------------------------------------------------------- dynamic batching over HTTP


class Gate:
    """Wraps translate_detailed: counts calls and holds the first one until released."""

    def __init__(self, translator):
        self.original, self.calls, self.release, self.entered = translator.translate_detailed, [], threading.Event(), threading.Event()

    def __call__(self, texts, *args, **kwargs):
        self.calls.append((list(texts), kwargs))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(30)
        return self.original(texts, *args, **kwargs)


def queued_behind_a_gate(translator, name: str, requests: list[dict], monkeypatch) -> tuple[Gate, dict[int, dict]]:
    """Serve `translator` alone, hold its worker on a first request until every one of `requests`
    is queued, then let them go: the Gate (its calls) and each request's response by index."""
    gate = Gate(translator)
    monkeypatch.setattr(translator, "translate_detailed", gate)
    app = create_app({name: translator}, Settings(max_wait_ms=0, max_batch=32))
    responses: dict[int, dict] = {}
    with TestClient(app) as client:
        worker = app.state.served[name].worker
        first = threading.Thread(target=post, args=(client, {"texts": ["a"]}))
        first.start()
        assert gate.entered.wait(30)
        threads = [threading.Thread(target=lambda i=i, r=r: responses.__setitem__(i, post(client, r).json()))
                   for i, r in enumerate(requests)]  # fmt: skip
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while worker.pending() < len(requests) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.release.set()
        for t in [first, *threads]:
            t.join(30)
    return gate, responses


def test_concurrent_requests_share_one_batch(translators, monkeypatch):
    requests = [{"texts": TEXTS[:2]}, {"texts": TEXTS[2:], "beam_size": 1}, {"texts": ["e e"]},
                {"texts": ["f g"], "beam_size": 2}]  # fmt: skip
    gate, responses = queued_behind_a_gate(translators["rnn"], "rnn", requests, monkeypatch)
    # the gate; then the three greedy requests (beam_size 1 is the default) in one call, and the beam one alone
    assert len(gate.calls) == 3 and gate.calls[0][0] == ["a"]
    batches = sorted(sorted(texts) for texts, _ in gate.calls[1:])
    assert batches == sorted([sorted(TEXTS + ["e e"]), ["f g"]])
    for i, request in enumerate(requests):
        options = {k: v for k, v in request.items() if k != "texts"}
        expected = [t.text for t in gate.original(request["texts"], **options)]
        assert [r["text"] for r in responses[i]["results"]] == expected


def test_sampled_requests_share_a_batch_and_sample_as_alone(translators, monkeypatch):
    """Sampled requests with the same settings are decoded together, and each text samples from
    its seed and its place in its own request: each response is the request's translation alone."""
    translator = translators["tf"]
    sampled = {"sample": True, "seed": 5, "top_k": 4}
    requests = [{"texts": TEXTS[:2], **sampled}, {"texts": TEXTS[2:], **sampled}, {"texts": TEXTS[1:3], **sampled}]
    gate, responses = queued_behind_a_gate(translator, "tf", requests, monkeypatch)
    assert len(gate.calls) == 2  # the gate, then the three sampled requests in one call
    assert sorted(gate.calls[1][0]) == sorted(TEXTS[:2] + TEXTS[2:] + TEXTS[1:3])
    for i, request in enumerate(requests):
        options = {k: v for k, v in request.items() if k != "texts"}
        expected = gate.original(request["texts"], **options)
        assert [r["tokens"] for r in responses[i]["results"]] == [t.tokens for t in expected]
        assert [r["score"] for r in responses[i]["results"]] == pytest.approx([t.score for t in expected], abs=1e-4)
    with pytest.raises(ValueError, match="sample_ids: one integer >= 0 for each of the 2 texts"):
        translator.translate_detailed(TEXTS[:2], sample_ids=[0], **sampled)


def test_shortlist_requests_are_decoded_alone(model_dirs, tmp_path, monkeypatch):
    """A batch is decoded over the union of its sentences' candidates, so a shortlist request
    that shared a batch could get another translation than alone: each is decoded alone."""
    from aligna import shortlist

    listed = shutil.copytree(model_dirs["tf"], tmp_path / "tf")
    shortlist.make(listed, frequent=4, per_source=1)
    translator = aligna.load(listed, device="cpu")
    options = {"shortlist": True, "beam_size": 2}
    requests = [{"texts": TEXTS[:2], **options}, {"texts": TEXTS[2:], **options}, {"texts": TEXTS[1:3]}, {"texts": ["e"]}]
    gate, responses = queued_behind_a_gate(translator, "tf", requests, monkeypatch)
    batches = sorted(sorted(call[0]) for call in gate.calls[1:])  # after the gate's
    assert batches == sorted([sorted(TEXTS[:2]), sorted(TEXTS[2:]), sorted(TEXTS[1:3] + ["e"])])
    for i, request in enumerate(requests):
        expected = gate.original(request["texts"], **{k: v for k, v in request.items() if k != "texts"})
        assert [r["tokens"] for r in responses[i]["results"]] == [t.tokens for t in expected]


def test_a_client_that_leaves_is_not_decoded(translators, monkeypatch):
    translator = translators["rnn"]
    gate = Gate(translator)
    monkeypatch.setattr(translator, "translate_detailed", gate)
    app = create_app({"rnn": translator}, Settings(max_wait_ms=0))
    with TestClient(app) as client:
        worker = app.state.served["rnn"].worker
        first = threading.Thread(target=post, args=(client, {"texts": ["a"]}))
        first.start()
        assert gate.entered.wait(30)

        async def leave() -> list[dict]:
            body = json.dumps({"texts": ["left behind"]}).encode()
            gone, sent = asyncio.Event(), []
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():
                if messages:
                    return messages.pop(0)
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/v1/translate", "raw_path": b"/v1/translate",
                     "query_string": b"", "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
                     "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": ""}  # fmt: skip
            call = asyncio.ensure_future(app(scope, receive, send))
            while worker.pending() < 1:
                await asyncio.sleep(0.01)
            gone.set()
            await asyncio.wait_for(call, 30)
            return sent

        sent = asyncio.run(leave())
        assert sent[0]["status"] == 499
        gate.release.set()
        first.join(30)
        assert post(client, {"texts": ["b"]}).status_code == 200
    assert [texts for texts, _ in gate.calls] == [["a"], ["b"]]  # "left behind" was never decoded


# --------------------------------------------------------------------------- the batching worker alone


class FakeModel:
    """run_batch for BatchWorker: records calls; the key "gate" blocks until released."""

    def __init__(self):
        self.calls, self.places, self.release, self.entered = [], [], threading.Event(), threading.Event()

    def __call__(self, texts, key, places):
        self.calls.append((key, list(texts)))
        self.places.append(places)
        if key == "gate":
            self.entered.set()
            assert self.release.wait(10)
        if "bad" in texts:
            raise ValueError("bad text")
        return [f"{key}:{t}" for t in texts]


def gated(max_batch=32, max_wait_ms=0.0):
    model = FakeModel()
    worker = BatchWorker(model, max_batch=max_batch, max_wait_ms=max_wait_ms, name="fake").start()
    gate = worker.submit(["x"], "gate")
    assert model.entered.wait(10)
    return model, worker, gate


def test_worker_batches_same_options_fifo():
    model, worker, gate = gated()
    jobs = [worker.submit(["a1", "a2"], "A"), worker.submit(["b1"], "B"), worker.submit(["a3"], "A"),
            worker.submit(["c1"], "C"), worker.submit(["b2", "b3"], "B")]  # fmt: skip
    model.release.set()
    results = [job.future.result(10) for job in jobs]
    assert gate.future.result(10) == ["gate:x"]
    assert results == [["A:a1", "A:a2"], ["B:b1"], ["A:a3"], ["C:c1"], ["B:b2", "B:b3"]]
    assert model.calls[1:] == [("A", ["a1", "a2", "a3"]), ("B", ["b1", "b2", "b3"]), ("C", ["c1"])]
    assert model.places[1:] == [[0, 1, 0], [0, 0, 1], [0]]  # each text's place in its own job
    assert worker.batches == 4 and worker.texts == 8
    worker.stop()


def test_worker_respects_max_batch_and_waits_for_company():
    model, worker, _ = gated(max_batch=4)
    jobs = [worker.submit([f"t{i}a", f"t{i}b"], "A") for i in range(3)] + [worker.submit(["big"] * 5, "A")]
    model.release.set()
    assert [len(job.future.result(10)) for job in jobs] == [2, 2, 2, 5]
    assert [len(texts) for _, texts in model.calls[1:]] == [4, 2, 5]  # a job bigger than max_batch goes alone
    worker.stop()

    model = FakeModel()
    worker = BatchWorker(model, max_batch=8, max_wait_ms=300, name="waiting").start()
    first = worker.submit(["1"], "A")
    time.sleep(0.05)
    second = worker.submit(["2"], "A")  # arrives within max_wait of the first
    assert first.future.result(10) == ["A:1"] and second.future.result(10) == ["A:2"]
    assert model.calls == [("A", ["1", "2"])]
    worker.stop()


def test_worker_skips_cancelled_and_isolates_failures():
    model, worker, _ = gated()
    keep, drop, bad = worker.submit(["k"], "A"), worker.submit(["d"], "A"), worker.submit(["bad"], "A")
    assert drop.cancel()
    model.release.set()
    assert keep.future.result(10) == ["A:k"]
    with pytest.raises(ValueError, match="bad text"):
        bad.future.result(10)
    assert drop.future.cancelled()
    assert all("d" not in texts for _, texts in model.calls)
    assert model.calls[1:] == [("A", ["k", "bad"]), ("A", ["k"]), ("A", ["bad"])]  # the batch failed; each alone
    assert worker.running
    worker.stop()
    assert not worker.running
    with pytest.raises(WorkerStopped):
        worker.submit(["late"], "A")


def test_worker_async_cancel_and_stop():
    model, worker, _ = gated()

    async def scenario():
        task = asyncio.ensure_future(worker.run(["never"], "A"))
        while worker.pending() < 1:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        model.release.set()
        return await asyncio.wait_for(worker.run(["yes"], "A"), 10)

    assert asyncio.run(scenario()) == ["A:yes"]
    assert all("never" not in texts for _, texts in model.calls)
    model2, worker2, _ = gated()
    waiting = worker2.submit(["w"], "B")
    worker2.stop(timeout=0.1)  # the gate is still decoding; the waiting job is failed, not lost
    with pytest.raises(WorkerStopped):
        waiting.future.result(10)
    model2.release.set()
    worker.stop()


def test_a_worker_that_dies_fails_its_waiting_jobs(monkeypatch):
    """A bug in the worker thread stops it; the jobs queued behind it fail with WorkerStopped
    (the server's 503) instead of waiting forever, and no new job is taken."""
    model, worker, gate = gated()  # decoding, held at the gate
    queued = worker.submit(["q"], "B")
    monkeypatch.setattr(worker, "_next_batch", lambda: 1 / 0)
    model.release.set()
    with pytest.raises(WorkerStopped):
        queued.future.result(10)
    assert gate.future.result(10) == ["gate:x"]
    with pytest.raises(WorkerStopped):
        worker.submit(["late"], "A")


def test_a_worker_that_dies_fails_the_jobs_it_had_taken_too():
    """Jobs already off the queue (the batch being put together, or decoding) fail with
    WorkerStopped too, for a bug while batching and for a SystemExit while decoding."""

    class Touchy:  # a key that breaks the comparison with the next job's
        def __hash__(self) -> int:
            return 1

        def __eq__(self, other: object) -> bool:
            raise RuntimeError("a bug")

    worker = BatchWorker(lambda texts, key, places: list(texts), max_wait_ms=2000, name="m").start()
    head, behind = worker.submit(["a"], Touchy()), worker.submit(["b"], "B")  # within the head's wait
    for job in (head, behind):
        with pytest.raises(WorkerStopped):
            job.future.result(10)

    def leave(texts, key, places):
        raise SystemExit(3)

    worker = BatchWorker(leave, max_wait_ms=1, name="m").start()
    with pytest.raises(WorkerStopped, match="SystemExit"):
        worker.submit(["a"], "A").future.result(10)


def test_worker_with_a_real_model_makes_one_call(translators, monkeypatch):
    translator = translators["tf"]
    calls = []
    original = translator.translate_detailed

    def counting(texts, *args, **kwargs):
        calls.append(list(texts))
        return original(texts, *args, **kwargs)

    monkeypatch.setattr(translator, "translate_detailed", counting)
    worker = BatchWorker(lambda texts, key, places: [t.text for t in translator.translate_detailed(texts, **dict(key))],
                         max_batch=16, max_wait_ms=500, name="tf").start()  # fmt: skip
    key = (("beam_size", 2),)
    jobs = [worker.submit([text], key) for text in TEXTS]
    results = [job.future.result(30) for job in jobs]
    worker.stop()
    assert calls == [TEXTS]
    assert results == [[t.text] for t in original(TEXTS, beam_size=2)]


# --------------------------------------------------------------------------- fuzz


WILD = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 5), st.text(max_size=12),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
TEXT_LISTS = st.one_of(st.lists(st.text(max_size=30), max_size=5),
                       st.lists(st.sampled_from(["a b c", "d e", "", " ", "f g h i j"]), max_size=6), WILD)  # fmt: skip
FIELDS = ["beam_size", "nbest", "alpha", "coverage", "min_len", "no_repeat_ngram", "sample", "temperature", "top_k",
          "top_p", "seed", "max_len_a", "max_len_b"]  # fmt: skip
BODIES = st.fixed_dictionaries(
    {"texts": TEXT_LISTS},
    optional={
        "model": st.one_of(st.sampled_from(["rnn", "tf", "plain"]), WILD),
        "attention": st.one_of(st.sampled_from(["none", "cross", "all"]), WILD),
        **{f: WILD for f in FIELDS},
        "bogus": WILD,
    },
)


@pytest.fixture(scope="module")
def fuzz_client(translators):
    limits = Settings(max_wait_ms=0, max_beam=4, max_output_len=24, max_texts=6, max_chars=40, max_body_bytes=4096)
    with TestClient(create_app(translators, limits), raise_server_exceptions=False) as c:
        yield c


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(BODIES, BODIES.map(lambda b: {k: v for k, v in b.items() if k != "texts"}), WILD),
       raw=st.one_of(st.none(), st.binary(max_size=60)))  # fmt: skip
def test_fuzz_never_500(fuzz_client, body, raw):
    content = raw if raw is not None else json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    response = fuzz_client.post("/v1/translate", content=content, headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, raw, response.text)
    assert response.status_code in (200, 404, 413, 422), response.text
    payload = response.json()
    if response.status_code == 200:
        TranslateResponse.model_validate(payload)
        assert len(payload["results"]) == len(body["texts"])
    else:
        assert isinstance(payload["error"], str)
    assert fuzz_client.get("/healthz").status_code == 200


# --------------------------------------------------------------------------- the command line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_over_http(model_dirs, translators):
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("ALIGNA_API_KEY", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "aligna", "serve", str(model_dirs["rnn"]), "--port", str(port), "--name", "toy",
         "--device", "cpu", "--threads", "1", "--max-wait-ms", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        response = httpx.post(f"{url}/v1/translate", json={"texts": ["a b c"], "beam_size": 2}, timeout=60)
        assert response.status_code == 200
        assert response.json()["results"][0]["text"] == translators["rnn"].translate(["a b c"], beam_size=2)[0]
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["models"][0]["name"] == "toy"
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=60)
    log = out.decode()
    assert process.returncode in (0, -signal.SIGTERM), log  # uvicorn shuts down, then re-raises the signal
    assert "Application shutdown complete" in log
    assert "serving 'toy'" in log and f"{url}/docs" in log


def test_cli_serves_an_ensemble(model_dirs, monkeypatch, capsys):
    """`aligna serve DIR,DIR DIR`: the first is served as the ensemble of its models, named by
    their directories joined with +, beside a single model."""
    import uvicorn

    from aligna import serve

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app))
    monkeypatch.setattr(serve, "setup_logging", lambda: None)  # no handler left on this test's captured stderr
    rnn, tf = str(model_dirs["rnn"]), str(model_dirs["tf"])
    assert main(["serve", f"{rnn},{tf}", tf, "--device", "cpu", "--checkpoint", "best,latest"]) == 1
    assert f"MODEL_DIR {tf!r} has 1; give one checkpoint for all" in capsys.readouterr().err  # before loading
    assert main(["serve", f"{rnn},{tf}", tf, "--device", "cpu", "--ensemble-weights", "3,1"]) == 0
    with TestClient(served["app"]) as client:
        info = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert set(info) == {"rnn+tf", "tf"} and info["rnn+tf"]["architecture"] == "ensemble"
        assert [m["weight"] for m in info["rnn+tf"]["members"]] == [0.75, 0.25] and info["tf"]["members"] is None
        got = post(client, {"model": "rnn+tf", "texts": TEXTS}).json()["results"]
    ensemble = aligna.load_ensemble([rnn, tf], device="cpu", weights=[3, 1])
    assert [r["text"] for r in got] == ensemble.translate(TEXTS)
    for bad, message in (([f"{rnn},", "--device", "cpu"], "no empty entry"),
                         ([rnn, tf, "--ensemble-weights", "1,1"], "give one as DIR,DIR"),
                         ([f"{rnn},{tf}", "--ensemble-weights", "1,1,1"], "gives 3 weights, and the ensemble"),
                         ([f"{rnn},{tf}", "--engine", "ctranslate2"], "an ensemble decodes with the aligna engine")):  # fmt: skip
        assert main(["serve", *bad]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_cli_errors(model_dirs, capsys, monkeypatch):
    rnn = str(model_dirs["rnn"])
    assert main(["serve", rnn, rnn]) == 1
    assert "distinct" in capsys.readouterr().err
    assert main(["serve", rnn, "--name", "a", "--name", "b"]) == 1
    assert "--name given 2 times for 1 model" in capsys.readouterr().err
    assert main(["serve", rnn, "--max-batch", "0"]) == 1
    assert "max_batch" in capsys.readouterr().err
    for flag, value, message in (("--max-wait-ms", "inf", "max_wait_ms: inf is out of range"),
                                 ("--max-wait-ms", "nan", "max_wait_ms: nan is out of range"),
                                 ("--port", "70000", "port: 70000 is out of range")):  # fmt: skip
        assert main(["serve", rnn, flag, value]) == 1  # inf killed the batch worker; requests then hung
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if it were not installed
    assert main(["serve", rnn]) == 1
    assert "pip install 'aligna[serve]'" in capsys.readouterr().err


def test_blocked_beams_still_end(client, translators):
    """n-gram blocking can forbid every token before min_len (a small vocabulary): the beam
    then ends there instead of leaving a sentence without hypotheses (was an IndexError)."""
    options = {"beam_size": 3, "nbest": 2, "no_repeat_ngram": 1, "min_len": 30, "max_len_b": 40}
    expected = translators["rnn"].translate_detailed(["a b c"], **options)[0]
    assert 0 < len(expected.tokens) < 30 and len(set(expected.tokens)) == len(expected.tokens)
    response = post(client, {"model": "rnn", "texts": ["a b c"], **options})
    assert response.status_code == 200 and response.json()["results"][0]["text"] == expected.text
