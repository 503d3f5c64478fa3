"""The chain every chapter walks: suite → held-out token windows → activation store → dictionary.

Each step is a cached artifact, so a chapter asks for what it needs with the parameters it was
given, and the second chapter that asks for the same thing gets it at once.

    store = activation_store("tiny", "blocks.2.hook_resid_post", n_tokens=200_000)
    result = dictionary(store, dict_size=1024, sparsity_coefficient=0.3)   # a crosscoder
    saes = dictionary(store, dict_size=1024, sparsity_coefficient=0.3, independent=True)  # one SAE per snapshot
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from crosslib.activations.cache import CacheConfig, build_stores
from crosslib.activations.sources import ActivationSource, RowSource
from crosslib.activations.store import ActivationStore
from crosslib.book.parameters import check_dictionary_memory, check_parameters
from crosslib.config import require, require_choice
from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from crosslib.dictionaries.train import TrainConfig, TrainResult, train_crosscoder_cached
from crosslib.machine import native_bf16
from crosslib.models.snapshots import context_length as snapshot_context_length
from crosslib.models.suite import (as_corpus_config, corpus_name, iter_steps, resolve_suite, suite_token_streams,
                                   windows_for_tokens)
from crosslib.progress import progress
from crosslib.text.corpus import CorpusConfig


def activation_store(suite: str, hook: str, steps: Sequence[int] | None = None, **options: Any) -> ActivationStore:
    """The activations at `hook` of the `steps` snapshots of `suite` on held-out text (`activation_stores`
    with one hook; the options are its)."""
    return activation_stores(suite, [hook], steps, **options)[0]


def activation_stores(
    suite: str,
    hooks: Sequence[str],
    steps: Sequence[int] | None = None,
    *,
    n_tokens: int = 200_000,
    context_length: int | None = None,
    suite_overrides: dict[str, Any] | None = None,
    corpus: CorpusConfig | str | dict[str, Any] | None = None,
    dtype: str = "float16",
    device: str = "cpu",
    seed: int = 0,
    split: str = "heldout",
    progress: bool = True,
) -> list[ActivationStore]:
    """One store per hook of `hooks`: the activations there of the `steps` snapshots of `suite` on held-out text.

    The same `n_tokens // context_length` windows (at seeded random places of the corpus split,
    held-out by default) are run through every snapshot. `context_length` defaults to the
    model's, at most 128. Stores with the same suite, tokens and seed but different hooks hold the
    same rows in the same order, so they can be read side by side (as the layers chapter does);
    asked for together, they are built in one pass of each snapshot.
    """
    hooks = list(hooks) if isinstance(hooks, (list, tuple)) else hooks
    require(isinstance(hooks, list) and len(hooks) > 0, "hooks", hooks, "a non-empty list of hook names")
    for hook in hooks:
        check_parameters(dict(suite=suite, suite_overrides=suite_overrides or {}, steps=steps, hook=hook,
                              n_tokens=n_tokens, device=device, seed=seed))
    require(context_length is None or (isinstance(context_length, int) and not isinstance(context_length, bool)
                                       and context_length >= 2), "context_length", context_length,
            "None (the model's, at most 128) or an integer >= 2")
    corpus = as_corpus_config(corpus)
    require_choice("split", split, ["heldout", "train"])
    path = resolve_suite(suite, suite_overrides)
    steps = tuple(iter_steps(path, list(steps) if steps is not None else None))
    if context_length is None:  # from the config: no weights loaded
        context_length = snapshot_context_length(path, steps[-1], at_most=128)
    stream = suite_token_streams(path, corpus)[split]
    windows = windows_for_tokens(stream, n_tokens, context_length, seed, split=split,
                                 corpus_name=corpus_name(path, corpus))
    configs = [CacheConfig(suite=path, steps=steps, hook=hook, dtype=dtype, device=device) for hook in hooks]
    return build_stores(configs, windows, progress=progress)


def dictionary(
    store: ActivationSource,
    dict_size: int,
    sparsity_coefficient: float,
    *,
    independent: bool = False,
    activation: str = "jumprelu",
    n_steps: int = 600,  # the tiny preset's values; chapters pass their own
    batch_size: int = 1024,
    lr: float = 1e-3,
    bf16: bool | None = None,  # None: bf16 where the CPU multiplies bf16 natively (crosslib.machine.native_bf16)
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    **model_options: Any,
) -> TrainResult:
    """A crosscoder over all snapshots of `store` (or, with `independent=True`, one SAE per
    snapshot trained together in one pass), trained with the paper's recipe and cached."""
    model_config = CrosscoderConfig(n_snapshots=store.n_snapshots, d_model=store.d_model, dict_size=dict_size,
                                    activation=activation, independent=independent, **model_options)
    bf16 = native_bf16() if bf16 is None else bf16  # emulated bf16 is 7x slower than fp32 (crosslib.machine)
    train_config = TrainConfig(n_steps=n_steps, batch_size=batch_size, lr=lr, seed=seed, bf16=bf16,
                               sparsity_coefficient=sparsity_coefficient)
    check_dictionary_memory(store.n_snapshots, store.d_model, dict_size, batch_size, device_name=device)
    return train_crosscoder_cached(store, model_config, train_config, device=device, progress=progress)


def sparsity_sweep(
    store: ActivationSource,
    dict_size: int,
    sparsity_coefficients: Sequence[float],
    *,
    methods: Sequence[str] = ("crosscoder", "per-snapshot SAEs"),
    **train_options: Any,
) -> pd.DataFrame:
    """Explained variance, L0 and dead fraction per snapshot for each λ and each method.

    "crosscoder" is one dictionary over all snapshots; "per-snapshot SAEs" are S independent
    dictionaries of the same size trained together in one pass over the cache. Same module, same
    loss, same schedule: the comparison is fair by construction.
    """
    coefficients = list(sparsity_coefficients)
    require(len(coefficients) > 0 and all(isinstance(c, (int, float)) and c >= 0 for c in coefficients),
            "sparsity_coefficients", sparsity_coefficients, "a non-empty list of numbers >= 0")
    independent = {"crosscoder": False, "per-snapshot SAEs": True}
    for method in methods:
        require_choice("methods", method, list(independent))
    rows = []
    plan = [(coefficient, method) for coefficient in coefficients for method in methods]
    # an outer bar, so that a long sweep's log says which dictionary of how many is training
    for coefficient, method in progress(plan, desc="sparsity sweep", unit="dictionary",
                                        disable=not train_options.get("progress", True)):
        result = dictionary(store, dict_size, coefficient, independent=independent[method], **train_options)
        for i, step in enumerate(store.steps):
            rows.append({
                "method": method, "sparsity_coefficient": coefficient, "step": step,
                "explained_variance": result.eval["explained_variance"][i],
                "l0": result.eval["l0"][i], "dead_fraction": result.eval["dead_fraction"][i],
            })
    return pd.DataFrame(rows)


@torch.no_grad()
def feature_activations(
    model: Crosscoder,
    store: ActivationStore,
    features: Sequence[int],
    *,
    split: str = "eval",
    max_windows: int | None = None,
    batch_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Token windows and the activations of `features` on them, at every snapshot.

    Returns `tokens` [window, position] and `activations` [window, position, snapshot, feature]
    (float32) for the windows of `split` (the first `max_windows` of them).
    """
    features = np.asarray(list(features), dtype=np.int64)
    rows = store.split_rows(split)
    first_window = rows.start // store.context_length
    n_windows = len(rows) // store.context_length
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    n_rows = n_windows * store.context_length
    out = np.empty((n_rows, store.n_snapshots, len(features)), dtype=np.float32)
    index = torch.from_numpy(features)
    for start in range(0, n_rows, batch_size):
        x = store.rows(split, start=start, limit=min(batch_size, n_rows - start))
        out[start : start + len(x)] = model.encode(x)[..., index].float().numpy()
    tokens = np.asarray(store.tokens[first_window : first_window + n_windows])
    return tokens, out.reshape(n_windows, store.context_length, store.n_snapshots, len(features))


def layer_feature_batches(
    stores: Sequence[RowSource],
    dictionaries: Sequence[Crosscoder],
    *,
    split: str = "train",
    batch_size: int = 8192,
):
    """A factory of iterators over aligned feature activations of several layers.

    `stores[L]` and `dictionaries[L]` are layer L's single-snapshot store and SAE; all stores
    must hold the same rows (same suite, tokens and seed). Each call of the returned function
    yields tuples (features of layer 0, ..., features of layer N), each [batch, feature], in row
    order — what `crosslib.analyses.crosslayer.layer_chain_statistics` reads (twice).
    """
    n_rows = {len(store.split_rows(split)) for store in stores}
    require(len(n_rows) == 1, "stores", [str(s) for s in stores], "stores over the same rows (same tokens and seed)")
    total = n_rows.pop()

    @torch.no_grad()
    def batches():
        for start in range(0, total, batch_size):
            yield tuple(
                sae.encode(store.rows(split, start=start, limit=batch_size))[:, 0].float()
                for store, sae in zip(stores, dictionaries)
            )

    return batches
