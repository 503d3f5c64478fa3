"""Content-addressed, atomically published artifacts.

An artifact is a directory `<data_dir>/<kind>/<key>/` whose key is the content hash of the
config that determines its bytes. It is built in `<key>.partial/` (which survives a kill, so a
long build can resume from what it finished), then published with one `os.replace`, so a
reader never sees half an artifact. A file lock makes a second process that asks for the same
key wait for the first instead of building it twice.

Integrity: before publishing, the SHA-256 and size of every file (raw `.bin` arrays excepted:
they carry per-chunk checksums in their own manifest) go into `sha256.json`. The first read
re-hashes them all; a stamp (`.verified.json`: each file's size and modification time when it
was last verified) then lets later reads skip the hashing while nothing changed, so opening a
terabyte artifact costs a few `stat` calls. A file modified within `RACY_SECONDS` of its
verification is re-hashed anyway (a write in the same clock tick keeps the modification time).
`crosslib verify` re-hashes everything on demand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout

from crosslib.config import Config, ParameterError
from crosslib.constants import data_dir

CONFIG_FILE = "config.json"
CHECKSUMS_FILE = "sha256.json"  # {relative path: {"sha256", "size"}} of an artifact's files
STAMP_FILE = ".verified.json"  # {relative path: [size, mtime_ns, verified_at_ns]}
RACY_SECONDS = 2.0
UNHASHED_SUFFIXES = (".bin", ".lock", ".tmp")  # raw arrays have chunk checksums; locks and temporaries change


class ArtifactError(RuntimeError):
    """An artifact on disk is missing, incomplete or does not match its checksum."""


class ArtifactFormatError(ArtifactError, ParameterError):
    """A file given to crosslib (or found in an artifact) does not have the expected structure."""


def read_json_object(path: str | os.PathLike, fields: tuple[str, ...] = (), *, parameter: str = "path") -> dict[str, Any]:
    """A JSON file that must hold an object with `fields`; anything else is refused naming
    `parameter` (the argument that pointed at the file) and what the file must hold."""
    path = Path(path)
    data = read_json(path)
    missing = [f for f in fields if not isinstance(data, dict) or f not in data]
    if not isinstance(data, dict) or missing:
        what = "a list" if isinstance(data, list) else type(data).__name__ if not isinstance(data, dict) else f"an object without {missing}"
        raise ArtifactFormatError(
            f"{parameter}={str(path.parent)!r} is not allowed: {path.name} is {what}; it must be a JSON object with "
            f"the fields {list(fields)} (as crosslib writes it)"
        )
    return data


def corruption_message(folder: Path, detail: str) -> str:
    """What a user sees when an artifact is corrupted: what is wrong, and which directory to delete."""
    return (f"{detail}: the artifact {folder} is corrupted. Delete the directory {folder} and re-run "
            "`crosslib book` (or the call that built it) to rebuild it")


def _hashed_files(folder: Path) -> list[str]:
    skip = {CONFIG_FILE, CHECKSUMS_FILE, STAMP_FILE}
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name not in skip and not p.name.endswith(UNHASHED_SUFFIXES))


def record_checksums(folder: str | os.PathLike) -> None:
    """Write `sha256.json` for the files of `folder` (and stamp them as verified)."""
    folder = Path(folder)
    sums = {rel: {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
            for rel in _hashed_files(folder)}
    atomic_write_json(folder / CHECKSUMS_FILE, sums)
    write_stamp(folder, list(sums))


def unchanged_since_verified(folder: Path, files: list[str]) -> bool:
    """True when every file has the size and modification time it had when last verified, and
    was not modified within `RACY_SECONDS` before that verification."""
    try:
        stamp = json.loads((folder / STAMP_FILE).read_text())
        for rel in files:
            size, mtime_ns, verified_ns = stamp[rel]
            st = (folder / rel).stat()
            if st.st_size != size or st.st_mtime_ns != mtime_ns or mtime_ns > verified_ns - RACY_SECONDS * 1e9:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def write_stamp(folder: Path, files: list[str]) -> None:
    """Record that `files` were just verified (best effort: a read-only data directory keeps no stamp)."""
    now = time.time_ns()
    with contextlib.suppress(OSError, ValueError):
        try:
            stamp = json.loads((folder / STAMP_FILE).read_text())
            stamp = stamp if isinstance(stamp, dict) else {}
        except (OSError, ValueError):
            stamp = {}
        for rel in files:
            st = (folder / rel).stat()
            stamp[rel] = [st.st_size, st.st_mtime_ns, now]
        atomic_write_json(folder / STAMP_FILE, stamp)


def verify_artifact(folder: str | os.PathLike, *, full: bool = False) -> None:
    """Check a published artifact's files against `sha256.json`: sizes always, contents when
    `full` or when a file changed since it was last verified. An artifact published before
    checksums were recorded gets them now (trust on first use)."""
    folder = Path(folder)
    if not (folder / CHECKSUMS_FILE).is_file():
        with contextlib.suppress(OSError):
            record_checksums(folder)
        return
    sums = read_json_object(folder / CHECKSUMS_FILE, parameter="artifact")
    for rel, rec in sums.items():
        file = folder / rel
        if not file.is_file():
            raise ArtifactError(corruption_message(folder, f"{rel} is missing"))
        if file.stat().st_size != rec.get("size"):
            raise ArtifactError(corruption_message(folder, f"{rel} has {file.stat().st_size} bytes, expected {rec.get('size')}"))
    if not full and unchanged_since_verified(folder, list(sums)):
        return
    for rel, rec in sums.items():
        if sha256_file(folder / rel) != rec.get("sha256"):
            raise ArtifactError(corruption_message(folder, f"{rel} does not match its checksum in {CHECKSUMS_FILE}"))
    write_stamp(folder, list(sums))


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e})") from None


@contextlib.contextmanager
def locked(path: str | os.PathLike, *, message: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a `.lock` file), telling the user if we must wait."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0.05)
    except Timeout:
        if message:  # operational: stderr, so that it never lands in a published notebook's output
            print(message, file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def display_path(path: str | os.PathLike) -> str:
    """`path` relative to the data directory (`$CROSSLIB_DATA/...`) when it lies inside it, so that
    messages do not show the builder's absolute paths; other paths as they are."""
    path = Path(path)
    with contextlib.suppress(ValueError, OSError):
        return "<data>/" + path.resolve().relative_to(data_dir()).as_posix()
    return str(path)


def artifact_dir(kind: str, config: Config, root: str | os.PathLike | None = None) -> Path:
    return Path(root or data_dir()) / kind / config.key()


def build_artifact(
    kind: str,
    config: Config,
    build: Callable[[Path], None],
    root: str | os.PathLike | None = None,
) -> Path:
    """Return the published artifact for `config`, building it with `build(partial_dir)` if needed.

    `build` writes into `partial_dir`, which keeps whatever an interrupted earlier attempt left
    there (so builds can resume); it must leave the directory complete when it returns.
    """
    return build_artifacts(kind, [config], lambda partials: build(partials[0]), root)[0]


def build_artifacts(
    kind: str,
    configs: list[Config],
    build: Callable[[dict[int, Path]], None],
    root: str | os.PathLike | None = None,
) -> list[Path]:
    """`build_artifact` for artifacts made in one computation (stores of several hooks read in one pass).

    `build({index: partial_dir})` builds the artifacts of `configs` that are not published yet, each
    into its own partial directory; each is then published on its own, as `build_artifact` does.
    """
    finals = [artifact_dir(kind, config, root) for config in configs]
    missing = [i for i, final in enumerate(finals) if not (final / CONFIG_FILE).is_file()]
    for i in set(range(len(finals))) - set(missing):
        verify_artifact(finals[i])
    if not missing:
        return finals
    finals[missing[0]].parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        # every process takes the locks in one order (by key), so two builders of overlapping sets cannot deadlock
        for i in sorted(missing, key=lambda i: finals[i].name):
            held.enter_context(locked(finals[i].with_suffix(".lock"),
                                      message=f"waiting for another process building {display_path(finals[i])}"))
        for i in [i for i in missing if (finals[i] / CONFIG_FILE).is_file()]:  # built by a process we waited for
            verify_artifact(finals[i])
            missing.remove(i)
        partials = {i: finals[i].with_name(finals[i].name + ".partial") for i in missing}
        for partial in partials.values():
            partial.mkdir(exist_ok=True)
        if partials:
            build(partials)
        for i, partial in partials.items():
            record_checksums(partial)
            # The config is written last: its presence marks a complete artifact.
            atomic_write_text(partial / CONFIG_FILE, configs[i].to_json() + "\n")
            if finals[i].exists():  # a stale, incomplete directory (no config.json)
                shutil.rmtree(finals[i])
            os.replace(partial, finals[i])
    return finals
