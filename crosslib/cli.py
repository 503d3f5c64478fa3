"""`crosslib` command line: a thin dispatcher; each subcommand lives in its own module.

    crosslib book [--preset tiny] [-p name=value ...] [--chapter NAME ...] [--out DIR] [--force]
    crosslib verify [PATH ...]

A subcommand is registered in `SUBCOMMANDS` as (module, help); the module provides
`add_arguments(parser)` and `run_from_args(args) -> int`. Modules are imported only when their
subcommand runs, so `crosslib --help` stays fast. As the program's entry point, `main` makes the
process-wide settings (`crosslib.runtime.configure_process`) before a subcommand runs: library calls
never do, and the notebook kernels `crosslib book` starts inherit them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from crosslib.runtime import configure_process

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "book": ("crosslib.book.runner", "execute the chapter notebooks (papermill) and build the HTML book"),
    "fetch": ("crosslib.fetch", "download once what the default book needs (Brown corpus, MathJax)"),
    "verify": ("crosslib.verify", "re-hash every artifact under the data directory (or the given ones) against its checksums"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="crosslib", description="crosscoders across pre-training snapshots")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints help or the error for an unknown command
        parser.print_help()
        return 2
    configure_process()
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    sub_parser = argparse.ArgumentParser(prog=f"crosslib {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    return int(module.run_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
