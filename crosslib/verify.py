"""`crosslib verify [PATH ...]`: re-hash artifacts against their checksums, on demand.

Opening an artifact checks its files' sizes, and re-hashes them only when they changed since
they were last verified (see `crosslib.artifacts`); this command re-hashes everything: every
file listed in each artifact's `sha256.json`, and every chunk of every activation store. With no
PATH it checks every published artifact under the data directory ($CROSSLIB_DATA, else data/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crosslib.artifacts import CONFIG_FILE, ArtifactError, verify_artifact
from crosslib.constants import data_dir


def published_artifacts(root: Path) -> list[Path]:
    """`<root>/<kind>/<key>/` directories holding a complete artifact (a config.json)."""
    return sorted(p.parent for p in root.glob(f"*/*/{CONFIG_FILE}") if not p.parent.name.endswith(".partial"))


def verify_path(path: Path) -> None:
    """Fully verify one artifact; raises `ArtifactError` naming what is corrupted."""
    from crosslib.activations.store import KIND, MANIFEST_FILE, open_store

    verify_artifact(path, full=True)
    if path.parent.name == KIND and (path / MANIFEST_FILE).is_file():
        open_store(path, verify="full")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH", help="artifact directories (default: all under the data directory)")


def run_from_args(args: argparse.Namespace) -> int:
    """Exit code 0 when everything matches its checksums, 1 when something is corrupted."""
    paths = [Path(p) for p in args.paths] or published_artifacts(data_dir())
    bad = 0
    for path in paths:
        try:
            verify_path(path.resolve())
        except ArtifactError as e:
            bad += 1
            print(f"corrupted: {e}", file=sys.stderr)
        else:
            print(f"ok  {path}")
    print(f"{len(paths) - bad} of {len(paths)} artifact(s) verified" + (f"; {bad} corrupted" if bad else ""))
    return 1 if bad else 0
