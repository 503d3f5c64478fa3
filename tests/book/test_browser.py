"""The smoke book in a real browser: headless Debian chromium, driven by selenium + chromedriver.

Builds the book at the `smoke` preset into a temporary directory (of the user's book/_build only
book/_build/screenshots/smoke/ is written), serves it on 127.0.0.1 and opens every page: every image
loads, every internal link resolves to an existing page and anchor, math is rendered by the book's
own MathJax, nothing is fetched from the network, and search finds the introduction. A full-page
screenshot of every page is saved under book/_build/screenshots/smoke/ (tests/screenshots.py;
`make screenshots` does the same for the built book). The feature explorer (chapter 8) is opened
from disk (file://, as readers open the book): it loads, its search, sort and deep links work, and
chapters 3-5 link their features to it.
"""

from __future__ import annotations

import functools
import html.parser
import re
import time
import urllib.parse
from pathlib import Path

import pytest

from crosslib.analyses import explorer
from crosslib.book import runner as book
from screenshots import CHROMEDRIVER, CHROMIUM, book_pages, chromium, screenshot_pages, serve

INSTALL_HINT = (
    "headless Chromium is needed for the browser check: install Debian's chromium and its driver with "
    "`apt-get update && apt-get install -y chromium chromium-driver` (.ci/run does this)"
)
SCREENSHOTS = book.BOOK_DIR / "_build" / "screenshots" / "smoke"  # one PNG per page, to look at

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


def explorer_feature(fragment: str) -> int | None:
    match = re.fullmatch(r"feature-(\d+)", fragment)
    return int(match.group(1)) if match else None


@functools.cache
def explorer_index(html_dir: Path) -> dict:
    return explorer.read_data_file(html_dir / explorer.DATA_DIR / "index.js")[1]


def explorer_features(html_dir: Path) -> frozenset[int]:
    return frozenset(explorer_index(html_dir)["columns"]["feature"])


@pytest.fixture(scope="module")
def smoke_html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke-book")
    result = book.build_book("smoke", out_dir=out, log=print)
    assert result.html_built and (result.html_dir / "index.html").is_file()
    return result.html_dir


@pytest.fixture(scope="module")
def base_url(smoke_html):
    with serve(smoke_html) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: {INSTALL_HINT}")
    driver = chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


WAIT_FOR_MATH = """
const done = arguments[arguments.length - 1];
// MathJax loads asynchronously: on a busy machine the page can be loaded before MathJax has defined
// itself, so a page that includes it waits for it (one deadline for both waits, within selenium's 60 s)
const included = Array.from(document.scripts).some((s) => /mathjax/i.test(s.src));
const deadline = Date.now() + 45000;
(function poll() {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    const timer = setTimeout(() => done("timeout"), Math.max(0, deadline - Date.now()));
    MathJax.startup.promise.then(() => { clearTimeout(timer); done(true); },
                                 (e) => { clearTimeout(timer); done("MathJax failed: " + e); });
  } else if (!included) { done(false); }
  else if (Date.now() > deadline) { done("timeout"); }
  else { setTimeout(poll, 100); }
})();
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
    # A fresh headless Chromium has once left MathJax's start-up promise pending on the first page it
    # opened (not reproducible on the same files): a page gets one reload before it counts as failed.
    for attempt in range(2):
        driver.get(url)
        math = driver.execute_async_script(WAIT_FOR_MATH)
        if math != "timeout":
            break
    assert math != "timeout", f"{url}: MathJax did not load and typeset in 45 s, twice"
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
            elif target.name == "explorer.html" and parsed.fragment:
                # the explorer draws its features from its data: a deep link must name a listed feature
                if explorer_feature(parsed.fragment) not in explorer_features(smoke_html):
                    problems.append(f"{rel}: link to a feature the explorer does not list {href}")
            elif parsed.fragment and target.suffix == ".html":
                if urllib.parse.unquote(parsed.fragment) not in anchors(target):
                    problems.append(f"{rel}: link to a missing anchor {href}")
        # no code block scrolls sideways at the browser's 1280 px, and no glued number reads "nan"
        wide = browser.execute_script(
            "return Array.from(document.querySelectorAll('main pre'), (p) => p.scrollWidth - p.clientWidth)"
            ".filter((extra) => extra > 1).length")
        if wide:
            problems.append(f"{rel}: {wide} code block(s) overflow horizontally")
        prose = browser.execute_script(
            "const main = document.querySelector('main') || document.body; const copy = main.cloneNode(true);"
            "copy.querySelectorAll('pre, code, script, style').forEach((e) => e.remove()); return copy.innerText")
        problems += [f"{rel}: a value renders as nan: ...{prose[max(0, m.start() - 60):m.end() + 20]!r}..."
                     for m in re.finditer(r"(?<![\w.])[+-]?nan(?![\w])", prose)]
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
    finished = False  # results appear one page at a time: wait for Sphinx's closing summary
    while time.time() < deadline and not finished:
        finished = browser.execute_script("return /found/i.test((document.querySelector('.search-summary') || {}).textContent || '')")
        results = browser.execute_script("return Array.from(document.querySelectorAll('ul.search li a'), (a) => a.href)")
        time.sleep(0.2)
    assert any("intro.html" in href for href in results), f"search for 'crosscoder' found {results}"


def test_screenshots_of_every_page(smoke_html, base_url, browser):
    """A full-page screenshot of the introduction, every chapter and Methods, for a person to look at."""
    pages = book_pages(smoke_html)
    assert len(pages) == len(list((smoke_html / "chapters").glob("*.html"))) + 2
    shots = screenshot_pages(browser, base_url, pages, SCREENSHOTS, load=load)
    for shot in shots:
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, f"{shot.name}: blank or not a PNG"
    load(browser, base_url + "intro.html")
    assert browser.execute_script("return document.querySelectorAll('mjx-container').length") > 0


WAIT_FOR_EXPLORER = """
const done = arguments[arguments.length - 1], start = Date.now();
(function poll() {
  if (document.body && document.body.getAttribute("data-ready") === "1") done(true);
  else if (Date.now() - start > 20000) done(document.getElementById("status") ? document.getElementById("status").textContent : "no page");
  else setTimeout(poll, 50);
})();
"""


def wait_until(browser, script: str, *args, seconds: float = 20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = browser.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.05)
    return browser.execute_script(script, *args)


def open_explorer(browser, smoke_html: Path, fragment: str = "") -> str:
    url = (smoke_html / "explorer.html").as_uri() + fragment
    browser.get(url)
    ready = browser.execute_async_script(WAIT_FOR_EXPLORER)
    assert ready is True, f"the explorer did not load from {url}: {ready}"
    return url


def rarest_focus_token(smoke_html: Path) -> tuple[int, str]:
    """A feature and a token that is the strongest token of one of its top contexts, chosen so that
    as few other features as possible share it (the list shows it on the first page)."""
    data = smoke_html / explorer.DATA_DIR
    index = explorer_index(smoke_html)
    vocab = explorer.read_data_file(data / "vocab.js")[1]
    search = explorer.read_data_file(data / "search-vocab.js")[1]
    starts = search["shard_starts"]
    shards = [explorer.read_data_file(data / f"search-{k}.js")[1] for k in range(len(starts))]
    best = None
    for feature in index["columns"]["feature"]:
        shard = explorer.read_data_file(data / f"detail-{feature // index['features_per_shard']}.js")[1]
        for context in shard[str(feature)]["final"]:
            word = explorer.normalise_token(vocab[str(context["t"][context["f"]])])
            if not word or not word.isalnum():
                continue
            t = search["tokens"].index(word)
            k = max(i for i, s in enumerate(starts) if s <= t)
            n_features = len(shards[k][t - starts[k]])
            if best is None or n_features < best[0]:
                best = (n_features, feature, word)
    assert best is not None, "no feature of the smoke explorer has a top context with a word token"
    return best[1], best[2]


def test_explorer_loads_offline_searches_sorts_and_opens_deep_links(smoke_html, browser):
    assert (smoke_html / "explorer.html").is_file(), "the book has no explorer.html"
    features = explorer_features(smoke_html)
    assert features, "the explorer lists no feature"
    open_explorer(browser, smoke_html)
    assert browser.execute_script("return document.querySelectorAll('#rows tr[data-feature]').length") > 0

    # Search finds a feature by a token of its top context.
    feature, word = rarest_focus_token(smoke_html)
    browser.execute_script(
        "const box = document.getElementById('search'); box.value = arguments[0]; box.dispatchEvent(new Event('input'));", word)
    found = wait_until(browser, "return document.querySelector(arguments[0]) !== null && "
                                "document.getElementById('count').textContent.indexOf('match') >= 0",
                       f'#rows tr[data-feature="{feature}"]')
    shown = browser.execute_script("return crosslibExplorer.visibleFeatures()")
    assert found and feature in shown, f"searching {word!r} did not list feature {feature} (listed {shown[:20]})"
    browser.execute_script(
        "const box = document.getElementById('search'); box.value = ''; box.dispatchEvent(new Event('input'));")
    wait_until(browser, "return document.getElementById('count').textContent.indexOf('match') < 0")

    # Sorting by emergence step orders the list (features that never formed last), both ways.
    emergence = dict(zip(explorer_index(smoke_html)["columns"]["feature"], explorer_index(smoke_html)["columns"]["emergence_step"]))
    browser.execute_script("const s = document.getElementById('sort'); s.value = 'emergence_step'; s.dispatchEvent(new Event('change'));")
    for direction in ("ascending", "descending"):
        order = browser.execute_script("return crosslibExplorer.visibleFeatures()")
        rendered = browser.execute_script("return Array.from(document.querySelectorAll('#rows tr[data-feature]'), (r) => Number(r.dataset.feature))")
        assert sorted(order) == sorted(features) and rendered == order[: len(rendered)]
        steps = [emergence[f] for f in order]
        known = [s for s in steps if s is not None]
        assert steps == known + [None] * (len(steps) - len(known)), "features that never formed should come last"
        assert known == sorted(known, reverse=direction == "descending"), f"not sorted {direction}: {known}"
        browser.execute_script("document.getElementById('direction').click()")

    # A deep link opens the right feature; so does a click in the list.
    target = sorted(features)[len(features) // 2]
    open_explorer(browser, smoke_html, f"#feature-{target}")
    opened = wait_until(browser, "const d = document.getElementById('detail'); return d.dataset.feature === arguments[0] "
                                 "&& d.querySelector('svg') !== null ? d.querySelector('h2').textContent : ''", str(target))
    assert opened == f"Feature {target}"
    other = browser.execute_script("return Number(document.querySelector('#rows tr[data-feature]:not(.selected)').dataset.feature)")
    browser.execute_script("document.querySelector(`#rows tr[data-feature=\"${arguments[0]}\"] td`).click()", other)
    assert wait_until(browser, "return document.getElementById('detail').dataset.feature === arguments[0]", str(other))
    assert browser.execute_script("return location.hash") == f"#feature-{other}"

    # Everything the page loaded from disk is a file beside it (Chromium keeps no resource timings for file://).
    sources = browser.execute_script(
        "return Array.from(document.querySelectorAll('script[src], link[href], img[src]'), (e) => e.src || e.href)")
    assert any("explorer-data/detail-" in s for s in sources), sources
    assert all(s.startswith("file://") for s in sources), sources


def test_explorer_fetches_nothing_from_the_network(smoke_html, base_url, browser):
    """Served over HTTP, where the browser records every request: a search and a detail view load
    only the book's own files."""
    target = sorted(explorer_features(smoke_html))[0]
    browser.get(urllib.parse.urljoin(base_url, f"explorer.html#feature-{target}"))
    assert browser.execute_async_script(WAIT_FOR_EXPLORER) is True
    assert wait_until(browser, "return document.getElementById('detail').dataset.feature === arguments[0]", str(target))
    feature, word = rarest_focus_token(smoke_html)
    browser.execute_script(
        "const box = document.getElementById('search'); box.value = arguments[0]; box.dispatchEvent(new Event('input'));", word)
    assert wait_until(browser, "return document.getElementById('count').textContent.indexOf('match') >= 0")
    resources = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert any("explorer-data/search-" in r for r in resources) and any("explorer-data/detail-" in r for r in resources), resources
    assert all(r.startswith(base_url) for r in resources), [r for r in resources if not r.startswith(base_url)]


def test_chapters_3_to_5_link_their_features_to_the_explorer(smoke_html):
    features = explorer_features(smoke_html)
    for chapter in ("03_feature_emergence", "04_complexity", "05_circuits"):
        page = (smoke_html / "chapters" / f"{chapter}.html").read_text()
        linked = {int(n) for n in re.findall(r'href="\.\./explorer\.html#feature-(\d+)"', page)}
        assert linked, f"chapter {chapter} links no feature to the explorer"
        assert linked <= features, f"chapter {chapter} links features the explorer does not list: {sorted(linked - features)}"
