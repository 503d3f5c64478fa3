"""Chapters 2–6 take their shared defaults from one file, `crosslib/book/defaults.py`, and the
chapters after chapter 2 reuse the crosscoder it trains (the same dictionary cache key).

No chapter is executed here. A chapter's defaults are what the book runner reads from its
`parameters` cell (`crosslib.book.runner.declared_parameters`). The dictionaries it would train are found
by running its own `activation_store(...)`, `dictionary(...)` and `sparsity_sweep(...)` statements
with those defaults: the store is a stand-in whose identity is the arguments it was asked for
with, and the real `crosslib.book.pipeline` → `crosslib.dictionaries.train.train_crosscoder_cached` path builds each
cache key (`DictionaryKey`); only the training is replaced, by recording the key.
"""

from __future__ import annotations

import ast
import inspect
import types
from typing import Any

import nbformat
import pytest

from crosslib.book import defaults as book_defaults
from crosslib.book import pipeline
from crosslib.book.parameters import CHECKS, check_parameters
from crosslib.book.runner import BOOK_DIR, NOTEBOOK_DIR, declared_parameters, notebook_defaults, toc_chapters
from crosslib.config import content_hash
from crosslib.dictionaries import train

CHAPTERS = toc_chapters(BOOK_DIR)
SHARING = [c for c in CHAPTERS if c[:2] in {"02", "03", "04", "05", "06"}]  # read book_defaults
SWEEP_CHAPTER = next(c for c in CHAPTERS if c.startswith("02"))  # trains the crosscoder at each λ
# Chapters that use chapter 2's crosscoder (the feature explorer, chapter 8, shows it too).
READERS = [c for c in CHAPTERS if c[:2] in {"03", "04", "05", "06", "08"}]
SHARED = {name: value for name, value in vars(book_defaults).items() if not name.startswith("_")}
PIPELINE_CALLS = {"activation_store", "activation_stores", "dictionary", "sparsity_sweep"}


def chapter_defaults(chapter: str) -> dict[str, Any]:
    return notebook_defaults(declared_parameters(NOTEBOOK_DIR / f"{chapter}.ipynb"))


# --------------------------------------------------------------------------- the one file


def test_the_shared_defaults_are_valid_chapter_parameters():
    assert set(SHARED) <= set(CHECKS), f"not a chapter parameter: {sorted(set(SHARED) - set(CHECKS))}"
    declared = set().union(*(chapter_defaults(c) for c in SHARING))
    assert set(SHARED) <= declared, f"shared by no chapter: {sorted(set(SHARED) - declared)}"
    check_parameters(SHARED)
    assert SHARED["sparsity_coefficient"] in SHARED["sparsity_coefficients"], "chapter 2's sweep must train the crosscoder"


def test_a_shared_default_changed_in_the_one_file_changes_in_every_chapter(monkeypatch):
    """No chapter keeps its own copy of a shared value: each reads every shared name it declares."""
    for name in SHARED:
        monkeypatch.setattr(book_defaults, name, f"changed {name}")
    for chapter in SHARING:
        defaults = chapter_defaults(chapter)
        stale = {name: defaults[name] for name in SHARED if name in defaults and defaults[name] != f"changed {name}"}
        assert not stale, f"{chapter} declares these itself instead of reading crosslib/book/defaults.py: {stale}"


def test_chapter_1_draws_the_learning_dynamics_with_the_shared_values():
    # Chapter 3 redraws chapter 1's learning-dynamics curves "as in chapter 1".
    chapter_1 = chapter_defaults(next(c for c in CHAPTERS if c.startswith("01")))
    for name in ("n_windows", "induction_sequences", "dynamics_batch_size"):
        assert chapter_1[name] == SHARED[name], name


# --------------------------------------------------------------------------- one crosscoder


class StandInStore:
    """What `pipeline.dictionary` reads of an activation store; its identity (what the dictionary
    key records of its data) is every argument of the `activation_store` call that made it."""

    steps = (0, 512, 2000)
    n_snapshots = len(steps)
    d_model = 16

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint


def stand_in_activation_store(suite: Any, hook: Any, *args: Any, **kwargs: Any) -> StandInStore:
    # activation_store is activation_stores with one hook: its options and defaults are those
    call = inspect.signature(pipeline.activation_stores).bind(suite, [hook], *args, **kwargs)
    call.apply_defaults()  # a chapter that leaves out split= asks for the same store as one giving the default
    return StandInStore(content_hash(dict(call.arguments)))


@pytest.fixture
def requested_dictionaries(monkeypatch, tmp_path):
    """`requested_dictionaries(chapter, **overrides)`: the `DictionaryKey`s of the dictionaries the
    chapter's code asks for with its defaults (and `overrides`), in order."""
    monkeypatch.setenv("CROSSLIB_DATA", str(tmp_path / "data"))
    keys: list[train.DictionaryKey] = []

    def record(kind: str, key: train.DictionaryKey, build: Any, root: Any = None):
        keys.append(key)
        return tmp_path

    metrics = {name: [0.0] * StandInStore.n_snapshots for name in ("explained_variance", "l0", "dead_fraction")}
    monkeypatch.setattr(train, "build_artifact", record)
    monkeypatch.setattr(train, "load_result", lambda directory: types.SimpleNamespace(model=None, eval=metrics))

    def requested(chapter: str, **overrides: Any) -> list[train.DictionaryKey]:
        keys.clear()
        namespace = {**chapter_defaults(chapter), **overrides, "activation_store": stand_in_activation_store,
                     "activation_stores": lambda suite, hooks, *args, **kwargs: [
                         stand_in_activation_store(suite, hook, *args, **kwargs) for hook in hooks],
                     "dictionary": pipeline.dictionary, "sparsity_sweep": pipeline.sparsity_sweep}
        exec(compile(ast.Module(pipeline_statements(chapter), type_ignores=[]), chapter, "exec"), namespace)
        return list(keys)

    return requested


def pipeline_statements(chapter: str) -> list[ast.stmt]:
    """The top-level statements of the chapter's code cells that call the pipeline."""
    nb = nbformat.read(str(NOTEBOOK_DIR / f"{chapter}.ipynb"), as_version=4)
    statements = []
    for cell in nb.cells:
        if cell.cell_type != "code" or "parameters" in cell.metadata.get("tags", []):
            continue
        for statement in ast.parse(cell.source).body:
            if any(isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in PIPELINE_CALLS
                   for node in ast.walk(statement)):
                statements.append(statement)
    return statements


def test_chapters_3_to_6_and_8_reuse_chapter_2s_crosscoder(requested_dictionaries):
    sweep = {key.train["sparsity_coefficient"]: key
             for key in requested_dictionaries(SWEEP_CHAPTER) if not key.model["independent"]}
    assert sorted(sweep) == sorted(chapter_defaults(SWEEP_CHAPTER)["sparsity_coefficients"])
    for chapter in READERS:
        keys = requested_dictionaries(chapter)
        assert len(keys) == 1, f"{chapter} asks for {len(keys)} dictionaries"
        coefficient = chapter_defaults(chapter)["sparsity_coefficient"]
        assert coefficient in sweep, f"{chapter}: λ={coefficient} is not in chapter 2's sweep {sorted(sweep)}"
        assert keys[0] == sweep[coefficient], f"{chapter} would train its own crosscoder, not reuse chapter 2's"


@pytest.mark.parametrize("override", [{"n_tokens": 1000}, {"hook": "blocks.1.hook_resid_post"}, {"n_steps": 7},
                                      {"dict_size": 8}, {"seed": 1}])
def test_a_different_parameter_gives_a_different_crosscoder(requested_dictionaries, override):
    """The check above would catch a chapter that differs (the stand-in store tells stores apart)."""
    chapter = READERS[0]
    assert requested_dictionaries(chapter, **override) != requested_dictionaries(chapter)
