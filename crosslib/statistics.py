"""Small statistics shared by the analyses: one correlation helper, row-wise ranks, monotone trends.

Every function takes plain arrays and drops non-finite pairs itself, so callers never repeat the
"fewer than three points or a constant input gives NaN" rule.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Sequence

import numpy as np
from jaxtyping import Float
from scipy import stats


@dataclasses.dataclass(frozen=True)
class Correlation:
    """Pearson and Spearman correlation of two paired samples (NaN when undefined).

    n counts the finite pairs used; a correlation needs at least 3 of them and neither input
    constant.
    """

    n: int
    pearson_r: float
    pearson_p: float
    spearman_rho: float
    spearman_p: float


def correlate(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Correlation:
    """Pearson r and Spearman ρ with their two-sided p-values over the pairs where both are finite."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"correlate needs paired samples, got {x.size} and {y.size} values")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(n, math.nan, math.nan, math.nan, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson = stats.pearsonr(x, y)
        spearman = stats.spearmanr(x, y)
    return Correlation(n, float(pearson.statistic), float(pearson.pvalue), float(spearman.statistic),
                       float(spearman.pvalue))


def row_spearman(x: Float[np.ndarray, "row sample"], y: Float[np.ndarray, "row sample"]) -> Float[np.ndarray, " row"]:
    """Spearman correlation of x[r] with y[r] for every row r (NaN for rows with < 3 finite pairs or a
    constant input). Ranks are average ranks, as in scipy.stats.spearmanr."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"row_spearman needs two equal [row, sample] arrays, got {x.shape} and {y.shape}")
    out = np.full(x.shape[0], math.nan)
    for row in range(x.shape[0]):
        out[row] = correlate(x[row], y[row]).spearman_rho
    return out


def monotone_trend(values: Sequence[float] | np.ndarray) -> float:
    """Spearman ρ between position (0, 1, 2, …) and the values: +1 for a strictly rising sequence,
    −1 for a falling one, near 0 for no trend (NaN for fewer than three finite values)."""
    values = np.asarray(values, dtype=np.float64)
    return correlate(np.arange(values.size, dtype=np.float64), values).spearman_rho
