"""The book's Methods page (book/methods.md) stays true to the code it cites.

Docstrings cite the Methods page instead of a design file users do not have, so the page must
name functions that exist and thresholds with their current values.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

import crosslib
from crosslib.book import claims

ROOT = Path(__file__).resolve().parents[2]
METHODS = ROOT / "book" / "methods.md"
CODE_LITERAL = re.compile(r"`(crosslib(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`")
TABLE_ROW = re.compile(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \|", re.MULTILINE)


def resolve(dotted: str) -> object:
    """The object a dotted name such as crosslib.dictionaries.crosscoder.Crosscoder.forward names."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


def verdict_constants() -> dict[str, object]:
    """The named numeric thresholds of crosslib.book.claims."""
    return {name: value for name, value in vars(claims).items()
            if name.isupper() and not name.startswith("_") and name != "VERDICTS"
            and isinstance(value, (int, float, tuple)) and not isinstance(value, bool)}


def test_every_cited_function_exists():
    names = sorted(set(CODE_LITERAL.findall(METHODS.read_text())))
    assert len(names) > 40, "the Methods page should cite the functions it describes"
    missing = []
    for name in names:
        try:
            resolve(name)
        except (AttributeError, ModuleNotFoundError):
            missing.append(name)
    assert not missing, f"book/methods.md cites names that do not exist (update the page): {missing}"


def test_verdict_table_lists_every_threshold_with_its_value():
    rows = {name: value.strip() for name, value in TABLE_ROW.findall(METHODS.read_text())}
    constants = verdict_constants()
    assert set(rows) == set(constants), (
        f"book/methods.md's verdict table and crosslib.book.claims disagree: only in the page "
        f"{sorted(set(rows) - set(constants))}, only in the code {sorted(set(constants) - set(rows))}")
    for name, value in constants.items():
        assert rows[name] == str(value), f"{name} is {value} in crosslib.book.claims but {rows[name]} on the Methods page"


@pytest.mark.parametrize("name, value", [
    ("crosslib.analyses.emergence.MIN_FIRING_ROWS", 5),
    ("crosslib.analyses.emergence.EmergenceConfig.strong_fraction", 0.5),
    ("crosslib.analyses.emergence.EmergenceConfig.fade_fraction", 0.25),
    ("crosslib.dictionaries.crosscoder.CrosscoderConfig.tanh_scale", 4.0),
    ("crosslib.dictionaries.crosscoder.CrosscoderConfig.quad_scale", 0.01),
    ("crosslib.dictionaries.crosscoder.CrosscoderConfig.bandwidth", 4.0),
    ("crosslib.dictionaries.crosscoder.CrosscoderConfig.threshold_init", 0.1),
    ("crosslib.dictionaries.train.TrainConfig.sparsity_coefficient", 0.3),
    ("crosslib.dictionaries.train.TrainConfig.lr", 1e-3),
    ("crosslib.dictionaries.train.TrainConfig.threshold_lr_factor", 0.1),
    ("crosslib.dictionaries.train.TrainConfig.sparsity_warmup_fraction", 0.1),
    ("crosslib.dictionaries.train.TrainConfig.lr_decay_fraction", 0.2),
    ("crosslib.dictionaries.train.TrainConfig.lr_end_factor", 1 / 32),
    ("crosslib.analyses.crosslayer.CrossLayerConfig.pass_through", 0.95),
    ("crosslib.analyses.crosslayer.CrossLayerConfig.gate", 0.999),
    ("crosslib.analyses.crosslayer.CrossLayerConfig.binarise_fraction", 0.2),
])
def test_defaults_quoted_on_the_page_are_the_code_defaults(name, value):
    assert resolve(name) == value, f"{name} changed: update book/methods.md, which quotes {value}"


def test_methods_page_is_in_the_book_and_docstrings_cite_it():
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    assert toc["chapters"][-1] == {"file": "methods"}
    package = Path(crosslib.__file__).parent
    stale = [str(p.relative_to(package)) for p in package.rglob("*.py") if "DESIGN §" in p.read_text()]
    assert not stale, f"cite the book's Methods page, not DESIGN: {stale}"
