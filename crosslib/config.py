"""Typed configs and the one error type for bad parameters.

Every stage of crosslib has a dataclass config that subclasses `Config`. A config is saved as
JSON beside the artifact it produced, and its content hash (`config.key()`) names that artifact.
Bad values raise `ParameterError`, whose message names the parameter and what is allowed. A
field's own rules are declared with its type (`dict_size: Annotated[int, positive_int()] = 512`)
and run when the config is built; `validate()` keeps the rules that relate several fields.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import sys
import typing
from typing import Any, Callable, Iterable, TypeVar

C = TypeVar("C", bound="Config")


class ParameterError(ValueError):
    """A parameter has a value that is not allowed; the message names it and the allowed values."""


def require(condition: bool, name: str, value: Any, allowed: str) -> None:
    """Raise `ParameterError` naming `name` unless `condition` holds."""
    if not condition:
        raise ParameterError(f"{name}={value!r} is not allowed: {allowed}")


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (NumPy float64 included), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- declarative field checks
#
# A config declares what each field allows beside its type, and `Config.__post_init__` runs the
# checks in field order before the config's own `validate()` (which keeps the rules that relate
# several fields):
#
#     dict_size: Annotated[int, positive_int()] = 512
#     eval_fraction: Annotated[float, fraction("[0, 1)")] = 0.1
#     activation: Annotated[str, choice(*ACTIVATIONS)] = "jumprelu"
#
# Annotated metadata never enters a config's JSON, so it leaves `Config.key()` unchanged.

Rule = Callable[[str, Any], None]
"""Anything called as rule(name, value) that raises `ParameterError` for a value it refuses."""


@dataclasses.dataclass(frozen=True)
class Check:
    """A rule from a test and a description: `test(value)` holds for the allowed values and
    `allowed` says which they are, in the refusal "name=value is not allowed: allowed"."""

    test: Callable[[Any], bool]
    allowed: str

    def __call__(self, name: str, value: Any) -> None:
        require(self.test(value), name, value, self.allowed)


@dataclasses.dataclass(frozen=True)
class Convert:
    """Replaces a field's value before the checks after it run (e.g. a JSON list back into a tuple)."""

    function: Callable[[Any], Any]


def lists_as_tuples() -> Convert:
    return Convert(lambda value: tuple(value) if isinstance(value, list) else value)


def integer(minimum: int | None = None, maximum: int | None = None, *, allowed: str | None = None) -> Check:
    """An integer (not a bool) within the bounds given (both included)."""
    if allowed is None:
        allowed = ("an integer" if minimum is None and maximum is None
                   else f"an integer >= {minimum}" if maximum is None
                   else f"an integer <= {maximum}" if minimum is None
                   else f"an integer in {minimum}..{maximum}")
    return Check(lambda value: is_int(value) and (minimum is None or value >= minimum)
                 and (maximum is None or value <= maximum), allowed)


def positive_int(*, allowed: str = "a positive integer") -> Check:
    return integer(1, allowed=allowed)


def positive(*, allowed: str = "a positive number") -> Check:
    """A finite number > 0."""
    return Check(lambda value: is_number(value) and value > 0, allowed)


def non_negative(*, allowed: str = "a finite number >= 0") -> Check:
    return Check(lambda value: is_number(value) and value >= 0, allowed)


def finite(*, allowed: str = "a finite number") -> Check:
    return Check(is_number, allowed)


_UNIT_INTERVALS: dict[str, Callable[[float], bool]] = {
    "(0, 1)": lambda v: 0 < v < 1,
    "[0, 1]": lambda v: 0 <= v <= 1,
    "[0, 1)": lambda v: 0 <= v < 1,
    "(0, 1]": lambda v: 0 < v <= 1,
}


def fraction(interval: str = "(0, 1)", *, allowed: str | None = None) -> Check:
    """A number in the unit interval written as `interval`: "(0, 1)", "[0, 1]", "[0, 1)" or "(0, 1]"."""
    inside = _UNIT_INTERVALS[interval]
    return Check(lambda value: is_number(value) and inside(value), allowed or f"a number in {interval}")


def choice(*values: Any) -> Check:
    """One of `values` (compared with ==)."""
    return Check(lambda value: value in values, f"choose one of {list(values)}")


def boolean() -> Check:
    return Check(lambda value: isinstance(value, bool), "True or False")


def non_empty_str(*, allowed: str = "a non-empty string") -> Check:
    return Check(lambda value: isinstance(value, str) and value.strip() != "", allowed)


def instance_of(cls: type, *, allowed: str | None = None) -> Check:
    article = "an" if cls.__name__[:1] in "AEIOU" else "a"
    return Check(lambda value: isinstance(value, cls), allowed or f"{article} {cls.__name__}")


def optional(check: Check) -> Check:
    """None, or a value `check` allows."""
    return Check(lambda value: value is None or check.test(value), f"None or {check.allowed}")


def require_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choice(*choices)(name, value)


def require_positive(name: str, value: float | int) -> None:
    positive()(name, value)


def require_fraction(name: str, value: float, *, open_interval: bool = True) -> None:
    fraction("(0, 1)" if open_interval else "[0, 1]")(name, value)


@functools.cache
def _field_rules(cls: type) -> tuple[tuple[str, tuple[Rule | Convert, ...]], ...]:
    """(field name, its rules) for every field of config class `cls` declared with Annotated rules."""
    rules = []
    for f in dataclasses.fields(cls):
        if "Annotated" not in str(f.type):  # other annotations are never evaluated
            continue
        metadata = getattr(_evaluated_annotation(cls, f.name), "__metadata__", ())
        field_rules = tuple(m for m in metadata if isinstance(m, Convert) or callable(m))
        if field_rules:
            rules.append((f.name, field_rules))
    return tuple(rules)


def _evaluated_annotation(cls: type, name: str) -> Any:
    """The annotation of field `name`, evaluated in the module of the class that declares it.

    `from __future__ import annotations` leaves annotations as strings. `typing.get_type_hints`
    evaluates them with the class namespace as globals, so a lambda in a `Check` would not see
    its module's names; here it does.
    """
    owner = next(klass for klass in cls.__mro__ if name in klass.__dict__.get("__annotations__", {}))
    annotation = owner.__dict__["__annotations__"][name]
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(sys.modules[owner.__module__]), dict(vars(owner)))
    return annotation


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal content gives equal text and equal hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def content_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of the canonical JSON of `obj` (configs, lists, dicts)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class for stage configs: JSON round trip, validation, content key."""

    def __post_init__(self) -> None:
        for name, rules in _field_rules(type(self)):
            value = getattr(self, name)
            for rule in rules:
                if isinstance(rule, Convert):
                    value = rule.function(value)
                    object.__setattr__(self, name, value)
                else:
                    rule(name, value)
        self.validate()

    def validate(self) -> None:
        """Rules that relate several fields (a field's own rules are declared with it, see `Check`);
        raise `ParameterError`."""

    def to_dict(self) -> dict[str, Any]:
        return json.loads(canonical_json(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ParameterError(
                f"unknown parameter {unknown[0]!r} for {cls.__name__}: valid ones are {cls.field_names()}"
            )
        hints = typing.get_type_hints(cls)
        converted = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                v = values[f.name]
                hint = hints.get(f.name)
                # JSON turns tuples into lists and nested configs into dicts; restore the declared types.
                if isinstance(v, list) and "tuple" in str(hint):
                    v = tuple(v)
                if isinstance(v, dict) and isinstance(hint, type) and issubclass(hint, Config):
                    v = hint.from_dict(v)
                converted[f.name] = v
        return cls(**converted)

    def replace(self: C, **changes: Any) -> C:
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ParameterError(
                f"unknown parameter {unknown[0]!r} for {type(self).__name__}: valid ones are {self.field_names()}"
            )
        return dataclasses.replace(self, **changes)

    def key(self) -> str:
        """Content hash of this config (with its class name), used to name artifacts."""
        return content_hash({"type": type(self).__name__, "config": self.to_dict()})
