"""The separability probe (`crosslib.analyses.probes.fit_logistic_probes`) against scikit-learn's
`LogisticRegression`, side by side on the sizes chapter 3 probes.

    .venv/bin/python benchmarks/bench_probe.py              # ~15 s on 2 busy cores
    .venv/bin/python benchmarks/bench_probe.py --repeats 1

Chapter 3 calls `crosslib.analyses.probes.separability` with `SeparabilityConfig(n_features=32)`: for each of
32 features, 100 active and 100 inactive positions to fit (samples_per_class=200, train_fraction=0.5)
and as many held out, one probe per snapshot of the tiny suite (19 snapshots, d_model = 128), an L2
penalty of 1e-2 on standardised inputs and at most 100 L-BFGS iterations. Those sizes are read from
`SeparabilityConfig` and the tiny preset here. The data are planted: a feature's active positions are
Gaussian noise (each dimension with its own scale, so standardisation matters) plus its direction
times a strength that grows over the snapshots, so the probes range from chance to near-perfect.

Both libraries solve the same problem: the mean logistic loss + ½·l2·‖w‖² (bias unpenalised) on
inputs standardised with the training statistics; scikit-learn's C = 1 / (l2 · n_train) is that
penalty in its units (lbfgs, its default tolerance, max_iter = 100). crosslib fits a feature's 19
probes in one L-BFGS run on one torch thread (as `separability` does); scikit-learn fits them one by
one on one BLAS thread. Printed per library: held-out accuracy, AUC, the objective reached, and the
time of fit + held-out scores over all 32 features (best of --repeats); then how often the two
predict the same held-out label, the largest AUC difference, and

    sklearn_vs_crosslib: X    scikit-learn's time ÷ crosslib's (above 1: crosslib is faster)

scikit-learn is a dev extra (pyproject.toml), not a runtime dependency; this is a measurement, not a
switch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crosslib.analyses.probes import SeparabilityConfig, auc_per_row, fit_logistic_probes  # noqa: E402
from crosslib.models.suite import SUITE_PRESETS, pythia_schedule  # noqa: E402
from crosslib.runtime import THREADS_ENV, configure_process  # noqa: E402


def planted_probes(n_features: int, n_snapshots: int, per_class: int, d_model: int, seed: int) -> np.ndarray:
    """Inputs [feature, snapshot, sample, d_model]: per_class active positions, then per_class inactive ones."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0.0, 1.0, d_model))  # per-dimension spread, as in a residual stream
    directions = rng.standard_normal((n_features, d_model))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    strength = np.linspace(0.0, 1.5, n_snapshots)  # chance at the first snapshot, near-perfect at the last
    noise = rng.standard_normal((n_features, n_snapshots, 2 * per_class, d_model))
    signal = np.einsum("s,fd->fsd", strength, directions)[:, :, None, :] * np.sqrt(d_model) / 4
    inputs = noise.copy()
    inputs[:, :, :per_class] += signal
    inputs *= scale
    return inputs.astype(np.float32)


def objective(weight: np.ndarray, bias: float, x: np.ndarray, y: np.ndarray, l2: float) -> float:
    """Mean logistic loss + ½·l2·‖w‖², the problem both libraries solve (x standardised)."""
    logits = x @ weight + bias
    return float(np.mean(np.logaddexp(0.0, logits) - y * logits) + 0.5 * l2 * weight @ weight)


def run_crosslib(train: np.ndarray, labels: np.ndarray, test: np.ndarray, config: SeparabilityConfig):
    """Scores [feature, snapshot, test sample], objectives [feature, snapshot], seconds."""
    scores, fits = [], []
    start = time.perf_counter()
    for train_x, test_x in zip(torch.as_tensor(train), torch.as_tensor(test)):
        n_snapshots = train_x.shape[0]
        weight, bias, mean, std = fit_logistic_probes(
            train_x, torch.as_tensor(labels, dtype=torch.float32).expand(n_snapshots, -1), l2=config.l2,
            max_iter=config.max_iter)
        scores.append((torch.einsum("snd,sd->sn", (test_x - mean) / std, weight) + bias[:, None]).numpy())
        fits.append((weight, bias, mean, std))
    seconds = time.perf_counter() - start
    objectives = [[objective(weight[k].double().numpy(), float(bias[k]),
                             ((train_x[k] - mean[k]) / std[k]).double().numpy(), labels, config.l2)
                   for k in range(train_x.shape[0])]
                  for train_x, (weight, bias, mean, std) in zip(torch.as_tensor(train), fits)]
    return np.stack(scores), np.array(objectives), seconds


def run_sklearn(train: np.ndarray, labels: np.ndarray, test: np.ndarray, config: SeparabilityConfig):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    n_train = train.shape[2]
    scores = np.zeros(test.shape[:3])
    objectives = np.zeros(train.shape[:2])
    seconds = 0.0
    for f in range(train.shape[0]):
        for k in range(train.shape[1]):
            start = time.perf_counter()
            # the standardisation crosslib applies (sample std, + 1e-6), inside the clock for both
            mean = train[f, k].mean(axis=0)
            std = train[f, k].std(axis=0, ddof=1) + 1e-6
            x, x_test = (train[f, k] - mean) / std, (test[f, k] - mean) / std
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = LogisticRegression(C=1.0 / (config.l2 * n_train), max_iter=config.max_iter).fit(x, labels)
            scores[f, k] = model.decision_function(x_test)
            seconds += time.perf_counter() - start
            objectives[f, k] = objective(model.coef_[0].astype(np.float64), float(model.intercept_[0]),
                                         x.astype(np.float64), labels, config.l2)
    return scores, objectives, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per library; the best is printed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    os.environ[THREADS_ENV] = "fixed"  # the thread count is this benchmark's to set
    configure_process()  # crosslib's allocator tuning, as `crosslib book` runs
    config = SeparabilityConfig()
    tiny = SUITE_PRESETS["tiny"]
    n_snapshots, d_model = len(pythia_schedule(tiny.total_steps, tiny.linear_every)), tiny.d_model
    per_class = round(config.samples_per_class * config.train_fraction)
    inputs = planted_probes(config.n_features, n_snapshots, 2 * per_class, d_model, args.seed)
    # half of each class fits, the other half is held out (as `separability` splits them)
    positives, negatives = inputs[:, :, :2 * per_class], inputs[:, :, 2 * per_class:]
    train = np.concatenate([positives[:, :, :per_class], negatives[:, :, :per_class]], axis=2)
    test = np.concatenate([positives[:, :, per_class:], negatives[:, :, per_class:]], axis=2)
    labels = np.concatenate([np.ones(per_class), np.zeros(per_class)])  # the same order in both halves
    test_labels = labels.astype(bool)

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    results = {}
    with threadpool_limits(1):
        for name, run in (("crosslib", run_crosslib), ("sklearn", run_sklearn)):
            runs = [run(train, labels, test, config) for _ in range(args.repeats)]
            results[name] = (runs[0][0], runs[0][1], min(r[2] for r in runs))

    print(f"{config.n_features} features × {n_snapshots} snapshots = {config.n_features * n_snapshots} probes; "
          f"{2 * per_class} positions to fit and {2 * per_class} held out per probe, d_model = {d_model}, "
          f"l2 = {config.l2}, max_iter = {config.max_iter}; one thread each, best of {args.repeats}")
    print(f"{'':10s} {'accuracy':>9s} {'mean AUC':>9s} {'objective':>10s} {'seconds':>8s}")
    aucs, predictions = {}, {}
    for name, (scores, objectives, seconds) in results.items():
        flat = scores.reshape(-1, scores.shape[-1])
        aucs[name] = auc_per_row(flat, np.broadcast_to(test_labels, flat.shape))
        predictions[name] = flat > 0
        accuracy = (predictions[name] == test_labels).mean()
        print(f"{name:10s} {accuracy:9.4f} {aucs[name].mean():9.4f} {objectives.mean():10.5f} {seconds:8.3f}")
    gap = results["crosslib"][1] - results["sklearn"][1]
    print(f"same held-out label: {(predictions['crosslib'] == predictions['sklearn']).mean():.4f}; "
          f"largest AUC difference: {np.abs(aucs['crosslib'] - aucs['sklearn']).max():.4f}; "
          f"objective crosslib − sklearn: median {np.median(gap):+.2e}, largest {gap.max():+.2e}")
    print(f"sklearn_vs_crosslib: {results['sklearn'][2] / results['crosslib'][2]:.2f}")


if __name__ == "__main__":
    main()
