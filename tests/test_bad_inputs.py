"""Bad inputs, one row each: every one is refused with one `ParameterError` that names the
parameter (and what is allowed), before any suite, cache or dictionary work, and writes nothing.

To cover a new parameter, add a row to `BOOK_ROWS` (a value given with `crosslib book -p`) or to
`API_ROWS` (a call of the Python API): the id, the call, and the parameter name the message must
start with. `test_every_checked_parameter_has_a_bad_book_row` fails until a new entry of
`crosslib.book.parameters.CHECKS` has a row.
"""

from __future__ import annotations

import importlib
import json
import types
from pathlib import Path
from typing import Any, Callable

import pytest

from crosslib.activations import cache
from crosslib.book import pipeline
from crosslib.book.parameters import CHECKS, check_dictionary_memory
from crosslib.cli import main
from crosslib.config import ParameterError
from crosslib.dictionaries import train
from crosslib.models import suite

# --------------------------------------------------------------------------- crosslib book -p ...

# (id, command-line arguments after `crosslib book`, the parameter the message names, more text it must hold)
BOOK_ROWS: list[tuple[str, list[str], str, str]] = [
    ("dict_size negative", ["-p", "dict_size=-5"], "dict_size", "positive integer"),
    ("dict_size negative with a cache size", ["-p", "dict_size=-5", "-p", "n_tokens=12288"], "dict_size", "positive"),
    ("dict_size not a number", ["-p", "dict_size=abc"], "dict_size", "an integer"),
    ("dict_size too big for memory", ["-p", "dict_size=100000000"], "dict_size", "is available"),
    ("batch_size too big for memory", ["-p", "batch_size=100000000"], "batch_size", "is available"),
    ("suite d_model too big for memory", ["-p", "suite_overrides={d_model: 65536}"], "suite_overrides", "is available"),
    ("suite_overrides not a mapping", ["-p", "suite_overrides=5"], "suite_overrides", "a mapping"),
    ("suite_overrides unknown name", ["-p", "suite_overrides={nope: 1}"], "suite_overrides", "repeat_fraction"),
    ("suite_overrides bad value", ["-p", "suite_overrides={repeat_fraction: 3}"], "repeat_fraction", "[0, 1]"),
    ("suite unknown", ["-p", "suite=nope"], "suite", "preset"),
    ("corpus unknown", ["-p", "corpus=nope"], "corpus", "brown"),
    ("corpus not a string", ["-p", "corpus=5"], "corpus", "brown"),
    ("split unknown", ["-p", "split=test"], "split", "heldout"),
    ("dynamics_batch_size zero", ["-p", "dynamics_batch_size=0"], "dynamics_batch_size", "positive"),
    ("features_per_shard zero", ["-p", "features_per_shard=0"], "features_per_shard", "positive"),
    ("n_contexts negative", ["-p", "n_contexts=-1"], "n_contexts", "positive"),
    ("seed negative", ["-p", "seed=-1"], "seed", "0..2**32-1"),
    ("steps empty", ["-p", "steps=[]"], "steps", "non-empty list"),
    ("steps zero", ["-p", "steps=0"], "steps", "list"),
    ("steps not in the schedule", ["-p", "steps=[3, 512]"], "steps", "schedule"),
    ("time_steps not in the schedule", ["-p", "time_steps=[3]"], "time_steps", "schedule"),
    ("hook malformed", ["-p", "hook=resid"], "hook", "blocks.{L}.hook_resid_post"),
    ("hook past the last layer", ["-p", "hook=blocks.9.hook_resid_post"], "hook", "0..3"),
    ("layer_hook unknown", ["-p", "layer_hook=nope"], "layer_hook", "hook_resid_post"),
    ("device unknown", ["-p", "device=tpu"], "device", "cpu"),
    ("n_tokens zero", ["-p", "n_tokens=0"], "n_tokens", "positive"),
    ("n_layer_tokens fractional", ["-p", "n_layer_tokens=0.5"], "n_layer_tokens", "an integer"),
    ("n_steps zero", ["-p", "n_steps=0"], "n_steps", "positive"),
    ("n_windows negative", ["-p", "n_windows=-1"], "n_windows", "positive"),
    ("induction_sequences zero", ["-p", "induction_sequences=0"], "induction_sequences", "positive"),
    ("n_probe_features zero", ["-p", "n_probe_features=0"], "n_probe_features", "positive"),
    ("min_firing_rows zero", ["-p", "min_firing_rows=0"], "min_firing_rows", "positive"),
    ("n_scored_features negative", ["-p", "n_scored_features=-1"], "n_scored_features", "positive"),
    ("n_dashboards negative", ["-p", "n_dashboards=-3"], "n_dashboards", "positive"),
    ("n_prompts zero", ["-p", "n_prompts=0"], "n_prompts", "positive"),
    ("ig_steps zero", ["-p", "ig_steps=0"], "ig_steps", "positive"),
    ("n_detail_windows zero", ["-p", "n_detail_windows=0"], "n_detail_windows", "positive"),
    ("sparsity_coefficient negative", ["-p", "sparsity_coefficient=-1"], "sparsity_coefficient", ">= 0"),
    ("sparsity_coefficients empty", ["-p", "sparsity_coefficients=[]"], "sparsity_coefficients", "non-empty"),
    ("strong_fraction above 1", ["-p", "strong_fraction=2"], "strong_fraction", "(0, 1)"),
    ("fade_fraction above strong", ["-p", "fade_fraction=0.9"], "fade_fraction", "strong_fraction"),
    ("warm_fraction above 1", ["-p", "warm_fraction=5"], "warm_fraction", "(0, 1]"),
    ("warm_lr_factor negative", ["-p", "warm_lr_factor=-1"], "warm_lr_factor", "positive"),
    ("pass_through above 1", ["-p", "pass_through=3"], "pass_through", "(0, 1]"),
    ("gate_threshold above 1", ["-p", "gate_threshold=7"], "gate_threshold", "(0, 1]"),
    ("edge_threshold negative", ["-p", "edge_threshold=-2"], "edge_threshold", "(0, 1]"),
    ("min_metric not a number", ["-p", "min_metric=nope"], "min_metric", "a number"),
    ("llm_model empty", ["-p", "llm_model="], "llm_model", "non-empty"),
    ("task unknown", ["-p", "task=nope"], "task", "induction_random"),
    ("task not tracked", ["-p", "tasks=[agreement]"], "task", "tracked"),
    ("tasks unknown", ["-p", "tasks=[nope]"], "tasks", "task names"),
    ("rank_by unknown", ["-p", "rank_by=nope"], "rank_by", "integrated_gradients"),
    ("ablation_ks zero", ["-p", "ablation_ks=[0, 5]"], "ablation_ks", "positive integers"),
    ("chapter ambiguous", ["--chapter", "0"], "--chapter", "ambiguous: it matches 01_snapshot_suite, 02_"),
    ("chapter unknown", ["--chapter", "99"], "chapter", "valid chapters"),
    ("parameter unknown", ["-p", "nope=1"], "parameter 'nope'", "valid parameters"),
    ("preset unknown", ["--preset", "nope"], "preset", "valid presets"),
]


@pytest.fixture
def no_expensive_work(monkeypatch, tmp_path):
    """Fail the test if a suite, cache, dictionary or chapter run starts; data go to an empty folder."""
    data = tmp_path / "data"
    monkeypatch.setenv("CROSSLIB_DATA", str(data))

    def expensive(*args: Any, **kwargs: Any):
        raise AssertionError("expensive work started before the bad input was refused")

    for module, name in [(suite, "train_suite"), (pipeline, "resolve_suite"), (pipeline, "build_stores"),
                         (cache, "build_store"), (cache, "build_stores"), (pipeline, "train_crosscoder_cached"),
                         (train, "train_crosscoder_cached")]:
        monkeypatch.setattr(module, name, expensive)
    monkeypatch.setattr("crosslib.book.runner.execute_chapter", expensive)
    monkeypatch.setattr("crosslib.book.runner.ensure_mathjax", expensive)
    return data


@pytest.mark.parametrize("args, name, text", [row[1:] for row in BOOK_ROWS], ids=[row[0] for row in BOOK_ROWS])
def test_book_refuses_bad_input_naming_the_parameter(no_expensive_work, capsys, args, name, text):
    assert main(["book", "--no-html", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    message = err.removeprefix("crosslib book: error: ")
    assert name in message.split(":")[0], message  # named in the message's first clause
    assert text in message, message
    assert not no_expensive_work.exists() or not any(no_expensive_work.rglob("*")), "files were written"


def test_every_checked_parameter_has_a_bad_book_row():
    covered = {arg.split("=", 1)[0] for _, args, _, _ in BOOK_ROWS for arg in args if "=" in arg}
    assert set(CHECKS) <= covered, f"add a BOOK_ROWS row for {sorted(set(CHECKS) - covered)}"


def test_every_parameter_a_chapter_declares_is_checked():
    from crosslib.book.runner import BOOK_DIR, NOTEBOOK_DIR, declared_parameters, toc_chapters

    declared = {name for chapter in toc_chapters(BOOK_DIR) for name in declared_parameters(NOTEBOOK_DIR / f"{chapter}.ipynb")}
    assert declared <= set(CHECKS), f"add a check to crosslib.book.parameters.CHECKS for {sorted(declared - set(CHECKS))}"


def test_good_values_are_accepted_and_integral_floats_become_ints(no_expensive_work):
    from crosslib.book.runner import plan_book

    _, plans, _ = plan_book("smoke", {"n_tokens": 1e4, "dict_size": 64.0, "steps": [0, 8]})
    chapter_2 = next(p for p in plans if p.name.startswith("02"))
    assert chapter_2.parameters["n_tokens"] == 10000 and isinstance(chapter_2.parameters["n_tokens"], int)


# --------------------------------------------------------------------------- the Python API


def one_snapshot_sae():
    from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig

    return Crosscoder(CrosscoderConfig(n_snapshots=1, d_model=4, dict_size=8, decoder_init_norm=0.1))


def export_snapshot_5(tmp_path: Path):
    from crosslib.dictionaries.saelens import export_saelens

    export_saelens(one_snapshot_sae(), tmp_path / "sae", snapshot=5)


def corpus_file(tmp_path: Path, name: str, data: bytes):
    from crosslib.text.corpus import CorpusConfig, load_corpus

    path = tmp_path / name
    path.write_bytes(data)
    load_corpus(CorpusConfig(source=str(path)))


def crosscoder_json(tmp_path: Path, content: Any):
    from crosslib.dictionaries.crosscoder import Crosscoder

    saved = one_snapshot_sae().save(tmp_path / "model")
    meta = json.loads((saved / "crosscoder.json").read_text())
    (saved / "crosscoder.json").write_text(json.dumps(content(meta)))
    Crosscoder.load(saved)


def saelens_cfg_list(tmp_path: Path):
    from crosslib.dictionaries.saelens import import_saelens

    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "cfg.json").write_text("[1, 2]")
    import_saelens(tmp_path / "sae")


def huge_dictionary(tmp_path: Path):
    store = types.SimpleNamespace(n_snapshots=19, d_model=128)
    pipeline.dictionary(store, dict_size=100_000_000, sparsity_coefficient=0.3)


# (id, call(tmp_path), the parameter the message names, more text it must hold)
API_ROWS: list[tuple[str, Callable[[Path], Any], str, str]] = [
    ("export_saelens snapshot 5 of 1", export_snapshot_5, "snapshot", "0..0"),
    ("activation_store context_length 0",
     lambda _: pipeline.activation_store("tiny", "blocks.2.hook_resid_post", context_length=0), "context_length", ">= 2"),
    ("activation_store seed -1", lambda _: pipeline.activation_store("tiny", "blocks.2.hook_resid_post", seed=-1), "seed", "0.."),
    ("activation_stores hooks []", lambda _: pipeline.activation_stores("tiny", []), "hooks", "non-empty"),
    ("activation_stores a bad hook",
     lambda _: pipeline.activation_stores("tiny", ["blocks.0.hook_resid_post", "blocks.0.resid"]), "hook", "blocks.{L}"),
    ("activation_store steps []", lambda _: pipeline.activation_store("tiny", "blocks.2.hook_resid_post", []), "steps", "non-empty"),
    ("activation_store suite_overrides list",
     lambda _: pipeline.activation_store("tiny", "blocks.2.hook_resid_post", suite_overrides=[1]), "suite_overrides", "mapping"),
    ("dictionary too big for memory", huge_dictionary, "dict_size", "is available"),
    ("binary corpus file", lambda t: corpus_file(t, "data.txt", b"\x00\x01\x02 binary \x00" * 50), "source", "data.txt"),
    ("non-UTF-8 corpus file", lambda t: corpus_file(t, "latin.txt", "caf\xe9 au lait\n\nbonjour".encode("latin-1")),
     "source", "latin.txt"),
    ("jsonl text not a string", lambda t: corpus_file(t, "docs.jsonl", b'{"text": 5}\n{"text": "x"}\n'), "source", "not a string"),
    ("jsonl line not an object", lambda t: corpus_file(t, "docs.jsonl", b'[1]\n'), "source", "line 1"),
    ("CorpusConfig source 5", lambda _: importlib.import_module("crosslib.text.corpus").CorpusConfig(source=5), "source", "brown"),
    ("crosscoder.json a list", lambda t: crosscoder_json(t, lambda meta: [meta]), "directory", "a list"),
    ("crosscoder.json without config", lambda t: crosscoder_json(t, lambda meta: {k: v for k, v in meta.items() if k != "config"}),
     "directory", "config"),
    ("crosscoder.json without sha256", lambda t: crosscoder_json(t, lambda meta: {k: v for k, v in meta.items() if k != "sha256"}),
     "directory", "sha256"),
    ("sae-lens cfg.json a list", saelens_cfg_list, "path", "a list"),
]


@pytest.mark.parametrize("call, name, text", [row[1:] for row in API_ROWS], ids=[row[0] for row in API_ROWS])
def test_api_refuses_bad_input_naming_the_parameter(no_expensive_work, tmp_path, call, name, text):
    with pytest.raises(ParameterError) as error:
        call(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{name}="), message
    assert text in message and "\n" not in message, message


def test_memory_estimate_scales_with_the_dictionary():
    check_dictionary_memory(19, 128, 512, 1024, available=2 * 2**30)  # the tiny preset fits in 2 GiB
    with pytest.raises(ParameterError, match=r"dict_size=65536 .* needs about .* and 1\.0 GiB is available"):
        check_dictionary_memory(19, 128, 65536, 1024, available=2**30)
