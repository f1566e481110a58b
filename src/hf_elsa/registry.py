"""``Registry``: one shape for every table of named, pluggable parts.

Sparsity patterns, curvature estimators, allocations, save formats, inference kernels and one-shot pruners
each keep one ``Registry``; every entry registers itself in the module that defines it, and a user's entry
(registered from outside the package) is usable by name at once: validation, ``--help`` and the error
messages read the registry when they run, never a copy taken at import time. A name is registered once:
a second entry under a taken name is refused (``replace=True`` swaps it on purpose).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_REQUIRED = object()


class UnknownNameError(ValueError, KeyError):
    """A name no entry is registered under. A ``ValueError`` (bad setting) and a ``KeyError`` (failed lookup)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Named entries of one kind, in registration order.

    Args:
        kind: the setting that names an entry (``"importance"``, ``"sparsity_allocation"``, ...): error messages
            read ``kind='name': use one of (...)`` so they point at the field to fix.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T, *, replace: bool = False) -> T:
        """Add ``obj`` under ``name``; returns ``obj``. A taken name raises unless ``replace=True``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind}: a registered name must be a non-empty string, got {name!r}.")
        current = self._entries.get(name)
        if current is not None and current is not obj and not replace:
            raise ValueError(
                f"{self.kind}={name!r} is already registered ({current!r}): pick another name, or pass replace=True "
                "to replace it."
            )
        self._entries[name] = obj
        return obj

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (e.g. a test's temporary entry)."""
        return self._entries.pop(self._check(name))

    def get(self, name: str, default: Any = _REQUIRED) -> T:
        """The entry registered as ``name``; an unknown name raises, listing the registered ones (or, when a
        ``default`` is given, returns it, as ``dict.get`` does)."""
        if default is not _REQUIRED and name not in self._entries:
            return default
        return self._entries[self._check(name)]

    def names(self) -> tuple[str, ...]:
        """The registered names now, in registration order."""
        return tuple(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def keys(self):
        return self._entries.keys()

    def _check(self, name: str) -> str:
        if not isinstance(name, str) or name not in self._entries:
            raise UnknownNameError(f"{self.kind}={name!r}: use one of {self.names()}.")
        return name

    def copy(self) -> Registry[T]:
        """A registry of the same kind with the same entries (a test swaps it in and registers into it)."""
        other: Registry[T] = Registry(self.kind)
        other._entries = dict(self._entries)
        return other

    # Mapping-like access, so ``name in REGISTRY``, ``tuple(REGISTRY)``, ``REGISTRY[name]`` and pytest's
    # ``monkeypatch.setitem`` keep working; assignment registers, so it refuses a taken name too.
    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __setitem__(self, name: str, obj: T) -> None:
        self.register(name, obj)

    def __delitem__(self, name: str) -> None:
        self.unregister(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


class LiveChoices:
    """The names of a registry as argparse ``choices``: read when argparse checks a value or prints ``--help``.

    ``HfArgumentParser`` copies a field's ``choices`` metadata into the parser; a tuple taken at import time would
    miss the entries users register later, this view does not.
    """

    def __init__(self, registry: Registry, before: tuple[str, ...] = ()):
        self.registry = registry
        self.before = tuple(before)  # fixed choices listed first (``--method elsa``)

    def _names(self) -> tuple[str, ...]:
        return self.before + self.registry.names()

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(self._names())
