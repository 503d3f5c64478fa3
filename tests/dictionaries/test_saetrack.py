"""SAE-Track's chain: the warm-started links keep feature identity on a slowly drifting planted
dictionary, centring follows a moving mean, warm versus cold at equal tokens, caching/resume, bad
parameters. Tiny models; ~10 s. What the chain shows (formation, drift, the two lenses) is tested in
tests/analyses/test_saetrack_analysis.py, on the same planted data (tests/saetrack_planted.py)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from crosslib.activations.sources import TensorSource
from crosslib.analyses.saetrack_analysis import summarise
from crosslib.config import ParameterError
from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from crosslib.dictionaries.saetrack import SAETrackConfig, shift_biases, train_chain, warm_cold_gap, warm_versus_cold
from crosslib.dictionaries.train import train_crosscoder
from saetrack_planted import CONFIG, D_MODEL, N_PLANTED, STEPS, drift_chain, drifting_dictionary, planted_cosines, unit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def drift():
    return drift_chain()


# ------------------------------------------------------------------------------------ the chain

def test_chain_keeps_feature_identity_through_warm_starts(drift):
    source, directions, chain = drift
    assert len(chain) == 5 and chain.steps == STEPS
    metrics = chain.metrics()
    assert metrics["method"].tolist() == ["scratch", "warm", "warm", "warm", "warm"]
    assert metrics["n_steps"].tolist() == [300, 60, 60, 60, 60]
    assert metrics["lr"].tolist() == pytest.approx([3e-2, 3e-3, 3e-3, 3e-3, 3e-3])
    assert (metrics["explained_variance"] > 0.9).all()

    cos = planted_cosines(chain.decoders(), directions)  # [snapshot, sae_feature, planted]
    final_index = cos[-1].argmax(dim=0)  # the final SAE's feature for each planted feature
    same_index = (cos.argmax(dim=1) == final_index).all(dim=0)  # that index is the best match at every snapshot
    own_cosine = cos[:, final_index, torch.arange(N_PLANTED)]  # [snapshot, planted]
    tracked = same_index & (own_cosine.min(dim=0).values > 0.9)
    assert int(tracked.sum()) >= 8, own_cosine
    assert len(set(final_index[tracked].tolist())) == int(tracked.sum())  # distinct features, not one shared

    # The tracked feature follows the drift: at snapshot 0 it points where the planted feature was
    # then (cos ≈ 1), not where it ends up (planted cos(first, last) ≈ 0.86).
    at_start = own_cosine[0, tracked]
    towards_end = torch.einsum("fd,fd->f", unit(chain.decoders()[0, final_index[tracked]].float()),
                               directions[tracked, -1])
    assert float(at_start.mean()) > 0.97
    assert float((at_start - towards_end).mean()) > 0.08


def test_cold_saes_do_not_share_indices(drift):
    """The control: an SAE trained from scratch with another seed labels the planted features differently,
    so the aligned indices above come from the warm starts, not from the data."""
    source, directions, chain = drift
    other = train_crosscoder(source.select(indices=[4]), CONFIG.model_config(D_MODEL),
                             CONFIG.first_train_config().replace(seed=11), progress=False).model
    other_index = (unit(other.W_D.detach()[0]) @ directions[:, -1].T).argmax(dim=0)
    chain_index = planted_cosines(chain.decoders(), directions)[-1].argmax(dim=0)
    assert int((other_index == chain_index).sum()) <= 3


def test_shift_biases_moves_the_sae_with_the_data():
    sae = Crosscoder(CrosscoderConfig(n_snapshots=1, d_model=6, dict_size=10, decoder_init_norm=0.5,
                                      threshold_init=0.05), seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 1, 6, generator=g)
    shift = 3 * torch.randn(6, generator=g)
    moved = shift_biases(sae, shift)
    codes = sae.encode(x)
    assert (codes > 0).float().mean() > 0.1  # the check is not vacuous
    torch.testing.assert_close(moved.encode(x + shift), codes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved(x + shift).reconstruction, sae(x).reconstruction + shift, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved.W_D, sae.W_D)  # the dictionary itself is untouched


def test_centring_keeps_warm_links_working_when_the_mean_moves():
    """A mean that walks away by 0.3 (raw units) per snapshot: links copied unchanged (bias_init="zero")
    spend their short budget chasing it; centred links (the default) keep their quality and identity."""
    source, directions, _, _ = drifting_dictionary(n_rows=1500)
    g = torch.Generator().manual_seed(1)
    offset = 0.3 * torch.cumsum(unit(torch.randn(len(STEPS), D_MODEL, generator=g)), dim=0)
    moved = TensorSource(source.rows("all", normalise=False) + offset[None], steps=STEPS, eval_fraction=0.2)
    explained = {}
    for bias_init in ("mean", "zero"):
        chain = train_chain(moved, CONFIG.replace(n_steps=150, bias_init=bias_init), cache=False, progress=False)
        explained[bias_init] = chain.metrics()["explained_variance"].to_numpy()
    assert explained["mean"].min() > 0.7, explained
    assert explained["zero"][-1] < explained["mean"][-1] - 0.2, explained


# ------------------------------------------------------------------------------------ warm versus cold

def test_warm_versus_cold_on_equal_tokens(drift):
    source, directions, chain = drift
    table = warm_versus_cold(source, chain, cache=False, progress=False)
    assert list(table.columns) == ["snapshot", "step", "method", "n_steps", "tokens", "lr", "explained_variance",
                                   "l0", "dead_fraction"]
    assert len(table) == 8 and table["snapshot"].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    assert table["method"].tolist() == ["warm", "cold"] * 4
    assert table["step"].tolist() == [1, 1, 2, 2, 4, 4, 8, 8]
    assert (table["tokens"] == 60 * 64).all()  # equal tokens: the budget of a warm link
    assert table.loc[table["method"] == "warm", "lr"].tolist() == pytest.approx([3e-3] * 4)
    assert table.loc[table["method"] == "cold", "lr"].tolist() == pytest.approx([3e-2] * 4)
    assert table[["explained_variance", "l0"]].notna().all().all()

    gap = warm_cold_gap(table)
    assert len(gap) == 4
    # Slow drift, no new features: the warm link starts almost right and is at least as good as a
    # cold SAE with the same tiny budget.
    assert (gap["explained_variance_gap"] > -0.02).all(), gap
    summary = summarise(table)
    assert summary["warm_cold_ev_gap"] == pytest.approx(gap["explained_variance_gap"].mean())
    assert summary["warm_cold_ev_gap"] > -0.01
    assert math.isnan(summary["median_formation_step"]) and math.isnan(summary["lens_spearman_r"])


# ------------------------------------------------------------------------------------ cache and resume

def test_chain_is_cached_link_by_link_and_resumes(tmp_path):
    source = drifting_dictionary(n_rows=600)[0].select(indices=[0, 1, 2])
    config = CONFIG.replace(n_steps=30, eval_rows=100)
    first = train_chain(source, config, root=tmp_path, progress=False)
    links = sorted(p for p in (tmp_path / "dictionaries").iterdir() if p.is_dir())
    assert len(links) == 3  # one artifact per link, each keyed by its starting weights
    assert sorted(r.path for r in first.results) == links
    written = {p: (p / "config.json").stat().st_mtime_ns for p in links}
    again = train_chain(source, config, root=tmp_path, progress=False)
    assert [r.path for r in again.results] == [r.path for r in first.results]
    assert {p: (p / "config.json").stat().st_mtime_ns for p in links} == written  # loaded, not retrained
    # lose the last link (as if killed before it finished): only that link trains again, identically
    shutil.rmtree(first.results[-1].path)
    resumed = train_chain(source, config, root=tmp_path, progress=False)
    for link in (r.path for r in first.results[:2]):
        assert (link / "config.json").stat().st_mtime_ns == written[link]
    assert (first.results[-1].path / "config.json").is_file()
    torch.testing.assert_close(resumed.decoders(), first.decoders(), rtol=0, atol=0)
    # a different first link changes every later link's key (the init fingerprint is in the key)
    other = train_chain(source, config.replace(seed=1), root=tmp_path, progress=False)
    assert not {r.path for r in other.results} & set(links)


# ------------------------------------------------------------------------------------ bad parameters

@pytest.mark.parametrize("changes, name", [
    ({"warm_fraction": 0}, "warm_fraction"),
    ({"warm_fraction": 1.5}, "warm_fraction"),
    ({"warm_lr_factor": -0.1}, "warm_lr_factor"),
    ({"formation_fraction": 1.0}, "formation_fraction"),
    ({"n_top": 1}, "n_top"),
    ({"n_random": 1}, "n_random"),
    ({"min_match_cosine": 1.5}, "min_match_cosine"),
    ({"match_by": "name"}, "match_by"),
    ({"min_match_correlation": -0.1}, "min_match_correlation"),
    ({"dict_size": 0}, "dict_size"),
    ({"activation": "gelu"}, "activation"),
    ({"n_steps": 2.5}, "n_steps"),
    ({"bias_init": "median"}, "bias_init"),
])
def test_bad_config_names_the_parameter(changes, name):
    with pytest.raises(ParameterError, match=name):
        SAETrackConfig(**changes)


def test_bad_inputs_name_the_parameter(drift):
    source, directions, chain = drift
    with pytest.raises(ParameterError, match="source"):
        train_chain(torch.zeros(3, 2, 4), CONFIG, cache=False, progress=False)
    with pytest.raises(ParameterError, match="config"):
        train_chain(source, {"dict_size": 8}, cache=False, progress=False)
    with pytest.raises(ParameterError, match="n_snapshots"):
        warm_versus_cold(source.select(indices=[0]), chain, cache=False, progress=False)
    with pytest.raises(ParameterError, match="chain"):
        warm_versus_cold(source.select(indices=[0, 1]), chain, cache=False, progress=False)
