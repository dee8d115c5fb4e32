"""The web page of `clipforge serve`, driven in headless Chromium through Selenium 4: a real uvicorn in a subprocess
(`python -m indexing.serve INDEX_DIR --port P`) over a tiny v2 index (tests/index_data.make_index_dir).

Needs Debian's /usr/bin/chromium and /usr/bin/chromedriver (the Makefile bootstrap installs them). Without them the
test is skipped, unless CI is set: then their absence is a failure. Selenium is pointed at both binaries, so
selenium-manager never downloads anything.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from helpers import write_shards
from index_data import add_sidecars, make_index_dir
from trainer.clip.checkpoint import save_model
from trainer.clip.model import CLIP, get_config

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # the shards' images are SIZE x SIZE


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the dev extra: pip install -e '.[dev]')")
    if missing:
        why = f"the web page test needs {', '.join(missing)} (`make venv` installs chromium and chromium-driver)"
        if _in_ci():
            pytest.fail(f"{why}; CI is set, so a missing browser is a failure", pytrace=False)
        pytest.skip(why)


def _get(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read()


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, seconds: float = 120) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"clipforge serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}", pytrace=False)
        try:
            status, body = _get(url + "/healthz", timeout=2)
            if status == 200:
                return json.loads(body)
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"clipforge serve did not answer /healthz within {seconds}s:\n{log.read_text()[-3000:]}",
                pytrace=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory, free_port):
    _require_browser()
    root = tmp_path_factory.mktemp("web")
    add_sidecars(write_shards(root / "shards", n_shards=2, per_shard=12, size=SIZE))
    torch.manual_seed(0)
    index = make_index_dir(root / "index", root / "shards", save_model(CLIP(get_config("tiny")), root / "ckpt"))
    port, log = free_port(), root / "serve.log"
    cmd = [sys.executable, "-m", "indexing.serve", str(index), "--port", str(port),
           "--duckdb-temp-dir", str(root / "duckdb")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        health = _wait_healthy(proc, url, log)
        yield SimpleNamespace(url=url, health=health, root=root)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def driver(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--window-size=1280,1200", f"--user-data-dir={server.root / 'chromium-profile'}"):
        opts.add_argument(arg)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(server.root / "chromedriver.log"))
    d = webdriver.Chrome(options=opts, service=service)
    d.set_page_load_timeout(60)
    try:
        yield d
    finally:
        d.quit()


def _submit(driver, after: int) -> int:
    """Click Search and wait for the page to answer (#grid's data-seq advances past `after`) -> the new seq."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "go").click()
    grid = driver.find_element(By.ID, "grid")
    WebDriverWait(driver, 60).until(lambda d: int(grid.get_attribute("data-seq")) > after)
    return int(grid.get_attribute("data-seq"))


def _cards(driver) -> list[dict]:
    return driver.execute_script("""return [...document.querySelectorAll('#grid .card')].map(c => ({
        id: Number(c.dataset.id), key: c.dataset.key, caption: c.querySelector('.caption').textContent,
        score: c.querySelector('.score').textContent.trim(), dataScore: Number(c.querySelector('.score').dataset.score),
        src: c.querySelector('img.thumb').getAttribute('src')}));""")


def _thumbs_loaded(driver) -> bool:
    sizes = driver.execute_script(
        "return [...document.querySelectorAll('#grid img.thumb')].map(i => i.complete ? i.naturalWidth : 0);")
    return bool(sizes) and all(w > 0 for w in sizes)


def _type(element, text: str) -> None:
    element.clear()
    element.send_keys(text)


def test_search_filter_open_and_screenshot(server, driver, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    driver.get(server.url + "/")
    info = driver.find_element(By.ID, "info")
    wait.until(lambda d: server.health["build_id"] in info.text)       # the page read /healthz
    _type(driver.find_element(By.ID, "q"), "a photo of object number 3")
    _type(driver.find_element(By.ID, "k"), "6")
    seq = _submit(driver, 0)

    # the grid: 6 cards, captions and scores, the same ranking as the API, thumbnails that are real images
    assert driver.find_element(By.ID, "grid").get_attribute("data-state") == "done"
    cards = _cards(driver)
    api = _post_json(server.url + "/search", {"text": "a photo of object number 3", "k": 6})["results"]
    assert [c["id"] for c in cards] == [h["id"] for h in api] and len(cards) == 6
    for card, hit in zip(cards, api):
        assert card["caption"] == hit["caption"] and card["caption"].startswith("a photo of object number")
        assert card["score"] == f"{hit['score']:.3f}" and abs(card["dataScore"] - hit["score"]) < 1e-6
        assert card["src"] == f"image/{hit['id']}"
    wait.until(_thumbs_loaded)

    # a filter that excludes the best result: it leaves the grid, the others move up, one more comes in
    first = cards[0]
    _type(driver.find_element(By.ID, "filter"), f"key <> '{first['key']}'")
    seq = _submit(driver, seq)
    filtered = _cards(driver)
    assert len(filtered) == 6 and first["id"] not in [c["id"] for c in filtered]
    assert [c["id"] for c in filtered[:5]] == [c["id"] for c in cards[1:]]
    wait.until(_thumbs_loaded)

    # a bad filter: the message, no grid
    _type(driver.find_element(By.ID, "filter"), "no_such_column = 1")
    seq = _submit(driver, seq)
    assert "unknown column 'no_such_column'" in driver.find_element(By.ID, "msg").text and _cards(driver) == []
    driver.find_element(By.ID, "filter").clear()
    seq = _submit(driver, seq)
    wait.until(_thumbs_loaded)

    # a click opens the full image in the viewer; Escape closes it
    target = _cards(driver)[2]
    driver.find_elements(By.CSS_SELECTOR, "#grid .card img.thumb")[2].click()
    viewer = driver.find_element(By.ID, "viewer")
    wait.until(lambda d: viewer.is_displayed() and d.execute_script(
        "const i = document.getElementById('viewer-img'); return i.complete && i.naturalWidth > 0;"))
    assert viewer.get_attribute("data-id") == str(target["id"])
    natural = driver.execute_script("const i = document.getElementById('viewer-img');"
                                    "return [i.naturalWidth, i.naturalHeight];")
    assert natural == [SIZE, SIZE]
    assert driver.find_element(By.ID, "viewer-link").get_attribute("href").endswith(f"/image/{target['id']}")
    assert target["caption"] in driver.find_element(By.ID, "viewer-caption").text

    shot = tmp_path / "page.png"
    assert driver.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.width >= 800 and img.height >= 600
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 50                                    # not a blank page
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    wait.until(lambda d: not viewer.is_displayed())
