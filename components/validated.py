"""The building blocks of every settings model: frozen, no unknown keys, and one-line messages.

Each message says what was expected and the value given (`expected a positive integer, got 0`);
pipeline/config puts the dotted params.yaml key in front of it.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, StrictBool, model_validator

__all__ = ["FieldError", "Frozen", "StrictBool", "number", "Pair", "Positive", "PositiveInt", "NonNegative",
           "NonNegativeInt", "PositiveIntOrNull", "Resources"]


class FieldError(ValueError):
    """A validator's complaint about `key` (dotted, relative to the model that raised it)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def closest_key(key: str, known) -> str:
    """`did you mean lr?` for `lr_typo`, else the list of known keys."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    # A misspelt ending (lr_typo) is too far off for difflib: a known key it starts with is meant.
    close = close or sorted((k for k in known if key.startswith(k)), key=len)[-1:]
    return f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(known))}"


class Frozen(BaseModel):
    """A settings model: immutable, and an unknown key is refused naming the closest known one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise FieldError(str(key), f"unknown key ({closest_key(str(key), cls.model_fields)})")
        return data


def number(*, integer: bool = False, minimum: float = 0, strict: bool = False, nullable: bool = False):
    """A number >= minimum (> minimum when strict), an integer when `integer`; null too when `nullable`."""
    noun = "an integer" if integer else "a number"
    if minimum == 0:
        what = ("a positive integer" if integer else "a positive number") if strict else f"{noun} >= 0"
    else:
        what = f"{noun} {'>' if strict else '>='} {minimum:g}"
    kind = int if integer else (int, float)

    def check(value):
        if value is None and nullable:
            return value
        if (isinstance(value, bool) or not isinstance(value, kind) or value < minimum
                or (strict and value == minimum)):
            raise ValueError(f"expected {what}{' or null' if nullable else ''}, got {value!r}")
        return value

    base = int if integer else float
    return Annotated[base | None if nullable else base, BeforeValidator(check)]


def _pair(value):
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"expected two positive integers like [512, 1024], got {value!r}")
    return tuple(value)


def _resources(value):
    if (not isinstance(value, dict)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value.values())):
        raise ValueError(f"expected a mapping of Ray resources like {{CPU: 1}}, got {value!r}")
    return value


Positive = number(strict=True)
PositiveInt = number(integer=True, strict=True)
PositiveIntOrNull = number(integer=True, strict=True, nullable=True)   # null: inherit / all / skip
NonNegative = number()
NonNegativeInt = number(integer=True)
Pair = Annotated[tuple[int, int], BeforeValidator(_pair)]            # sizes: (h, w) or (w, h)
Resources = Annotated[dict[str, int | float], BeforeValidator(_resources)]  # Ray resources, e.g. {CPU: 4, GPU: 1}
