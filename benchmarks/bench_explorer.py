"""The feature explorer's page weight and load time, with a synthetic dictionary of each size.

    .venv/bin/python benchmarks/bench_explorer.py                      # 512 and 32,768 features
    .venv/bin/python benchmarks/bench_explorer.py --features 512 --repeats 5

For each size it builds a random JumpReLU crosscoder over S = 8 snapshots (d_model = 32, random
decoder-norm trajectories that form at random snapshots, about 2% of positions active) and a
synthetic held-out store (256 windows × 32 tokens over a vocabulary of 2,000 made-up words), runs
`crosslib.analyses.explorer.prepare_explorer` on it (the real code path: top contexts, context-depth
scores, search index, shards), writes the page, and opens it from disk (file://) in headless
Chromium. It reports:

* bytes: what opening the page loads (page, script, style, index), the largest detail shard,
  the search vocabulary, and everything on disk;
* load: from navigation start to the list being rendered (`performance.mark("explorer-ready")`);
* open: from a deep-link hash change to the feature's detail being drawn;
* search: from typing a token to the filtered list (vocabulary and postings shards loaded on
  first use);
* sort: re-sorting the whole list by emergence step.

Times are the median of --repeats fresh page loads (a new Chromium profile per size, so the
second and later loads may come from the page cache: the first load's number is printed too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from crosslib.analyses import explorer  # noqa: E402
from crosslib.runtime import THREADS_ENV, configure_process  # noqa: E402
from crosslib.config import content_hash  # noqa: E402
from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
N_SNAPSHOTS, D_MODEL, VOCAB, N_WINDOWS, CONTEXT = 8, 32, 2000, 256, 32


class SyntheticStore:
    """The parts of an ActivationStore that `feature_activations` reads; all windows held out."""

    def __init__(self, tokens: np.ndarray, activations: torch.Tensor, steps: list[int]):
        self.tokens, self._activations, self.steps = tokens, activations, steps
        self.context_length = tokens.shape[1]
        self.n_snapshots, self.d_model = activations.shape[1], activations.shape[2]
        self.fingerprint = content_hash([tokens.tolist(), steps, float(activations.sum())])

    def split_rows(self, split: str = "eval") -> range:
        return range(0, self.tokens.size)

    def rows(self, split: str = "eval", *, start: int = 0, limit: int | None = None, **_) -> torch.Tensor:
        return self._activations[start : start + (limit or len(self._activations))]


def synthetic(n_features: int, seed: int = 0) -> tuple[Crosscoder, SyntheticStore, list[str]]:
    rng = np.random.default_rng(seed)
    steps = [0, 1, 4, 16, 64, 256, 1000, 2000]
    tokens = rng.integers(0, VOCAB, size=(N_WINDOWS, CONTEXT))
    embedding = torch.from_numpy(rng.standard_normal((VOCAB, D_MODEL)).astype(np.float32))
    x = embedding[torch.from_numpy(tokens.reshape(-1))]
    activations = x[:, None, :].expand(-1, N_SNAPSHOTS, -1).contiguous()
    model = Crosscoder(CrosscoderConfig(n_snapshots=N_SNAPSHOTS, d_model=D_MODEL, dict_size=n_features), initialise=False)
    directions = torch.from_numpy(rng.standard_normal((n_features, D_MODEL)).astype(np.float32))
    directions /= directions.norm(dim=1, keepdim=True)
    forms = rng.integers(0, N_SNAPSHOTS, size=n_features)
    norms = np.clip((np.arange(N_SNAPSHOTS)[:, None] - forms[None] + 1) / 2, 0.02, 1.0).astype(np.float32)
    with torch.no_grad():
        model.W_E.copy_(directions.T[None].expand(N_SNAPSHOTS, -1, -1) / N_SNAPSHOTS)
        model.W_D.copy_(directions[None] * torch.from_numpy(norms)[:, :, None])
        model.b_E.zero_()
        model.b_D.zero_()
        model.log_threshold.fill_(float(np.log(2.0)))  # h ~ N(0, 1): active on about 2% of positions
    words = [f"w{i:04d}" for i in range(VOCAB)]
    return model, SyntheticStore(tokens, activations, steps), words


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(120)
    return driver


WAIT_READY = """
const done = arguments[arguments.length - 1];
(function poll() {
  const mark = performance.getEntriesByName("explorer-ready")[0];
  if (mark) done(mark.startTime); else setTimeout(poll, 5);
})();
"""

TIME_OPEN = """
const feature = arguments[0], done = arguments[arguments.length - 1], t0 = performance.now();
location.hash = "feature-" + feature;
(function poll() {
  const d = document.getElementById("detail");
  if (d.getAttribute("data-feature") === String(feature)) done(performance.now() - t0); else setTimeout(poll, 2);
})();
"""

TIME_SEARCH = """
const word = arguments[0], done = arguments[arguments.length - 1], box = document.getElementById("search");
const t0 = performance.now();
box.value = word;
box.dispatchEvent(new Event("input"));
(function poll() {  // the page waits 150 ms after the last keystroke (debounce): subtract it
  const c = document.getElementById("count").textContent;
  if (c.indexOf("match") >= 0) done(performance.now() - t0 - 150); else setTimeout(poll, 2);
})();
"""

TIME_SORT = """
const t0 = performance.now(), sort = document.getElementById("sort");
sort.value = "emergence_step";
sort.dispatchEvent(new Event("change"));
return performance.now() - t0;
"""


def measure(n_features: int, repeats: int, work: Path) -> dict:
    model, store, words = synthetic(n_features)
    start = time.perf_counter()
    data = explorer.prepare_explorer(model, store, words, root=work / "cache", progress=False)
    prepare_s = time.perf_counter() - start
    page = explorer.write_explorer_page(data, work / f"html-{n_features}")
    weight = explorer.page_weight(data)
    index = explorer.read_data_file(data / explorer.DATA_DIR / "index.js")[1]
    feature = index["columns"]["feature"][len(index["columns"]["feature"]) // 2]
    word = index["columns"]["summary"][len(index["columns"]["feature"]) // 3].split(" · ")[0]
    driver = browser(work / f"profile-{n_features}")
    loads, opens, searches, sorts = [], [], [], []
    try:
        for _ in range(repeats):
            driver.get(page.as_uri())
            loads.append(driver.execute_async_script(WAIT_READY))
            opens.append(driver.execute_async_script(TIME_OPEN, feature))
            searches.append(driver.execute_async_script(TIME_SEARCH, word))
            sorts.append(driver.execute_script(TIME_SORT))
        remote = driver.execute_script(
            "return performance.getEntriesByType('resource').map((e) => e.name).filter((n) => !n.startsWith('file:'))")
    finally:
        driver.quit()
    return {
        "features": n_features,
        "live_features": len(index["columns"]["feature"]),
        "prepare_s": round(prepare_s, 1),
        "bytes": weight,
        "load_ms": {"first": round(loads[0]), "median": round(statistics.median(loads))},
        "open_feature_ms": round(statistics.median(opens)),
        "search_ms": {"first": round(searches[0]), "median": round(statistics.median(searches))},
        "sort_ms": round(statistics.median(sorts)),
        "network_requests": remote,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, nargs="+", default=[512, 32_768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ[THREADS_ENV] = "fixed"  # the thread count is this benchmark's to set
    configure_process()  # crosslib's allocator tuning, as `crosslib book` runs
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-explorer-") as tmp:
        for n in args.features:
            result = measure(n, args.repeats, Path(tmp))
            print(json.dumps(result), flush=True)
            b = result["bytes"]
            print(f"{n:>6} features: opening loads {b['at_open'] / 1e3:,.0f} kB (index {b['index'] / 1e3:,.0f} kB), "
                  f"a detail shard ≤ {b['largest_detail_shard'] / 1e3:,.0f} kB, search vocabulary "
                  f"{b['search_vocabulary'] / 1e3:,.0f} kB, all files {b['total'] / 1e6:,.1f} MB in {b['files']} files; "
                  f"load {result['load_ms']['median']} ms (first {result['load_ms']['first']}), open a feature "
                  f"{result['open_feature_ms']} ms, search {result['search_ms']['median']} ms "
                  f"(first {result['search_ms']['first']}), sort {result['sort_ms']} ms; prepared in {result['prepare_s']} s",
                  flush=True)


if __name__ == "__main__":
    main()
