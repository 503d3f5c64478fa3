"""Shared fixtures: a small synthetic corpus and a trained micro suite, both made offline."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never touch the network: hub lookups must come from local caches the tests build.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the teacher", "a bird", "the children", "our neighbour"]
VERBS = ["sees", "likes", "finds", "follows", "remembers", "paints", "calls", "helps"]
OBJECTS = ["the river", "a red house", "the small garden", "an apple", "the long road", "a letter", "the moon"]
ENDINGS = ["today", "at night", "in the morning", "again", "with care", "before noon"]


def write_text_corpus(path: Path, n_documents: int = 60, seed: int = 0) -> Path:
    """A deterministic toy English corpus: documents separated by blank lines."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_documents):
        sentences = []
        for _ in range(rng.integers(8, 16)):
            words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
            if rng.random() < 0.5:
                words.append(rng.choice(ENDINGS))
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    return write_text_corpus(tmp_path_factory.mktemp("corpus") / "toy.txt")


def micro_suite_config(corpus: Path, **changes):
    from crosslib.models.suite import SuiteConfig
    from crosslib.text.corpus import CorpusConfig

    base = dict(
        corpus=CorpusConfig(source=str(corpus), heldout_fraction=0.2),
        vocab_size=300, n_layers=2, d_model=32, n_heads=2, d_mlp=64, context_length=16,
        total_steps=12, batch_size=4, warmup_steps=2, linear_every=4, checkpoint_every=3, repeat_fraction=0.25,
    )
    base.update(changes)
    return SuiteConfig(**base)


@pytest.fixture(scope="session")
def micro_suite(tmp_path_factory, text_corpus) -> Path:
    """A trained 2-layer, d=32 suite with steps 0, 1, 2, 4, 8, 12 (a few seconds to train)."""
    from crosslib.models.suite import train_suite

    return train_suite(micro_suite_config(text_corpus), root=tmp_path_factory.mktemp("data"), progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: tiny tensors gain nothing from a second thread on a
    busy 2-core machine, and results compared across processes need the same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "check_suite: trains the tiny suite under two CPU instruction sets (~25 min); run by `make check-suite`")


def pytest_collection_modifyitems(config, items):
    """`check_suite` tests run only when asked for by marker (`-m check_suite`), never in `make test`."""
    if "check_suite" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="trains full suites for ~25 minutes: run `make check-suite`")
    for item in items:
        if "check_suite" in item.keywords:
            item.add_marker(skip)
