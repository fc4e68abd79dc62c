"""Reading one mapping of params.yaml: every value checked, every key accounted for.

A `Section` hands out its values through typed getters and remembers which keys were read; `done()`
then refuses any key nobody read, naming the closest known one (`train.lr_typo: unknown key (did you
mean lr?)`). Every error is one line that names the key and what was expected.
"""

from __future__ import annotations

import difflib
from typing import Any

MISSING = object()


class ConfigError(ValueError):
    """A bad value in params.yaml; the message names the key."""


def fail(where: str, what: str) -> ConfigError:
    return ConfigError(f"params.yaml: {where}: {what}")


class Section:
    def __init__(self, data: Any, where: str = "", *, optional: bool = False, places: dict | None = None):
        """`places`: keys that came from elsewhere (a profile's override) -> where to say they are."""
        if data is None and optional:
            data = {}
        if not isinstance(data, dict):
            raise fail(where or "params", f"expected a mapping, got {data!r}")
        self.data, self.where, self.places, self._read = data, where, places or {}, set()

    def at(self, key: str) -> str:
        if key in self.places:
            return self.places[key]
        return f"{self.where}.{key}" if self.where else key

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def keys(self) -> list[str]:
        self._read.update(self.data)
        return list(self.data)

    def raw(self, key: str, default: Any = MISSING) -> Any:
        self._read.add(key)
        if key in self.data:
            return self.data[key]
        if default is MISSING:
            raise fail(self.at(key), "missing")
        return default

    def section(self, key: str, default: Any = MISSING) -> Section:
        return Section(self.raw(key, default), self.at(key), optional=default is not MISSING)

    def done(self, known: list[str] | None = None) -> None:
        """Refuse the keys nobody read (`known`: what to suggest instead, default the keys read)."""
        unknown = [k for k in self.data if k not in self._read]
        if unknown:
            key, choices = str(unknown[0]), [str(k) for k in (known if known is not None else self._read)]
            close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
            # A misspelt ending (lr_typo) is too far off for difflib: a known key it starts with is meant.
            close = close or sorted((k for k in choices if key.startswith(k)), key=len)[-1:]
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(choices))}"
            raise fail(self.at(key), f"unknown key ({hint})")

    # --- typed getters ------------------------------------------------------------------------------

    def number(self, key: str, default: Any = MISSING, *, integer: bool = False, minimum: float = 0,
               strict: bool = False) -> Any:
        """A number >= minimum (> minimum when strict); an integer when `integer`."""
        return check_number(self.raw(key, default), self.at(key), integer=integer, minimum=minimum,
                            strict=strict)

    def positive(self, key: str, default: Any = MISSING, integer: bool = False) -> Any:
        return self.number(key, default, integer=integer, strict=True)

    def non_negative(self, key: str, default: Any = MISSING, integer: bool = False) -> Any:
        return self.number(key, default, integer=integer)

    def boolean(self, key: str, default: Any = MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise fail(self.at(key), f"expected true or false, got {value!r}")
        return value

    def choice(self, key: str, choices, default: Any = MISSING) -> Any:
        value = self.raw(key, default)
        if value not in choices:
            raise fail(self.at(key), f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value

    def string(self, key: str, default: Any = MISSING) -> str:
        value = self.raw(key, default)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise fail(self.at(key), f"expected a string, got {value!r}")
        return value

    def pair(self, key: str, default: Any = MISSING) -> tuple[int, int]:
        value = self.raw(key, default)
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise fail(self.at(key), f"expected two positive integers like [512, 1024], got {value!r}")
        return int(value[0]), int(value[1])

    def resources(self, key: str, default: Any = MISSING) -> dict[str, float]:
        """Ray resources like {CPU: 4, GPU: 1}: names to numbers >= 0."""
        value = self.raw(key, default) or {}
        if (not isinstance(value, dict)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                           for v in value.values())):
            raise fail(self.at(key), f"expected a mapping of Ray resources like {{CPU: 1}}, got {value!r}")
        return dict(value)


def check_number(value: Any, where: str, *, integer: bool = False, minimum: float = 0,
                 strict: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum or (strict and value == minimum):
        noun = "an integer" if integer else "a number"
        if minimum == 0:
            what = ("a positive integer" if integer else "a positive number") if strict else f"{noun} >= 0"
        else:
            what = f"{noun} {'>' if strict else '>='} {minimum:g}"
        raise fail(where, f"expected {what}, got {value!r}")
    return value
