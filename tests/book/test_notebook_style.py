"""Chapters read like a book: the plumbing is collapsed, the science stays in view.

A reader comes for the figures and the argument. Code that only glues numbers into the prose,
draws or styles a figure, shows a table or builds the "Does it reproduce?" verdict table is
collapsed behind a toggle (the `hide-input` cell tag: its output still shows and a click opens the
code); the crosslib calls that compute a chapter's results stay visible, in lines that fit the page
at 1280 px. Only the notebooks' structure is read here: no chapter runs, and tests/book/test_browser.py
looks at the built pages.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import nbformat
import pytest

from crosslib.book.runner import BOOK_DIR, NOTEBOOK_DIR, toc_chapters
from crosslib.runtime import MALLOC_ENV, THREADS_ENV

CHAPTERS = toc_chapters(BOOK_DIR)
COLLAPSED = "hide-input"
# Tags that take code out of the page for good: hidden code must stay one click away.
REMOVING = {"remove-input", "remove-cell", "hide-cell", "remove-output", "hide-output"}
CODE_COLUMN = 76  # characters that fit the rendered code column at 1280 px
PLOT_NAMES = {"plt", "fig", "ax", "axes", "ax2"}
NOT_SCIENCE = {"check_parameters", "configure_process"}  # crosslib calls that are plumbing themselves


def code_cells(chapter: str) -> list[nbformat.NotebookNode]:
    nb = nbformat.read(str(NOTEBOOK_DIR / f"{chapter}.ipynb"), as_version=4)
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def tags(cell: nbformat.NotebookNode) -> list[str]:
    return cell.metadata.get("tags", [])


def is_parameters(cell: nbformat.NotebookNode) -> bool:
    return "parameters" in tags(cell)


def is_visible(cell: nbformat.NotebookNode) -> bool:
    return COLLAPSED not in tags(cell)


def too_wide(source: str) -> list[str]:
    """The lines that wrap in the rendered code column."""
    return [line for line in source.splitlines() if len(line) > CODE_COLUMN]


def called_name(call: ast.Call) -> str:
    return ast.unparse(call.func)


def is_glue(statement: ast.stmt) -> bool:
    """`glue(...)`, or a loop or branch holding only glue calls."""
    if isinstance(statement, ast.Expr):
        return isinstance(statement.value, ast.Call) and called_name(statement.value) == "glue"
    if isinstance(statement, (ast.For, ast.If)):
        return all(is_glue(inner) for inner in statement.body + statement.orelse)
    return False


def is_plotting(statement: ast.stmt) -> bool:
    return any(isinstance(node, ast.Name) and node.id in PLOT_NAMES for node in ast.walk(statement))


def is_showing(statement: ast.stmt, last: bool, science: set[str]) -> bool:
    """A display or print call, or the cell's last bare expression showing a table it does not
    compute with crosslib."""
    if not isinstance(statement, ast.Expr):
        return False
    call = statement.value
    if isinstance(call, ast.Call) and called_name(call) in {"display", "print"}:
        return True
    return last and not calls_any(statement, science)


def builds_the_verdict(tree: ast.AST) -> bool:
    return any(isinstance(node, ast.Call) and called_name(node) == "claims.table" for node in ast.walk(tree))


def is_plumbing_only(source: str, science: set[str] = frozenset()) -> bool:
    body = [s for s in ast.parse(source).body if not isinstance(s, (ast.Import, ast.ImportFrom))]
    return bool(body) and all(is_glue(s) or is_plotting(s) or is_showing(s, s is body[-1], science)
                              or builds_the_verdict(s) for s in body)


def crosslib_names(cells: list[nbformat.NotebookNode]) -> set[str]:
    """The names the chapter imports from crosslib (functions, classes and modules)."""
    names = set()
    for cell in cells:
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "crosslib":
                names |= {alias.asname or alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names
                          if alias.name.split(".")[0] == "crosslib"}
    return names - NOT_SCIENCE


def root_name(call: ast.Call) -> str | None:
    node = call.func
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def calls_any(tree: ast.AST, names: set[str]) -> bool:
    return any(isinstance(node, ast.Call) and root_name(node) in names for node in ast.walk(tree))


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_the_parameters_cell_stays_in_view(chapter):
    (parameters,) = [cell for cell in code_cells(chapter) if is_parameters(cell)]
    assert not {COLLAPSED, *REMOVING} & set(tags(parameters)), f"{chapter}: the parameters cell is hidden"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_plumbing_and_the_verdict_table_are_collapsed(chapter):
    cells = code_cells(chapter)
    science = crosslib_names(cells)
    for cell in cells:
        assert not REMOVING & set(tags(cell)), f"{chapter}: use hide-input, which keeps the code one click away"
        if is_parameters(cell):
            continue
        if is_plumbing_only(cell.source, science):
            assert not is_visible(cell), f"{chapter}: this cell only glues, plots or shows; tag it hide-input:\n{cell.source}"
        if builds_the_verdict(ast.parse(cell.source)):
            assert not is_visible(cell), f"{chapter}: the verdict table is built in view:\n{cell.source}"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_the_science_stays_in_view(chapter):
    cells = code_cells(chapter)
    science = crosslib_names(cells)
    shown = [cell for cell in cells
             if is_visible(cell) and not is_parameters(cell) and calls_any(ast.parse(cell.source), science)]
    assert shown, f"{chapter}: every crosslib call is collapsed; the reader sees none of the science"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_visible_cells_hold_no_glue(chapter):
    for cell in code_cells(chapter):
        if is_visible(cell) and not is_parameters(cell):
            glued = [ast.unparse(s)[:60] for s in ast.parse(cell.source).body if is_glue(s)]
            assert not glued, f"{chapter}: glue calls in a visible cell (split them into a hide-input cell): {glued}"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_visible_code_fits_the_page(chapter):
    # The parameters cell is exempt: its trailing comments are the parameters' help text
    # (crosslib.book.runner.declared_parameters reads them), one line each.
    for cell in code_cells(chapter):
        if is_visible(cell) and not is_parameters(cell):
            wide = too_wide(cell.source)
            assert not wide, f"{chapter}: lines over {CODE_COLUMN} characters wrap in the code column: {wide}"


def test_a_line_one_past_the_code_column_is_too_wide():
    assert too_wide("x = 1\n" + "y" * CODE_COLUMN) == []
    assert too_wide("x = 1\n" + "y" * (CODE_COLUMN + 1)) == ["y" * (CODE_COLUMN + 1)]


def test_the_checks_tell_plumbing_from_science():
    assert is_plumbing_only('glue("n", n, display=False)\nfor k, v in d.items():\n    glue(k, v, display=False)')
    assert is_plumbing_only("fig, ax = plt.subplots()\nax.plot(x, y)\nplt.show()\ntable.round(3)")
    assert is_plumbing_only("from crosslib import claims\nchecks = claims.table([a, b])\nchecks.style.hide(axis='index')")
    assert not is_plumbing_only("store = activation_store(suite, hook)\nglue('n', store.n_snapshots, display=False)")
    assert not is_plumbing_only("for k in ks:\n    glue(k, 1, display=False)\n    result = fit(k)")
    assert not is_plumbing_only("saetrack.warm_cold_gap(warm_cold).round(3)", {"saetrack"})
    cells = [nbformat.v4.new_code_cell("from crosslib import emergence\nfrom crosslib.book.parameters import check_parameters")]
    assert crosslib_names(cells) == {"emergence"}
    assert root_name(ast.parse("emergence.firing_norms(x).norms.sum()").body[0].value) == "emergence"


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator tuning is Linux-only")
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_a_chapter_opened_in_jupyter_gets_the_settings_crosslib_book_gives_it(chapter):
    """`crosslib book` starts each chapter's kernel with crosslib's process settings (load-following threads,
    glibc keeping large freed buffers: crosslib.runtime.configure_process); a chapter run in Jupyter gets them
    from its first code cell. Run alone, in a fresh interpreter without crosslib's variables, it sets them."""
    first = code_cells(chapter)[0]
    assert not is_visible(first), f"{chapter}: the process settings are plumbing; tag the cell hide-input"
    assert not isinstance(ast.parse(first.source).body[-1], ast.Expr), \
        f"{chapter}: the cell ends in an expression, whose value Jupyter would show on the page"
    env = {name: value for name, value in os.environ.items() if name not in (THREADS_ENV, *MALLOC_ENV)}
    report = f"import os\nprint(os.environ.get({THREADS_ENV!r}), *(os.environ.get(n) is not None for n in {MALLOC_ENV!r}))"
    out = subprocess.run([sys.executable, "-c", f"{first.source}\n{report}"], env=env, cwd=NOTEBOOK_DIR,
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["follow", "True", "True"], f"{chapter}: its first code cell does not call " \
        f"crosslib.runtime.configure_process() ({out.stdout!r})"
