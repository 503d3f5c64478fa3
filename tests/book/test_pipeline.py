"""The chain chapters walk: the sparsity sweep's results and the progress a long sweep shows."""

from __future__ import annotations

from crosslib.activations.sources import planted_features
from crosslib.book.pipeline import sparsity_sweep
from crosslib.progress import PROGRESS_LOG_ENV


def test_sparsity_sweep_reports_every_dictionary_and_says_which_is_training(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSLIB_DATA", str(tmp_path / "data"))
    log = tmp_path / "progress.log"
    monkeypatch.setenv(PROGRESS_LOG_ENV, str(log))  # as `crosslib book` sets it for a chapter's kernel
    source, _ = planted_features(n_rows=2_000, n_snapshots=2, d_model=16)
    table = sparsity_sweep(source, 32, [0.1, 1.0], n_steps=6, batch_size=128, bf16=False)

    assert len(table) == 2 * 2 * 2  # λ × method × snapshot
    assert sorted(set(table["sparsity_coefficient"])) == [0.1, 1.0]
    assert set(table["method"]) == {"crosscoder", "per-snapshot SAEs"}
    assert table["explained_variance"].notna().all()
    lines = log.read_text().splitlines()
    sweep = [line for line in lines if line.startswith("sparsity sweep")]
    assert sweep and "4/4" in sweep[-1], lines  # the outer bar counts dictionaries
    assert any("λ = 0.1" in line for line in lines) and any("λ = 1" in line for line in lines), lines
