"""A screenshot of the page of `aligna serve`: one sentence translated, its attention shown.

    python scripts/screenshot.py runs/multi30k_de_en_transformer docs/serve.png \\
        "ein kleines mädchen klettert eine treppe hinauf ."
    python scripts/screenshot.py runs/de_en OUT.png "..." --kind cross --layer 3 --head mean

Starts `python -m aligna serve MODEL_DIR` on a free loopback port, opens its page in headless
Chromium (Debian's chromium and chromium-driver, driven by Selenium; nothing is downloaded),
types the sentence, translates it and saves the window as a PNG. tests/test_browser.py
drives the page with the same helpers, and bench/serve_load.py starts its servers with
`Server` (both import this file as scripts.screenshot, from the repository root).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1280, 900)


def browser_missing() -> str | None:
    """Why the page cannot be driven here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'aligna[dev]')"
    return None


def chrome(width: int = WINDOW[0], height: int = WINDOW[1]):
    """Headless Chromium from Debian's packages; Selenium Manager is never asked for a driver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m aligna serve MODEL_DIR ... --port P` from this checkout. It starts at once;
    `wait_ready` returns when /readyz says 200 (so a browser can start meanwhile)."""

    def __init__(self, model_dirs: list[str | Path], *options: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = tempfile.NamedTemporaryFile("w+b", prefix="aligna_serve_", suffix=".log")
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        )
        self.command = [sys.executable, "-m", "aligna", "serve", *map(str, model_dirs),
                        "--port", self.url.rsplit(":", 1)[1], *options]  # fmt: skip
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.ready = False

    def wait_ready(self, timeout: float = 120.0) -> Server:
        deadline = time.monotonic() + timeout
        while not self.ready and time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"aligna serve exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                    self.ready = response.status == 200
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        if not self.ready:
            log = self.log_text()
            self.stop()
            raise RuntimeError(f"aligna serve was not ready after {timeout:.0f} s:\n{log}")
        return self

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text("utf-8", errors="replace")[-5000:]

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait(driver, condition, timeout: float = 20.0, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message)


def status(driver) -> str:
    return driver.find_element("id", "status").text.strip()


def open_page(driver, url: str) -> None:
    """Load the page and wait until it has its models and says it is ready."""
    driver.get(url + "/")
    wait(driver, lambda d: "ready" in status(d).lower() and d.find_elements("css selector", "#model option"),
         message="the page never said ready")  # fmt: skip


def select(driver, element_id: str, value: str | None = None, text: str | None = None) -> None:
    """Choose an option of a <select> by value or by visible text (a change event fires)."""
    from selenium.webdriver.support.ui import Select

    menu = Select(driver.find_element("id", element_id))
    if value is not None:
        menu.select_by_value(value)
    else:
        menu.select_by_visible_text(text)


def options(driver, element_id: str) -> list[list[str]]:
    """[value, text] of every option of a <select>."""
    return driver.execute_script(
        "return [...document.getElementById(arguments[0]).options].map(o => [o.value, o.text.trim()])",
        element_id,
    )


def set_search(driver, beam: int, nbest: int = 1) -> None:
    """Greedy search for beam 1, else beam search with `beam` and `nbest`."""
    for element_id, value in (("beam", beam), ("nbest", nbest)):
        field = driver.find_element("id", element_id)
        field.clear()
        field.send_keys(str(value))
    driver.find_element("id", "greedy" if beam == 1 else "beam-search").click()


def search_on_page(driver) -> dict[str, int]:
    """The beam_size and nbest the page will send."""
    if not driver.find_element("id", "beam-search").is_selected():
        return {"beam_size": 1, "nbest": 1}
    value = {k: int(driver.find_element("id", k).get_attribute("value") or 1) for k in ("beam", "nbest")}
    return {"beam_size": value["beam"], "nbest": value["nbest"]}


def translate(driver, sentence: str, model: str | None = None) -> str:
    """Type `sentence`, press Translate, wait for the result; its translation's text."""
    if model is not None and driver.find_element("id", "model").get_attribute("value") != model:
        select(driver, "model", value=model)
    source = driver.find_element("id", "source")
    source.clear()
    source.send_keys(sentence)
    driver.execute_script("document.getElementById('results').replaceChildren()")  # a new result must appear
    driver.find_element("id", "translate").click()
    wait(driver, lambda d: (d.find_elements("css selector", "#results .result .translation")
                            and status(d).lower() == "ready") or "error" in status(d).lower(),
         message="no translation appeared")  # fmt: skip  # "ready": a Transformer's maps are in too
    if "error" in status(driver).lower():
        raise RuntimeError(f"the page says {status(driver)!r}")
    return driver.find_element("css selector", "#results .result .translation").text.strip()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("sentence")
    parser.add_argument("--kind", help="attention kind to show (cross, encoder, decoder)")
    parser.add_argument("--layer", help="layer to show, from 1 (default: the page's)")
    parser.add_argument("--head", help="head to show, from 1, or mean (default: the page's)")
    parser.add_argument("--beam", type=int, help="beam size (default: the page's)")
    parser.add_argument("--size", default=f"{WINDOW[0]}x{WINDOW[1]}", help="window size WxH")
    args = parser.parse_args()
    if reason := browser_missing():
        sys.exit(reason)
    width, height = map(int, args.size.lower().split("x"))
    with Server([args.model_dir], "--threads", "1") as server:
        driver = chrome(width, height)
        try:
            server.wait_ready()
            open_page(driver, server.url)
            if args.beam is not None:
                set_search(driver, args.beam)
            print(f"translation: {translate(driver, args.sentence)}")
            for element_id, label in (("kind", args.kind), ("layer", args.layer), ("head", args.head)):
                if label is not None:  # option values: kinds by name, layers and heads from 0, "mean"
                    value = str(int(label) - 1) if label.isdigit() else label
                    if value not in [v for v, _ in options(driver, element_id)]:
                        sys.exit(f"--{element_id} {label}: the page offers {options(driver, element_id)}")
                    select(driver, element_id, value=value)
            driver.execute_script("document.activeElement && document.activeElement.blur()")  # no focus ring
            time.sleep(0.3)  # let the heatmap's transition finish
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    print(f"screenshot written to {args.out}")


if __name__ == "__main__":
    main()
