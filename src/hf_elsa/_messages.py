"""The one way an error message shows a value that came from a user: bounded, however large the value.

A message that ``repr()``s a user value costs what the value costs: a 447-byte YAML alias bomb under one
setting expands to a list whose ``repr`` is 351 million characters (seconds and gigabytes before the error is
shown). :func:`shorten` walks at most a few levels and a few items of each container (``reprlib``) and cuts the
text, so every message built from a user value stays short. Use it wherever such a value enters a message.
"""

from __future__ import annotations

import reprlib

MAX_CHARS = 200  # the longest text shown for one value

_REPR = reprlib.Repr()
_REPR.maxlevel = 3  # nesting levels shown; deeper containers print as [...]
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 8
_REPR.maxdict = 8
_REPR.maxstring = 120
_REPR.maxlong = 60
_REPR.maxother = 120


def shorten(value: object, limit: int = MAX_CHARS) -> str:
    """``repr(value)`` cut to at most ``limit`` characters, at bounded cost for nested or aliased containers."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not replace the error being reported
        text = f"<{type(value).__name__} object>"
    if len(text) > limit:
        text = text[: limit - 14] + f"... ({type(value).__name__})"
    return text
