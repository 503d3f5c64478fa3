"""The book runner: presets, parameter checks, incremental runs, failure handling, HTML build.

The end-to-end tests use throwaway notebooks in tmp_path, executed by a real kernel (about 1-3 s
per chapter run); the book's own notebooks are only inspected, never executed here (the smoke
book is built by tests/book/test_browser.py).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from crosslib.book import runner as book
from crosslib.book.runner import BookError, Preset, build_book, parse_assignment, resolve_parameters
from crosslib.cli import main
from crosslib.config import ParameterError


# --------------------------------------------------------------------------- helpers


def write_notebook(path: Path, parameters: str, *body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    param_cell = nbformat.v4.new_code_cell(parameters)
    param_cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}"), param_cell]
    nb.cells += [nbformat.v4.new_code_cell(src) for src in body]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def make_project(root: Path, chapters: dict[str, tuple[str, ...]], presets: dict[str, dict] | None = None) -> tuple[Path, Path]:
    """A book (intro + chapters) and its notebooks under `root`; returns (book_dir, notebook_dir)."""
    book_dir, nb_dir = root / "book", root / "notebooks"
    book_dir.mkdir(parents=True)
    shutil.copy(book.BOOK_DIR / "_config.yml", book_dir / "_config.yml")
    shutil.copytree(book.BOOK_DIR / "_static", book_dir / "_static")  # the style sheet _config.yml names
    (book_dir / "intro.md").write_text("# A test book\n\nSome math: $a^2 + b^2 = c^2$.\n")
    toc = {"format": "jb-book", "root": "intro"}
    if chapters:
        toc["chapters"] = [{"file": f"chapters/{c}"} for c in chapters]
    (book_dir / "_toc.yml").write_text(yaml.safe_dump(toc))
    for name, (params, *body) in chapters.items():
        write_notebook(nb_dir / f"{name}.ipynb", params, *body)
    (nb_dir / "presets").mkdir(parents=True, exist_ok=True)
    for name, content in (presets or {"tiny": {}}).items():
        (nb_dir / "presets" / f"{name}.yaml").write_text(yaml.safe_dump(content))
    return book_dir, nb_dir


def outputs_text(notebook: Path) -> str:
    nb = nbformat.read(str(notebook), as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


# --------------------------------------------------------------------------- presets and parameters


def test_repository_presets_are_valid():
    presets_dir = book.preset_dir_of(book.NOTEBOOK_DIR)
    names = book.available_presets(presets_dir)
    assert {"tiny", "smoke"} <= set(names)
    for name in names:
        preset = book.load_preset(name, presets_dir)
        assert preset.description, f"preset {name} needs a description"
    # Every chapter the book lists has its notebook with exactly one parameters cell, and the
    # presets only set parameters those chapters declare.
    chapters = book.toc_chapters(book.BOOK_DIR)
    declared = {c: book.declared_parameters(book.NOTEBOOK_DIR / f"{c}.ipynb") for c in chapters}
    for name in names:
        resolve_parameters(declared, book.load_preset(name, presets_dir), {}, all_chapters=chapters)


def test_unknown_preset_and_bad_preset_keys(tmp_path):
    (tmp_path / "tiny.yaml").write_text("description: x\nparameters: {n: 1}\n")
    (tmp_path / "odd.yaml").write_text("description: x\nparams: {n: 1}\n")
    with pytest.raises(ParameterError, match=r"unknown preset 'nope': valid presets are odd, tiny"):
        book.load_preset("nope", tmp_path)
    with pytest.raises(ParameterError, match=r"unknown key 'params'"):
        book.load_preset("odd", tmp_path)
    assert book.load_preset("tiny", tmp_path).parameters == {"n": 1}


def test_preset_merging_and_overrides():
    declared = {"01_a": ["suite", "seed", "label"], "02_b": ["suite", "dict_size"]}
    preset = Preset("p", "", {"suite": "smoke", "seed": 3, "steps": 10}, {"02_b": {"dict_size": 64}})
    got = resolve_parameters(declared, preset, {"suite": "EleutherAI/pythia-70m-deduped", "label": "x"})
    assert got == {
        "01_a": {"suite": "EleutherAI/pythia-70m-deduped", "seed": 3, "label": "x"},  # `steps`: not declared
        "02_b": {"suite": "EleutherAI/pythia-70m-deduped", "dict_size": 64},
    }
    # a command-line value beats the preset's per-chapter value
    assert resolve_parameters(declared, preset, {"dict_size": 4096})["02_b"]["dict_size"] == 4096


def test_unknown_names_are_reported_with_the_valid_ones():
    declared = {"01_a": ["suite", "seed"], "02_b": ["dict_size"]}
    empty = Preset("p")
    with pytest.raises(ParameterError, match=r"unknown parameter 'dict_sise'.*valid parameters are dict_size, seed, suite"):
        resolve_parameters(declared, empty, {"dict_sise": 1})
    with pytest.raises(ParameterError, match=r"chapter '03_c', which does not exist: valid chapters are 01_a, 02_b"):
        resolve_parameters(declared, Preset("p", chapters={"03_c": {"seed": 1}}), {})
    with pytest.raises(ParameterError, match=r"parameter 'seed' for chapter '02_b'.*valid parameters of 02_b are dict_size"):
        resolve_parameters(declared, Preset("p", chapters={"02_b": {"seed": 1}}), {})
    with pytest.raises(ParameterError, match=r"unknown chapter '04': valid chapters are 01_a, 02_b"):
        book.select_chapters(["01_a", "02_b"], ["04"])
    assert book.select_chapters(["01_a", "02_b"], ["02"]) == ["02_b"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("dict_size=4096", ("dict_size", 4096)),
        ("lr=1e-3", ("lr", 0.001)),
        ("steps=[0, 1, 2]", ("steps", [0, 1, 2])),
        ("suite=EleutherAI/pythia-160m-deduped", ("suite", "EleutherAI/pythia-160m-deduped")),
        ("hook=blocks.6.hook_resid_post", ("hook", "blocks.6.hook_resid_post")),
        ("device=null", ("device", None)),
        ("flag=true", ("flag", True)),
    ],
)
def test_parse_assignment(text, expected):
    assert parse_assignment(text) == expected


@pytest.mark.parametrize("text", ["dict_size", "=3", "2x=1"])
def test_parse_assignment_rejects_malformed(text):
    with pytest.raises(ParameterError, match="name=value"):
        parse_assignment(text)


def test_notebook_hash_ignores_outputs_but_not_sources(tmp_path):
    path = write_notebook(tmp_path / "a.ipynb", "n = 1", "print(n)")
    before = book.notebook_hash(path)
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[2].execution_count = 7
    nb.metadata["papermill"] = {"duration": 1.0}
    nbformat.write(nb, str(path))
    assert book.notebook_hash(path) == before
    nb.cells[2].source = "print(n + 1)"
    nbformat.write(nb, str(path))
    assert book.notebook_hash(path) != before


def test_toc_chapters_reads_nested_entries(tmp_path):
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nparts:\n  - caption: A\n    chapters:\n"
        "      - file: chapters/01_a\n      - file: notes\n  - caption: B\n    chapters:\n"
        "      - file: chapters/02_b\n        sections:\n          - file: chapters/03_c\n"
    )
    assert book.toc_chapters(tmp_path) == ["01_a", "02_b", "03_c"]


def test_declared_parameters_requires_one_parameters_cell(tmp_path):
    path = write_notebook(tmp_path / "a.ipynb", "n = 1  # how many\nlabel = 'x'")
    assert set(book.declared_parameters(path)) == {"n", "label"}
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[1].metadata["tags"] = []
    nbformat.write(nb, str(path))
    with pytest.raises(BookError, match="exactly one cell tagged 'parameters', found 0"):
        book.declared_parameters(path)


def test_defaults_read_from_a_module_are_reported_as_their_values_and_type_checked(tmp_path):
    cell = ("from crosslib.book import defaults as shared  # the shared defaults\n"
            "dict_size = shared.dict_size  # features\nlabel = 'x'")
    path = write_notebook(tmp_path / "02_a.ipynb", cell)
    declared = book.declared_parameters(path)
    assert set(declared) == {"dict_size", "label"}
    assert declared["dict_size"]["default"] == "512" and declared["dict_size"]["help"] == "features"
    assert book.notebook_defaults(declared) == {"dict_size": 512, "label": "x"}
    with pytest.raises(ParameterError, match="dict_size='abc' is not allowed: an integer"):
        book.check_chapter_parameters("02_a", declared, {"dict_size": "abc"})
    write_notebook(path, "from crosslib.book import defaults as shared\ndict_size = shared.no_such_name")
    with pytest.raises(BookError, match="parameters cell fails: AttributeError"):
        book.declared_parameters(path)


# --------------------------------------------------------------------------- command line


def test_cli_unknown_preset_and_parameter_exit_2_and_replace_nothing(tmp_path, capsys):
    book_dir, nb_dir = make_project(tmp_path, {"01_a": ("n = 1", "print(n)")}, {"tiny": {}, "smoke": {}})
    executed = book_dir / "chapters" / "01_a.ipynb"
    executed.parent.mkdir()
    executed.write_text("previous good copy")
    common = ["book", "--book-dir", str(book_dir), "--notebook-dir", str(nb_dir)]

    assert main(common + ["--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown preset 'huge'" in err and "smoke, tiny" in err

    assert main(common + ["-p", "m=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown parameter 'm'" in err and "valid parameters are n" in err

    assert main(common + ["--chapter", "09"]) == 2
    assert "unknown chapter '09': valid chapters are 01_a" in capsys.readouterr().err

    assert executed.read_text() == "previous good copy"
    assert not (book_dir / "_build").exists()


# --------------------------------------------------------------------------- execution (real kernels)


@pytest.mark.slow
def test_incremental_runs_only_what_changed(tmp_path):
    book_dir, nb_dir = make_project(
        tmp_path,
        {
            "01_alpha": ("n = 1\nlabel = 'a'", "import sys\nprint('python', sys.executable)\nprint('label', label, n)"),
            "02_beta": ("n = 2", "print('beta', n)"),
        },
        {"tiny": {"description": "t"}, "smoke": {"description": "s", "parameters": {"n": 5}}},
    )
    kw = dict(book_dir=book_dir, notebook_dir=nb_dir, html=False, log=lambda line: None)

    first = build_book("tiny", **kw)
    assert first.ran == ["01_alpha", "02_beta"] and first.skipped == []
    alpha = book_dir / "chapters" / "01_alpha.ipynb"
    # the kernel is this interpreter (the venv's python), whatever `python` is on PATH
    # (published outputs show paths inside the repository relative to it)
    shown = sys.executable.removeprefix(str(book.REPO_ROOT) + "/")
    assert f"python {shown}" in outputs_text(alpha)
    assert "label a 1" in outputs_text(alpha)
    meta = book.executed_metadata(alpha)
    assert meta["parameters"] == {} and meta["preset"] == "tiny"

    lines: list[str] = []
    second = build_book("tiny", **{**kw, "log": lines.append})
    assert second.ran == [] and second.skipped == ["01_alpha", "02_beta"]
    assert "skip 01_alpha (unchanged)" in lines and "skip 02_beta (unchanged)" in lines

    # a parameter only 01_alpha declares re-runs only 01_alpha
    lines.clear()
    third = build_book("tiny", {"label": "b"}, **{**kw, "log": lines.append})
    assert third.ran == ["01_alpha"] and third.skipped == ["02_beta"]
    assert any(line.startswith("run  01_alpha (parameters changed: label='b')") for line in lines)
    assert "label b 1" in outputs_text(alpha)
    assert book.executed_metadata(alpha)["parameters"] == {"label": "b"}

    # the same values coming from a preset instead of the command line: nothing to do for 02_beta
    # when its effective parameters are equal, a re-run when they differ
    fourth = build_book("smoke", {"label": "b"}, **kw)
    assert fourth.ran == ["01_alpha", "02_beta"]  # n=5 reaches both
    assert "beta 5" in outputs_text(book_dir / "chapters" / "02_beta.ipynb")
    assert build_book("smoke", {"label": "b"}, **kw).ran == []

    # editing a notebook's source re-runs that chapter only
    write_notebook(nb_dir / "02_beta.ipynb", "n = 2", "print('beta!', n)")
    fifth = build_book("smoke", {"label": "b"}, **kw)
    assert fifth.ran == ["02_beta"]


@pytest.mark.slow
def test_failing_chapter_keeps_the_last_good_copy(tmp_path):
    body = "if fail:\n    raise ValueError('the suite is broken')\nprint('ok')"
    book_dir, nb_dir = make_project(tmp_path, {"01_fragile": ("fail = False", body)})
    kw = dict(book_dir=book_dir, notebook_dir=nb_dir, html=False, log=lambda line: None)
    build_book("tiny", **kw)
    executed = book_dir / "chapters" / "01_fragile.ipynb"
    good = executed.read_bytes()

    with pytest.raises(BookError) as err:
        build_book("tiny", {"fail": True}, **kw)
    message = str(err.value)
    assert "chapter 01_fragile failed" in message and "ValueError: the suite is broken" in message
    assert executed.read_bytes() == good  # the last good executed copy stays
    failed = book_dir / "_build" / "failed" / "01_fragile.ipynb"
    assert "the suite is broken" in failed.read_text()  # the failed run is kept for reading
    assert not [p for p in executed.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    # the failure did not record anything: the good parameters are still up to date
    assert build_book("tiny", **kw).ran == []


@pytest.mark.slow
def test_html_build_is_strict_incremental_and_keeps_the_last_good_html(tmp_path):
    book_dir, nb_dir = make_project(tmp_path, {})
    shutil.copytree(book.ensure_mathjax(book.BOOK_DIR, log=lambda line: None), book_dir / "_vendor" / "mathjax")
    out = tmp_path / "out"
    kw = dict(book_dir=book_dir, notebook_dir=nb_dir, out_dir=out, log=lambda line: None)

    assert build_book("tiny", **kw).html_built
    page = out / "_build" / "html" / "intro.html"
    good = page.read_text()
    assert "a^2 + b^2" in good and "_static/mathjax/tex-mml-chtml.js" in good
    assert book.remote_assets(out / "_build" / "html") == []
    assert not build_book("tiny", **kw).html_built  # nothing changed: no Sphinx run at all

    # a dangling reference is a warning, and warnings are errors: the good html stays
    (book_dir / "intro.md").write_text("# A test book\n\nSee [the missing part](#no-such-label).\n")
    with pytest.raises(BookError, match="html build failed"):
        build_book("tiny", **kw)
    assert page.read_text() == good
    # and it fails again on the next run (the failed page is not forgotten by an incremental build)
    with pytest.raises(BookError, match="html build failed"):
        build_book("tiny", **kw)

    (book_dir / "intro.md").write_text("# A test book\n\nFixed: $e^{i\\pi} = -1$.\n")
    assert build_book("tiny", **kw).html_built
    assert "Fixed" in page.read_text()


def test_remote_assets_are_detected(tmp_path):
    (tmp_path / "a.html").write_text(
        '<script src="_static/x.js"></script><script src="https://cdn.example/mathjax.js"></script>'
        '<link rel="stylesheet" href="//fonts.example/a.css"><a href="https://arxiv.org/abs/1">ok</a>'
    )
    found = book.remote_assets(tmp_path)
    assert len(found) == 2 and "cdn.example" in found[0] and "fonts.example" in found[1]


def test_code_hash_covers_the_package(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    before = book.code_hash(pkg)
    (pkg / "sub").mkdir()
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    assert book.code_hash(pkg) != before
    assert json.dumps(book.code_hash())  # the real package hashes


# --------------------------------------------------------------------------- --out never destroys files


def _out_args(book_dir: Path, nb_dir: Path, out: Path | str, *extra: str) -> list[str]:
    return ["book", "--book-dir", str(book_dir), "--notebook-dir", str(nb_dir), "--out", str(out), "--no-html", *extra]


def test_out_refuses_a_directory_with_files_it_did_not_write(tmp_path, capsys):
    book_dir, nb_dir = make_project(tmp_path / "p", {"01_a": ("n = 1", "print(n)")})
    out = tmp_path / "thesis"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("three years of work")
    (out / "sub" / "results.csv").write_text("a,b\n1,2\n")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    # a good run and one with a bad parameter: both refused, nothing touched
    for extra in ([], ["-p", "nope=1"]):
        assert main(_out_args(book_dir, nb_dir, out, *extra)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
    assert "not empty and was not written by `crosslib book`" in err or "unknown parameter" in err
    assert main(_out_args(book_dir, nb_dir, out)) == 2
    assert "--out" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "thesis.txt").read_text() == "three years of work"


def test_out_refuses_a_project_checkout_and_the_book_itself_or_its_parent(tmp_path, capsys):
    book_dir, nb_dir = make_project(tmp_path / "p", {"01_a": ("n = 1", "print(n)")})
    tracked = sorted(p for p in (tmp_path / "p").rglob("*"))
    for out in (tmp_path / "p", book_dir / "sub"):  # contains the sources / lies inside them
        assert main(_out_args(book_dir, nb_dir, out)) == 2
        assert "must lie outside the book's sources" in capsys.readouterr().err
    assert sorted(p for p in (tmp_path / "p").rglob("*")) == tracked


@pytest.mark.parametrize("where", ["/proc/crosslib-out", "file/sub"])
def test_unwritable_out_is_one_line_and_exit_2(tmp_path, capsys, where):
    book_dir, nb_dir = make_project(tmp_path / "p", {"01_a": ("n = 1", "print(n)")})
    (tmp_path / "file").write_text("a plain file")
    out = where if where.startswith("/") else tmp_path / where
    assert main(_out_args(book_dir, nb_dir, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "a plain file"


def test_out_mirror_removes_only_what_it_wrote(tmp_path):
    book_dir, nb_dir = make_project(tmp_path / "p", {})
    (book_dir / "extra.md").write_text("# extra\n")
    out = tmp_path / "out"
    book.check_out_dir(out, book_dir)  # a new directory is fine and gets created
    book.sync_sources(book_dir, out)
    assert (out / "extra.md").is_file() and (out / book.OUT_MANIFEST).is_file()
    (out / "notes.txt").write_text("the user's own note, added later")
    book.check_out_dir(out, book_dir)  # our own output stays usable, even with a user's file in it
    (book_dir / "extra.md").unlink()
    book.sync_sources(book_dir, out)
    assert not (out / "extra.md").exists()  # ours and no longer in the sources: removed
    assert (out / "notes.txt").read_text() == "the user's own note, added later"  # never ours: kept
    assert (out / "intro.md").is_file()


# --------------------------------------------------------------------------- nothing operational in a published chapter


@pytest.mark.slow
def test_published_chapter_shows_no_absolute_path_and_no_lock_message(tmp_path, monkeypatch):
    import threading
    import time

    from filelock import FileLock

    data = tmp_path / "data"
    monkeypatch.setenv("CROSSLIB_DATA", str(data))
    lock_path = data / "activations" / "abc.lock"
    lock_path.parent.mkdir(parents=True)
    marker = tmp_path / "kernel-is-about-to-wait"
    body = (
        "from pathlib import Path\n"
        "from crosslib.artifacts import display_path, locked\n"
        "from crosslib.constants import data_dir\n"
        f"Path({str(marker)!r}).touch()\n"
        f"with locked({str(lock_path)!r}, message='waiting for another process building ' + str(data_dir())):\n"
        "    pass\n"
        "print('store at', data_dir() / 'activations' / 'abc', 'shown as', display_path(data_dir() / 'activations'))\n"
    )
    book_dir, nb_dir = make_project(tmp_path / "project", {"01_paths": ("x = 1", body)})
    acquired = threading.Event()

    def hold_the_lock_until_the_chapter_waits() -> None:
        with FileLock(str(lock_path)):
            acquired.set()
            for _ in range(600):
                if marker.exists():
                    break
                time.sleep(0.1)
            time.sleep(0.5)  # the chapter is waiting now, and says so on stderr

    holder = threading.Thread(target=hold_the_lock_until_the_chapter_waits)
    holder.start()
    acquired.wait()
    build_book("tiny", book_dir=book_dir, notebook_dir=nb_dir, html=False, log=lambda line: None)
    holder.join()
    nb = nbformat.read(str(book_dir / "chapters" / "01_paths.ipynb"), as_version=4)
    published = json.dumps([cell.get("outputs", []) for cell in nb.cells])  # everything the page shows of the run
    assert "store at <data>/activations/abc shown as <data>/activations" in outputs_text(book_dir / "chapters" / "01_paths.ipynb")
    assert str(tmp_path) not in published and "waiting for another process" not in published


def test_stale_temporary_notebooks_and_empty_partials_are_cleaned_and_nothing_else(tmp_path):
    from filelock import FileLock

    out, data = tmp_path / "out", tmp_path / "data"
    (out / "chapters").mkdir(parents=True)
    stale = out / "chapters" / ".01_intro.4242.tmp.ipynb"
    mine = [out / "chapters" / "notes.ipynb", out / "chapters" / ".hidden.ipynb", out / "chapters" / "01_intro.ipynb"]
    for path in [stale, *mine]:
        path.write_text("{}")
    (data / "activations").mkdir(parents=True)
    empty = data / "activations" / "aaaa.partial"
    resumable = data / "activations" / "bbbb.partial"
    in_use = data / "activations" / "cccc.partial"
    for d in (empty, resumable, in_use):
        d.mkdir()
    (resumable / "progress.jsonl").write_text("{}\n")
    (data / "activations" / "dddd").mkdir()  # a published artifact's folder (empty here): not a .partial
    lock = FileLock(str(data / "activations" / "cccc.lock"))
    with lock:
        removed = book.clean_stale_files(out, data)
    assert sorted(removed) == sorted([stale, empty])
    assert all(p.exists() for p in mine) and resumable.is_dir() and in_use.is_dir() and (data / "activations" / "dddd").is_dir()


@pytest.mark.slow
def test_running_chapter_streams_progress_and_heartbeats_but_keeps_them_out_of_the_page(tmp_path):
    book_dir, nb_dir = make_project(tmp_path, {"01_slow": (
        "n = 3",
        "import time\nfrom crosslib.progress import progress\nfor i in progress(range(n), desc='working hard'):\n"
        "    time.sleep(0.2)\ntime.sleep(2.5)\nprint('done', n)",
    )})
    lines: list[str] = []
    result = build_book("tiny", book_dir=book_dir, notebook_dir=nb_dir, html=False, log=lines.append)
    assert result.ran == ["01_slow"]
    assert any(line.startswith("  01_slow: working hard") and "3/3" in line for line in lines), lines
    assert any(line.startswith("chapter times:") and "01_slow" in line and "total" in line for line in lines), lines
    page = outputs_text(book_dir / "chapters" / "01_slow.ipynb")
    assert "done 3" in page and "working hard" not in page


def test_heartbeat_says_a_silent_chapter_is_alive(tmp_path):
    lines: list[str] = []
    with book.follow_progress("07_quiet", lines.append, heartbeat=0.6):
        import time

        time.sleep(1.6)
    assert any(line.startswith("  07_quiet: running, ") for line in lines), lines


def test_the_injected_parameters_cell_is_collapsed():
    import nbformat

    from crosslib.book.runner import collapse_injected_parameters

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("x = 2", metadata={"tags": ["injected-parameters"]}),
        nbformat.v4.new_code_cell("print(x)"),
    ])
    collapse_injected_parameters(nb)
    assert [c.metadata.get("tags", []) for c in nb.cells] == [
        ["parameters"], ["injected-parameters", "hide-input"], []]
    collapse_injected_parameters(nb)  # idempotent
    assert nb.cells[1].metadata["tags"] == ["injected-parameters", "hide-input"]
