"""The smoke book in a real browser: headless Debian chromium, driven by selenium + chromedriver.

Builds the book at the `smoke` preset into a temporary directory (the user's book/_build is not
touched), serves it on 127.0.0.1 and opens every page: every image loads, every internal link
resolves to an existing page and anchor, math is rendered by the book's own MathJax, nothing is
fetched from the network, and search finds the introduction. A screenshot of the introduction is
saved to book/_build/screenshots/intro.png.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import os
import shutil
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from crosslib import book

CHROMIUM = os.environ.get("CROSSLIB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CROSSLIB_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL_HINT = (
    "headless Chromium is needed for the browser check: install Debian's chromium and its driver with "
    "`apt-get update && apt-get install -y chromium chromium-driver` (.ci/run does this)"
)
SCREENSHOT = book.BOOK_DIR / "_build" / "screenshots" / "intro.png"

pytestmark = pytest.mark.slow


class _Ids(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if value and (key == "id" or (tag == "a" and key == "name")):
                self.ids.add(value)


@functools.cache
def anchors(page: Path) -> frozenset[str]:
    parser = _Ids()
    parser.feed(page.read_text(errors="replace"))
    return frozenset(parser.ids)


@pytest.fixture(scope="module")
def smoke_html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke-book")
    result = book.build_book("smoke", out_dir=out, log=print)
    assert result.html_built and (result.html_dir / "index.html").is_file()
    return result.html_dir


@pytest.fixture(scope="module")
def base_url(smoke_html):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(smoke_html)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: {INSTALL_HINT}")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,1600",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


WAIT_FOR_MATH = """
const done = arguments[arguments.length - 1];
if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
  MathJax.startup.promise.then(() => done(true), (e) => done("MathJax failed: " + e));
} else { done(false); }
"""

WAIT_FOR_IMAGES = """
const done = arguments[arguments.length - 1];
const imgs = Array.from(document.images);
imgs.forEach((img) => { img.loading = "eager"; img.scrollIntoView(); });
const start = Date.now();
(function poll() {
  if (imgs.every((img) => img.complete) || Date.now() - start > 15000) {
    done(imgs.map((img) => [img.currentSrc || img.src, img.complete, img.naturalWidth]));
  } else { setTimeout(poll, 100); }
})();
"""


def load(driver, url: str):
    driver.get(url)
    math = driver.execute_async_script(WAIT_FOR_MATH)
    assert math is True or math is False, f"{url}: {math}"
    return math


def test_every_page_loads_its_images_links_and_math_offline(smoke_html, base_url, browser):
    pages = sorted(p.relative_to(smoke_html).as_posix() for p in smoke_html.rglob("*.html"))
    assert "intro.html" in pages
    problems: list[str] = []
    pages_with_math = []
    for rel in pages:
        url = urllib.parse.urljoin(base_url, rel)
        has_mathjax = load(browser, url)
        for src, complete, width in browser.execute_async_script(WAIT_FOR_IMAGES):
            if not complete or width == 0:
                problems.append(f"{rel}: image did not load: {src}")
        if has_mathjax:
            rendered = browser.execute_script("return document.querySelectorAll('mjx-container').length")
            errors = browser.execute_script("return document.querySelectorAll('mjx-merror').length")
            if rendered:
                pages_with_math.append(rel)
            if errors:
                problems.append(f"{rel}: {errors} MathJax error(s)")
        for href in browser.execute_script("return Array.from(document.querySelectorAll('a[href]'), (a) => a.href)"):
            if not href.startswith(base_url):
                continue  # external (arxiv, ...) or javascript:, not followed offline
            parsed = urllib.parse.urlsplit(href)
            path = urllib.parse.unquote(parsed.path[1:]) or "index.html"
            target = smoke_html / path
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                problems.append(f"{rel}: broken link {href}")
            elif parsed.fragment and target.suffix == ".html":
                if urllib.parse.unquote(parsed.fragment) not in anchors(target):
                    problems.append(f"{rel}: link to a missing anchor {href}")
        remote = browser.execute_script(
            "return performance.getEntriesByType('resource').map((e) => e.name)"
            ".filter((n) => !n.startsWith(location.origin) && !n.startsWith('data:') && !n.startsWith('blob:'))"
        )
        problems += [f"{rel}: fetched from the network: {name}" for name in remote]
    assert not problems, "\n".join(problems)
    assert "intro.html" in pages_with_math, "MathJax rendered no math on the introduction"


def test_search_finds_the_introduction(base_url, browser):
    browser.get(urllib.parse.urljoin(base_url, "search.html?q=crosscoder"))
    deadline = time.time() + 20
    results: list[str] = []
    while time.time() < deadline and not results:
        results = browser.execute_script("return Array.from(document.querySelectorAll('ul.search li a'), (a) => a.href)")
        time.sleep(0.2)
    assert any("intro.html" in href for href in results), f"search for 'crosscoder' found {results}"


def test_screenshot_of_the_introduction(base_url, browser, tmp_path):
    load(browser, urllib.parse.urljoin(base_url, "intro.html"))
    assert browser.execute_script("return document.querySelectorAll('mjx-container').length") > 0
    shot = tmp_path / "intro.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a real, non-blank page
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, SCREENSHOT)
