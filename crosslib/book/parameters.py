"""Chapter parameters, checked before any expensive work.

`check_parameters(values)` checks every value whose name a chapter may declare (the `CHECKS`
table: one entry per parameter name), builds the configs those values feed (`CrosscoderConfig`,
`TrainConfig`, `DynamicsConfig`, ...), so that their own checks run too, and estimates the memory
of the largest training step. `check_types(values, defaults)` compares each value's type with the
notebook's default. Both raise one `ParameterError` naming the parameter and what is allowed.

The book runner calls them for every chapter before any chapter runs; each chapter calls
`check_parameters(globals())` first, so a notebook run by hand or by papermill is checked too.

A new parameter is one entry in `CHECKS` (and, if it feeds a config, a line in `check_configs`);
tests/test_bad_inputs.py holds one bad value per entry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

from crosslib.config import (ParameterError, Rule, finite, integer, is_int, non_empty_str, non_negative, positive_int,
                             require, require_choice)

# --------------------------------------------------------------------------- value checks

seed = integer(0, 2**32 - 1, allowed="an integer in 0..2**32-1")


def step_list(name: str, value: Any) -> None:
    """None (every snapshot) or a non-empty list of distinct training steps."""
    ok = value is None or (
        isinstance(value, (list, tuple)) and len(value) > 0 and all(is_int(s) and s >= 0 for s in value)
        and len(set(value)) == len(value)
    )
    require(ok, name, value, "None (every snapshot) or a non-empty list of distinct training steps, e.g. [0, 512, 2000]")


def list_of(item: Rule, what: str) -> Rule:
    def check(name: str, value: Any) -> None:
        require(isinstance(value, (list, tuple)) and len(value) > 0, name, value, f"a non-empty list of {what}")
        for v in value:
            try:
                item(name, v)
            except ParameterError:
                raise ParameterError(f"{name}={value!r} is not allowed: a non-empty list of {what}") from None
    return check


def choice(choices: Callable[[], Any]) -> Rule:
    def check(name: str, value: Any) -> None:
        require_choice(name, value, choices())
    return check


def device(name: str, value: Any) -> None:
    import torch

    allowed = "'cpu', 'cuda' or 'cuda:N' (where the models run)"
    require(isinstance(value, str), name, value, allowed)
    try:
        kind = torch.device(value).type
    except (RuntimeError, ValueError):
        raise ParameterError(f"{name}={value!r} is not allowed: {allowed}") from None
    require(kind in ("cpu", "cuda"), name, value, allowed)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"{name}={value!r} is not allowed here: no CUDA GPU is available; use 'cpu'")


def hook(name: str, value: Any) -> None:
    from crosslib.models.hooks import parse_hook

    require(isinstance(value, str), name, value, "a hook name such as 'blocks.2.hook_resid_post'")
    parse_hook(value)  # its error names hook= and the allowed forms


def layer_hook(name: str, value: Any) -> None:
    from crosslib.models.hooks import HOOK_KINDS

    require_choice(name, value, [f"hook_{kind}" for kind in HOOK_KINDS])


def suite(name: str, value: Any) -> None:
    from crosslib.models.suite import SUITE_PRESETS

    allowed = (f"a preset {sorted(SUITE_PRESETS)}, a folder of step{{N}}/ checkpoints, or a hub id such as "
               "'EleutherAI/pythia-70m-deduped'")
    require(isinstance(value, (str, os.PathLike)) and str(value) != "", name, value, allowed)
    text = str(value)
    if text in SUITE_PRESETS or Path(text).is_dir():
        return
    require("/" in text and not text.startswith((".", "/")), name, value, allowed)


def mapping(name: str, value: Any) -> None:
    require(isinstance(value, Mapping), name, value, 'a mapping of names to values, e.g. {"repeat_fraction": 0.0}')


def corpus(name: str, value: Any) -> None:
    """None (the suite's own corpus) or a corpus source, as `CorpusConfig(source=...)` takes it."""
    from crosslib.text.corpus import CorpusConfig

    if value is None or isinstance(value, str) and value.startswith("hf:") and len(value) > 3:
        return
    _as_parameters(lambda: CorpusConfig(source=value), {"source": name})


def _tasks() -> tuple[str, ...]:
    from crosslib.analyses.tasks import TASK_NAMES

    return TASK_NAMES


def _scores() -> tuple[str, ...]:
    from crosslib.analyses.attribution import SCORES

    return SCORES


# One entry per parameter name that a chapter may declare.
CHECKS: dict[str, Rule] = {
    "suite": suite,
    "suite_overrides": mapping,
    "corpus": corpus,
    "split": choice(lambda: ("heldout", "train")),
    "steps": step_list,
    "time_steps": step_list,
    "hook": hook,
    "layer_hook": layer_hook,
    "device": device,
    "seed": seed,
    **{name: positive_int() for name in (
        "n_windows", "induction_sequences", "n_tokens", "n_layer_tokens", "dict_size", "n_steps", "batch_size",
        "n_probe_features", "n_scored_features", "n_dashboards", "n_prompts", "ig_steps", "n_detail_windows",
        "dynamics_batch_size", "features_per_shard", "n_contexts", "min_firing_rows",
    )},
    "sparsity_coefficient": non_negative(),
    "sparsity_coefficients": list_of(non_negative(), "numbers >= 0"),
    **{name: finite() for name in (
        "strong_fraction", "fade_fraction", "warm_fraction", "warm_lr_factor", "pass_through", "gate_threshold",
        "edge_threshold", "min_metric",
    )},
    "llm_model": non_empty_str(),
    "task": choice(_tasks),
    "tasks": list_of(choice(_tasks), "task names"),
    "rank_by": choice(_scores),
    "ablation_ks": list_of(positive_int(), "positive integers"),
}


# --------------------------------------------------------------------------- types against defaults


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "True or False"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    if isinstance(default, (list, tuple)):
        return "a list"
    if isinstance(default, dict):
        return "a mapping"
    return type(default).__name__


def check_types(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Each value has its default's type (None defaults take anything); returns the values with
    integral floats (`-p n_tokens=1e6`) made ints where the default is an int."""
    out = dict(values)
    for name, value in values.items():
        if name not in defaults or defaults[name] is None:
            continue
        default = defaults[name]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            if isinstance(value, float) and value.is_integer():
                value = out[name] = int(value)
            ok = is_int(value)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, (list, tuple)):
            ok = isinstance(value, (list, tuple))
        elif isinstance(default, dict):
            ok = isinstance(value, Mapping)
        else:
            ok = isinstance(value, type(default))
        require(ok, name, value, f"{_kind(default)} (the notebook's default is {default!r})")
    return out


# --------------------------------------------------------------------------- configs


def _config(build: Callable[[], Any], name: str, value: Any) -> Any:
    """Build a config from the value of parameter `name`; any error becomes one naming `name`."""
    try:
        return build()
    except (TypeError, ValueError, KeyError) as e:  # ParameterError is a ValueError
        raise ParameterError(f"{name}={value!r} is not allowed: {e}") from None


def _as_parameters(build: Callable[[], Any], renames: Mapping[str, str]) -> Any:
    """Build a config whose field names differ from the chapter's parameter names: an error about
    field `gate` is reported as one about parameter `gate_threshold`, and so on."""
    try:
        return build()
    except ParameterError as e:
        message = str(e)
        for field, parameter in renames.items():
            if message.startswith(f"{field}="):
                message = parameter + message[len(field):]
        raise ParameterError(message) from None


def suite_config_of(values: Mapping[str, Any]):
    """The `SuiteConfig` a chapter's `suite` and `suite_overrides` describe (None for suites
    crosslib did not train, such as Pythia on the hub)."""
    from crosslib.models.suite import SUITE_PRESETS, SuiteConfig, suite_config

    name = str(values.get("suite", "tiny"))
    overrides = dict(values.get("suite_overrides") or {})
    if name not in SUITE_PRESETS:
        require(not overrides, "suite_overrides", overrides, f"{{}}: overrides only apply to the presets {sorted(SUITE_PRESETS)}")
        try:
            return suite_config(name)
        except Exception:  # a folder crosslib did not write: its own checks run when it is opened
            return None
    unknown = sorted(set(overrides) - set(SuiteConfig.field_names()))
    require(not unknown, "suite_overrides", overrides, f"names from {SuiteConfig.field_names()}")
    return _config(lambda: SUITE_PRESETS[name].replace(**overrides), "suite_overrides", overrides)


def check_configs(values: Mapping[str, Any]) -> None:
    """Build every config the chapter's values feed, so each config's own checks run now."""
    v = dict(values)
    has = v.__contains__
    seed_value = v.get("seed", 0)
    suite = suite_config_of(v) if has("suite") else None
    if suite is not None:
        schedule = suite.steps
        for name in ("steps", "time_steps"):
            missing = [s for s in (v.get(name) or []) if s not in schedule]
            require(not missing, name, v.get(name), f"steps of the suite's schedule {schedule}")
        if has("hook"):
            from crosslib.models.hooks import parse_hook

            layer = parse_hook(v["hook"]).layer
            require(layer < suite.n_layers, "hook", v["hook"], f"a layer in 0..{suite.n_layers - 1} (the suite has {suite.n_layers})")
    if has("dict_size"):
        from crosslib.dictionaries.crosscoder import CrosscoderConfig
        from crosslib.dictionaries.train import TrainConfig

        CrosscoderConfig(n_snapshots=1, d_model=1, dict_size=v["dict_size"])
        coefficients = v.get("sparsity_coefficients") or [v.get("sparsity_coefficient", 0.3)]
        for coefficient in coefficients:
            TrainConfig(n_steps=v.get("n_steps", 600), batch_size=v.get("batch_size", 1024),
                        sparsity_coefficient=coefficient, seed=seed_value)
    if has("n_windows") and has("induction_sequences"):
        from crosslib.analyses.dynamics import DynamicsConfig

        DynamicsConfig(n_windows=v["n_windows"], induction_sequences=v["induction_sequences"], seed=seed_value)
    if has("strong_fraction") or has("fade_fraction"):
        from crosslib.analyses.emergence import EmergenceConfig

        EmergenceConfig(strong_fraction=v.get("strong_fraction", 0.5), fade_fraction=v.get("fade_fraction", 0.25))
    if has("task") and has("tasks"):
        require(v["task"] in v["tasks"], "task", v["task"], f"one of the tracked tasks={list(v['tasks'])}")
    if has("n_prompts"):
        from crosslib.analyses.tasks import TaskConfig

        TaskConfig(n_prompts=v["n_prompts"], seed=seed_value)
    if has("ig_steps") or has("rank_by") or has("ablation_ks"):
        from crosslib.analyses.attribution import AttributionConfig, InterventionConfig

        AttributionConfig(ig_steps=v.get("ig_steps", 16))
        _as_parameters(lambda: InterventionConfig(ks=tuple(v.get("ablation_ks", (1,))), rank_by=v.get("rank_by", "attribution"),
                                                  seed=seed_value), {"ks": "ablation_ks"})
    if has("warm_fraction") or has("warm_lr_factor"):
        from crosslib.dictionaries.saetrack import SAETrackConfig

        SAETrackConfig(dict_size=v.get("dict_size", 512), sparsity_coefficient=v.get("sparsity_coefficient", 0.3),
                       n_steps=v.get("n_steps", 600), batch_size=v.get("batch_size", 1024),
                       warm_fraction=v.get("warm_fraction", 0.2), warm_lr_factor=v.get("warm_lr_factor", 0.3),
                       seed=seed_value)
    if has("pass_through") or has("gate_threshold") or has("edge_threshold"):
        from crosslib.analyses.crosslayer import CrossLayerConfig

        _as_parameters(lambda: CrossLayerConfig(pass_through=v.get("pass_through", 0.95), gate=v.get("gate_threshold", 0.999),
                                                edge_threshold=v.get("edge_threshold", 0.5), seed=seed_value),
                       {"gate": "gate_threshold"})
    if has("llm_model"):
        from crosslib.analyses.complexity import LLMRubricConfig

        LLMRubricConfig(model=v["llm_model"])
    check_memory(v, suite)


# --------------------------------------------------------------------------- memory


def available_memory(device_name: str = "cpu") -> int:
    """Bytes of memory available now: the GPU's free memory for a CUDA device, else the RAM that
    is available (and within this process's cgroup limit, in a container)."""
    if str(device_name).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device_name))[0])
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, available)


def suite_training_bytes(config: Any) -> int:
    """Memory to train a suite: fp32 weights, gradients and two Adam moments (16 bytes per
    parameter), plus the activations of one batch (≈ 16 d_model floats per layer and token, and
    the logits and their gradient)."""
    d, layers = config.d_model, config.n_layers
    params = 2 * config.vocab_size * d + layers * (4 * d * d + 2 * d * config.d_mlp)
    tokens = config.batch_size * config.context_length
    return 16 * params + 4 * tokens * (16 * d * layers + 2 * config.vocab_size)


def dictionary_training_bytes(n_snapshots: int, d_model: int, dict_size: int, batch_size: int) -> tuple[int, int]:
    """(weights part, batch part) of the memory to train a crosscoder: W_E and W_D hold
    2·S·d·F fp32 weights, each with a gradient, two Adam moments and a bf16 copy (18 bytes); one
    batch holds ≈ 6 fp32 [batch, S, F] feature arrays (pre-activations, gates, gradients) and as
    many [batch, S, d] activation arrays. S counts snapshots (an upper bound for a crosscoder,
    whose features are shared)."""
    weights = 18 * 2 * n_snapshots * d_model * dict_size
    batch = 24 * batch_size * n_snapshots * (dict_size + d_model)
    return weights, batch


def _human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n_bytes < 1024 or unit == "PiB":
            return f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""  # pragma: no cover


def check_memory(values: Mapping[str, Any], suite: Any = None, available: int | None = None) -> None:
    """Refuse values whose training would not fit in memory, naming the parameter, the estimate
    and the memory available (estimates are upper bounds within a small factor)."""
    device_name = values.get("device", "cpu")
    free = available_memory(device_name) if available is None else available
    if suite is not None:
        need = suite_training_bytes(suite)
        if need > free:
            raise ParameterError(
                f"suite_overrides={dict(values.get('suite_overrides') or {})!r} is not allowed here: training this "
                f"suite (d_model={suite.d_model}, {suite.n_layers} layers, vocab {suite.vocab_size}) needs about "
                f"{_human(need)} of memory and {_human(free)} is available; choose a smaller model"
            )
    if "dict_size" not in values or suite is None:
        return
    steps = values.get("steps") if "steps" in values else values.get("time_steps")
    n_snapshots = 1 if "layer_hook" in values else len(steps) if steps else len(suite.steps)
    check_dictionary_memory(n_snapshots, suite.d_model, values["dict_size"], values.get("batch_size", 1024), free)


def check_dictionary_memory(n_snapshots: int, d_model: int, dict_size: int, batch_size: int,
                            available: int | None = None, device_name: str = "cpu") -> None:
    """Refuse a dictionary whose training would not fit in memory, naming dict_size or batch_size
    (the one to lower), with the estimate and the memory available."""
    free = available_memory(device_name) if available is None else available
    weights, batch = dictionary_training_bytes(n_snapshots, d_model, dict_size, batch_size)
    if weights + batch > free:
        # dict_size is at fault when even a batch of one row would not fit
        too_big = sum(dictionary_training_bytes(n_snapshots, d_model, dict_size, 1)) > free
        name, value = ("dict_size", dict_size) if too_big else ("batch_size", batch_size)
        raise ParameterError(
            f"{name}={value!r} is not allowed here: training a dictionary of {dict_size:,} features over "
            f"{n_snapshots} snapshot(s) of d_model={d_model} with batch_size={batch_size:,} needs about "
            f"{_human(weights + batch)} of memory and {_human(free)} is available; lower {name}"
        )


# --------------------------------------------------------------------------- entry point


def check_parameters(values: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check a chapter's parameter values (names without a check are ignored) and return them
    (with the type fixes of `check_types` when `defaults` are given)."""
    known = {name: value for name, value in values.items() if name in CHECKS}
    if defaults is not None:
        known = check_types(known, defaults)
    for name, value in known.items():
        CHECKS[name](name, value)
    check_configs(known)
    return known
