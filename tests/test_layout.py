"""The package's folders, its module map, the README's architecture and the tests agree."""

from __future__ import annotations

import re
from pathlib import Path

import crosslib

PACKAGE = Path(crosslib.__file__).resolve().parent
ROOT = PACKAGE.parent
TESTS = Path(__file__).resolve().parent


def subpackages() -> list[str]:
    return sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


def modules(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")


def test_the_package_is_grouped_in_data_flow_folders():
    assert subpackages() == ["activations", "analyses", "book", "dictionaries", "models", "text"]
    readme = (ROOT / "README.md").read_text()
    top_map = (PACKAGE / "__init__.py").read_text()
    for name in subpackages():
        assert f"`crosslib/{name}/`" in readme, f"README's architecture table lacks crosslib/{name}/"
        assert re.search(rf"^  {name}/ ", top_map, re.M), f"crosslib/__init__.py's map lacks {name}/"


def test_every_module_is_listed_where_it_lives():
    """Each folder's docstring names its modules, the top-level map names the shared ones."""
    top_map = (PACKAGE / "__init__.py").read_text()
    for module in modules(PACKAGE):
        assert re.search(rf"\b{module}\b", top_map), f"crosslib/__init__.py does not list {module}"
    for name in subpackages():
        listing = (PACKAGE / name / "__init__.py").read_text()
        for module in modules(PACKAGE / name):
            assert re.search(rf"\b{module}\b", listing), f"crosslib/{name}/__init__.py does not list {module}"


def test_the_readme_names_each_module_in_its_folder_row():
    readme = (ROOT / "README.md").read_text()
    for name in subpackages():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `crosslib/{name}/` |")), "")
        for module in modules(PACKAGE / name):
            assert f"`{module}`" in row, f"README's architecture row for crosslib/{name}/ lacks `{module}`"


def test_the_tests_mirror_the_package():
    folders = sorted(p.name for p in TESTS.iterdir() if p.is_dir() and list(p.glob("test_*.py")))
    assert folders == subpackages()
