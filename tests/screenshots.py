"""Full-page screenshots of a built book's pages in headless Chromium, to look at.

    .venv/bin/python tests/screenshots.py [HTML_DIR] [OUT_DIR]     # `make screenshots`

HTML_DIR defaults to book/_build/html and OUT_DIR to book/_build/screenshots: one PNG per page
(the introduction, every chapter, Methods), 1280 px wide like the browser check, as tall as the
page (capped). The pages are served on 127.0.0.1 as the browser test serves them. The browser test
(tests/book/test_browser.py) uses the same driver and writes the smoke book's screenshots under
book/_build/screenshots/smoke/.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import sys
import tempfile
import threading
from pathlib import Path

CHROMIUM = os.environ.get("CROSSLIB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CROSSLIB_CHROMEDRIVER", "/usr/bin/chromedriver")
WIDTH = 1280
MAX_HEIGHT = 16000  # px; a longer page is cut (Chromium refuses huge captures)
REPO = Path(__file__).resolve().parents[1]


def chromium(profile_dir: str | os.PathLike, height: int = 1600):
    """Headless Debian chromium through chromedriver, with no background network of its own."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--window-size={WIDTH},{height}", "--hide-scrollbars",
        f"--user-data-dir={profile_dir}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    return driver


@contextlib.contextmanager
def serve(html_dir: Path):
    """The book's folder on an ephemeral 127.0.0.1 port; yields its base URL."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(html_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def book_pages(html_dir: Path) -> list[str]:
    """The pages a reader turns: the introduction, the chapters in order, Methods."""
    chapters = sorted(p.relative_to(html_dir).as_posix() for p in (html_dir / "chapters").glob("*.html"))
    return [page for page in ["intro.html", *chapters, "methods.html"] if (html_dir / page).is_file()]


def screenshot_pages(driver, base_url: str, pages: list[str], out_dir: Path, load=None) -> list[Path]:
    """One full-page PNG per page (named after it); `load(driver, url)` waits for the page (math, images)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shots = []
    for page in pages:
        url = base_url + page
        driver.set_window_size(WIDTH, 800)  # a page is never measured shorter than the window it opens in
        if load:
            load(driver, url)
        else:
            driver.get(url)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        chrome = driver.execute_script("return window.outerHeight - window.innerHeight")  # the window's own bars
        driver.set_window_size(WIDTH, min(int(height) + int(chrome), MAX_HEIGHT))
        shot = out_dir / (Path(page).stem + ".png")
        driver.save_screenshot(str(shot))
        shots.append(shot)
    driver.set_window_size(WIDTH, 1600)
    return shots


def main(argv: list[str]) -> int:
    html_dir = Path(argv[0]) if argv else REPO / "book" / "_build" / "html"
    out_dir = Path(argv[1]) if len(argv) > 1 else REPO / "book" / "_build" / "screenshots"
    if not (html_dir / "intro.html").is_file():
        print(f"no built book in {html_dir}: run `make book` first", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="crosslib-chromium-") as profile, serve(html_dir) as base_url:
        driver = chromium(profile)
        try:
            shots = screenshot_pages(driver, base_url, book_pages(html_dir), out_dir)
        finally:
            driver.quit()
    for shot in shots:
        print(shot)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
