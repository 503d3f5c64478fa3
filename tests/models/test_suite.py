"""The snapshot suite: deterministic training, exact resume, one loader for local and hub suites."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import micro_suite_config
from crosslib.config import ParameterError
from crosslib.constants import PYTHIA_STEPS, pythia_schedule
from crosslib.models.snapshots import SnapshotError, list_steps, load_snapshot, step_dir
from crosslib.models.suite import (SUITE_PRESETS, SuiteConfig, frequent_tokens, initial_model, lr_at,
                                   next_token_loss, repeat_periods, resolve_suite, suite_optimizer, train_suite,
                                   training_batch, training_log, training_step)


def weights(suite: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(step_dir(suite, step) / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_pythia_schedule():
    assert PYTHIA_STEPS[:12] == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
    assert PYTHIA_STEPS[-1] == 143000 and len(PYTHIA_STEPS) == 154
    assert pythia_schedule(2000, 250) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 250, 256, 500, 512, 750, 1000,
                                          1250, 1500, 1750, 2000]
    assert pythia_schedule(12, 4) == [0, 1, 2, 4, 8, 12]


def test_suite_has_schedule_and_log(micro_suite):
    assert list_steps(micro_suite) == [0, 1, 2, 4, 8, 12]
    log = training_log(micro_suite)
    assert [r["step"] for r in log] == list(range(12))
    assert log[-1]["loss"] < log[0]["loss"]  # it learns something
    model, tokenizer = load_snapshot(micro_suite, 12)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.config.use_parallel_residual and model.config.rope_parameters["partial_rotary_factor"] == 0.25
    assert tokenizer.decode(tokenizer("The cat sees the moon.")["input_ids"]) == "The cat sees the moon."


def test_same_seed_same_weights(text_corpus, tmp_path):
    # Both runs in this test: float results depend on torch's thread count, which other tests may change.
    first = train_suite(micro_suite_config(text_corpus), root=tmp_path / "a", progress=False)
    again = train_suite(micro_suite_config(text_corpus), root=tmp_path / "b", progress=False)
    for step in (0, 4, 12):
        assert_same_weights(weights(first, step), weights(again, step))
    other = train_suite(micro_suite_config(text_corpus, seed=1), root=tmp_path, progress=False)
    assert not torch.equal(weights(other, 12)["embed_out.weight"], weights(again, 12)["embed_out.weight"])


def test_interrupted_run_resumes_to_same_weights(text_corpus, tmp_path):
    config = micro_suite_config(text_corpus)
    uninterrupted = train_suite(config, root=tmp_path / "clean", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_suite(config, root=tmp_path, progress=False, interrupt_after=7)
    partial = next((tmp_path / "suite").glob("*.partial"))
    assert (partial / "train_state" / "state.json").is_file()
    resumed = train_suite(config, root=tmp_path, progress=False)
    assert not partial.exists()
    for step in list_steps(uninterrupted):
        assert_same_weights(weights(uninterrupted, step), weights(resumed, step))
    assert training_log(resumed) == training_log(uninterrupted)


KILL_SCRIPT = """
import sys
from conftest import micro_suite_config
from crosslib.models.suite import train_suite
from pathlib import Path
train_suite(micro_suite_config(Path(sys.argv[1]), total_steps=24, linear_every=8, checkpoint_every=2),
            root=sys.argv[2], progress=False)
"""


def test_kill_minus_nine_then_resume(text_corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(text_corpus), str(killed_root)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list(killed_root.glob("suite/*.partial/train_state/state.json")):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(text_corpus), str(killed_root)], env=env, check=True)
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(text_corpus), str(clean_root)], env=env, check=True)
    killed, clean = (next(p for p in root.glob("suite/*") if p.is_dir()) for root in (killed_root, clean_root))
    assert killed.name == clean.name
    for step in list_steps(clean):
        assert_same_weights(weights(killed, step), weights(clean, step))


def test_training_batches_are_a_function_of_step(text_corpus):
    import numpy as np

    config = micro_suite_config(text_corpus, repeat_fraction=1.0, repeat_mode="random-span")
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = training_batch(tokens, 5, config), training_batch(tokens, 5, config)
    assert torch.equal(a, b) and not torch.equal(a, training_batch(tokens, 6, config))
    # The stream counts up, so within a window a token appears twice only where a span was copied.
    distances = set()
    for step in range(10):
        for row in training_batch(tokens, step, config).tolist():
            copies = [j - i for i in range(len(row)) for j in range(i + 1, len(row)) if row[i] == row[j]]
            assert len(copies) >= 2 and len(set(copies)) == 1  # one span of >= 2 tokens, one distance
            distances.add(copies[0])
    assert len(distances) > 3  # the copy distance varies: no fixed-offset shortcut
    assert lr_at(0, config) == pytest.approx(config.lr / 2)
    assert lr_at(config.total_steps, config) == pytest.approx(config.lr * config.min_lr_ratio)


def test_random_token_repeats_vary_their_period_and_use_frequent_tokens(text_corpus):
    """The default mix: from a random place on, a random motif of frequent tokens repeats; the period
    varies from row to row (no fixed-offset shortcut) and the text before it is untouched."""
    import numpy as np

    config = micro_suite_config(text_corpus, context_length=64, repeat_fraction=0.5, repeat_vocab=8)
    tokens = np.arange(8, 1000).astype(np.uint16)  # a counting stream: it never repeats by itself
    pool = np.arange(8)
    periods, n_rows, n_repeated = set(), 0, 0
    for step in range(30):
        for row in training_batch(tokens, step, config, pool).numpy():
            n_rows += 1
            pooled = row < 8
            if not pooled.any():
                assert (np.diff(row) == 1).all()  # an untouched window of the counting stream
                continue
            n_repeated += 1
            begin = int(pooled.argmax())
            assert pooled[begin:].all() and (np.diff(row[:begin]) == 1).all()
            tail = row[begin:]
            period = next(p for p in range(1, len(tail)) if np.array_equal(tail[p:], tail[:-p]))
            assert len(tail) >= 2 * period  # the motif appears at least twice
            periods.add(period)
    assert 0.3 < n_repeated / n_rows < 0.7  # about repeat_fraction of the rows
    shortest, longest = repeat_periods(config)
    assert (shortest, longest) == (2, 32)  # 64 // 32 to 64 // 2 tokens
    assert min(periods) >= 1 and max(periods) <= longest
    assert max(periods) > 64 // 4  # long repeats too, as long as chapter 1's induction test (ctx/4)
    # log-uniform by default: about half the periods are short (<= 8 of 2..32 tokens); linear spacing: a quarter
    for spacing, low, high in (("log", 0.4, 0.7), ("linear", 0.1, 0.35)):
        spaced = config.replace(repeat_period_spacing=spacing, repeat_fraction=1.0)
        tails = [row[int((row < 8).argmax()):] for step in range(20)
                 for row in training_batch(tokens, step, spaced, pool).numpy()]
        drawn = [next(p for p in range(1, len(t)) if np.array_equal(t[p:], t[:-p])) for t in tails]
        assert low < np.mean(np.array(drawn) <= 8) < high, spacing
    # without a precomputed pool, the repeat_vocab most frequent tokens of the stream are used
    skewed = np.concatenate([tokens, np.repeat(np.arange(990, 998), 3)]).astype(np.uint16)
    assert sorted(frequent_tokens(skewed, 8)) == list(range(990, 998))
    assert torch.equal(training_batch(skewed, 3, config), training_batch(skewed, 3, config, np.arange(990, 998)))


def test_unknown_step_lists_available(micro_suite):
    with pytest.raises(SnapshotError, match=r"step=3 .*available steps are \[0, 1, 2, 4, 8, 12\]"):
        load_snapshot(micro_suite, 3)


def test_corrupted_checkpoint_is_an_error(micro_suite, tmp_path):
    copy = tmp_path / "suite"
    shutil.copytree(micro_suite, copy)
    weights_file = step_dir(copy, 4) / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-10] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="step4: model.safetensors does not match its checksum"):
        load_snapshot(copy, 4)
    # Without checksums, a truncated file is still caught (by safetensors), never half-loaded.
    (step_dir(copy, 8) / "checksums.json").unlink()
    truncated = step_dir(copy, 8) / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(SnapshotError, match="corrupted or unreadable checkpoint"):
        load_snapshot(copy, 8)


def make_hub_cache(suite: Path, repo_id: str, cache: Path) -> None:
    """Lay out `suite` as the Hugging Face cache lays out a repo with revisions step{N}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for step in list_steps(suite):
        commit = f"{step:040x}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / f"step{step}").write_text(commit)
        shutil.copytree(step_dir(suite, step), repo / "snapshots" / commit)


def test_hub_id_and_local_folder_load_through_same_code(micro_suite, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_hub_cache(micro_suite, "crosslib-test/micro", tmp_path / "hub")
    assert list_steps("crosslib-test/micro", cache_dir=tmp_path / "hub") == list_steps(micro_suite)
    hub_model, hub_tokenizer = load_snapshot("crosslib-test/micro", 8, cache_dir=tmp_path / "hub")
    local_model, local_tokenizer = load_snapshot(micro_suite, 8)
    assert_same_weights(hub_model.state_dict(), local_model.state_dict())
    assert hub_tokenizer("a red house")["input_ids"] == local_tokenizer("a red house")["input_ids"]
    with pytest.raises(SnapshotError, match="step=3 is not in suite 'crosslib-test/micro'"):
        load_snapshot("crosslib-test/micro", 3, cache_dir=tmp_path / "hub")


def test_offline_hub_gives_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SnapshotError, match="local folder of step\\{N\\}/ checkpoints"):
        load_snapshot("EleutherAI/pythia-70m-deduped", 1000, cache_dir=tmp_path / "empty")


def test_bad_suite_parameters():
    with pytest.raises(ParameterError, match="n_heads=3 .*divisor of d_model=128"):
        SuiteConfig(n_heads=3)
    with pytest.raises(ParameterError, match="unknown parameter 'layers'.*n_layers"):
        SuiteConfig.from_dict({"layers": 2})
    with pytest.raises(ParameterError, match="suite='nonsense' is not allowed.*'smoke', 'tiny'"):
        resolve_suite("nonsense")
    with pytest.raises(ParameterError, match="unknown parameter 'depth'"):
        resolve_suite("tiny", {"depth": 3})


def test_token_streams_for_another_corpus_use_the_suite_tokenizer(micro_suite, text_corpus, tmp_path, monkeypatch):
    import numpy as np

    from crosslib.models.suite import suite_token_streams, token_windows
    from crosslib.text.corpus import CorpusConfig

    monkeypatch.setenv("CROSSLIB_DATA", str(tmp_path))
    own = suite_token_streams(micro_suite)
    # The same corpus given explicitly goes through the generic path (tokenize with the suite's
    # tokenizer, cache by content) and must give the suite's own streams back.
    generic = suite_token_streams(micro_suite, CorpusConfig(source=str(text_corpus), heldout_fraction=0.2))
    for split in ("train", "heldout"):
        np.testing.assert_array_equal(own[split], generic[split])
    windows = token_windows(own["heldout"], 5, 16, seed=0)
    assert windows.shape == (5, 16)
    with pytest.raises(ParameterError, match="n_windows=100000 .*at most"):
        token_windows(own["heldout"], 100000, 16)


def foreign_suite(micro_suite: Path, out: Path, steps: dict[int, int], *, tokenizer: str | None = "shared") -> Path:
    """A suite as another tool writes it: `save_pretrained` weights only (no checksums), steps[new] = micro step.

    tokenizer: "shared" puts it in <suite>/tokenizer/, "per-step" in every step folder, None nowhere.
    """
    for new, old in steps.items():
        model, tok = load_snapshot(micro_suite, old)
        model.save_pretrained(step_dir(out, new))
        if tokenizer == "per-step":
            tok.save_pretrained(step_dir(out, new))
    if tokenizer == "shared":
        tok.save_pretrained(out / "tokenizer")
    return out


def test_missing_tokenizer_has_its_own_error_naming_where_it_looked(micro_suite, tmp_path):
    from crosslib.models.snapshots import TokenizerNotFoundError, load_tokenizer

    suite = foreign_suite(micro_suite, tmp_path / "suite", {0: 0, 8: 8}, tokenizer=None)
    with pytest.raises(TokenizerNotFoundError, match=r"no tokenizer for .*@step8: looked for tokenizer.json or "
                       r"tokenizer_config.json in .*/step8/ and .*/suite/tokenizer/"):
        load_snapshot(suite, 8)
    model, _ = load_snapshot(suite, 8, with_tokenizer=False)  # the weights themselves are fine
    # One tokenizer folder serves every step.
    load_tokenizer(micro_suite).save_pretrained(suite / "tokenizer")
    for step in (0, 8):
        _, tokenizer = load_snapshot(suite, step)
        assert tokenizer("a red house")["input_ids"] == load_tokenizer(micro_suite)("a red house")["input_ids"]


def test_foreign_weights_are_hashed_once_and_remembered(micro_suite, tmp_path, monkeypatch):
    import crosslib.models.snapshots as snapshots

    suite = foreign_suite(micro_suite, tmp_path / "suite", {0: 0, 4: 4})
    folder = step_dir(suite, 4)
    assert not (folder / "checksums.json").exists()
    hashed = []
    real_sha256 = snapshots.sha256_file
    monkeypatch.setattr(snapshots, "sha256_file", lambda path: hashed.append(Path(path).name) or real_sha256(path))
    first = snapshots.local_checksums(folder)
    assert "model.safetensors" in hashed and (folder / "checksums.json").is_file()
    hashed.clear()
    load_snapshot(suite, 4, with_tokenizer=False)
    assert snapshots.local_checksums(folder) == first and hashed == []  # size + mtime unchanged: no hashing
    # A changed file is re-hashed (only it) and no longer matches what was recorded.
    weights_file = folder / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-10] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="step4: model.safetensors does not match its checksum"):
        load_snapshot(suite, 4, with_tokenizer=False)
    assert hashed == ["model.safetensors"]


def test_context_length_comes_from_the_config_without_weights(micro_suite, tmp_path):
    from crosslib.models.snapshots import context_length

    suite = tmp_path / "suite"
    shutil.copytree(step_dir(micro_suite, 8), step_dir(suite, 8))
    (step_dir(suite, 8) / "model.safetensors").unlink()  # a config alone is enough
    assert context_length(suite, 8) == 16
    assert context_length(suite, 8, at_most=8) == 8


def test_duplicated_revisions_are_refused_naming_them(micro_suite, tmp_path, monkeypatch):
    """Two steps that are byte copies (as on some published Pythia branches) are refused, or warned about."""
    from crosslib.models.snapshots import DuplicateSnapshotError
    from crosslib.models.suite import iter_steps

    suite = foreign_suite(micro_suite, tmp_path / "suite", {0: 0, 1000: 12, 143000: 12})
    with pytest.raises(DuplicateSnapshotError, match=r"step1000 and step143000 \(model.safetensors\)"):
        list(iter_steps(suite))
    with pytest.raises(DuplicateSnapshotError):
        list(iter_steps(suite, [1000, 143000]))
    assert list(iter_steps(suite, [0, 1000])) == [0, 1000]  # distinct steps pass
    with pytest.warns(UserWarning, match="step1000 and step143000"):
        assert list(iter_steps(suite, on_duplicate="warn")) == [0, 1000, 143000]
    monkeypatch.setenv("CROSSLIB_ON_DUPLICATE_SNAPSHOTS", "warn")
    with pytest.warns(UserWarning, match="identical weights"):
        list(iter_steps(suite))
    monkeypatch.setenv("CROSSLIB_ON_DUPLICATE_SNAPSHOTS", "sometimes")
    with pytest.raises(ParameterError, match="on_duplicate='sometimes'"):
        list(iter_steps(suite))
    monkeypatch.delenv("CROSSLIB_ON_DUPLICATE_SNAPSHOTS")
    # The crosslib suite's own snapshots are all distinct.
    assert list(iter_steps(micro_suite)) == list_steps(micro_suite)


def test_too_small_split_names_n_tokens_and_suggests_a_larger_corpus(micro_suite):
    import numpy as np

    from crosslib.models.suite import as_corpus_config, windows_for_tokens

    stream = np.arange(1000) % 50
    assert windows_for_tokens(stream, 160, 16).shape == (10, 16)
    with pytest.raises(ParameterError, match=r"n_tokens=100,000 is not allowed: the 'heldout' split of corpus "
                       r"'brown' holds 1,000 tokens \(62 windows of 16\), so at most n_tokens=992. Use a larger corpus "
                       r"\(corpus='hf:"):
        windows_for_tokens(stream, 100_000, 16, corpus_name="corpus 'brown'")
    assert as_corpus_config(None) is None
    assert as_corpus_config("kjv").source == "kjv"
    assert as_corpus_config("hf:monology/pile-uncopyrighted").max_documents > 0
    assert as_corpus_config({"source": "hf:x", "max_documents": 10}).max_documents == 10
    with pytest.raises(ParameterError, match="corpus='no/such/file.txt' is not allowed"):
        as_corpus_config("no/such/file.txt")
    with pytest.raises(ParameterError, match="corpus=3 is not allowed"):
        as_corpus_config(3)
    with pytest.raises(ParameterError, match="corpus=.*fields from"):
        as_corpus_config({"sauce": "brown"})


def test_duplicated_hub_revisions_are_found_from_the_cache_blob_ids(tmp_path, monkeypatch):
    """In the Hugging Face cache, a revision's files link to blobs named by their SHA-256: equal names, equal weights."""
    from crosslib.models.snapshots import DuplicateSnapshotError, check_distinct_snapshots

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hub" / "models--org--model"
    (repo / "blobs").mkdir(parents=True)
    for blob in ("a" * 64, "b" * 64):
        (repo / "blobs" / blob).write_bytes(b"weights")
    for step, blob in ((0, "a" * 64), (1000, "b" * 64), (2000, "b" * 64)):
        commit = f"{step:040x}"
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / f"step{step}").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "model.safetensors").symlink_to(Path("../../blobs") / blob)
    assert check_distinct_snapshots("org/model", [0, 1000], cache_dir=tmp_path / "hub") == []
    with pytest.raises(DuplicateSnapshotError, match=r"step1000 and step2000 \(model.safetensors\)"):
        check_distinct_snapshots("org/model", [0, 1000, 2000], cache_dir=tmp_path / "hub")


def test_suite_records_its_precision_and_cpu(tmp_path):
    import json

    from crosslib.machine import machine_description
    from crosslib.models.suite import describe_training, suite_record

    machine = machine_description()
    assert machine["aten_cpu_capability"] in {"DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "NO AVX"} or machine["aten_cpu_capability"]
    assert isinstance(machine["amx_bf16"], bool) and machine["threads"] >= 1
    suite = tmp_path / "s"
    (suite / "step0").mkdir(parents=True)
    (suite / "suite.json").write_text(json.dumps({"precision": "bf16 autocast", "machine": {**machine, "amx_bf16": True}}))
    assert suite_record(suite)["precision"] == "bf16 autocast"
    text = describe_training(suite)
    assert "bf16 autocast" in text and "AMX" in text and machine["aten_cpu_capability"] in text
    assert "thread" not in text  # it changes no weight


def _train_steps(threads: int, invariant: bool, n_steps: int = 2) -> list[torch.Tensor]:
    """`n_steps` of the suite trainer's step at the tiny preset's full shape (smaller ones run on one thread)."""
    import numpy as np

    config = SUITE_PRESETS["tiny"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = initial_model(config, eos_token_id=0, thread_invariant=invariant)
        optimizer = suite_optimizer(model, config)
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=50_000, dtype=np.int32)
        for step in range(n_steps):
            batch = training_batch(tokens, step, config, np.arange(config.repeat_vocab))
            training_step(model, optimizer, batch, config)
        return [p.detach().clone() for p in model.parameters()]
    finally:
        torch.set_num_threads(before)


def test_the_suite_trains_bit_for_bit_the_same_at_any_thread_count():
    """The thread count follows the machine's load (crosslib.runtime.follow_load), so it must not change a
    weight. torch's own layer-norm backward does (it splits the γ/β sums among threads): the control."""
    one, two = _train_steps(1, invariant=True), _train_steps(2, invariant=True)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    native_one, native_two = _train_steps(1, invariant=False, n_steps=1), _train_steps(2, invariant=False, n_steps=1)
    assert not all(torch.equal(a, b) for a, b in zip(native_one, native_two))  # what the column sums fix
    # the same function: after one step the weights agree to rounding (later steps' Adam would turn
    # rounding-level gradients of near-zero weights into lr-sized moves)
    one_step = _train_steps(1, invariant=True, n_steps=1)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-3 * 3e-3) for a, b in zip(one_step, native_two))


@pytest.mark.parametrize("bf16", [False, True])
def test_the_training_loss_is_the_models_own_loss(bf16):
    """`next_token_loss` (chunked, crosslib's) against `model(input_ids, labels=...).loss` (transformers'), with
    the gradient of every weight: a shifted target or a missed weight would be far outside these bounds."""
    config = SUITE_PRESETS["smoke"].replace(vocab_size=2048, bf16=bf16)
    model = initial_model(config, eos_token_id=0)
    # 40 × 32 rows: more than one chunk of the cross-entropy, the last one partial
    batch = torch.randint(0, config.vocab_size, (40, config.context_length))

    def loss_and_grads(loss_of):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ours, our_grads = loss_and_grads(lambda: next_token_loss(model, batch))
    theirs, their_grads = loss_and_grads(lambda: model(input_ids=batch, labels=batch).loss)
    tolerance = 2e-2 if bf16 else 1e-5
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-3 if bf16 else 1e-6)
    for ours_grad, theirs_grad in zip(our_grads, their_grads):
        scale = theirs_grad.abs().max().clamp(min=1e-12)
        assert ((ours_grad - theirs_grad).abs().max() / scale).item() < tolerance


def test_the_training_code_version_is_part_of_a_suites_key(monkeypatch):
    """A change of the training code that changes weights (not a field) must not reuse suites trained before."""
    before = SuiteConfig().key()
    monkeypatch.setattr(SuiteConfig, "TRAINING_CODE", SuiteConfig.TRAINING_CODE + 1)
    assert SuiteConfig().key() != before
    assert "TRAINING_CODE" not in SuiteConfig().to_dict()  # not a parameter a user could set


def test_a_non_finite_loss_stops_the_step_before_any_update():
    config = SUITE_PRESETS["smoke"]
    model = initial_model(config, eos_token_id=0)
    optimizer = suite_optimizer(model, config)
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="training loss is nan"):
        training_step(model, optimizer, torch.zeros(2, config.context_length, dtype=torch.long), config)
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
