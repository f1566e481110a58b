"""``--config run.yaml``: read a YAML mapping of options strictly and type each value as the command line would.

Why not ``yaml.safe_load`` + ``parser.set_defaults``: argparse converts only *string* defaults, so a YAML
``max_steps: 2.7`` reached the Trainer as a float (a ``TypeError`` deep inside), ``text_files: doc.txt`` was
read one character at a time, a list for an int failed inside the DataLoader, a duplicated key kept the last
value silently, and a malformed file or a ``!!python`` tag printed a PyYAML traceback. Here:

- :func:`read_config_file` loads with PyYAML's safe loader (no ``!!python`` objects), refuses duplicated keys at
  every level, and turns every YAML problem into one ``ValueError`` naming the file and line;
- :func:`typed_options` passes each value through its argparse action: the option's ``type``, ``choices`` and
  number of values, exactly as ``--option value`` on the command line (one value for a list option is a
  list of one; ``null`` keeps the default; ``no_X: true`` is ``--no_X``).

Messages show user values through :func:`hf_elsa._messages.shorten` (an alias bomb stays a short message).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._messages import shorten

SCALARS = (str, int, float, bool)


@dataclass
class ConfigEntry:
    """One top-level ``key: value`` of the file, with its line (1-based) for messages."""

    key: Any
    value: Any
    line: int


def _loader_class():
    import yaml

    class StrictSafeLoader(yaml.SafeLoader):
        """The safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

        def construct_mapping(self, node, deep=False):
            refuse_duplicates(self, node)
            return super().construct_mapping(node, deep=deep)

    return StrictSafeLoader


def refuse_duplicates(loader, node) -> None:
    """Raise a ``ConstructorError`` at the second occurrence of a key in a mapping node (merge keys ``<<`` aside)."""
    import yaml

    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: PyYAML's own error names it
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {shorten(key)} is given twice (first on line {first})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1


def _yaml_problem(path: str, exc: Exception) -> str:
    """One line for a PyYAML error: what, where (line, column), and the fix for the usual causes."""
    mark = getattr(exc, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    text = f"--config {path}{where}: {problem}" + (f" ({context})" if context else "")
    if "python/" in text or "constructor for the tag" in text:
        text += (
            "; tags such as !!python/... are not allowed: a config file holds plain values (numbers, strings, "
            "lists, mappings)"
        )
    return shorten_text(text)


def shorten_text(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_config_file(path: str | os.PathLike) -> list[ConfigEntry]:
    """The top-level entries of a YAML mapping file; ``ValueError`` (file and line) for anything else."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            loader = _loader_class()(f)
            try:
                node = loader.get_single_node()
                if node is None:
                    return []
                if not isinstance(node, yaml.MappingNode):
                    kind = {"tag:yaml.org,2002:seq": "a list"}.get(node.tag, "a single value")
                    raise ValueError(f"--config {path}: expected a mapping of option: value, got {kind}.")
                refuse_duplicates(loader, node)
                loader.flatten_mapping(node)  # merge keys (<<: *defaults) as safe_load reads them
                return [
                    ConfigEntry(
                        loader.construct_object(k, deep=True),
                        loader.construct_object(v, deep=True),
                        k.start_mark.line + 1,
                    )
                    for k, v in node.value
                ]
            finally:
                loader.dispose()
    except yaml.YAMLError as exc:
        raise ValueError(_yaml_problem(path, exc)) from None
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"--config {path}: not UTF-8 text (byte {exc.start}): save the file as UTF-8 (a YAML file of options)."
        ) from None
    except RecursionError:
        raise ValueError(
            f"--config {path}: values nest too deep to be options (lists or mappings inside each other)."
        ) from None


def typed_options(
    parser: argparse.ArgumentParser, entries: Iterable[ConfigEntry], path: str, mapping_options: Iterable[str] = ()
) -> dict[str, Any]:
    """``{dest: value}`` for ``parser.set_defaults``: each value parsed by its option's action.

    ``mapping_options``: the dests whose field takes a dict (``model_init_kwargs``): a YAML mapping passes as is.
    Unknown options, an option given twice under two of its names, and values the option's type or choices
    refuse raise ``ValueError`` naming the file, the line and the option.
    """
    actions = _actions_by_name(parser)
    mapping_options = set(mapping_options)
    values: dict[str, Any] = {}
    given: dict[str, ConfigEntry] = {}
    unknown = []
    for entry in entries:
        action = actions.get(entry.key) if isinstance(entry.key, str) else None
        if action is None or action.dest in ("help", "config"):
            unknown.append(entry.key)
            continue
        where = f"--config {path}, line {entry.line}: {entry.key}"
        if action.dest in given:
            first = given[action.dest]
            raise ValueError(f"{where} sets the option that {first.key} (line {first.line}) sets: the option twice.")
        given[action.dest] = entry
        if entry.value is None:  # null: the option's default
            continue
        values[action.dest] = _typed(action, entry.value, where, action.dest in mapping_options)
    if unknown:
        names = sorted(shorten(k, 60) for k in unknown)
        raise ValueError(f"--config {path}: unknown option(s) {names}; see --help for the names.")
    return values


def _actions_by_name(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every ``--name`` of the parser (aliases and ``no_X`` included) -> its action."""
    names = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                names.setdefault(option[2:], action)
    return names


def _typed(action: argparse.Action, value: Any, where: str, takes_mapping: bool) -> Any:
    if isinstance(value, Mapping):
        if takes_mapping:
            return dict(value)
        raise ValueError(f"{where} takes {_what(action)}, got a mapping {shorten(value)}.")
    if action.nargs == 0:  # a flag such as --no_X: in YAML, true gives the flag, false the default
        if not isinstance(value, bool):
            raise ValueError(f"{where} is a flag: true or false, got {shorten(value)}.")
        return action.const if value else action.default
    if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1):
        items = value if isinstance(value, list) else [value]  # --text_files doc.txt is a list of one
        if not items and action.nargs != "*":
            raise ValueError(f"{where} takes at least one value, got an empty list.")
        return [_one(action, item, f"{where} (item {i + 1})") for i, item in enumerate(items)]
    if isinstance(value, list):
        raise ValueError(f"{where} takes {_what(action)}, got a list of {len(value)}: {shorten(value)}.")
    return _one(action, value, where)


def _one(action: argparse.Action, value: Any, where: str) -> Any:
    """One value through the option's type and choices, from the text the command line would carry."""
    if not isinstance(value, SCALARS):
        raise ValueError(f"{where} takes {_what(action, one=True)}, got {type(value).__name__} {shorten(value)}.")
    if isinstance(value, bool):
        # YAML 1.1 reads `save_strategy: no` as False: back to the choice it spells
        text = "true" if value else "false"
        if action.choices and ("yes" if value else "no") in [str(c) for c in action.choices]:
            text = "yes" if value else "no"
    else:
        text = str(value)
    try:
        typed = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"{where}: {shorten(value)} is not {_what(action, one=True)}.") from None
    if action.choices is not None and typed not in action.choices:
        raise ValueError(f"{where}: {shorten(value)} is not one of the choices ({_choices(action)}).")
    return typed


def _choices(action: argparse.Action, limit: int = 300) -> str:
    text = ", ".join(str(c) for c in action.choices)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _what(action: argparse.Action, one: bool = False) -> str:
    """``an int``, ``a number``, ``true or false``, ``one of ...``: what the option (or ``one`` of its values)
    takes, for messages."""
    if action.choices is not None:
        return "one of " + _choices(action, 200)
    kinds = {"int": "an int", "float": "a number", "str": "a string", "string_to_bool": "true or false"}
    kind = kinds.get(getattr(action.type, "__name__", ""), "a value")
    if action.nargs in ("+", "*") and not one:
        return f"a list of values ({kind} each)"
    return kind
