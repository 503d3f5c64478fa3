"""Content-addressed, atomically published artifacts.

An artifact is a directory `<data_dir>/<kind>/<key>/` whose key is the content hash of the
config that determines its bytes. It is built in `<key>.partial/` (which survives a kill, so a
long build can resume from what it finished), then published with one `os.replace`, so a
reader never sees half an artifact. A file lock makes a second process that asks for the same
key wait for the first instead of building it twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout

from crosslib.config import Config
from crosslib.constants import data_dir

CONFIG_FILE = "config.json"


class ArtifactError(RuntimeError):
    """An artifact on disk is missing, incomplete or does not match its checksum."""


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
        if message:
            print(message, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


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
    final = artifact_dir(kind, config, root)
    if (final / CONFIG_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with locked(final.with_suffix(".lock"), message=f"waiting for another process building {final}"):
        if (final / CONFIG_FILE).is_file():  # built by the process we waited for
            return final
        partial = final.with_name(final.name + ".partial")
        partial.mkdir(exist_ok=True)
        build(partial)
        # The config is written last: its presence marks a complete artifact.
        atomic_write_text(partial / CONFIG_FILE, config.to_json() + "\n")
        if final.exists():  # a stale, incomplete directory (no config.json)
            shutil.rmtree(final)
        os.replace(partial, final)
    return final
