"""The book runner: execute the chapter notebooks with papermill, then build the HTML.

    crosslib book [--preset tiny] [-p name=value ...] [--chapter NAME ...] [--out DIR] [--force]

* **Chapters.** `book/_toc.yml` lists `chapters/NN_name` pages. Each one is the executed copy of
  `notebooks/NN_name.ipynb`, written to `book/chapters/NN_name.ipynb` (git-ignored). Jupyter
  Book only renders those copies (`execute_notebooks: "off"`).
* **Presets.** `notebooks/presets/<name>.yaml` holds `description`, `parameters` (given to every
  chapter whose `parameters` cell declares the name) and `chapters` (chapter name -> parameters,
  overriding). Command-line `-p name=value` overrides both. A name that no chapter being run
  declares is an error, reported before anything runs.
* **Checks first.** Every chapter's parameter values (its defaults with the preset and `-p`
  values) are checked before anything runs: types against the `parameters` cell, values, the
  configs they feed and a memory estimate (`crosslib.book.parameters`); a bad one exits 2 with one
  line. Temporary notebooks and empty `.partial` directories left by killed runs are removed.
* **Published output.** An executed chapter keeps no stderr output (progress, lock waits, free
  disk) and shows data-directory paths as `<data>/...`.
* **Incremental.** A chapter's run key hashes its notebook's cells, the parameters injected into
  it and the source of the `crosslib` package. The key is stored in the executed copy's metadata;
  a chapter whose key did not change is skipped. The HTML is rebuilt only when a source file or
  an executed chapter changed, and then incrementally by Sphinx.
* **Failure.** A chapter executes into a temporary file that replaces the executed copy only on
  success; the HTML is built in a staging directory and published only on success. A failure
  stops the run with the chapter's name and the failing cell's error, and leaves the last good
  executed copies and HTML in place (the failed notebook is kept under `_build/failed/`).
* **Offline.** MathJax 3 is fetched once from the npm registry into `book/_vendor/mathjax`
  (git-ignored) and served by the book itself; a built page that loads a script or a style
  sheet from the network is an error.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import yaml

from crosslib.artifacts import atomic_write_json, locked
from crosslib.config import ParameterError, content_hash
from crosslib.constants import REPO_ROOT

BOOK_DIR = REPO_ROOT / "book"
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
DEFAULT_PRESET = "tiny"
CHAPTER_DIR = "chapters"  # inside the book: executed copies, one per chapter
BUILD_DIR = "_build"  # inside the book: html/, the staging build, failed notebooks
VENDOR_DIR = "_vendor"  # inside the book: third-party static files (MathJax), git-ignored
MATHJAX_VERSION = "3.2.2"
MATHJAX_ENTRY = "tex-mml-chtml.js"
# The parts of MathJax's es5/ bundle that the CommonHTML output needs (fonts, TeX extensions
# loaded on demand, the menu); the speech engine and the SVG output are left out.
MATHJAX_PARTS = (MATHJAX_ENTRY, "input", "output/chtml.js", "output/chtml", "ui", "a11y", "adaptors")
HTML_STAMP = ".crosslib-html.json"
PRESET_KEYS = ("description", "parameters", "chapters")

Log = Callable[[str], None]


class BookError(RuntimeError):
    """A chapter or the HTML build failed; the message names what failed and why."""


# --------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str = ""
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    chapters: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


def preset_dir_of(notebook_dir: str | os.PathLike) -> Path:
    return Path(notebook_dir) / "presets"


def available_presets(preset_dir: str | os.PathLike) -> list[str]:
    return sorted(p.stem for p in Path(preset_dir).glob("*.yaml"))


def load_preset(name: str, preset_dir: str | os.PathLike) -> Preset:
    """Read `<preset_dir>/<name>.yaml`; an unknown name or key raises `ParameterError`."""
    valid = available_presets(preset_dir)
    if name not in valid:
        raise ParameterError(f"unknown preset {name!r}: valid presets are {', '.join(valid) or '(none)'}")
    path = Path(preset_dir) / f"{name}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParameterError(f"preset {name!r} ({path}) must be a mapping with keys {', '.join(PRESET_KEYS)}")
    unknown = sorted(set(data) - set(PRESET_KEYS))
    if unknown:
        raise ParameterError(f"preset {name!r} has unknown key {unknown[0]!r}: valid keys are {', '.join(PRESET_KEYS)}")
    parameters = data.get("parameters") or {}
    chapters = data.get("chapters") or {}
    if not isinstance(parameters, dict) or not all(isinstance(v, dict) for v in chapters.values()):
        raise ParameterError(
            f"preset {name!r}: 'parameters' must map names to values and 'chapters' must map "
            "chapter names to such mappings"
        )
    return Preset(name, str(data.get("description") or ""), dict(parameters), {k: dict(v) for k, v in chapters.items()})


# --------------------------------------------------------------------------- chapters


def toc_chapters(book_dir: str | os.PathLike) -> list[str]:
    """The chapter names (`NN_name`) that `_toc.yml` lists as `chapters/NN_name`, in order."""
    toc = yaml.safe_load((Path(book_dir) / "_toc.yml").read_text()) or {}
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            file = node.get("file")
            if isinstance(file, str) and file.startswith(f"{CHAPTER_DIR}/"):
                name = file[len(CHAPTER_DIR) + 1 :].removesuffix(".ipynb")
                if name not in names:
                    names.append(name)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(toc)
    return names


def declared_parameters(notebook: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Parameters declared in the notebook's `parameters` cell (papermill's inspection), each
    default a Python literal: a default the cell reads from a module (`dict_size = shared.dict_size`,
    the defaults chapters share in `crosslib.book.defaults`) is replaced by its value, which
    running the cell gives.

    Raises `BookError` unless exactly one cell is tagged `parameters` and, if it reads defaults
    from a module, it runs.
    """
    import nbformat
    import papermill

    nb = nbformat.read(str(notebook), as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise BookError(f"{notebook}: expected exactly one cell tagged 'parameters', found {len(tagged)}")
    declared = papermill.inspect_notebook(str(notebook))
    read_elsewhere = [name for name, info in declared.items() if not _is_literal(str(info.get("default")))]
    if read_elsewhere:
        values = _run_parameters_cell(notebook, tagged[0].source)
        for name in read_elsewhere:
            if name in values:
                declared[name]["default"] = repr(values[name])
    return declared


def _is_literal(text: str) -> bool:
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError):
        return False
    return True


def _run_parameters_cell(notebook: str | os.PathLike, source: str) -> dict[str, Any]:
    """The names a `parameters` cell defines, as Jupyter would run it (the cell only assigns values)."""
    namespace: dict[str, Any] = {}
    try:
        exec(compile(source, f"{notebook} (parameters cell)", "exec"), namespace)
    except Exception as e:
        raise BookError(f"{notebook}: its parameters cell fails: {type(e).__name__}: {e}") from None
    return namespace


def notebook_hash(notebook: str | os.PathLike) -> str:
    """Hash of a notebook's cells (type, source, tags): outputs and metadata noise don't count."""
    nb = json.loads(Path(notebook).read_text())
    cells = []
    for cell in nb.get("cells", []):
        source = cell.get("source", "")
        cells.append(
            {
                "type": cell.get("cell_type"),
                "source": "".join(source) if isinstance(source, list) else source,
                "tags": sorted(cell.get("metadata", {}).get("tags", [])),
            }
        )
    return content_hash(cells)


def code_hash(package_dir: str | os.PathLike | None = None) -> str:
    """Hash of every `.py` file of the crosslib package (a chapter may use any of them)."""
    root = Path(package_dir) if package_dir else Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def run_key(nb_hash: str, parameters: dict[str, Any], code: str) -> str:
    return content_hash({"notebook": nb_hash, "parameters": parameters, "code": code})


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_assignment(text: str) -> tuple[str, Any]:
    """`name=value` with the value read as YAML (`1e-3`, `[0, 1, 2]`, `null`, `cuda`, ...)."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise ParameterError(f"-p {text!r} is not allowed: write -p name=value (e.g. -p dict_size=4096)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 as a string
    return name, value


def resolve_parameters(
    declared: dict[str, Iterable[str]],
    preset: Preset,
    overrides: dict[str, Any],
    all_chapters: Iterable[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """The parameters injected into each chapter: preset values for the names it declares,
    then the preset's per-chapter values, then the command-line overrides.

    `declared` maps each chapter being run to the parameter names it declares; `all_chapters`
    are all chapter names that exist (for checking the preset's `chapters` section).
    An override declared by no chapter being run raises `ParameterError` naming the valid ones.
    """
    declared = {c: set(names) for c, names in declared.items()}
    known_chapters = set(all_chapters) if all_chapters is not None else set(declared)
    for chapter in preset.chapters:
        if chapter not in known_chapters:
            raise ParameterError(
                f"preset {preset.name!r} names chapter {chapter!r}, which does not exist: "
                f"valid chapters are {', '.join(sorted(known_chapters)) or '(none)'}"
            )
    valid = sorted(set().union(*declared.values())) if declared else []
    for name in overrides:
        if name not in valid:
            raise ParameterError(
                f"unknown parameter {name!r} (declared by no chapter being run): valid parameters are "
                f"{', '.join(valid) or '(none: no chapter being run declares parameters)'}"
            )
    resolved: dict[str, dict[str, Any]] = {}
    for chapter, names in declared.items():
        params = {k: v for k, v in preset.parameters.items() if k in names}
        for k, v in preset.chapters.get(chapter, {}).items():
            if k not in names:
                raise ParameterError(
                    f"preset {preset.name!r} sets parameter {k!r} for chapter {chapter!r}, which does not "
                    f"declare it: valid parameters of {chapter} are {', '.join(sorted(names)) or '(none)'}"
                )
            params[k] = v
        params.update({k: v for k, v in overrides.items() if k in names})
        resolved[chapter] = params
    return resolved


def notebook_defaults(declared: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The default values of a `parameters` cell (as `declared_parameters` reports them: Python literals)."""
    defaults = {}
    for name, info in declared.items():
        with contextlib.suppress(ValueError, SyntaxError, TypeError):
            defaults[name] = ast.literal_eval(str(info.get("default")))
    return defaults


def check_chapter_parameters(chapter: str, declared: dict[str, dict[str, Any]], given: dict[str, Any]) -> dict[str, Any]:
    """Check the values a chapter will run with (its defaults and `given`) before anything runs:
    types against the notebook's defaults, then `crosslib.book.parameters.check_parameters` (values,
    configs, memory). Returns `given` with integral floats made ints where the default is an int."""
    from crosslib.book.parameters import check_parameters

    defaults = notebook_defaults(declared)
    try:
        checked = check_parameters({**defaults, **given}, defaults)
    except ParameterError as e:
        raise ParameterError(f"{e} (chapter {chapter})") from None
    return {k: checked.get(k, v) for k, v in given.items()}


@dataclasses.dataclass
class ChapterPlan:
    name: str
    source: Path
    target: Path
    parameters: dict[str, Any]
    notebook_hash: str
    code_hash: str
    reason: str | None  # why it must run; None when the executed copy is up to date

    @property
    def key(self) -> str:
        return run_key(self.notebook_hash, self.parameters, self.code_hash)


def executed_metadata(target: str | os.PathLike) -> dict[str, Any] | None:
    """The crosslib metadata of an executed copy, or None if there is none (or it is unreadable)."""
    try:
        return json.loads(Path(target).read_text())["metadata"]["crosslib"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _reason(meta: dict[str, Any] | None, plan: ChapterPlan, force: bool) -> str | None:
    if meta is None:
        return "not executed yet"
    if force:
        return "forced"
    if meta.get("run_key") == plan.key:
        return None
    reasons = []
    if meta.get("notebook_hash") != plan.notebook_hash:
        reasons.append("notebook changed")
    if meta.get("parameters") != json.loads(json.dumps(plan.parameters)):
        old = meta.get("parameters") or {}
        changed = sorted(k for k in set(old) | set(plan.parameters) if old.get(k, None) != plan.parameters.get(k, None))
        shown = [f"{k}={plan.parameters[k]!r}" if k in plan.parameters else f"{k}=(notebook default)" for k in changed]
        reasons.append("parameters changed: " + ", ".join(shown))
    if meta.get("code_hash") != plan.code_hash:
        reasons.append("crosslib code changed")
    return "; ".join(reasons) or "run key changed"


def select_chapters(available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """Chapters to run: all, or those named (a unique prefix such as `03` is enough)."""
    if not wanted:
        return list(available)
    chosen: list[str] = []
    for w in wanted:
        matches = [c for c in available if c == w] or [c for c in available if c.startswith(w)]
        if len(matches) > 1:
            raise ParameterError(f"--chapter {w!r} is ambiguous: it matches {', '.join(matches)}; give more of the name")
        if len(matches) != 1:
            raise ParameterError(
                f"unknown chapter {w!r}: valid chapters are {', '.join(available) or '(none: the book has no chapters yet)'}"
            )
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return chosen


# --------------------------------------------------------------------------- execution


@contextlib.contextmanager
def kernel_environment() -> Iterator[None]:
    """Make the `python3` kernel run this interpreter (the venv's), whatever else is installed.

    A kernel spec pointing at `sys.executable` is put first on JUPYTER_PATH for the duration.
    """
    with tempfile.TemporaryDirectory(prefix="crosslib-kernel-") as tmp:
        spec_dir = Path(tmp) / "kernels" / "python3"
        spec_dir.mkdir(parents=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}", "--IPKernelApp.log_level=ERROR"],
            "display_name": "Python 3 (crosslib)",
            "language": "python",
            "env": {"PYDEVD_DISABLE_FILE_VALIDATION": "1"},
            "metadata": {"debugger": False},
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.pathsep.join([tmp] + ([old] if old else []))
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


# a chapter that printed no progress for this long gets a "still running" line (< 30 s: a log shows a
# line at least every 30 s, with the follower's half-second polling to spare)
HEARTBEAT_SECONDS = 20.0


@contextlib.contextmanager
def follow_progress(name: str, log: Log, heartbeat: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """While a chapter runs, print its progress bars' lines (see crosslib.progress) and, when none came
    for `heartbeat` seconds, a line saying it is still running: plain lines, on a terminal or in a log."""
    import threading

    from crosslib.progress import PROGRESS_LOG_ENV

    with tempfile.TemporaryDirectory(prefix="crosslib-progress-") as tmp:
        path = Path(tmp) / "progress.log"
        path.touch()
        stop = threading.Event()
        start = time.perf_counter()

        def follow() -> None:
            position, last = 0, time.perf_counter()
            while True:
                stopping = stop.wait(0.5)
                with open(path, encoding="utf-8", errors="replace") as f:
                    f.seek(position)
                    text = f.read()
                    position = f.tell()
                for line in text.splitlines():
                    if line.strip():
                        log(f"  {name}: {line.strip()}")
                        last = time.perf_counter()
                if stopping:
                    return
                if time.perf_counter() - last >= heartbeat:
                    log(f"  {name}: running, {time.perf_counter() - start:.0f} s")
                    last = time.perf_counter()

        thread = threading.Thread(target=follow, daemon=True)
        old = os.environ.get(PROGRESS_LOG_ENV)
        os.environ[PROGRESS_LOG_ENV] = str(path)  # the kernel inherits the runner's environment
        thread.start()
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(PROGRESS_LOG_ENV, None)
            else:
                os.environ[PROGRESS_LOG_ENV] = old
            stop.set()
            thread.join()


def execute_chapter(plan: ChapterPlan, out_dir: Path, preset: str, log: Log = print,
                    heartbeat: float = HEARTBEAT_SECONDS) -> float:
    """Execute one chapter into a temporary file and publish it atomically on success.

    While it runs, its progress is printed as plain lines (`follow_progress`). On failure raises
    `BookError` naming the chapter and the failing cell's error; the previous executed copy stays,
    and the failed notebook is saved under `_build/failed/`.
    """
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    plan.target.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.target.with_name(f".{plan.target.stem}.{os.getpid()}.tmp.ipynb")
    start = time.perf_counter()
    try:
        try:
            with kernel_environment(), follow_progress(plan.name, log, heartbeat):
                papermill.execute_notebook(
                    str(plan.source),
                    str(tmp),
                    parameters=plan.parameters,
                    kernel_name="python3",
                    cwd=str(plan.source.parent),
                    progress_bar=sys.stderr.isatty(),
                    log_output=False,
                )
        except PapermillExecutionError as e:
            kept = _keep_failed(tmp, out_dir, plan.name)
            raise BookError(
                f"chapter {plan.name} failed in cell [{e.exec_count}]: {e.ename}: {e.evalue}"
                + (f" (failed notebook: {kept})" if kept else "")
                + (f"; kept the last good copy {plan.target}" if plan.target.exists() else "")
            ) from None
        except Exception as e:  # kernel died, bad notebook, ...
            kept = _keep_failed(tmp, out_dir, plan.name)
            raise BookError(
                f"chapter {plan.name} failed: {type(e).__name__}: {e}" + (f" (failed notebook: {kept})" if kept else "")
            ) from None
        seconds = time.perf_counter() - start
        nb = nbformat.read(str(tmp), as_version=4)
        scrub_outputs(nb)
        collapse_injected_parameters(nb)
        nb.metadata["crosslib"] = {
            "run_key": plan.key,
            "notebook_hash": plan.notebook_hash,
            "code_hash": plan.code_hash,
            "parameters": json.loads(json.dumps(plan.parameters)),
            "preset": preset,
            "source": _display_path(plan.source),
            "seconds": round(seconds, 2),
            "executed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        nbformat.write(nb, str(tmp))
        os.replace(tmp, plan.target)
        return seconds
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def scrub_outputs(nb: Any) -> None:
    """Keep operational output out of a published chapter: stderr streams (progress bars, lock
    waits, free disk) are dropped, and absolute paths of the data directory and the repository in
    the other outputs become `<data>/...` and repository-relative paths, so that a page shows
    neither the builder's file system nor anything that depends on timing."""
    from crosslib.constants import data_dir

    prefixes = [(str(data_dir()), "<data>"), (str(REPO_ROOT) + os.sep, "")]

    def clean(text: Any) -> Any:
        if isinstance(text, list):
            return [clean(t) for t in text]
        if not isinstance(text, str):
            return text
        for prefix, replacement in prefixes:
            text = text.replace(prefix, replacement)
        return text

    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                continue
            if "text" in output:
                output["text"] = clean(output["text"])
            for mime in ("text/plain", "text/html", "text/markdown"):
                if mime in output.get("data", {}):
                    output["data"][mime] = clean(output["data"][mime])
            kept.append(output)
        cell["outputs"] = kept


def collapse_injected_parameters(nb: Any) -> None:
    """Collapse the cell papermill adds with a run's parameters (tag `injected-parameters`) behind a
    toggle, as the chapters' other plumbing is: the page shows the chapter's own `parameters` cell."""
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "hide-input" not in tags:
            cell.setdefault("metadata", {})["tags"] = [*tags, "hide-input"]


_STALE_TMP = re.compile(r"^\..+\.\d+\.tmp\.ipynb$")


def clean_stale_files(out_dir: Path, data: Path | None = None) -> list[Path]:
    """Remove what killed runs left behind, and only that: `chapters/.NN_name.<pid>.tmp.ipynb`
    files (call while holding the book's lock: no other run can be writing them) and empty
    `<data>/<kind>/<key>.partial` directories whose build lock is free. Returns what was removed."""
    from filelock import FileLock, Timeout

    from crosslib.constants import data_dir

    removed = []
    chapters = out_dir / CHAPTER_DIR
    if chapters.is_dir():
        for path in chapters.iterdir():
            if path.is_file() and _STALE_TMP.match(path.name):
                path.unlink(missing_ok=True)
                removed.append(path)
    data = Path(data) if data is not None else data_dir()
    for partial in sorted(data.glob("*/*.partial")) if data.is_dir() else []:
        if not partial.is_dir() or any(partial.iterdir()):
            continue  # a non-empty .partial is resumable work
        lock = FileLock(str(partial.with_name(partial.name.removesuffix(".partial") + ".lock")))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # a build is using it right now
        try:
            with contextlib.suppress(OSError):
                partial.rmdir()
                removed.append(partial)
        finally:
            lock.release()
    if removed:
        print(f"removed {len(removed)} stale file(s) left by interrupted runs", file=sys.stderr, flush=True)
    return removed


def _keep_failed(tmp: Path, out_dir: Path, name: str) -> Path | None:
    if not tmp.exists():
        return None
    failed = out_dir / BUILD_DIR / "failed" / f"{name}.ipynb"
    failed.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, failed)
    return failed


def _display_path(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- static files


def ensure_mathjax(book_dir: str | os.PathLike, log: Log = print) -> Path:
    """Make sure `<book>/_vendor/mathjax/` holds MathJax 3 (fetched with npm from its registry)."""
    target = Path(book_dir) / VENDOR_DIR / "mathjax"
    version_file = target / "VERSION"
    if (target / MATHJAX_ENTRY).is_file() and version_file.is_file() and version_file.read_text().strip() == MATHJAX_VERSION:
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise BookError(
            f"MathJax is missing from {target} and npm was not found: install Node.js and npm "
            "(e.g. apt-get install -y npm), then run `crosslib book` again"
        )
    log(f"fetching MathJax {MATHJAX_VERSION} from the npm registry into {target}")
    with tempfile.TemporaryDirectory(prefix="crosslib-mathjax-") as tmp:
        proc = subprocess.run(
            [npm, "pack", f"mathjax@{MATHJAX_VERSION}", "--silent"],
            cwd=tmp, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )
        tarballs = list(Path(tmp).glob("mathjax-*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise BookError(f"could not fetch MathJax with `npm pack mathjax@{MATHJAX_VERSION}`: {proc.stderr.strip()[-500:]}")
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(tmp, filter="data")
        es5 = Path(tmp) / "package" / "es5"
        staging = target.with_name("mathjax.partial")
        shutil.rmtree(staging, ignore_errors=True)
        for part in MATHJAX_PARTS:
            src, dst = es5 / part, staging / part
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
        shutil.copy2(Path(tmp) / "package" / "LICENSE", staging / "LICENSE")
        (staging / "VERSION").write_text(MATHJAX_VERSION + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


OUT_MANIFEST = ".crosslib-out.json"  # inside an --out directory: marks it as ours, lists what was mirrored


def _read_manifest(out: Path) -> set[Path] | None:
    """The source files an earlier run mirrored into `out`, or None when `out` is not our output."""
    try:
        data = json.loads((out / OUT_MANIFEST).read_text())
        return {Path(p) for p in data["mirrored"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_out_dir(out: Path, book_dir: Path) -> None:
    """Refuse an `--out` that is not ours to write, before anything runs.

    Allowed: the book directory itself, a directory that does not exist or is empty, or one that an
    earlier `crosslib book --out` wrote (it holds the manifest). Anything else holds someone's
    files, and mirroring the book there could replace or delete them.
    """
    if out == book_dir:
        return
    if out in book_dir.parents or book_dir in out.parents:
        raise ParameterError(f"--out {out} is not allowed: it must lie outside the book's sources ({book_dir}) and not contain them")
    if out.exists() and not out.is_dir():
        raise ParameterError(f"--out {out} is not allowed: it is a file, not a directory")
    try:
        if out.is_dir() and any(out.iterdir()) and _read_manifest(out) is None:
            raise ParameterError(
                f"--out {out} is not allowed: the directory is not empty and was not written by `crosslib book` "
                f"(no {OUT_MANIFEST}); give a new or empty directory"
            )
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".crosslib-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ParameterError(f"--out {out} is not allowed: cannot write there ({e.strerror or e})") from None


def sync_sources(src: Path, dst: Path) -> None:
    """Mirror the book's sources (not its executed chapters or builds) from `src` into `dst`.

    Only files that an earlier mirror wrote (listed in `dst`'s manifest) are ever removed: a file
    this function did not put there is never deleted.
    """
    skip_top = {BUILD_DIR, CHAPTER_DIR}
    previous = _read_manifest(dst) or set()
    wanted: set[Path] = set()
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if rel.parts[0] in skip_top or any(p.startswith(".") for p in rel.parts) or not path.is_file():
            continue
        wanted.add(rel)
    # The manifest lists the union first, so a run killed mid-copy still owns what it copied.
    atomic_write_json(dst / OUT_MANIFEST, {"mirrored": sorted(str(p) for p in wanted | previous)})
    for rel in wanted:
        path, out = src / rel, dst / rel
        st = path.stat()
        if out.is_file() and out.stat().st_size == st.st_size and out.stat().st_mtime_ns == st.st_mtime_ns:
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out)
    for rel in previous - wanted:
        with contextlib.suppress(FileNotFoundError):
            (dst / rel).unlink()
    atomic_write_json(dst / OUT_MANIFEST, {"mirrored": sorted(str(p) for p in wanted)})


# --------------------------------------------------------------------------- html


def book_sources_key(book_dir: Path) -> str:
    """Hash of everything the HTML is built from: sources, static files and executed chapters."""
    digest = hashlib.sha256()
    for path in sorted(book_dir.rglob("*")):
        rel = path.relative_to(book_dir)
        if rel.parts[0] == BUILD_DIR or any(p.startswith(".") for p in rel.parts) or not path.is_file():
            continue
        digest.update(rel.as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


_REMOTE_ASSET = re.compile(
    r"""<script\b[^>]*\bsrc=["'](?:https?:)?//[^"']+["']|<link\b[^>]*\bhref=["'](?:https?:)?//[^"']+\.css[^"']*["']""",
    re.IGNORECASE,
)


def remote_assets(html_dir: str | os.PathLike) -> list[str]:
    """`page: tag` for every script or style sheet that a built page would load from the network."""
    found = []
    for page in sorted(Path(html_dir).rglob("*.html")):
        for match in _REMOTE_ASSET.finditer(page.read_text(errors="replace")):
            found.append(f"{page.relative_to(html_dir)}: {match.group(0)}")
    return found


def build_html(out_dir: Path, *, force: bool = False, log: Log = print) -> bool:
    """Build `<out>/_build/html` with Jupyter Book (warnings are errors); return False if it was
    already up to date. The build runs in `<out>/_build/.stage` and is published only on success."""
    key = book_sources_key(out_dir)
    html = out_dir / BUILD_DIR / "html"
    stamp = html / HTML_STAMP
    with contextlib.suppress(OSError, ValueError):
        if not force and json.loads(stamp.read_text()).get("key") == key:
            log(f"html up to date: {_display_path(html / 'index.html')}")
            return False
    stage = out_dir / BUILD_DIR / ".stage"
    doctrees = stage / "doctrees"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "crosslib.book.runner", "sphinx", str(out_dir), str(stage / "html"), str(doctrees)]
        + (["--all"] if force else []),
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        # Start the next build afresh so that pages whose warnings failed this one are read again.
        shutil.rmtree(doctrees, ignore_errors=True)
        details = "\n".join(line for line in (proc.stderr + proc.stdout).splitlines() if line.strip())[-4000:]
        raise BookError(f"html build failed (Sphinx, warnings are errors); the last good html is kept\n{details}")
    remote = remote_assets(stage / "html")
    if remote:
        raise BookError("html build loads files from the network (the book must work offline):\n" + "\n".join(remote[:20]))
    atomic_write_json(stage / "html" / HTML_STAMP, {"key": key})
    new, old = html.with_name(".html.new"), html.with_name(".html.old")
    for d in (new, old):
        shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(stage / "html", new)
    if html.exists():
        os.replace(html, old)
    os.replace(new, html)
    shutil.rmtree(old, ignore_errors=True)
    log(f"html built in {time.perf_counter() - start:.1f} s: {_display_path(html / 'index.html')}")
    return True


def _sphinx_main(argv: Sequence[str]) -> int:
    """`python -m crosslib.book.runner sphinx SRC OUTDIR DOCTREES [--all]` (run in a subprocess)."""
    from jupyter_book.sphinx import build_sphinx

    src, outdir, doctrees = (Path(a) for a in argv[:3])
    result = build_sphinx(
        src,
        outdir,
        doctreedir=doctrees,
        use_external_toc=True,
        noconfig=True,
        path_config=str(src / "_config.yml"),
        confoverrides={"external_toc_path": str(src / "_toc.yml"), "nitpicky": True, "latex_individualpages": False},
        builder="html",
        warningiserror=True,
        keep_going=True,
        freshenv="--all" in argv[3:],
        quiet=True,
    )
    return 0 if result == 0 else 1


# --------------------------------------------------------------------------- the whole book


@dataclasses.dataclass
class BookResult:
    ran: list[str]
    skipped: list[str]
    html_built: bool
    html_dir: Path | None


def plan_book(
    preset: str = DEFAULT_PRESET,
    overrides: dict[str, Any] | None = None,
    chapters: Sequence[str] | None = None,
    *,
    book_dir: str | os.PathLike = BOOK_DIR,
    notebook_dir: str | os.PathLike = NOTEBOOK_DIR,
    preset_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> tuple[Preset, list[ChapterPlan], list[str]]:
    """Check everything and decide what to run, touching no file.

    Returns the preset, one plan per selected chapter, and all chapter names of the book.
    Bad names raise `ParameterError`.
    """
    book_dir, notebook_dir = Path(book_dir).resolve(), Path(notebook_dir).resolve()
    out = Path(out_dir).resolve() if out_dir else book_dir
    p = load_preset(preset, preset_dir or preset_dir_of(notebook_dir))
    book_chapters = toc_chapters(book_dir)
    missing = [c for c in book_chapters if not (notebook_dir / f"{c}.ipynb").is_file()]
    if missing:
        raise BookError(
            f"{book_dir / '_toc.yml'} lists {CHAPTER_DIR}/{missing[0]} but {notebook_dir / (missing[0] + '.ipynb')} does not exist"
        )
    selected = select_chapters(book_chapters, chapters)
    declared = {c: declared_parameters(notebook_dir / f"{c}.ipynb") for c in selected}
    params = resolve_parameters(declared, p, dict(overrides or {}), all_chapters=book_chapters)
    for c in selected:
        params[c] = check_chapter_parameters(c, declared[c], params[c])
    code = code_hash()
    plans = []
    for c in selected:
        plan = ChapterPlan(
            name=c,
            source=notebook_dir / f"{c}.ipynb",
            target=out / CHAPTER_DIR / f"{c}.ipynb",
            parameters=params[c],
            notebook_hash=notebook_hash(notebook_dir / f"{c}.ipynb"),
            code_hash=code,
            reason=None,
        )
        plan.reason = _reason(executed_metadata(plan.target), plan, force)
        plans.append(plan)
    return p, plans, book_chapters


def build_book(
    preset: str = DEFAULT_PRESET,
    overrides: dict[str, Any] | None = None,
    chapters: Sequence[str] | None = None,
    *,
    book_dir: str | os.PathLike = BOOK_DIR,
    notebook_dir: str | os.PathLike = NOTEBOOK_DIR,
    preset_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
    html: bool = True,
    log: Log = print,
) -> BookResult:
    """Execute the chapters that changed under `preset` (+ overrides), then build the HTML.

    `out_dir` (default: the book directory itself) receives `chapters/` and `_build/html`; when it
    differs from `book_dir`, the book's sources are mirrored into it first.
    """
    book_dir = Path(book_dir).resolve()
    out = Path(out_dir).resolve() if out_dir else book_dir
    p, plans, book_chapters = plan_book(
        preset, overrides, chapters, book_dir=book_dir, notebook_dir=notebook_dir,
        preset_dir=preset_dir, out_dir=out, force=force,
    )
    check_out_dir(out, book_dir)
    (out / BUILD_DIR).mkdir(parents=True, exist_ok=True)
    with locked(out / BUILD_DIR / ".crosslib-book.lock", message=f"waiting for another `crosslib book` using {out}"):
        clean_stale_files(out)
        if html:
            ensure_mathjax(book_dir, log)
        if out != book_dir:
            sync_sources(book_dir, out)
        log(f"preset {p.name}: {len(plans)} of {len(book_chapters)} chapter(s)" + (f" - {p.description}" if p.description else ""))
        ran, skipped = [], []
        times: dict[str, float] = {}
        for plan in plans:
            if plan.reason is None:
                log(f"skip {plan.name} (unchanged)")
                skipped.append(plan.name)
                continue
            shown = ", ".join(f"{k}={v!r}" for k, v in plan.parameters.items()) or "notebook defaults"
            log(f"run  {plan.name} ({plan.reason}) with {shown}")
            seconds = execute_chapter(plan, out, p.name, log)
            log(f"done {plan.name} in {seconds:.1f} s")
            ran.append(plan.name)
            times[plan.name] = seconds
        if times:
            log(chapter_times_table(times))
        if not html:
            return BookResult(ran, skipped, False, None)
        never = [c for c in book_chapters if executed_metadata(out / CHAPTER_DIR / f"{c}.ipynb") is None]
        if never:
            log(f"html not built: chapter(s) never executed: {', '.join(never)} (run `crosslib book` without --chapter)")
            return BookResult(ran, skipped, False, None)
        built = build_html(out, force=force, log=log)
        return BookResult(ran, skipped, built, out / BUILD_DIR / "html")


def chapter_times_table(times: dict[str, float]) -> str:
    """The chapters this run executed and their wall time, with the total (printed at the end of a run)."""
    width = max(len(name) for name in times)
    lines = ["chapter times:"] + [f"  {name:<{width}}  {seconds:8.1f} s  ({seconds / 60:.1f} min)" for name, seconds in times.items()]
    total = sum(times.values())
    return "\n".join(lines + [f"  {'total':<{width}}  {total:8.1f} s  ({total / 60:.1f} min)"])


def describe(
    *, book_dir: str | os.PathLike = BOOK_DIR, notebook_dir: str | os.PathLike = NOTEBOOK_DIR,
    preset_dir: str | os.PathLike | None = None,
) -> str:
    """Presets, chapters and the parameters each chapter declares (for `crosslib book --list`)."""
    preset_dir = Path(preset_dir) if preset_dir else preset_dir_of(notebook_dir)
    lines = ["presets:"]
    for name in available_presets(preset_dir):
        lines.append(f"  {name:10s} {load_preset(name, preset_dir).description}")
    lines.append("chapters (parameter = notebook default):")
    chapters = toc_chapters(book_dir)
    for c in chapters:
        lines.append(f"  {c}")
        for name, info in declared_parameters(Path(notebook_dir) / f"{c}.ipynb").items():
            lines.append(f"      {name} = {info.get('default')}")
    if not chapters:
        lines.append("  (none yet: the book is the introduction only)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="preset of parameters (notebooks/presets/NAME.yaml; default: tiny)")
    parser.add_argument("-p", "--parameter", dest="parameters", action="append", default=[], metavar="NAME=VALUE",
                        help="override one parameter in every chapter that declares it (value read as YAML); repeatable")
    parser.add_argument("--chapter", dest="chapters", action="append", default=[], metavar="NAME",
                        help="run only this chapter (NN_name or a unique prefix such as 03); repeatable")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write executed chapters and html under DIR instead of book/ (DIR/chapters, DIR/_build/html)")
    parser.add_argument("--force", action="store_true", help="re-execute the chapters and rebuild the html even if unchanged")
    parser.add_argument("--no-html", action="store_true", help="execute the chapters only")
    parser.add_argument("--list", action="store_true", help="list presets, chapters and their parameters, then exit")
    parser.add_argument("--book-dir", default=str(BOOK_DIR), help=argparse.SUPPRESS)
    parser.add_argument("--notebook-dir", default=str(NOTEBOOK_DIR), help=argparse.SUPPRESS)
    parser.add_argument("--preset-dir", default=None, help=argparse.SUPPRESS)


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of `crosslib book`; returns the exit code (0 ok, 1 failed, 2 bad parameters)."""
    try:
        if args.list:
            print(describe(book_dir=args.book_dir, notebook_dir=args.notebook_dir, preset_dir=args.preset_dir))
            return 0
        overrides = dict(parse_assignment(a) for a in args.parameters)
        build_book(
            args.preset, overrides, args.chapters or None,
            book_dir=args.book_dir, notebook_dir=args.notebook_dir, preset_dir=args.preset_dir,
            out_dir=args.out, force=args.force, html=not args.no_html,
            log=lambda line: print(line, flush=True),
        )
    except ParameterError as e:
        print(f"crosslib book: error: {e}", file=sys.stderr)
        return 2
    except BookError as e:
        print(f"crosslib book: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "sphinx":
        sys.exit(_sphinx_main(sys.argv[2:]))
    print("usage: crosslib book ... (this module's own entry is internal)", file=sys.stderr)
    sys.exit(2)
