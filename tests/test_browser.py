"""The page of `aligna serve` in a real browser: headless Chromium driven by Selenium.

A 2-layer 2-head Transformer, an RNN with Bahdanau attention and an RNN without attention
are trained for a few steps on the reverse task and served by one `python -m aligna serve`.
The page must translate as the Python API does, and draw the attention the JSON API returns:
one row per target token, one column per source token, the weights of the chosen kind, layer
and head (or the mean over heads).

Needs Debian's chromium and chromium-driver and the selenium package; without them the
tests are skipped, unless ALIGNA_REQUIRE_BROWSER=1 (as in CI), where they fail.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch
from conftest import reverse_pairs, write_tsv

import aligna
from aligna.config import config_from_dict
from aligna.training import train
from scripts import screenshot as page

SENTENCE = "a b c d e f"
TOLERANCE = 1e-3  # the page shows weights to 3 decimals (and the API rounds them to 5)

MODELS = {  # name (the served model's name is its directory's) -> model section and updates
    "transformer": ({"arch": "transformer", "encoder_layers": 2, "decoder_layers": 2,
                     "transformer": {"heads": 2, "ff_size": 32}}, 60),
    "bahdanau": ({"rnn": {"attention": "bahdanau"}}, 30),
    "plain": ({}, 10),
}  # fmt: skip

# The grid as the page draws it: the headers and, per cell, its weight (data-weight, to 3
# decimals; null if missing) and its colour.
READ_GRID = """
const hm = document.getElementById('heatmap');
const text = e => (e ? e.textContent.trim() : null);
return {
  cols: [...hm.querySelectorAll('.hm-src')].map(text),
  rows: [...hm.querySelectorAll('.hm-row')].map(r => ({
    tgt: text(r.querySelector('.hm-tgt')),
    cells: [...r.querySelectorAll('.hm-cell')].map(c => [
      c.dataset.weight === undefined ? null : parseFloat(c.dataset.weight), getComputedStyle(c).backgroundColor,
    ]),
  })),
};
"""


@pytest.fixture(scope="module")
def browser_ready():
    reason = page.browser_missing()
    if reason is None:
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as e:
            reason = f"aligna serve needs fastapi and uvicorn: {e}"
    if reason is not None:
        if os.environ.get("ALIGNA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"ALIGNA_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def models(browser_ready, tmp_path_factory) -> dict[str, Path]:
    """name -> model directory: the three models, trained on one thread (much faster on a busy CPU)."""
    tmp = tmp_path_factory.mktemp("browser")
    train_tsv = write_tsv(tmp / "train.tsv", reverse_pairs(500, seed=1))
    dev_tsv = write_tsv(tmp / "dev.tsv", reverse_pairs(10, seed=2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dirs = {}
        for name, (model, steps) in MODELS.items():
            config = config_from_dict({
                "model_dir": str(tmp / name),
                "data": {"train": {"tsv": str(train_tsv)}, "dev": {"tsv": str(dev_tsv)}},
                "model": {"emb_dim": 16, "hidden_size": 32, "encoder_layers": 1, "decoder_layers": 1, **model},
                "train": {"batch_tokens": 256, "epochs": 10, "max_steps": steps, "lr": 3e-3, "validate_every": 1000},
                "eval": {"metrics": ["wer"]},
            })  # fmt: skip
            dirs[name] = Path(train(config, progress=False))
    finally:
        torch.set_num_threads(threads)
    return dirs


@pytest.fixture(scope="module")
def server(models):
    """The three models in one server, and the ensemble of two of them (served as
    "bahdanau+transformer", weighted 3:1); the driver fixture waits for it to be ready."""
    ensemble = f"{models['bahdanau']},{models['transformer']}"
    with page.Server([*models.values(), ensemble], "--threads", "1", "--ensemble-weights", "3,1") as served:
        yield served


@pytest.fixture(scope="module")
def driver(server):
    browser = page.chrome()  # while the server loads
    try:
        server.wait_ready()
        page.open_page(browser, server.url)
        yield browser
    finally:
        browser.quit()


@pytest.fixture(autouse=True)
def greedy(driver):
    """Every test starts from greedy search, whatever the one before left on the page."""
    page.set_search(driver, beam=1)


def grid(driver) -> dict:
    return driver.execute_script(READ_GRID)


def api(server, model: str, **search) -> dict:
    """The JSON API's answer for SENTENCE, with every map."""
    body = {"model": model, "texts": [SENTENCE], "attention": "all", **search}
    return server.post("/v1/translate", body)["results"][0]


def assert_grid(shown: dict, rows: list[str], cols: list[str], weights: list[list[float]]) -> None:
    assert shown["cols"] == cols
    assert [r["tgt"] for r in shown["rows"]] == rows
    assert [len(r["cells"]) for r in shown["rows"]] == [len(cols)] * len(rows)
    for r, (row, expected) in enumerate(zip(shown["rows"], weights)):
        assert [value for value, _ in row["cells"]] == pytest.approx(expected, abs=TOLERANCE), (
            f"row {r} ({rows[r]})"
        )
        shades = [opacity(colour) for _, colour in sorted(row["cells"], key=lambda cell: cell[0])]
        assert shades == sorted(shades), f"row {r} ({rows[r]}): a heavier weight drawn lighter"


def opacity(colour: str) -> float:
    """The alpha of a computed CSS colour, "rgba(r, g, b, a)" or "rgb(r, g, b)"."""
    parts = colour[colour.index("(") + 1 : -1].split(",")
    return float(parts[3]) if len(parts) == 4 else 1.0


def selected(driver) -> list[str]:
    """The values of #kind, #layer and #head."""
    return [driver.find_element("id", k).get_attribute("value") for k in ("kind", "layer", "head")]


def colours(shown: dict) -> list[list[str]]:
    return [[colour for _, colour in row["cells"]] for row in shown["rows"]]


def mean(heads: list[list[list[float]]]) -> list[list[float]]:
    return [[sum(column) / len(heads) for column in zip(*rows)] for rows in zip(*heads)]


def test_page_translates_as_the_python_api(driver, server, models):
    translator = aligna.load(models["transformer"])
    shown = page.translate(driver, SENTENCE, model="transformer")
    assert page.search_on_page(driver) == {"beam_size": 1, "nbest": 1}  # the model's default: greedy
    assert shown == translator.translate([SENTENCE])[0]
    assert page.status(driver) == "ready"

    page.set_search(driver, beam=3, nbest=2)
    shown = page.translate(driver, SENTENCE)
    expected = translator.translate_detailed([SENTENCE], beam_size=3, nbest=2)[0]
    assert shown == expected.text
    nbest = driver.find_elements("css selector", "#results .result .nbest li span:first-child")
    assert [e.text for e in nbest] == [text for text, _ in expected.nbest]


def test_heatmap_shows_every_kind_layer_and_head(driver, server, models):
    page.translate(driver, SENTENCE, model="transformer")
    record = api(server, "transformer")["attention"]
    src, tgt, maps = record["src_tokens"], record["tgt_tokens"], record["maps"]
    assert src == SENTENCE.split() and tgt[-1] == "<eos>"
    assert sorted(value for value, _ in page.options(driver, "kind")) == ["cross", "decoder", "encoder"]

    # As it comes: the map search used, the last layer's cross-attention averaged over heads.
    assert selected(driver) == ["cross", "1", "mean"]
    search_used = grid(driver)
    assert_grid(search_used, tgt, src, record["weights"])

    assert page.options(driver, "layer") == [["0", "layer 1"], ["1", "layer 2"]]
    assert [value for value, _ in page.options(driver, "head")] == ["mean", "0", "1"]
    for kind in ("encoder", "decoder", "cross"):
        page.select(driver, "kind", value=kind)
        m = maps[kind]
        shown = {}
        for layer, head in (("1", "0"), ("1", "1"), ("1", "mean"), ("0", "0")):
            page.select(driver, "layer", value=layer)
            page.select(driver, "head", value=head)
            shown[layer, head] = grid(driver)
            heads = m["weights"][int(layer)]
            assert_grid(
                shown[layer, head], m["rows"], m["cols"], mean(heads) if head == "mean" else heads[int(head)]
            )
        assert colours(shown["1", "0"]) != colours(shown["1", "1"]), f"{kind}: both heads drawn alike"
        assert colours(shown["1", "0"]) != colours(shown["0", "0"]), f"{kind}: both layers drawn alike"
    assert maps["cross"]["rows"] == tgt and maps["cross"]["cols"] == src
    assert maps["encoder"]["rows"] == maps["encoder"]["cols"] == src
    assert maps["decoder"]["rows"] == tgt and maps["decoder"]["cols"] == ["<sos>", *tgt[:-1]]

    # A choice is kept for the next translation.
    page.select(driver, "kind", value="decoder")
    page.select(driver, "layer", value="0")
    page.select(driver, "head", value="1")
    page.translate(driver, SENTENCE)
    assert selected(driver) == ["decoder", "0", "1"]
    assert_grid(
        grid(driver), maps["decoder"]["rows"], maps["decoder"]["cols"], maps["decoder"]["weights"][0][1]
    )

    # the state the screenshot shows: the map search used
    page.select(driver, "kind", value="cross")
    page.select(driver, "layer", value="1")
    page.select(driver, "head", value="mean")
    assert colours(grid(driver)) == colours(search_used)


def test_screenshot(driver, server, tmp_path):
    """The page as the README shows it, a translation and the map search used, whatever ran
    before; ALIGNA_SCREENSHOT=PATH keeps it (default: a temporary file)."""
    page.translate(driver, SENTENCE)
    page.select(driver, "kind", value="cross")
    page.select(driver, "layer", value="1")
    page.select(driver, "head", value="mean")
    shown = grid(driver)["rows"]  # the heatmap is drawn: a row per output token, a cell per source token
    assert shown and all(len(row["cells"]) == len(SENTENCE.split()) for row in shown)
    out = Path(os.environ.get("ALIGNA_SCREENSHOT") or tmp_path / "serve.png")
    assert driver.save_screenshot(str(out))
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24])[0] == page.WINDOW[0]  # the width; the height is the viewport's


def test_bahdanau_has_one_map(driver, server):
    page.translate(driver, SENTENCE, model="bahdanau")
    record = api(server, "bahdanau")["attention"]
    assert record["maps"]["cross"]["weights"] == [[record["weights"]]]  # one layer, one head
    assert_grid(grid(driver), record["tgt_tokens"], record["src_tokens"], record["weights"])
    for element_id in ("kind", "layer", "head"):
        assert len(page.options(driver, element_id)) == 1


def test_model_without_attention(driver, server):
    text = page.translate(driver, SENTENCE, model="plain")
    assert text == api(server, "plain")["text"]
    assert grid(driver)["rows"] == [] and grid(driver)["cols"] == []
    assert "no attention" in driver.find_element("tag name", "body").text


def test_an_ensemble_shows_its_members_and_their_mean_attention(driver, server):
    text = page.translate(driver, SENTENCE, model="bahdanau+transformer")
    record = api(server, "bahdanau+transformer")
    assert text == record["text"] and record["attention"]["maps"] == {}
    assert "ensemble of rnn+bahdanau ×0.75 + transformer ×0.25" in driver.find_element("id", "model-info").text
    attention = record["attention"]
    assert_grid(grid(driver), attention["tgt_tokens"], attention["src_tokens"], attention["weights"])
    for element_id in ("kind", "layer", "head"):  # no layers or heads of its own
        assert len(page.options(driver, element_id)) == 1
        assert driver.find_element("id", element_id).get_attribute("disabled")
    assert page.options(driver, "head") == [["mean", "mean over heads and models"]]


def test_an_older_answer_never_replaces_a_newer_one(driver, server):
    """Lines sent to the Transformer, then another model chosen and one line translated: only
    the newest request's answer is shown, whenever the older one comes back. The page asks for
    the map search used; a Transformer's other maps come for the selected line alone."""
    import time

    page.select(driver, "model", value="transformer")
    driver.find_element("id", "show-request").click()
    assert '"attention": "cross"' in driver.find_element("id", "request").text
    # the request of several lines answered 1.5 s late, after the newer one
    driver.execute_script("""
        window.realFetch = window.realFetch || window.fetch;
        window.fetch = async (url, init) => {
          if (init && init.body && JSON.parse(init.body).texts.length > 1) await new Promise((r) => setTimeout(r, 1500));
          return window.realFetch(url, init);
        };""")
    try:
        source = driver.find_element("id", "source")
        source.clear()
        source.send_keys("\n".join([SENTENCE] * 24))
        driver.find_element("id", "translate").click()
        page.translate(driver, SENTENCE, model="bahdanau")
        time.sleep(2.5)  # the older answer has come back, unless it was dropped
        assert len(driver.find_elements("css selector", "#results .result")) == 1
        assert page.status(driver) == "ready" and driver.find_element("id", "model").get_attribute("value") == "bahdanau"
    finally:
        driver.execute_script("window.fetch = window.realFetch;")


def test_text_keeps_its_direction(driver, server):
    page.translate(driver, SENTENCE, model="bahdanau")
    assert driver.find_element("id", "source").get_attribute("dir") == "auto"
    for selector in ("#results .source", "#results .translation", "#heatmap .hm-src span", "#heatmap .hm-tgt"):
        assert {e.get_attribute("dir") for e in driver.find_elements("css selector", selector)} == {"auto"}, selector
