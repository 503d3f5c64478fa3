"""Typed configs and the one error type for bad parameters.

Every stage of crosslib has a dataclass config that subclasses `Config`. A config is saved as
JSON beside the artifact it produced, and its content hash (`config.key()`) names that artifact.
Bad values raise `ParameterError`, whose message names the parameter and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from typing import Any, Iterable, TypeVar

C = TypeVar("C", bound="Config")


class ParameterError(ValueError):
    """A parameter has a value that is not allowed; the message names it and the allowed values."""


def require(condition: bool, name: str, value: Any, allowed: str) -> None:
    """Raise `ParameterError` naming `name` unless `condition` holds."""
    if not condition:
        raise ParameterError(f"{name}={value!r} is not allowed: {allowed}")


def require_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ParameterError(f"{name}={value!r} is not allowed: choose one of {choices}")


def require_positive(name: str, value: float | int) -> None:
    require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name, value, "a positive number")


def require_fraction(name: str, value: float, *, open_interval: bool = True) -> None:
    ok = isinstance(value, (int, float)) and (0 < value < 1 if open_interval else 0 <= value <= 1)
    require(ok, name, value, "a number in (0, 1)" if open_interval else "a number in [0, 1]")


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
        self.validate()

    def validate(self) -> None:
        """Subclasses check their fields here and raise `ParameterError`."""

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
