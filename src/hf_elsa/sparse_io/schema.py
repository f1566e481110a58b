"""One validation layer for everything sparse_io parses from a folder: field-by-field type checks.

A schema maps each key to a check; a check returns the value (possibly normalised) or raises :class:`Invalid`.
:func:`validate` turns that into a ``ValueError`` naming the file and the key, e.g.
``.../elsa_config.json: key tensors['w']['shape']: expected a list of non-negative integers, got 'abc'``,
so a malformed or hostile file never surfaces as an ``AttributeError``/``TypeError`` deep inside hf_elsa.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import PurePosixPath
from typing import Any

from .._messages import shorten

Check = Callable[[Any], Any]
MAX_NDIM = 8
MAX_NUMEL = 2**48  # far above any weight; keeps byte counts of a declared shape in machine range


class Invalid(ValueError):
    """A value that fails its check; ``path`` is filled in as the error travels up through nested checks."""

    def __init__(self, message: str, path: tuple = ()):
        super().__init__(message)
        self.message, self.path = message, path


def _show(value: Any) -> str:
    return shorten(value, 60)  # the one bounded repr of user values (hf_elsa._messages)


def _type_name(value: Any) -> str:
    return {dict: "a JSON object", list: "a JSON list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {_type_name(value)} {_show(value)}")
    return value


def integer(value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise Invalid(f"expected an integer >= {minimum}, got {_show(value)}")
    return value


def positive_integer(value: Any) -> int:
    return integer(value, 1)


def number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"expected a number, got {_type_name(value)} {_show(value)}")
    return value


def fraction(value: Any) -> float:
    number(value)
    if not 0 <= value <= 1:
        raise Invalid(f"expected a number in [0, 1], got {_show(value)}")
    return value


def mapping(value: Any) -> dict:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise Invalid(f"expected a JSON object, got {_type_name(value)} {_show(value)}")
    return dict(value)


def optional(check: Check) -> Check:
    def optional_check(value: Any) -> Any:
        return None if value is None else check(value)

    return optional_check


def strings(value: Any) -> list[str] | str:
    """A module selection: a string (``"all-linear"``, a regex) or a list of strings."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid(f"expected a string or a list of strings, got {_show(value)}")
    return value


def shape(value: Any) -> tuple[int, ...]:
    """A tensor shape: 1 to ``MAX_NDIM`` non-negative integers whose product stays below ``MAX_NUMEL``."""
    if (
        not isinstance(value, (list, tuple))
        or not 1 <= len(value) <= MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    ):
        raise Invalid(f"expected a list of 1 to {MAX_NDIM} non-negative integers, got {_show(value)}")
    if math.prod(value) > MAX_NUMEL:
        raise Invalid(f"declares {math.prod(value):,} elements, more than any weight ({_show(value)})")
    return tuple(value)


def relative_file(name: str) -> str:
    """A file name inside the checkpoint folder: relative, no ``..``, no backslash or NUL."""
    parts = PurePosixPath(name).parts
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\0" in name
        or ".." in parts
        or re.match(r"^[A-Za-z]:", name)
    ):
        raise Invalid("not a file name inside the checkpoint folder (absolute, '..', or a drive/backslash path)")
    return name


def mapping_of(check: Check, key_check: Check | None = None) -> Check:
    """A JSON object whose every value passes ``check`` (and every key ``key_check``)."""

    def mapping_check(value: Any) -> dict:
        result = {}
        for key, item in mapping(value).items():
            try:
                if key_check is not None:
                    key_check(key)
                result[key] = check(item)
            except Invalid as exc:
                raise Invalid(exc.message, (key, *exc.path)) from None
        return result

    return mapping_check


def record(schema: Mapping[str, Check], required: tuple[str, ...] = ()) -> Check:
    """A JSON object with known keys checked by ``schema`` (unknown keys kept as they are)."""

    def record_check(value: Any) -> dict:
        data = mapping(value)
        for key in required:
            if key not in data:
                raise Invalid("missing", (key,))
        for key, check in schema.items():
            if key in data:
                try:
                    data[key] = check(data[key])
                except Invalid as exc:
                    raise Invalid(exc.message, (key, *exc.path)) from None
        return data

    return record_check


def key_path(path: tuple) -> str:
    """``("tensors", "w", "shape")`` -> ``tensors['w']['shape']``."""
    return str(path[0]) + "".join(f"[{p!r}]" for p in path[1:])


def validate(check: Check, value: Any, source: Any, what: str = "key") -> Any:
    """``check(value)``, a failure raised as ``ValueError("<source>: <what> <key path>: <problem>")``."""
    try:
        return check(value)
    except Invalid as exc:
        where = f" {what} {key_path(exc.path)}:" if exc.path else ""
        raise ValueError(f"{source}:{where} {exc.message}.") from None
