"""Configs: declarative field checks, their messages, and content keys that do not move.

A config's key names its artifacts on disk (activation caches, dictionaries, tables), so a key that
changes silently orphans every cached result. The keys below were computed before the field checks
became declarative; a change here must be deliberate (and invalidates the caches).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import numpy as np
import pytest

from crosslib.activations.cache import CacheConfig, StoreIdentity
from crosslib.analyses.attribution import AttributionConfig, InterventionConfig
from crosslib.analyses.complexity import ContextDepthConfig, LLMRubricConfig
from crosslib.analyses.crosslayer_statistics import CrossLayerConfig
from crosslib.analyses.dynamics import DynamicsConfig, DynamicsKey
from crosslib.analyses.emergence import EmergenceConfig
from crosslib.analyses.explorer import ExplorerConfig, ExplorerKey
from crosslib.analyses.probes import SeparabilityConfig
from crosslib.analyses.tasks import TaskConfig
from crosslib.config import (Check, Config, Convert, ParameterError, choice, fraction, integer, is_int, is_number,
                             lists_as_tuples, optional, positive, positive_int, require)
from crosslib.dictionaries.crosscoder import CrosscoderConfig
from crosslib.dictionaries.saetrack import SAETrackConfig
from crosslib.text.corpus import CorpusConfig

HOOK = "blocks.0.hook_resid_post"

# (config, its key before the field checks became declarative)
KEYS: list[tuple[Config, str]] = [
    (CacheConfig(suite="s", steps=(0, 1), hook=HOOK), "dfd1770578acb66d"),
    (CrosscoderConfig(n_snapshots=2, d_model=4, dict_size=8), "ed0aca2150ef844d"),
    (CrosscoderConfig(n_snapshots=2, d_model=4, dict_size=8, activation="topk", k=4), "c9fed22351030e98"),
    (EmergenceConfig(), "188384002f10f048"),
    (SeparabilityConfig(), "678796a4998a45f2"),
    (SAETrackConfig(), "3d5ab911856d257d"),
    (SAETrackConfig(activation="topk"), "712db6fd0468b0f6"),
    (ContextDepthConfig(), "1bb28bb41d289800"),
    (LLMRubricConfig(), "47accf5102822eb3"),
    (CrossLayerConfig(), "782b405b6bcc0980"),
    (AttributionConfig(), "46a4cf471ff30dc8"),
    (InterventionConfig(), "4fe11ef469c2c9d5"),
    (TaskConfig(), "c2102f5fcb281ca1"),
    (ExplorerConfig(), "4a6db474275208fd"),
    (CorpusConfig(), "bd64a89370482bce"),
    (CorpusConfig(source="hf:x", max_documents=5), "809e761b9e56bc0a"),
    (DynamicsConfig(), "ca0e6fc0626614d1"),
    (DynamicsKey(suite="s", dynamics=DynamicsConfig(), heldout="h", train="t"), "19c098e49942d5c9"),
    (StoreIdentity(cache={"a": 1}, tokens_sha256="t", n_windows=2, context_length=3, weights=(1,)), "8c40288b2faa5a3b"),
    (ExplorerKey(config={}, model="m", source="s", steps=(0,), tokenizer="t", attributions="a", llm_answers="l"),
     "7958452163661ae4"),
]


@pytest.mark.parametrize("config, key", KEYS, ids=[f"{type(c).__name__}-{i}" for i, (c, _) in enumerate(KEYS)])
def test_keys_of_the_default_configs_are_unchanged(config, key):
    assert config.key() == key
    assert type(config).from_dict(json.loads(config.to_json())).key() == key  # the JSON round trip keeps it


def test_field_checks_convert_before_they_check():
    from_list = CacheConfig(suite="s", steps=[0, 1], hook=HOOK)
    assert from_list.steps == (0, 1) and from_list.key() == KEYS[0][1]
    assert InterventionConfig(ks=[1, 2]).ks == (1, 2)


# (id, config call, the message it must start with)
REFUSED: list[tuple[str, object, str]] = [
    ("dict_size negative", lambda: CrosscoderConfig(n_snapshots=1, d_model=4, dict_size=-5),
     "dict_size=-5 is not allowed: a positive integer"),
    ("dict_size a bool", lambda: CrosscoderConfig(n_snapshots=1, d_model=4, dict_size=True),
     "dict_size=True is not allowed: a positive integer"),
    ("activation unknown", lambda: CrosscoderConfig(n_snapshots=1, d_model=4, dict_size=8, activation="gelu"),
     "activation='gelu' is not allowed: choose one of ['jumprelu', 'relu', 'topk']"),
    ("k above dict_size (cross-field)", lambda: CrosscoderConfig(n_snapshots=1, d_model=4, dict_size=8, activation="topk", k=9),
     "k=9 is not allowed: an integer in 1..dict_size=8"),
    ("decoder_init_norm", lambda: CrosscoderConfig(n_snapshots=1, d_model=4, dict_size=8, decoder_init_norm="grid"),
     "decoder_init_norm='grid' is not allowed: a positive number or \"search\""),
    ("eval_fraction 1", lambda: CacheConfig(suite="s", steps=(0,), hook=HOOK, eval_fraction=1),
     "eval_fraction=1 is not allowed: a number in [0, 1)"),
    ("steps decreasing", lambda: CacheConfig(suite="s", steps=[3, 1], hook=HOOK),
     "steps=(3, 1) is not allowed: a non-empty tuple of training steps"),
    ("device unknown", lambda: CacheConfig(suite="s", steps=(0,), hook=HOOK, device="tpu"), "device='tpu' is not allowed"),
    ("hook malformed", lambda: CacheConfig(suite="s", steps=(0,), hook="resid"), "hook='resid' is not a known hook name"),
    ("fade above strong (cross-field)", lambda: EmergenceConfig(fade_fraction=0.6),
     "fade_fraction=0.6 is not allowed: a number in (0, strong_fraction=0.5]"),
    ("strong_fraction 1", lambda: EmergenceConfig(strong_fraction=1.0), "strong_fraction=1.0 is not allowed: a number in (0, 1)"),
    ("warm_fraction 0", lambda: SAETrackConfig(warm_fraction=0), "warm_fraction=0 is not allowed: a number in (0, 1]"),
    ("seed negative", lambda: SAETrackConfig(seed=-1), "seed=-1 is not allowed: an integer >= 0"),
    ("partner above pass_through (cross-field)", lambda: CrossLayerConfig(partner_threshold=0.99),
     "partner_threshold=0.99 is not allowed: a correlation in (0, pass_through=0.95]"),
    ("gate 0", lambda: CrossLayerConfig(gate=0), "gate=0 is not allowed: a probability in (0, 1]"),
    ("base_url", lambda: LLMRubricConfig(base_url="localhost"), "base_url='localhost' is not allowed: None or a URL"),
    ("max_windows 0", lambda: ExplorerConfig(max_windows=0), "max_windows=0 is not allowed: None or an integer >= 1"),
    ("emergence not a config", lambda: ExplorerConfig(emergence={}), "emergence={} is not allowed: an EmergenceConfig"),
    ("context_length 0", lambda: DynamicsConfig(context_length=0), "context_length=0 is not allowed: None or a positive number"),
    ("ks not increasing", lambda: InterventionConfig(ks=[5, 2]), "ks=(5, 2) is not allowed: a non-empty increasing tuple"),
    ("rank_by unknown", lambda: InterventionConfig(rank_by="x"), "rank_by='x' is not allowed: choose one of"),
    ("some above enough (cross-field)", lambda: ContextDepthConfig(some=0.6), "some=0.6 is not allowed: a number below enough=0.5"),
    ("heldout_fraction", lambda: CorpusConfig(heldout_fraction=1.5), "heldout_fraction=1.5 is not allowed: a number in (0, 1)"),
    ("hf corpus without a limit (cross-field)", lambda: CorpusConfig(source="hf:x"), "max_documents=0 is not allowed: a positive number"),
    ("induction_length 1", lambda: TaskConfig(induction_length=1), "induction_length=1 is not allowed: an integer >= 2"),
]


@pytest.mark.parametrize("build, message", [row[1:] for row in REFUSED], ids=[row[0] for row in REFUSED])
def test_bad_fields_are_refused_naming_the_parameter_the_value_and_what_is_allowed(build, message):
    with pytest.raises(ParameterError) as error:
        build()
    assert str(error.value).startswith(message), str(error.value)


def test_replace_runs_the_checks_again():
    with pytest.raises(ParameterError, match="dict_size=0"):
        CrosscoderConfig(n_snapshots=1, d_model=4, dict_size=8).replace(dict_size=0)


def test_numpy_integers_are_integers_and_keep_the_key():
    assert CrosscoderConfig(n_snapshots=2, d_model=4, dict_size=np.int64(8)).key() == KEYS[1][1]
    assert is_int(np.int32(3)) and not is_int(True) and not is_int(3.0)
    assert is_number(np.float64(0.5)) and not is_number(False) and not is_number(float("nan"))


# --------------------------------------------------------------------------- the machinery


def _even(name: str, value: int) -> None:
    require(value % 2 == 0, name, value, "an even number")


@dataclasses.dataclass(frozen=True)
class Toy(Config):
    count: Annotated[int, positive_int()] = 2
    share: Annotated[float, fraction("[0, 1]")] = 0.5
    sizes: Annotated[tuple[int, ...], lists_as_tuples(), Check(lambda v: isinstance(v, tuple), "a tuple")] = (1,)
    label: Annotated[str, Check(lambda v: isinstance(v, str), "a string"), Convert(str.upper)] = "a"
    mode: Annotated[str, choice("x", "y")] = "x"
    scale: Annotated[float | None, optional(positive())] = None
    even: Annotated[int, integer(0), _even] = 0
    free: int = 0  # no rule

    def validate(self) -> None:
        require(self.count <= 10 or self.mode == "y", "count", self.count, "at most 10 when mode='x'")


def test_rules_run_in_order_and_conversions_are_kept():
    toy = Toy(sizes=[1, 2], label="b", free=-3)
    assert toy.sizes == (1, 2) and toy.label == "B" and toy.free == -3
    assert "Annotated" not in toy.to_json() and json.loads(toy.to_json())["sizes"] == [1, 2]
    assert Toy.from_dict(toy.to_dict()) == toy


@pytest.mark.parametrize("changes, message", [
    ({"count": 0}, "count=0 is not allowed: a positive integer"),
    ({"share": 1.5}, "share=1.5 is not allowed: a number in [0, 1]"),
    ({"label": 5}, "label=5 is not allowed: a string"),
    ({"mode": "z"}, "mode='z' is not allowed: choose one of ['x', 'y']"),
    ({"scale": -1.0}, "scale=-1.0 is not allowed: None or a positive number"),
    ({"even": -2}, "even=-2 is not allowed: an integer >= 0"),  # rules run in order: integer(0) first
    ({"even": 3}, "even=3 is not allowed: an even number"),
    ({"count": 11}, "count=11 is not allowed: at most 10 when mode='x'"),  # validate() runs after the field rules
])
def test_each_rule_refuses_with_its_own_message(changes, message):
    with pytest.raises(ParameterError) as error:
        Toy(**changes)
    assert str(error.value) == message


def test_configs_without_annotated_rules_never_evaluate_their_annotations():
    @dataclasses.dataclass(frozen=True)
    class Local(Config):
        thing: NotImportableHere = None  # noqa: F821 - a name that only exists where the class was written

    assert Local().thing is None
