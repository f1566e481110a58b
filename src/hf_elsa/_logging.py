"""hf_elsa's logs: ``transformers.utils.logging`` loggers under an ``hf_elsa`` root with its own handler.

``get_logger(__name__)`` is transformers' ``get_logger``; the ``hf_elsa`` root logger gets one stderr handler
(``[hf_elsa] message``) and level INFO, so that the end-of-run summaries show without any set-up, while
transformers itself stays at its default (WARNING). ``HF_ELSA_VERBOSITY`` (``debug``, ``info``, ``warning``,
``error``) changes the default; ``ElsaConfig(log_level=...)`` / ``log_level_replica`` set it per run, as they
do for transformers (replicas log warnings only by default). With ``CI`` set the records also propagate to
the root logger (transformers' rule), so pytest's ``caplog`` sees them there.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from transformers.utils import logging as transformers_logging

LIBRARY = "hf_elsa"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}  # fmt: skip
_lock = threading.Lock()
_handler: logging.Handler | None = None


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (pytest's capture, notebooks)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if message.startswith(LIBRARY) else f"[{LIBRARY}] {message}"


def _default_level() -> int:
    name = os.environ.get("HF_ELSA_VERBOSITY", "info").lower()
    return LEVELS.get(name, logging.INFO)


def _configure() -> None:
    global _handler
    with _lock:
        if _handler is not None:
            return
        _handler = _StderrHandler()
        _handler.setFormatter(_Formatter("%(message)s"))
        root = logging.getLogger(LIBRARY)
        root.addHandler(_handler)
        root.setLevel(_default_level())
        ci = os.environ.get("CI", "").upper() in {"1", "ON", "YES", "TRUE"}
        root.propagate = ci


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``hf_elsa`` root, from ``transformers.utils.logging.get_logger``."""
    _configure()
    return transformers_logging.get_logger(name)


def set_verbosity(level: int | str) -> None:
    """Level of every hf_elsa logger (``logging.INFO`` or ``"info"``)."""
    _configure()
    logging.getLogger(LIBRARY).setLevel(LEVELS[level] if isinstance(level, str) else level)


def get_verbosity() -> int:
    _configure()
    return logging.getLogger(LIBRARY).getEffectiveLevel()


def follow_log_level(args) -> None:
    """``TrainingArguments.log_level`` (main process) / ``log_level_replica`` (others) for hf_elsa's loggers.

    ``"passive"`` (the default of ``log_level``) leaves hf_elsa's level alone (INFO unless changed).
    """
    main = getattr(args, "should_log", True)
    name = args.log_level if main else args.log_level_replica
    name = str(getattr(name, "value", name))
    if name in LEVELS:
        set_verbosity(name)
    elif name == "detail":
        set_verbosity(logging.DEBUG)
