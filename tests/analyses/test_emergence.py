"""Emergence analyses on synthetic trajectories and directions with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crosslib.analyses import emergence
from crosslib.analyses.emergence import (
    EmergenceConfig,
    decoder_norms,
    direction_change_curve,
    emergence_table,
    lifetime_histogram,
    peak_order,
    projection_matrix,
    relative_strength,
    step_histogram,
    strong_fraction_curve,
    summarise_emergence,
    turning_point,
    validate_steps,
)
from crosslib.config import ParameterError

STEPS = [0, 1, 2, 4, 8, 16, 32, 64]  # Pythia-like log spacing, 8 snapshots
LOW, HIGH = 0.05, 1.0

# Planted ρ trajectories (one column each) and what the classifier must say about them.
PLANTED = {
    "init_fades_at_4": [1.0, 0.9, 0.6, 0.1, 0.05, 0.02, 0.02, 0.02],
    "emerges_at_8": [LOW, LOW, LOW, LOW, 0.8, 1.0, 0.9, 0.9],
    "emerges_at_32_transient_later": [LOW, LOW, LOW, LOW, LOW, LOW, 1.0, 0.1],
    "reforms_at_16": [0.9, 0.8, 0.1, 0.05, 0.3, 0.7, 1.0, 0.95],  # the naive rule says step 0
    "persistent": [1.0, 0.9, 0.45, 0.4, 0.6, 0.9, 1.0, 1.0],  # dips to 0.4 but never fades (< 0.25)
    "blip_at_2": [LOW, LOW, 1.0, LOW, LOW, LOW, 0.3, 0.3],
    "dead": [0.0] * 8,
}


def planted_norms(scale: float = 3.0) -> np.ndarray:
    norms = np.array(list(PLANTED.values())).T * scale  # [snapshot, feature]
    norms[:, 1] *= 7.0  # a much larger feature: ρ makes scale irrelevant
    return norms


def row(table, name):
    return table.iloc[list(PLANTED).index(name)]


def test_relative_strength_is_per_feature_peak_normalised():
    rho = relative_strength(planted_norms())
    assert rho.shape == (8, len(PLANTED))
    np.testing.assert_allclose(rho[:, :-1].max(axis=0), 1.0)
    np.testing.assert_allclose(rho[:, 1], PLANTED["emerges_at_8"])
    assert np.all(rho[:, -1] == 0)  # dead feature: zero, not NaN


def test_emergence_table_recovers_planted_categories_and_steps():
    table = emergence_table(planted_norms(), STEPS, EmergenceConfig())
    expected_category = {
        "init_fades_at_4": "initialisation",
        "emerges_at_8": "emergent",
        "emerges_at_32_transient_later": "emergent",
        "reforms_at_16": "emergent",
        "persistent": "persistent",
        "blip_at_2": "emergent",  # min_lifetime=1 counts a one-snapshot blip
        "dead": "dead",
    }
    assert {name: row(table, name)["category"] for name in PLANTED} == expected_category

    init = row(table, "init_fades_at_4")
    assert init["fade_step"] == 4 and math.isnan(init["emergence_step"])
    assert init["lifetime_snapshots"] == 3 and init["strong_until_step"] == 2 and init["lifetime_steps"] == 2

    early = row(table, "emerges_at_8")
    assert early["emergence_step"] == 8 and early["peak_step"] == 16
    assert early["lifetime_snapshots"] == 4 and early["survives_to_end"] and early["lifetime_steps"] == 56

    late = row(table, "emerges_at_32_transient_later")
    assert late["emergence_step"] == 32 and late["lifetime_snapshots"] == 1 and not late["survives_to_end"]

    reformed = row(table, "reforms_at_16")
    assert reformed["reformed"] and reformed["emergence_step"] == 16 and reformed["fade_step"] == 2
    assert reformed["first_strong_step"] == 0  # what the naive rule would report
    assert reformed["peak_step"] == 32

    dead = row(table, "dead")
    assert dead["lifetime_snapshots"] == 0 and math.isnan(dead["peak_step"])


def test_min_lifetime_ignores_blips_and_dead_mask_is_respected():
    config = EmergenceConfig(min_lifetime=2)
    dead = np.zeros(len(PLANTED), bool)
    dead[list(PLANTED).index("persistent")] = True
    table = emergence_table(planted_norms(), STEPS, config, dead=dead)
    assert row(table, "blip_at_2")["category"] == "transient"
    # A formation at the last-but-one snapshot that lasts one snapshot does not count either.
    assert row(table, "emerges_at_32_transient_later")["category"] == "transient"
    assert row(table, "emerges_at_8")["emergence_step"] == 8
    assert row(table, "persistent")["category"] == "dead"


def test_fade_threshold_is_a_real_parameter():
    # With fade_fraction = strong_fraction (no hysteresis) the dip to 0.4 counts as fading.
    table = emergence_table(planted_norms(), STEPS, EmergenceConfig(fade_fraction=0.5))
    persistent = row(table, "persistent")
    assert persistent["category"] == "emergent" and persistent["emergence_step"] == 8


def test_summary_and_histograms():
    table = emergence_table(planted_norms(), STEPS)
    summary = summarise_emergence(table)
    assert summary["n_alive"] == 6
    assert summary["emergent_fraction"] == pytest.approx(4 / 6)
    assert summary["initialisation_fraction"] == pytest.approx(1 / 6)
    assert summary["median_emergence_step"] == pytest.approx(np.median([8, 32, 16, 2]))
    assert summary["naive_step0_fraction"] == pytest.approx(3 / 6)  # init, reformed, persistent

    hist = step_histogram(table["emergence_step"], STEPS)
    assert hist["count"].sum() == 4
    assert dict(zip(hist["step"], hist["count"]))[16] == 1
    assert np.all(np.diff(hist["bin_left"]) > 0)
    np.testing.assert_allclose(hist["bin_right"].to_numpy()[:-1], hist["bin_left"].to_numpy()[1:])
    assert hist["plot_position"].iloc[0] == 0.5  # step 0 drawn at half of step 1
    with pytest.raises(ParameterError, match="not in steps"):
        step_histogram([3], STEPS)

    lifetimes = lifetime_histogram(table["lifetime_snapshots"], 8)
    assert lifetimes["count"].sum() == 6 and dict(zip(lifetimes["lifetime_snapshots"], lifetimes["count"]))[1] == 2


def test_strong_fraction_curve_dips_where_planted():
    # 40 init features fade by snapshot 3; 60 features form at snapshot 4: the dip is at 3.
    n_snapshots = len(STEPS)
    norms = np.full((n_snapshots, 100), LOW)
    norms[:3, :40] = 1.0
    norms[4:, 40:] = 1.0
    curve = strong_fraction_curve(norms, STEPS)
    np.testing.assert_allclose(curve["fraction_strong"], [0.4, 0.4, 0.4, 0.0, 0.6, 0.6, 0.6, 0.6])
    order = peak_order(norms)
    assert set(order[:40]) == set(range(40))  # peaking at step 0 comes first in the heatmap


# ---------------------------------------------------------------------------------------------
# Directions
# ---------------------------------------------------------------------------------------------

TURN = 4  # planted turning point: snapshot index 4 (step 8)


def random_rotation(d_model: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d_model, d_model, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def planted_decoder(n_features=60, d_model=32, seed=0) -> torch.Tensor:
    """Directions fixed after the turning point (tiny drift), a random rotation of them before."""
    generator = torch.Generator().manual_seed(seed)
    after = torch.randn(n_features, d_model, generator=generator, dtype=torch.float64)
    rotation = random_rotation(d_model, generator)
    snapshots = []
    for k in range(len(STEPS)):
        base = after @ rotation.T if k < TURN else after
        snapshots.append(base + 0.02 * torch.randn(n_features, d_model, generator=generator, dtype=torch.float64))
    return torch.stack(snapshots)  # [snapshot, feature, d_model]


def test_turning_point_finds_planted_rotation():
    decoder = planted_decoder()
    curve = direction_change_curve(decoder, STEPS)
    change = curve["change"].to_numpy()
    assert change[TURN - 1] > 0.7  # nearly orthogonal across the turn
    assert np.delete(change, TURN - 1).max() < 0.01
    point = turning_point(decoder, STEPS)
    assert (point.step, point.index, point.method) == (8, TURN, "direction_change")


def test_strength_weighting_ignores_faded_features_turning():
    # 30 extra features are faded except at the final snapshot and spin randomly at every
    # transition; uniform weighting is fooled, strength weighting is not.
    generator = torch.Generator().manual_seed(1)
    decoder = planted_decoder(n_features=20, seed=1)
    spinning = torch.randn(len(STEPS), 30, decoder.shape[-1], generator=generator, dtype=torch.float64)
    spinning[:-1] *= 0.01
    decoder = torch.cat([decoder, spinning], dim=1)
    uniform = direction_change_curve(decoder, STEPS, weighting="uniform")["change"].to_numpy()
    assert np.delete(uniform, TURN - 1).min() > 0.4  # noise everywhere
    point = turning_point(decoder, STEPS, EmergenceConfig(direction_weighting="strength"))
    assert point.step == 8
    dip = turning_point(decoder.numpy(), STEPS, EmergenceConfig(turning_point_method="strength_dip"))
    assert dip.method == "strength_dip" and "fraction_strong" in dip.curve


def test_projection_matrix_blocks_and_normalisations():
    decoder = planted_decoder()
    cosine = projection_matrix(decoder, "cosine")
    np.testing.assert_allclose(np.diag(cosine), 1.0, atol=1e-6)
    assert cosine[TURN:, TURN:].min() > 0.99  # fixed directions after the turn
    assert cosine[:TURN, :TURN].min() > 0.99
    assert np.abs(cosine[:TURN, TURN:]).max() < 0.3  # nearly orthogonal across it
    np.testing.assert_allclose(cosine, cosine.T, atol=1e-9)

    # Hand-computed two-snapshot example: W^0 = (2, 0), W^1 = (1, 1).
    two = torch.tensor([[[2.0, 0.0]], [[1.0, 1.0]]])
    raw = projection_matrix(two, "raw")
    np.testing.assert_allclose(raw, [[2.0, 1.0], [math.sqrt(2), math.sqrt(2)]], atol=1e-6)
    peak = projection_matrix(two, "peak")  # divided by the peak norm 2
    np.testing.assert_allclose(peak, raw / 2.0, atol=1e-6)
    np.testing.assert_allclose(np.diag(peak), [1.0, math.sqrt(2) / 2], atol=1e-6)
    # Selecting features: only the second one (which never moves) → all-ones cosine matrix.
    mixed = torch.cat([two, torch.tensor([[[0.0, 3.0]], [[0.0, 1.0]]])], dim=1)
    np.testing.assert_allclose(projection_matrix(mixed, "cosine", features=[1]), np.ones((2, 2)), atol=1e-6)


def test_decoder_norms_match_shapes():
    decoder = planted_decoder(n_features=5)
    norms = decoder_norms(decoder)
    assert norms.shape == (len(STEPS), 5)
    np.testing.assert_allclose(norms, torch.linalg.vector_norm(decoder, dim=-1).numpy())


# ---------------------------------------------------------------------------------------------
# Bad parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, name",
    [
        ({"strong_fraction": 1.2}, "strong_fraction"),
        ({"strong_fraction": 0.0}, "strong_fraction"),
        ({"fade_fraction": -0.1}, "fade_fraction"),
        ({"fade_fraction": 0.7}, "fade_fraction"),  # above strong_fraction
        ({"min_lifetime": 0}, "min_lifetime"),
        ({"turning_point_method": "magic"}, "turning_point_method"),
        ({"projection": "dot"}, "projection"),
    ],
)
def test_bad_emergence_parameters_are_named(changes, name):
    with pytest.raises(ParameterError, match=name):
        EmergenceConfig(**changes)


def test_bad_steps_and_inputs_are_named():
    norms = planted_norms()
    with pytest.raises(ParameterError, match="steps"):
        emergence_table(norms, [0, 1, 2, 2, 8, 16, 32, 64])
    with pytest.raises(ParameterError, match="steps"):
        emergence_table(norms, STEPS[:-1])
    with pytest.raises(ParameterError, match="steps"):
        validate_steps([0, 1.5], 2)
    bad = norms.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ParameterError, match="decoder_norms"):
        emergence_table(bad, STEPS)
    with pytest.raises(ParameterError, match="decoder"):
        turning_point(torch.zeros(8, 3), STEPS)
    with pytest.raises(ParameterError, match="normalisation"):
        projection_matrix(planted_decoder(n_features=2), "dot")
    assert EmergenceConfig.from_dict(EmergenceConfig().to_dict()) == EmergenceConfig()

# ------------------------------------------------------------------------------------ features that never fire

def test_a_feature_that_never_fires_is_dead_whatever_its_decoder_says():
    """Feature 0 keeps its initial decoder norm but never fires: by its norm alone it is persistent; by
    the firing rule it is dead. Feature 1 fires only from snapshot 2 on: its ρ is 0 before, so it emerges
    there instead of counting as strong at initialisation."""
    steps = [0, 1, 2, 3]
    norms = np.array([[0.1, 0.6, 0.3], [0.1, 0.6, 0.3], [0.1, 0.9, 0.3], [0.1, 1.0, 0.3]])
    counts = np.array([[0, 0, 40], [0, 2, 40], [0, 30, 40], [1, 50, 40]])
    naive = emergence.emergence_table(norms, steps)
    assert naive.loc[0, "category"] == "persistent" and naive.loc[1, "category"] == "persistent"
    live = emergence.firing_norms(norms, counts, min_rows=5)
    assert live.dead.tolist() == [True, False, False]
    assert live.norms[:, 1].tolist() == [0.0, 0.0, 0.9, 1.0]  # fired on 0 and 2 < 5 rows: ρ = 0 there
    table = emergence.emergence_table(live.norms, steps, dead=live.dead)
    assert table["category"].tolist() == ["dead", "emergent", "persistent"]
    assert table.loc[1, "emergence_step"] == 2
    summary = emergence.summarise_emergence(table)
    assert summary["n_alive"] == 2
    # with a rule of one row, feature 0's single row at the last snapshot keeps it alive
    assert not emergence.firing_norms(norms, counts, min_rows=1).dead[0]


def test_firing_norms_refuses_mismatched_counts_and_bad_thresholds():
    with pytest.raises(ParameterError, match="firing_counts"):
        emergence.firing_norms(np.ones((3, 4)), np.ones((4, 3)))
    with pytest.raises(ParameterError, match="min_firing_rows"):
        emergence.firing_norms(np.ones((3, 4)), np.ones((3, 4)), min_rows=0)
