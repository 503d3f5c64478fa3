"""The planted data the SAE-Track tests share (tests/dictionaries/test_saetrack.py for the chain,
tests/analyses/test_saetrack_analysis.py for what it shows): slowly drifting sparse features, some of
which appear late, and the chains trained on them, each trained once per test session."""

from __future__ import annotations

import functools

import torch

from crosslib.activations.sources import TensorSource
from crosslib.dictionaries.saetrack import SAETrackChain, SAETrackConfig, train_chain

STEPS = [0, 1, 2, 4, 8]
N_PLANTED = 12
D_MODEL = 16
# λ = 1 and lr 3e-2 recover the planted features cleanly in 300 steps of 64 rows (λ = 0.3 merges some).
CONFIG = SAETrackConfig(dict_size=24, n_steps=300, batch_size=64, lr=3e-2, sparsity_coefficient=1.0, eval_rows=600,
                        warm_fraction=0.2, warm_lr_factor=0.1, n_top=8, n_random=64, formation_rows=600,
                        n_trajectory_features=6)


def drifting_dictionary(*, first_snapshot=None, rotate=0.25, n_rows=3000, density=0.05, seed=5, noise=0.01):
    """Planted sparse features whose unit directions rotate a little from snapshot to snapshot.

    Each step adds `rotate` × a random unit vector orthogonal to the current direction (neighbour
    cosine ≈ 0.97, first to last ≈ 0.86). Feature j fires on a row with probability `density` with a
    magnitude in [0.5, 1.5], the same at every snapshot where it is present (from
    first_snapshot[j] on). Returns the source, directions [feature, snapshot, d_model],
    present [feature, snapshot] and magnitudes [row, feature].
    """
    g = torch.Generator().manual_seed(seed)
    directions = [torch.nn.functional.normalize(torch.randn(N_PLANTED, D_MODEL, generator=g), dim=-1)]
    for _ in STEPS[1:]:
        step = torch.randn(N_PLANTED, D_MODEL, generator=g)
        step = torch.nn.functional.normalize(step - (step * directions[-1]).sum(-1, keepdim=True) * directions[-1], dim=-1)
        directions.append(torch.nn.functional.normalize(directions[-1] + rotate * step, dim=-1))
    directions = torch.stack(directions, dim=1)
    present = torch.ones(N_PLANTED, len(STEPS), dtype=torch.bool)
    for j, first in enumerate(first_snapshot or []):
        present[j, :first] = False
    fires = torch.rand(n_rows, N_PLANTED, generator=g) < density
    magnitudes = torch.where(fires, torch.rand(n_rows, N_PLANTED, generator=g) + 0.5, 0.0)
    x = torch.einsum("rf,fs,fsd->rsd", magnitudes, present.float(), directions)
    x = x + noise * torch.randn(x.shape, generator=g)
    return TensorSource(x, steps=STEPS, eval_fraction=0.2), directions, present, magnitudes


def unit(t):
    return torch.nn.functional.normalize(t, dim=-1)


def planted_cosines(decoders, directions):
    """cos[snapshot, sae_feature, planted] between the chain's decoders and the planted directions at each snapshot."""
    return torch.einsum("kfd,jkd->kfj", unit(decoders.float()), directions)


LATE_FIRST = [0] * 8 + [2, 2, 3, 3]  # planted features 8..11 appear at steps 2, 2, 4, 4


# A feature that appears mid-training must be learnt by a warm link from a dead latent: with the
# default short, slow links (20% of the steps at 0.1× lr) the chain learns it only partly, so here
# the links get 30% of the steps at 0.3× lr.
LATE_CONFIG = CONFIG.replace(warm_fraction=0.3, warm_lr_factor=0.3)


@functools.cache
def drift_chain() -> tuple[TensorSource, torch.Tensor, SAETrackChain]:
    """The drifting dictionary and its chain: (source, planted directions, chain)."""
    source, directions, present, magnitudes = drifting_dictionary()
    chain = train_chain(source, CONFIG, cache=False, progress=False)
    return source, directions, chain


@functools.cache
def late_chain() -> tuple[TensorSource, torch.Tensor, torch.Tensor, SAETrackChain]:
    """Features 8..11 appear late, and the chain of LATE_CONFIG: (source, directions, magnitudes, chain)."""
    source, directions, present, magnitudes = drifting_dictionary(first_snapshot=LATE_FIRST, seed=7)
    chain = train_chain(source, LATE_CONFIG, cache=False, progress=False)
    return source, directions, magnitudes, chain
