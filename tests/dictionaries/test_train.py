"""Training: recovery of planted features, exact resume (also after a kill), bad inputs, NaN handling,
caching, the one-pass per-snapshot SAEs, the schedule, the default single-process context, and no
process-wide side effects. Tiny models; ~40 s in all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from crosslib.activations.sources import TensorSource, planted_features
from crosslib.artifacts import ArtifactError
from crosslib.config import ParameterError
from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from crosslib.dictionaries.distributed import SingleProcess
from crosslib.dictionaries import kernels
from crosslib.dictionaries.kernels import ActivePattern, KernelOptions
from crosslib.dictionaries.train import (CHECKPOINT_JSON, DataError, TrainConfig, TrainingDiverged, load_result, train_crosscoder,
                                         train_crosscoder_cached)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    """Same thread count in every run we compare bit for bit (and kind to a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Wrapped:
    """An ActivationSource that passes another's batches through `transform(k, batch)` (same fingerprint)."""

    def __init__(self, inner, transform):
        self.inner, self.transform = inner, transform
        self.steps, self.n_snapshots, self.d_model = inner.steps, inner.n_snapshots, inner.d_model
        self.fingerprint = inner.fingerprint

    def batches(self, batch_size, *, start_batch=0, **kw):
        for k, b in enumerate(self.inner.batches(batch_size, start_batch=start_batch, **kw), start=start_batch):
            yield self.transform(k, b)

    def rows(self, *a, **kw):
        return self.inner.rows(*a, **kw)

    def select(self, *a, **kw):
        return self.inner.select(*a, **kw)


def small_source(seed=1, n_rows=1500, S=3, d=8):
    return planted_features(n_rows=n_rows, n_snapshots=S, d_model=d, n_shared=4, n_partial=4, seed=seed)[0]


SMALL_MODEL = CrosscoderConfig(n_snapshots=3, d_model=8, dict_size=16)
SMALL_TRAIN = TrainConfig(n_steps=20, batch_size=32, lr=3e-3, log_every=5, checkpoint_every=5, eval_rows=64,
                          init_search_rows=64, compile=False, bf16=False)


def same_weights(a: Crosscoder, b: Crosscoder) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ----------------------------------------------------------------------------------- science

def test_crosscoder_recovers_planted_features_shared_and_partial():
    """12 features in all 4 snapshots, 12 in only some: ≥ 90% recovered (cosine ≥ 0.9 at every snapshot
    where present) and near-zero decoder norm where a feature is absent."""
    source, truth = planted_features(n_rows=20_000, n_snapshots=4, d_model=32, n_shared=12, n_partial=12,
                                     density=0.01, seed=0)
    model_config = CrosscoderConfig(n_snapshots=4, d_model=32, dict_size=48, activation="jumprelu", sparsity="l1")
    train_config = TrainConfig(n_steps=800, batch_size=256, lr=3e-3, sparsity_coefficient=3.0, log_every=100,
                               eval_rows=2000, compile=False)  # bf16 autocast (the default) on
    result = train_crosscoder(source, model_config, train_config, progress=False)
    W = result.model.W_D.detach()  # [snapshot, feature, d_model]
    norms = W.norm(dim=-1)
    cos = torch.einsum("sfd,ksd->ksf", W / norms[..., None].clamp_min(1e-9), truth["directions"])
    recovered, absent = 0, []
    for k, present in enumerate(truth["present"]):
        score = cos[k][present].min(0).values  # worst cosine over the snapshots where planted feature k exists
        j = int(score.argmax())
        recovered += float(score[j]) >= 0.9
        relative = norms[:, j] / norms[:, j].max()
        absent += relative[~present].tolist()
    assert recovered >= 0.9 * len(truth["present"]), recovered
    assert len(absent) > 0 and max(absent) < 0.05, max(absent)
    assert min(result.eval["explained_variance"]) > 0.95
    assert result.history[-1]["step"] == 800 and len(result.history) == 8


def test_training_is_deterministic_and_resumes_exactly(tmp_path):
    source = small_source()
    full = train_crosscoder(source, SMALL_MODEL, SMALL_TRAIN, tmp_path / "a", progress=False)
    again = train_crosscoder(source, SMALL_MODEL, SMALL_TRAIN, tmp_path / "b", progress=False)
    assert same_weights(full.model, again.model) and full.history == again.history

    part = train_crosscoder(source, SMALL_MODEL, SMALL_TRAIN, tmp_path / "c", progress=False, stop_after=7)
    assert part.eval == {} and json.loads((tmp_path / "c" / CHECKPOINT_JSON).read_text())["step"] == 7
    resumed = train_crosscoder(source, SMALL_MODEL, SMALL_TRAIN, tmp_path / "c", progress=False)
    assert same_weights(full.model, resumed.model)
    assert resumed.history == full.history and resumed.eval == full.eval
    assert not (tmp_path / "c" / CHECKPOINT_JSON).exists()  # removed once the final model is written
    assert same_weights(load_result(tmp_path / "c").model, full.model)


def test_killed_training_resumes_bit_for_bit(tmp_path):
    """SIGKILL a training subprocess after a checkpoint, resume here: identical to an uninterrupted run."""
    out = tmp_path / "killed"
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)
        from test_train import Wrapped, small_source, SMALL_MODEL, SMALL_TRAIN
        from crosslib.dictionaries.train import train_crosscoder
        slow = Wrapped(small_source(), lambda k, b: (time.sleep(0.1), b)[1])
        train_crosscoder(slow, SMALL_MODEL, SMALL_TRAIN.replace(n_steps=60), {str(out)!r}, progress=False)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            ckpt = out / CHECKPOINT_JSON
            if ckpt.exists() and json.loads(ckpt.read_text())["step"] >= 10:
                break
            if proc.poll() is not None:
                pytest.fail(f"training subprocess ended early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = json.loads((out / CHECKPOINT_JSON).read_text())["step"]
    assert 10 <= killed_at < 60 and not (out / "metrics.json").exists()
    config = SMALL_TRAIN.replace(n_steps=60)
    resumed = train_crosscoder(small_source(), SMALL_MODEL, config, out, progress=False)
    reference = train_crosscoder(small_source(), SMALL_MODEL, config, None, progress=False)
    assert same_weights(resumed.model, reference.model)
    assert resumed.history == reference.history


# ----------------------------------------------------------------------------------- bad input

def test_mismatched_source_is_refused_naming_the_parameter():
    source = small_source()
    with pytest.raises(ParameterError, match="n_snapshots=4") as e:
        train_crosscoder(source, SMALL_MODEL.replace(n_snapshots=4), SMALL_TRAIN, progress=False)
    assert "3 snapshots" in str(e.value)
    with pytest.raises(ParameterError, match="d_model=9"):
        train_crosscoder(source, SMALL_MODEL.replace(d_model=9), SMALL_TRAIN, progress=False)
    with pytest.raises(ParameterError, match="lr="):
        TrainConfig(lr=0)
    with pytest.raises(ParameterError, match="batch_size="):
        TrainConfig(batch_size=0)


def test_nan_in_a_batch_is_an_error_naming_the_batch_and_snapshot():
    def poison(k, b):
        if k == 3:
            b = b.clone()
            b[0, 1, 0] = float("nan")
        return b

    with pytest.raises(DataError, match=r"batch 3 .*snapshot step\(s\) \[1\]"):
        train_crosscoder(Wrapped(small_source(), poison), SMALL_MODEL, SMALL_TRAIN, progress=False)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    def explode(k, b):
        return b * 1e30 if k == 7 else b  # finite inputs, infinite squared error

    with pytest.raises(TrainingDiverged, match="at step 7") as e:
        train_crosscoder(Wrapped(small_source(), explode), SMALL_MODEL, SMALL_TRAIN, tmp_path, progress=False)
    assert e.value.step == 7 and e.value.checkpoint_step == 5
    assert json.loads((tmp_path / CHECKPOINT_JSON).read_text())["step"] == 5
    assert not (tmp_path / "crosscoder.safetensors").exists()
    # the kept checkpoint is good: with clean data the run resumes and matches a clean run
    resumed = train_crosscoder(small_source(), SMALL_MODEL, SMALL_TRAIN, tmp_path, progress=False)
    assert same_weights(resumed.model, train_crosscoder(small_source(), SMALL_MODEL, SMALL_TRAIN, progress=False).model)


def test_out_dir_of_another_run_is_refused(tmp_path):
    source = small_source()
    train_crosscoder(source, SMALL_MODEL, SMALL_TRAIN, tmp_path, progress=False, stop_after=5)
    with pytest.raises(ParameterError, match="another run"):
        train_crosscoder(source, SMALL_MODEL, SMALL_TRAIN.replace(lr=1e-2), tmp_path, progress=False)


# ----------------------------------------------------------------------------------- the recipe

def test_schedule_follows_the_paper():
    c = TrainConfig(n_steps=1000, lr=1e-3, lr_warmup_fraction=0.05, sparsity_coefficient=0.3)
    assert c.lr_at(0) == pytest.approx(1e-3 / 50) and c.lr_at(49) == pytest.approx(1e-3)
    assert c.lr_at(500) == 1e-3 and c.lr_at(799) == 1e-3
    assert c.lr_at(999) == pytest.approx(1e-3 / 32)  # linear decay over the last 20% to lr/32
    assert c.lr_at(899) == pytest.approx(1e-3 * (1 - 0.5 * (1 - 1 / 32)))
    assert c.sparsity_coefficient_at(49) == pytest.approx(0.3 * 50 / 100) and c.sparsity_coefficient_at(100) == 0.3
    assert TrainConfig(n_tokens=10_000, batch_size=2048).total_steps == 5
    tiny_preset = CrosscoderConfig(n_snapshots=16, d_model=128, dict_size=2048)
    assert not TrainConfig(n_steps=100, batch_size=64).use_compile(tiny_preset)  # too small to pay back compiling
    assert TrainConfig(compile=True).use_compile(SMALL_MODEL) and not TrainConfig(compile=False).use_compile(tiny_preset)
    assert TrainConfig(compile=True).kernel_options(SMALL_MODEL, KernelOptions(sparse=False)) == KernelOptions(
        compiled=True, sparse=False)  # compile sets `compiled` and nothing else
    with pytest.raises(ParameterError, match="compile"):
        TrainConfig(compile="yes")


def test_decoder_norm_search_and_metrics_are_recorded():
    result = train_crosscoder(small_source(), SMALL_MODEL, SMALL_TRAIN, progress=False)
    grid = SMALL_TRAIN.init_norm_grid
    assert set(result.init["mse"]) == {repr(float(v)) for v in grid}
    assert result.init["mse"][repr(result.init["decoder_norm"])] == min(result.init["mse"].values())
    entry = result.history[-1]
    for key in ("explained_variance", "l0", "dead_fraction"):
        assert len(entry[key]) == 3 and len(result.eval[key]) == 3
    assert entry["lr"] == pytest.approx(SMALL_TRAIN.lr_at(19))


def test_all_per_snapshot_saes_train_in_one_pass():
    """independent=True trains S SAEs over one read of the data, exactly like S separate S=1 trainings."""
    source = small_source()
    config = TrainConfig(n_steps=10, batch_size=32, lr=3e-3, log_every=5, eval_rows=0, compile=False, bf16=False)
    sae_config = CrosscoderConfig(n_snapshots=1, d_model=8, dict_size=16, decoder_init_norm=0.3)
    inits = [Crosscoder(sae_config, seed=s) for s in range(3)]
    stacked = train_crosscoder(source, SMALL_MODEL.replace(independent=True, decoder_init_norm=0.3), config,
                               init=Crosscoder.stack(inits), progress=False)
    for s in range(3):
        alone = train_crosscoder(source.select(indices=[s]), sae_config, config, init=inits[s], progress=False)
        for name, value in alone.model.state_dict().items():
            assert torch.allclose(stacked.model.sae(s).state_dict()[name], value, atol=1e-6), (s, name)
        assert alone.history[-1]["explained_variance"][0] == pytest.approx(
            stacked.history[-1]["explained_variance"][s], abs=1e-5)


def test_cached_training_is_keyed_by_content(tmp_path, monkeypatch):
    source = small_source()
    first = train_crosscoder_cached(source, SMALL_MODEL, SMALL_TRAIN, root=tmp_path, progress=False)
    assert (first.path / "config.json").is_file() and (first.path / "metrics.json").is_file()

    import crosslib.dictionaries.train as train_module

    monkeypatch.setattr(train_module, "train_crosscoder", lambda *a, **k: pytest.fail("trained twice"))
    again = train_crosscoder_cached(small_source(), SMALL_MODEL, SMALL_TRAIN, root=tmp_path, progress=False)
    assert again.path == first.path and same_weights(again.model, first.model)
    # A cache hit still reports the training's speed, from the stored record.
    assert (again.steps_run, again.seconds, again.tokens_per_second) == (
        first.steps_run, first.seconds, first.tokens_per_second)
    assert again.steps_run == SMALL_TRAIN.n_steps and again.tokens_per_second > 0
    # held-out firing counts per (snapshot, feature) are saved, verified and read back
    assert first.firing_counts.shape == (3, SMALL_MODEL.dict_size)
    assert torch.equal(again.firing_counts, first.firing_counts)
    dead = (first.firing_counts == 0).double().mean(1)
    assert dead.tolist() == pytest.approx(first.eval["dead_fraction"], abs=1e-6)
    assert first.firing_counts.sum(1).double().div(first.eval["rows"]).tolist() == pytest.approx(first.eval["l0"], abs=1e-3)
    data = bytearray((first.path / "firing_counts.safetensors").read_bytes())
    data[-1] ^= 1
    (first.path / "firing_counts.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="firing_counts.safetensors"):
        load_result(first.path)
    other = small_source(seed=2)
    monkeypatch.undo()
    different = train_crosscoder_cached(other, SMALL_MODEL, SMALL_TRAIN, root=tmp_path, progress=False)
    assert different.path != first.path


def test_bf16_autocast_trains_close_to_fp32():
    source = small_source()
    config = SMALL_TRAIN.replace(n_steps=40, log_every=20)
    fp32 = train_crosscoder(source, SMALL_MODEL, config, progress=False)
    bf16 = train_crosscoder(source, SMALL_MODEL, config.replace(bf16=True), progress=False)
    ev32, ev16 = fp32.eval["explained_variance"], bf16.eval["explained_variance"]
    assert all(abs(a - b) < 0.05 for a, b in zip(ev32, ev16)), (ev32, ev16)
    assert bf16.model.W_E.dtype == torch.float32  # master weights stay fp32


def test_tensor_source_protocol():
    acts = torch.randn(100, 2, 4)
    s = TensorSource(acts, steps=[0, 8], eval_fraction=0.2)
    assert (s.n_train, s.n_eval) == (80, 20)
    a = list(zip(range(7), s.batches(32, seed=3)))
    b = next(s.batches(32, seed=3, start_batch=5))
    assert torch.equal(a[5][1], b)  # start_batch=k gives the k-th batch
    first_epoch = torch.cat([x for _, x in a[:3]])[:80]
    assert torch.allclose(first_epoch.norm(dim=-1).sum(), s.rows("train").norm(dim=-1).sum(), rtol=1e-4)
    assert torch.allclose(s.rows("all", normalise=True).norm(dim=-1).mean(0), torch.full((2,), 2.0), rtol=1e-5)
    sub = s.select(steps=[8])
    assert sub.steps == [8] and torch.equal(sub.rows("eval"), s.rows("eval")[:, 1:])
    assert s.select(indices=[1]).steps == [8]
    with pytest.raises(ParameterError, match="steps"):
        s.select(steps=[3])
    with pytest.raises(ParameterError, match="split"):
        s.rows("test")


def test_sparse_products_train_like_dense_ones_and_resume_exactly(tmp_path):
    """With every step on the sparse products (KernelOptions(sparse=True)), fp32 training follows the dense run to
    rounding, and a killed sparse run resumes to the same weights as an uninterrupted one."""
    source = planted_features(n_rows=1500, n_snapshots=1, d_model=8, n_shared=6, n_partial=0, seed=1)[0]
    model = CrosscoderConfig(n_snapshots=1, d_model=8, dict_size=32)
    dense = train_crosscoder(source, model, SMALL_TRAIN, progress=False, kernels=KernelOptions(sparse=False))
    always = KernelOptions(sparse=True)
    sparse = train_crosscoder(source, model, SMALL_TRAIN, tmp_path / "full", progress=False, kernels=always)
    for name, value in dense.model.state_dict().items():
        assert torch.allclose(sparse.model.state_dict()[name], value, rtol=1e-4, atol=1e-5), name
    assert sparse.history[-1]["loss"] == pytest.approx(dense.history[-1]["loss"], rel=1e-5)
    assert sparse.model.kernels == always  # (eager after training: SMALL_TRAIN does not compile)
    train_crosscoder(source, model, SMALL_TRAIN, tmp_path / "killed", progress=False, stop_after=9, kernels=always)
    resumed = train_crosscoder(source, model, SMALL_TRAIN, tmp_path / "killed", progress=False, kernels=always)
    assert same_weights(resumed.model, sparse.model) and resumed.history == sparse.history


def test_default_penalty_recovers_planted_features_at_the_tiny_presets_settings():
    """tanh-quad + JumpReLU (the default) at the tiny preset's dictionary size, steps, batch and lr: most
    planted features recovered (cosine ≥ 0.9) at an L0 within 2x the planted one (measured 100% at 1.6x)."""
    source, truth = planted_features(n_rows=100_000, n_snapshots=1, d_model=128, n_shared=256, n_partial=0,
                                     density=0.02, seed=0)
    model_config = CrosscoderConfig(n_snapshots=1, d_model=128, dict_size=512)  # the default penalty and gate
    train_config = TrainConfig(n_steps=600, batch_size=1024, lr=1e-3, sparsity_coefficient=1.0, eval_rows=8192,
                               compile=False)
    result = train_crosscoder(source, model_config, train_config, progress=False)
    W = torch.nn.functional.normalize(result.model.W_D[0].detach().float(), dim=-1)
    best = (W @ truth["directions"][:, 0].T).max(dim=0).values  # per planted feature
    planted_l0 = 256 * 0.02
    assert float((best >= 0.9).float().mean()) >= 0.8, best.sort().values[:10]
    assert planted_l0 / 2 <= result.eval["l0"][0] <= 2 * planted_l0, result.eval["l0"]


# ----------------------------------------------------------------------------------- distribution and the process

def test_the_single_process_context_is_the_default_and_trains_bit_identically():
    """The trainer always holds a sharding context: the default is crosslib.dictionaries.distributed.SingleProcess, whose hooks
    are identities, so passing one explicitly gives the same weights, history and metrics bit for bit."""
    source = small_source()
    default = train_crosscoder(source, SMALL_MODEL, SMALL_TRAIN, progress=False)
    explicit = train_crosscoder(source, SMALL_MODEL, SMALL_TRAIN, progress=False, parallel=SingleProcess())
    assert same_weights(default.model, explicit.model)
    assert default.history == explicit.history and default.eval == explicit.eval and default.init == explicit.init
    with pytest.raises(ParameterError, match="parallel="):
        train_crosscoder(source, SMALL_MODEL, SMALL_TRAIN, progress=False, parallel=None)


def test_a_dictionary_trains_bit_for_bit_the_same_at_any_thread_count(monkeypatch):
    """The thread count follows the machine's load (crosslib.runtime.follow_load), so it must change no weight:
    at the chapters' d and F, bf16, with the sparse products switching on as f gets sparse (the switch-over
    density used to be divided by the thread count: weights then depended on it)."""
    source = planted_features(n_rows=4096, n_snapshots=4, d_model=128, n_shared=128, n_partial=128, density=0.01,
                              seed=3, eval_fraction=0.0)[0]
    config = CrosscoderConfig(n_snapshots=4, d_model=128, dict_size=512)
    train = TrainConfig(n_steps=30, batch_size=1024, log_every=3, eval_rows=0, bf16=True, compile=False)
    # f's density falls from ~19% to ~4% in these steps: switch over half way (the default, 1.75%, comes later)
    monkeypatch.setattr(kernels, "SPARSE_MAX_DENSITY", 0.08)
    sparse_steps, original = [], ActivePattern.of
    monkeypatch.setattr(ActivePattern, "of", classmethod(lambda cls, f: sparse_steps.append(1) or original(f)))
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(train_crosscoder(source, config, train, progress=False))
    assert 0 < len(sparse_steps) < 2 * train.n_steps  # dense steps, then sparse ones
    assert same_weights(results[0].model, results[1].model)
    assert results[0].history == results[1].history


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_training_leaves_the_process_settings_alone_and_entry_points_make_them(tmp_path):
    """In a fresh process: training (and building every compiled kernel) changes neither glibc's allocator nor
    torch._dynamo's recompile limit nor the environment; crosslib.runtime.configure_process (what entry points
    call) then does tune the allocator, and exports the tuning to child processes."""
    script = tmp_path / "settings.py"
    script.write_text(textwrap.dedent(f"""
        import ctypes, os, subprocess, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)
        limit, environ = torch._dynamo.config.recompile_limit, dict(os.environ)
        from test_train import small_source, SMALL_MODEL, SMALL_TRAIN
        from crosslib import runtime
        from crosslib.dictionaries import kernels
        from crosslib.dictionaries.train import train_crosscoder

        def big_block_in_heap():  # glibc serves a 100 MB block from its heap only when tuned (else: its own mmap)
            libc = ctypes.CDLL("libc.so.6")
            libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
            p = libc.malloc(100 << 20)
            heap = [line.split()[0] for line in open("/proc/self/maps") if "[heap]" in line]
            lo, hi = (int(v, 16) for v in heap[0].split("-")) if heap else (0, 0)
            return lo <= p < hi

        train_crosscoder(small_source(), SMALL_MODEL, SMALL_TRAIN, progress=False)
        for name in ("gate", "tanh_sum", "backward", "shut_window", "error_forward", "error_backward"):
            kernels._kernel(name, True)  # torch.compile's wrappers (compiled at their first call)
        assert torch._dynamo.config.recompile_limit == limit
        assert dict(os.environ) == environ
        assert not big_block_in_heap()

        assert runtime.configure_process()
        assert big_block_in_heap()
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('MALLOC_MMAP_THRESHOLD_'))"],
                               capture_output=True, text=True, check=True)
        assert child.stdout.strip() == str(runtime.MALLOC_THRESHOLD)
        print("settings ok")
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "CROSSLIB_MALLOC_TUNING"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "settings ok" in proc.stdout, proc.stderr[-3000:]
