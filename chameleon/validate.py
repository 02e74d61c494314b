"""attrs validators shared by every config class: one rule per kind of value, one error type.

Each raises `ConfigError` naming the class and field, so a bad knob fails where it is set, not
deep inside the engine. Bools are never accepted as numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

from chameleon.errors import ConfigError

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _fail(inst: object, attribute: attrs.Attribute[Any], what: str, value: object) -> None:
    raise ConfigError(f"{type(inst).__name__}.{attribute.name} must be {what}, got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def int_at_least(low: int, *, optional: bool = False) -> Validator:
    def check(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if optional and value is None:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            _fail(inst, attribute, f"an int >= {low}" + (" or None" if optional else ""), value)

    return check


positive_int = int_at_least(1)
optional_positive_int = int_at_least(1, optional=True)
non_negative_int = int_at_least(0)


def number(predicate: Callable[[float], bool], what: str) -> Validator:
    def check(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not (_is_number(value) and predicate(value)):
            _fail(inst, attribute, what, value)

    return check


positive = number(lambda v: math.isfinite(v) and v > 0, "a positive finite number")
non_negative = number(lambda v: math.isfinite(v) and v >= 0, "a non-negative finite number")
unit_interval = number(lambda v: 0.0 <= v <= 1.0, "in [0, 1]")


def one_of(*choices: str) -> Validator:
    def check(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            _fail(inst, attribute, f"one of {choices}", value)

    return check


def boolean(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        _fail(inst, attribute, "a bool", value)
