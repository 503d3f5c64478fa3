"""The activation cache on a tiny random GPT-NeoX suite (d=32, 2 layers, 3 steps; CPU, seconds).

The kill -9 and concurrency trials fork build processes from one pre-imported helper process
(a "zygote"), so each trial costs a fraction of a second instead of a fresh torch import.
"""

from __future__ import annotations

import json
import os
import random
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from crosslib.activations import cache as cache_module
from crosslib.activations import store as store_module
from crosslib.activations.cache import CacheConfig, CacheError, build_store, build_stores, store_path
from crosslib.activations.sources import RowPermutation
from crosslib.activations.store import KIND, ActivationStore, open_store
from crosslib.artifacts import STAMP_FILE, ArtifactError
from crosslib.config import ParameterError
from crosslib.models.hooks import capture

REPO = Path(__file__).resolve().parents[2]
D, LAYERS, VOCAB, CONTEXT = 32, 2, 64, 16
STEPS = (0, 1, 2)
HOOK = "blocks.1.hook_resid_post"
HOOKS = ("blocks.0.hook_resid_post", HOOK, "blocks.1.hook_attn_out")  # built together in one pass


# --------------------------------------------------------------------------- fixtures


def save_step(folder: Path, *, d: int = D, seed: int = 0, nan: bool = False) -> None:
    """A random GPT-NeoX checkpoint as crosslib.models.suite writes one: safetensors + checksums.json."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from crosslib.artifacts import sha256_file

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=d, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=2 * d,
        max_position_embeddings=CONTEXT, rotary_pct=0.25, use_parallel_residual=True,
    )
    model = GPTNeoXForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if nan and "layers.0.mlp" in name:
                p.fill_(float("nan"))
            elif "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    sums = {name: sha256_file(folder / name) for name in ("model.safetensors", "config.json")}
    (folder / "checksums.json").write_text(json.dumps(sums))


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("suite")
    for step in STEPS:
        save_step(root / f"step{step}", seed=step)
    return root


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, size=(40, CONTEXT)).astype(np.int64)


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(suite: Path, **changes) -> CacheConfig:
    base = dict(suite=str(suite), steps=STEPS, hook=HOOK, dtype="float16", batch_size=3, chunk_tokens=32,
                eval_fraction=0.25)
    base.update(changes)
    return CacheConfig(**base)


@pytest.fixture(scope="module")
def store(suite, windows, tmp_path_factory) -> ActivationStore:
    return build_store(cfg(suite), windows, root=tmp_path_factory.mktemp("data"), progress=False)


def published(root: Path) -> list[str]:
    """Everything under <root>/activations except lock files."""
    folder = root / KIND
    return sorted(p.name for p in folder.iterdir() if p.suffix != ".lock") if folder.is_dir() else []


def store_bytes(path: Path) -> dict[str, bytes]:
    """Every file of a store except the verification stamp (modification times, not content)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != STAMP_FILE}


# --------------------------------------------------------------------------- building


def test_config_validation(suite):
    with pytest.raises(ParameterError, match="dtype="):
        cfg(suite, dtype="int8")
    with pytest.raises(ParameterError, match="steps="):
        cfg(suite, steps=(2, 1))
    with pytest.raises(ParameterError, match="hook=.*blocks.{L}.hook_resid_post"):
        cfg(suite, hook="blocks.1.resid")
    with pytest.raises(ParameterError, match="eval_fraction="):
        cfg(suite, eval_fraction=1.0)
    with pytest.raises(ParameterError, match="device="):
        cfg(suite, device="tpu")
    with pytest.raises(ParameterError, match="unknown parameter 'layer'"):
        CacheConfig.from_dict({**cfg(suite).to_dict(), "layer": 3})
    assert CacheConfig.from_dict(json.loads(cfg(suite).to_json())) == cfg(suite)


def test_store_holds_the_models_activations(store, suite, windows):
    from crosslib.models.snapshots import load_snapshot

    assert store.steps == list(STEPS) and store.hook == HOOK and store.d_model == D
    assert store.n_snapshots == 3 and store.context_length == CONTEXT and store.n_windows == 40
    assert store.n_tokens == 40 * CONTEXT and len(store.split_rows("eval")) == 10 * CONTEXT
    np.testing.assert_array_equal(store.tokens, windows)
    raw = store.rows("all", normalise=False)
    assert raw.shape == (store.n_tokens, 3, D) and raw.dtype == torch.float32
    for i, step in enumerate(STEPS):
        model, _ = load_snapshot(suite, step, with_tokenizer=False)
        with torch.no_grad():
            expected = capture(model, HOOK, torch.from_numpy(windows))
            hidden = model(torch.from_numpy(windows), output_hidden_states=True).hidden_states
            # the last layer's resid_post is HF's last hidden state before the final layer norm
            torch.testing.assert_close(model.gpt_neox.final_layer_norm(expected), hidden[LAYERS], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(raw[:, i].reshape(40, CONTEXT, D), expected.half().float())
        norms = expected.half().float().norm(dim=-1).double().mean()
        assert store.mean_norms[i] == pytest.approx(float(norms), rel=1e-9)
    manifest = store.manifest
    assert manifest["n_chunks"] == 20 and len(manifest["snapshots"][0]["chunks"]) == 20
    assert {"model_type", "weights", "tokens", "dtype"} <= set(manifest)


def test_asking_again_returns_the_store_without_computing(store, suite, windows, monkeypatch):
    monkeypatch.setattr(cache_module, "_build", lambda *a, **k: pytest.fail("rebuilt an existing store"))
    again = build_store(cfg(suite), windows, root=store.path.parent.parent, progress=False)
    assert again.path == store.path


def test_key_hashes_content_not_paths(store, suite, windows, tmp_path):
    root = store.path.parent.parent

    def key_of(config, tokens):
        return store_path(config, tokens, root=root).name

    assert store_path(cfg(suite), windows, root=root) == store.path
    # the same weights in another folder: the same store
    copy = tmp_path / "copy"
    shutil.copytree(suite, copy)
    assert key_of(cfg(copy), windows) == store.path.name
    # the same tokens as another dtype: the same store
    assert key_of(cfg(suite), windows.astype(np.int32)) == store.path.name
    # other tokens, another hook, other options, other weights: new keys
    other_tokens = windows.copy()
    other_tokens[0, 0] = (other_tokens[0, 0] + 1) % VOCAB
    keys = {
        key_of(cfg(suite), other_tokens),
        key_of(cfg(suite), windows[:-1]),
        key_of(cfg(suite, hook="blocks.0.hook_mlp_out"), windows),
        key_of(cfg(suite, dtype="float32"), windows),
        key_of(cfg(suite, steps=(0, 2)), windows),
    }
    save_step(copy / "step1", seed=99)
    keys.add(key_of(cfg(copy), windows))
    assert len(keys) == 6 and store.path.name not in keys
    assert published(root) == [store.path.name]  # asking for a path builds nothing


def test_dtypes_round_trip(suite, windows, tmp_path):
    tokens = windows[:8]
    stores = {
        dtype: build_store(cfg(suite, dtype=dtype, steps=(2,), eval_fraction=0.0), tokens, root=tmp_path, progress=False)
        for dtype in ("float32", "bfloat16", "float16")
    }
    exact = stores["float32"].rows("all", normalise=False)
    torch.testing.assert_close(stores["bfloat16"].rows("all", normalise=False), exact.bfloat16().float())
    torch.testing.assert_close(stores["float16"].rows("all", normalise=False), exact.half().float())
    assert len({s.path for s in stores.values()}) == 3


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_stop_early_and_publish_nothing(suite, windows, tmp_path):
    root = tmp_path / "data"
    with pytest.raises(ParameterError, match="n_layers=2"):
        build_store(cfg(suite, hook="blocks.2.hook_resid_post"), windows, root=root)
    with pytest.raises(ParameterError, match="parallel residual"):
        build_store(cfg(suite, hook="blocks.0.hook_resid_mid"), windows, root=root)
    with pytest.raises(ParameterError, match="hook="):
        build_store(cfg(suite).replace(hook="blocks.0.hook_q"), windows, root=root)
    with pytest.raises(ParameterError, match="vocabulary"):
        build_store(cfg(suite), windows + VOCAB, root=root)
    with pytest.raises(ParameterError, match="max_position_embeddings"):
        build_store(cfg(suite), np.zeros((4, CONTEXT + 1), dtype=np.int64), root=root)
    with pytest.raises(ParameterError, match="token_windows"):
        build_store(cfg(suite), windows.astype(np.float32), root=root)
    with pytest.raises(ParameterError, match="eval_fraction"):
        build_store(cfg(suite), windows[:1], root=root)
    from crosslib.models.snapshots import SnapshotError

    with pytest.raises(SnapshotError, match="step=7"):
        build_store(cfg(suite, steps=(0, 7)), windows, root=root)
    assert published(root) == []


def test_different_d_is_refused(suite, windows, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(suite / "step0", mixed / "step0")
    save_step(mixed / "step5", d=48)
    root = tmp_path / "data"
    with pytest.raises(ParameterError, match=r"different d_model \({0: 32, 5: 48}\)"):
        build_store(cfg(mixed, steps=(0, 5)), windows, root=root)
    assert published(root) == []


def test_nan_activations_are_refused(suite, windows, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(suite / "step0", broken / "step0")
    save_step(broken / "step3", nan=True)
    root = tmp_path / "data"
    with pytest.raises(CacheError, match="non-finite activations .* at step 3.*chunk 0"):
        build_store(cfg(broken, steps=(0, 3)), windows, root=root, progress=False)
    assert published(root) == []  # not even a .partial folder


def test_short_disk_is_refused(suite, windows, tmp_path, monkeypatch, capsys):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(cache_module, "_disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    root = tmp_path / "data"
    with pytest.raises(CacheError, match="not enough free disk .* needs 122.5 KiB"):
        build_store(cfg(suite), windows, root=root)
    assert "640 tokens x d=32 x 2 B (float16) x 3 snapshots = 120.0 KiB (+ 2.5 KiB of tokens)" in capsys.readouterr().err
    assert published(root) == []


# --------------------------------------------------------------------------- corruption


def test_stores_built_together_are_the_stores_built_alone(store, suite, windows, tmp_path, monkeypatch):
    """build_stores runs each snapshot once per batch for every hook; each store has build_store's bytes."""
    passes = []
    original = cache_module.capture_all
    monkeypatch.setattr(cache_module, "capture_all",
                        lambda model, points, ids: passes.append(len(points)) or original(model, points, ids))
    configs = [cfg(suite, hook=hook) for hook in HOOKS]
    together = build_stores(configs, windows, root=tmp_path / "data", progress=False)
    assert passes == [len(HOOKS)] * (store.manifest["n_chunks"] * len(STEPS))  # a batch per chunk here
    assert together[1].path == store_path(configs[1], windows, root=tmp_path / "data")
    assert store_bytes(together[1].path) == store_bytes(store.path)
    monkeypatch.undo()
    for config, built in zip(configs, together):
        alone = build_store(config, windows, root=tmp_path / "alone", progress=False)
        assert built.path.name == alone.path.name and store_bytes(built.path) == store_bytes(alone.path)
        assert built.manifest["hook"] == config.hook


def test_build_stores_builds_only_the_missing_ones(store, suite, windows, tmp_path, monkeypatch):
    root = tmp_path / "data"
    first = build_store(cfg(suite), windows, root=root, progress=False)
    before = {p: p.stat().st_mtime_ns for p in first.path.rglob("*") if p.is_file()}
    passes = []
    original = cache_module.capture_all
    monkeypatch.setattr(cache_module, "capture_all",
                        lambda model, points, ids: passes.append(len(points)) or original(model, points, ids))
    stores = build_stores([cfg(suite, hook=hook) for hook in HOOKS], windows, root=root, progress=False)
    assert stores[1].path == first.path and set(passes) == {len(HOOKS) - 1}
    assert {p: p.stat().st_mtime_ns for p in first.path.rglob("*") if p.is_file() and p.name != STAMP_FILE} == {
        p: t for p, t in before.items() if p.name != STAMP_FILE}


def test_stores_that_differ_in_more_than_the_hook_are_not_built_together(suite, windows, tmp_path):
    root = tmp_path / "data"
    for configs in ([cfg(suite), cfg(suite, hook=HOOKS[0], dtype="float32")], [cfg(suite), cfg(suite)], []):
        with pytest.raises(ParameterError, match="configs="):
            build_stores(configs, windows, root=root, progress=False)
    assert published(root) == []


def test_flipped_byte_names_file_and_chunk(store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store.path, copy)
    open_store(copy)  # intact
    row_bytes = D * 2
    chunk_bytes = 2 * CONTEXT * row_bytes  # chunk_tokens=32 -> 2 windows per chunk
    target = copy / "acts" / "step1.bin"
    data = bytearray(target.read_bytes())
    data[7 * chunk_bytes + 123] ^= 0x10
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"acts/step1\.bin: chunk 7 \(rows 224\.\.255\)"):
        open_store(copy)
    assert open_store(copy, verify=False).n_tokens == store.n_tokens  # opt-out exists
    tokens = copy / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    data[5] ^= 1
    tokens.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"tokens\.bin does not match"):
        open_store(copy)
    (copy / "acts" / "step2.bin").write_bytes(b"short")
    with pytest.raises(ArtifactError, match=r"step2\.bin has 5 bytes"):
        open_store(copy)
    with pytest.raises(ArtifactError, match="not a complete activation store"):
        open_store(tmp_path / "nothing")


# --------------------------------------------------------------------------- kill -9 and concurrency

ZYGOTE = r"""
import json, os, sys, traceback
import numpy as np
import torch
torch.set_num_threads(1)
from crosslib.activations.cache import CacheConfig, build_stores
from crosslib.models.snapshots import load_snapshot
load_snapshot(sys.argv[1], 0, with_tokenizer=False)  # import transformers' lazy modules once, here
print("ready", flush=True)
for line in sys.stdin:
    jobs = json.loads(line)
    pids = []
    for job in jobs:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                stores = build_stores([CacheConfig.from_dict(c) for c in job["configs"]], np.load(job["tokens"]),
                                      root=job["root"], progress=False)
                with open(job["result"], "w") as f:
                    f.write("\n".join(str(store.path) for store in stores))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        pids.append(pid)
    print(json.dumps(pids), flush=True)
    print(json.dumps([os.waitpid(pid, 0)[1] for pid in pids]), flush=True)
"""


class Zygote:
    def __init__(self, suite: Path):
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(suite)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=env, cwd=REPO,
        )

        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def readline(self, timeout: float = 120) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the build helper process did not answer (rc={self.proc.poll()})") from None
        return line.strip()

    def start(self, jobs: list[dict]) -> list[int]:
        if not hasattr(self, "ready"):
            assert self.readline() == "ready"
            self.ready = True
        self.proc.stdin.write(json.dumps(jobs) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.readline())

    def wait(self) -> list[int]:
        return json.loads(self.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def zygote(suite):
    z = Zygote(suite)  # starts importing now, while other tests run
    yield z
    z.close()


def job(config: CacheConfig | list[CacheConfig], tokens_file: Path, root: Path, name: str) -> dict:
    configs = config if isinstance(config, list) else [config]
    return {"configs": [c.to_dict() for c in configs], "tokens": str(tokens_file), "root": str(root),
            "log": str(root.parent / f"{name}.log"), "result": str(root.parent / f"{name}.result")}


def finished_chunks(root: Path) -> int:
    """Chunks a (killed) build recorded as finished in its progress logs."""
    return sum(len(cache_module._read_progress(log)) for log in (root / KIND).glob("*.partial/progress/*.jsonl"))


def test_kill_9_then_rebuild_gives_identical_bytes(store, suite, windows, zygote, tmp_path, monkeypatch):
    rng = random.Random(1234)
    tokens_file = tmp_path / "tokens.npy"
    np.save(tokens_file, windows, allow_pickle=False)
    reference = store_bytes(store.path)
    total_chunks = store.manifest["n_chunks"] * len(STEPS)
    killed = 0
    for trial in range(5):
        root = tmp_path / f"trial{trial}" / "data"
        root.mkdir(parents=True)
        for attempt in range(2):  # kill a fresh build, then kill its resumption
            after = rng.randrange(0, total_chunks - 4)
            (pid,) = zygote.start([job(cfg(suite), tokens_file, root, f"a{attempt}")])
            deadline = time.monotonic() + 60
            while finished_chunks(root) < after and time.monotonic() < deadline:
                if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                    break
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.01))
            os.kill(pid, signal.SIGKILL)
            (status,) = zygote.wait()
            log_file = root.parent / f"a{attempt}.log"  # absent when killed right after the fork
            log = log_file.read_text() if log_file.exists() else ""
            assert os.WIFSIGNALED(status) or os.waitstatus_to_exitcode(status) == 0, log
            killed += os.WIFSIGNALED(status)
        # resume in this process: finished chunks are kept, the rest computed, bytes as uninterrupted
        kept = finished_chunks(root)
        calls = []
        original = cache_module._compute_chunk
        monkeypatch.setattr(cache_module, "_compute_chunk", lambda *a, **k: calls.append(1) or original(*a, **k))
        resumed = build_store(cfg(suite), windows, root=root, progress=False)
        monkeypatch.undo()
        assert len(calls) <= total_chunks - kept, (len(calls), kept)
        assert resumed.path.name == store.path.name
        assert store_bytes(resumed.path) == reference
        assert published(root) == [store.path.name]
    assert killed >= 8, f"only {killed} of 10 builds were killed mid-way"


def test_kill_9_then_rebuild_of_stores_built_together_gives_their_bytes(suite, windows, zygote, tmp_path):
    """Several hooks' stores built in one pass, killed and resumed: the bytes of each store built alone."""
    rng = random.Random(99)
    tokens_file = tmp_path / "tokens.npy"
    np.save(tokens_file, windows, allow_pickle=False)
    configs = [cfg(suite, hook=hook) for hook in HOOKS[:2]]
    alone = [build_store(config, windows, root=tmp_path / "alone", progress=False) for config in configs]
    total_chunks = alone[0].manifest["n_chunks"] * len(STEPS) * len(configs)
    killed = 0
    for trial in range(3):
        root = tmp_path / f"trial{trial}" / "data"
        root.mkdir(parents=True)
        for attempt in range(2):
            after = rng.randrange(0, total_chunks - 8)
            (pid,) = zygote.start([job(configs, tokens_file, root, f"b{attempt}")])
            deadline = time.monotonic() + 60
            while finished_chunks(root) < after and time.monotonic() < deadline:
                if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                    break
                time.sleep(0.001)
            os.kill(pid, signal.SIGKILL)
            (status,) = zygote.wait()
            killed += os.WIFSIGNALED(status)
        resumed = build_stores(configs, windows, root=root, progress=False)
        for built, reference in zip(resumed, alone):
            assert built.path.name == reference.path.name
            assert store_bytes(built.path) == store_bytes(reference.path)
        assert published(root) == sorted(reference.path.name for reference in alone)
    assert killed >= 4, f"only {killed} of 6 builds were killed mid-way"


def test_builders_of_overlapping_sets_of_stores_make_each_store_once(store, suite, windows, zygote, tmp_path):
    """Two processes asking for the same stores in opposite orders: no deadlock (one lock order), one of each."""
    tokens_file = tmp_path / "tokens.npy"
    np.save(tokens_file, windows, allow_pickle=False)
    root = tmp_path / "data"
    forward, backward = [cfg(suite, hook=hook) for hook in HOOKS[:2]], [cfg(suite, hook=hook) for hook in HOOKS[1::-1]]
    pids = zygote.start([job(forward, tokens_file, root, "one"), job(backward, tokens_file, root, "two")])
    assert len(pids) == 2
    statuses = zygote.wait()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("one", "two")}
    assert statuses == [0, 0], logs
    one, two = ((tmp_path / f"{name}.result").read_text().splitlines() for name in ("one", "two"))
    assert one == two[::-1] and store.path.name in {Path(p).name for p in one}
    assert published(root) == sorted(Path(p).name for p in one)  # two stores, no .partial left


def test_temp_files_left_by_a_kill_are_not_published(store, suite, windows, tmp_path):
    """A kill between an atomic write's temp file and its rename leaves `.name.XXXX.tmp` behind."""
    root = tmp_path / "data"
    partial = store_path(cfg(suite), windows, root=root).with_name(store.path.name + ".partial")
    (partial / "acts").mkdir(parents=True)
    (partial / ".manifest.json.abc123.tmp").write_text("{")
    (partial / "acts" / "step0.bin.tmp").write_bytes(b"x")
    built = build_store(cfg(suite), windows, root=root, progress=False)
    assert store_bytes(built.path) == store_bytes(store.path)


def test_concurrent_builders_make_one_store(store, suite, windows, zygote, tmp_path):
    tokens_file = tmp_path / "tokens.npy"
    np.save(tokens_file, windows, allow_pickle=False)
    root = tmp_path / "data"
    pids = zygote.start([job(cfg(suite), tokens_file, root, "one"), job(cfg(suite), tokens_file, root, "two")])
    assert len(pids) == 2
    statuses = zygote.wait()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("one", "two")}
    assert statuses == [0, 0], logs
    paths = {(tmp_path / f"{name}.result").read_text() for name in ("one", "two")}
    assert paths == {str(root / KIND / store.path.name)}
    assert published(root) == [store.path.name]  # one store, no .partial left
    assert store_bytes(root / KIND / store.path.name) == store_bytes(store.path)


# --------------------------------------------------------------------------- reading


def test_row_permutation_is_a_bijection_per_epoch():
    for n in (1, 2, 3, 17, 64, 1000, 4099):
        perm = RowPermutation(n, seed=5)
        first, second = perm(np.arange(n)), perm(np.arange(n, 2 * n))
        assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
        if n > 16:
            assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(n))
    assert not np.array_equal(RowPermutation(1000, 0)(np.arange(50)), RowPermutation(1000, 1)(np.arange(50)))


def test_batches_are_deterministic_resumable_and_aligned(store):
    def take(it, k):
        return [next(it) for _ in range(k)]

    first = take(store.batches(64, seed=3), 12)  # 30 train windows * 16 = 480 rows: crosses epochs
    again = take(store.batches(64, seed=3), 12)
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    resumed = take(store.batches(64, seed=3, start_batch=7), 5)
    for a, b in zip(first[7:], resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = next(store.batches(64, seed=4))
    assert not torch.equal(first[0], other)
    assert first[0].shape == (64, 3, D) and first[0].dtype == torch.float32

    # rows are aligned across snapshots: each batch row is one store row in every snapshot
    everything = store.rows("all", normalise=False)
    n_train = len(store.split_rows("train"))
    batch = next(store.batches(64, seed=3, start_batch=7, normalise=False))
    rows = RowPermutation(n_train, 3)(np.arange(7 * 64, 8 * 64))
    torch.testing.assert_close(batch, everything[torch.from_numpy(rows)], rtol=0, atol=0)

    # one epoch of train batches visits every train row once; eval batches only see eval rows
    epoch = torch.cat(take(store.batches(48, seed=0, normalise=False), n_train // 48))
    key = lambda t: sorted(map(tuple, t[:, 0].tolist()))  # noqa: E731
    assert key(epoch) == key(everything[:n_train])
    eval_batch = next(store.batches(32, split="eval", normalise=False))
    eval_rows = {tuple(r) for r in everything[n_train:, 0].tolist()}
    assert all(tuple(r) in eval_rows for r in eval_batch[:, 0].tolist())
    with pytest.raises(ParameterError, match="split="):
        store.batches(8, split="test")
    half = next(store.batches(8, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16


def test_a_tensor_source_over_the_same_rows_gives_the_same_batches(store):
    """Split, shuffle and batching belong to RowSource: only where the rows live differs."""
    from crosslib.activations.sources import RowSource, TensorSource

    raw = store.rows("all", normalise=False)
    memory = TensorSource(raw, steps=store.steps, eval_fraction=store.config.eval_fraction,
                          _norm_factors=store.norm_factors)
    assert isinstance(memory, RowSource) and isinstance(store, RowSource)
    for split in ("train", "eval", "all"):
        assert memory.split_rows(split) == store.split_rows(split)
        torch.testing.assert_close(memory.rows(split, start=3, limit=50), store.rows(split, start=3, limit=50),
                                   rtol=0, atol=0)
    for seed, split, start_batch, normalise in [(0, "train", 0, True), (3, "train", 11, False), (5, "eval", 2, True),
                                                (1, "all", 4, True)]:
        streams = [source.batches(64, seed=seed, split=split, start_batch=start_batch, normalise=normalise)
                   for source in (memory, store)]
        for _ in range(10):  # 640 rows > one epoch of either split
            torch.testing.assert_close(next(streams[0]), next(streams[1]), rtol=0, atol=0)
    views = memory.select(steps=[2, 0]), store.select(steps=[2, 0])
    torch.testing.assert_close(next(views[0].batches(32, seed=7)), next(views[1].batches(32, seed=7)), rtol=0, atol=0)


def test_normalisation_gives_mean_norm_sqrt_d(store):
    x = store.rows("all")
    norms = x.double().norm(dim=-1).mean(dim=0)
    torch.testing.assert_close(norms, torch.full((3,), D**0.5, dtype=torch.float64), rtol=1e-5, atol=0)
    raw = store.rows("all", normalise=False)
    torch.testing.assert_close(raw.double().norm(dim=-1).mean(dim=0), torch.from_numpy(store.mean_norms),
                               rtol=1e-6, atol=0)
    assert not np.allclose(store.mean_norms, D**0.5)


def test_select_rows_and_context(store, windows):
    view = store.select(steps=[2])
    assert view.steps == [2] and view.n_snapshots == 1 and view.mean_norms.shape == (1,)
    full = next(store.batches(16, seed=1, start_batch=3))
    torch.testing.assert_close(next(view.batches(16, seed=1, start_batch=3)), full[:, 2:3], rtol=0, atol=0)
    both = store.select(indices=[2, 0])
    assert both.steps == [2, 0]
    torch.testing.assert_close(both.rows("eval", limit=5), store.rows("eval", limit=5)[:, [2, 0]])
    with pytest.raises(ParameterError, match=r"choose among this store's steps \[0, 1, 2\]"):
        store.select(steps=[4])
    with pytest.raises(ParameterError, match="exactly one"):
        store.select()

    eval_rows = store.rows("eval")
    assert eval_rows.shape == (10 * CONTEXT, 3, D)
    torch.testing.assert_close(store.rows("eval", start=20, limit=7), eval_rows[20:27])
    tokens, acts = store.context(33)
    np.testing.assert_array_equal(tokens, windows[33])
    first_eval = store.n_train_windows
    torch.testing.assert_close(acts, eval_rows[(33 - first_eval) * CONTEXT : (34 - first_eval) * CONTEXT])
    tokens, one = store.context(33, 5)
    torch.testing.assert_close(one, acts[5])
    row = store.row_index(33, 5)
    assert row == 33 * CONTEXT + 5 and store.window_position(row) == (33, 5)
    w, p = store.window_position(np.array([0, 17, 639]))
    assert w.tolist() == [0, 1, 39] and p.tolist() == [0, 1, 15]
    with pytest.raises(ParameterError, match="window="):
        store.context(40)
    with pytest.raises(ParameterError, match="position="):
        store.row_index(0, CONTEXT)


def test_loader_reads_only_the_rows_it_needs(store, monkeypatch):
    """Memory independent of n_tokens: every read is at most one batch of rows per snapshot."""
    reads: list[int] = []
    read, read_range = ActivationStore._read, ActivationStore._read_range
    monkeypatch.setattr(ActivationStore, "_read", lambda self, i, rows: reads.append(len(rows)) or read(self, i, rows))
    monkeypatch.setattr(
        ActivationStore, "_read_range",
        lambda self, i, a, b: reads.append(b - a) or read_range(self, i, a, b),
    )
    monkeypatch.setattr(np.memmap, "__array__", lambda *a, **k: pytest.fail("a whole array was read"), raising=False)
    it = store.batches(8, seed=0)
    for _ in range(20):
        next(it)
    store.rows("eval", limit=8)
    store.context(3)
    assert reads and max(reads) <= CONTEXT
    assert len(reads) == 20 * 3 + 3 + 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_cuda_build_matches_cpu(store, suite, windows, tmp_path):
    gpu = build_store(cfg(suite, device="cuda"), windows, root=tmp_path, progress=False)
    torch.testing.assert_close(gpu.rows("all", normalise=False), store.rows("all", normalise=False),
                               rtol=2e-3, atol=2e-3)
    batch = next(gpu.batches(16, device="cuda"))
    assert batch.device.type == "cuda"


# --------------------------------------------------------------------------- verify once, then stamp


def _age(folder: Path, seconds: float = 60) -> None:
    """Make every file look last modified `seconds` ago (older than the racy-write window)."""
    past = time.time() - seconds
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, (past, past))


def test_store_is_hashed_once_then_opened_by_stamp_and_verify_command_rehashes(store, tmp_path, monkeypatch, capsys):
    from crosslib.cli import main

    copy = tmp_path / "data" / KIND / store.path.name
    shutil.copytree(store.path, copy)
    (copy / STAMP_FILE).unlink(missing_ok=True)
    _age(copy)
    hashed = []
    real_chunk_sha = store_module.chunk_sha256
    monkeypatch.setattr(store_module, "chunk_sha256", lambda *a: hashed.append(1) or real_chunk_sha(*a))
    open_store(copy)
    first = len(hashed)
    assert first > 0  # the first open hashes every chunk
    open_store(copy)
    assert len(hashed) == first  # unchanged since verified: sizes and stamps only

    # A flipped byte changes the modification time: the next open re-hashes and names the directory.
    target = copy / "acts" / "step1.bin"
    data = bytearray(target.read_bytes())
    data[100] ^= 0x10
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"Delete the directory {copy} and re-run `crosslib book`"):
        open_store(copy)

    # One that keeps the modification time is caught by the full check on demand.
    data[100] ^= 0x10
    target.write_bytes(bytes(data))
    _age(copy)
    open_store(copy)  # re-verified and stamped
    stat = target.stat()
    data[100] ^= 0x10
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    open_store(copy)  # the cheap check cannot see it
    with pytest.raises(ArtifactError, match="chunk"):
        open_store(copy, verify="full")
    monkeypatch.setenv("CROSSLIB_DATA", str(tmp_path / "data"))
    capsys.readouterr()
    assert main(["verify"]) == 1
    out = capsys.readouterr()
    assert "1 corrupted" in out.out and f"Delete the directory {copy}" in out.err


def test_derived_tables_carry_checksums_and_are_verified(tmp_path):
    from crosslib.artifacts import CHECKSUMS_FILE, build_artifact, verify_artifact
    from crosslib.config import Config
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class TableKey(Config):
        n: int = 3

    def build(folder: Path) -> None:
        (folder / "metrics.csv").write_text("step,loss\n0,5.0\n1,4.0\n")
        (folder / "metrics.json").write_text('{"loss": 4.0}\n')

    folder = build_artifact("tables", TableKey(), build, root=tmp_path)
    sums = json.loads((folder / CHECKSUMS_FILE).read_text())
    assert set(sums) == {"metrics.csv", "metrics.json"}
    assert build_artifact("tables", TableKey(), build, root=tmp_path) == folder  # intact: accepted
    (folder / "metrics.csv").write_text("step,loss\n0,5.0\n1,0.0\n")  # same size, other numbers
    with pytest.raises(ArtifactError, match=r"metrics\.csv does not match its checksum.*Delete the directory"):
        build_artifact("tables", TableKey(), build, root=tmp_path)
    (folder / "metrics.json").unlink()
    with pytest.raises(ArtifactError, match=r"metrics\.json is missing"):
        verify_artifact(folder)


def test_the_cache_is_bit_for_bit_the_same_at_any_thread_count(tmp_path):
    """The thread count follows the machine's load (crosslib.runtime.follow_load): at the tiny suite's width
    (d 128, batches of 1024 tokens), one and two threads cache the same bytes."""
    for step in (0, 1):
        save_step(tmp_path / "suite" / f"step{step}", d=128, seed=step)
    windows = np.random.default_rng(1).integers(0, VOCAB, size=(128, CONTEXT))
    config = CacheConfig(suite=str(tmp_path / "suite"), steps=(0, 1), hook=HOOK, dtype="float32", batch_size=64,
                         eval_fraction=0.0)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        store = build_store(config, windows, root=tmp_path / f"data{threads}", progress=False)
        rows.append(store.rows("all", normalise=False))
    assert torch.equal(rows[0], rows[1])


def test_caching_progress_goes_to_the_book_runners_log(suite, windows, tmp_path, monkeypatch):
    from crosslib.progress import PROGRESS_LOG_ENV

    log = tmp_path / "progress.log"
    monkeypatch.setenv(PROGRESS_LOG_ENV, str(log))  # as `crosslib book` sets it for a chapter's kernel
    build_store(cfg(suite, steps=(0,)), windows[:8], root=tmp_path)
    assert any(line.startswith(f"caching {HOOK}") and "100%" in line for line in log.read_text().splitlines())
