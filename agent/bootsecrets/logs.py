"""Logging: to the journal with structured fields when systemd-python is there, else stderr.

Structured fields are passed as `extra={"UNIT": ..., "SECRET_PATH": ...}` (upper-case keys
only). Control characters in a message or a field are escaped (errors.printable): a name
cannot start a line of its own. Alerts carry a stable MESSAGE_ID and go out at priority 1
(alert). No call anywhere in the package passes a value, token or secret-id to a logger.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

from bootsecrets.errors import BootsecretsError, printable

LOGGER = "bootsecrets"
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalHandler(logging.Handler):
    """Sends each record with its upper-case extra fields; nothing implicit (no args)."""

    def __init__(self, send: Any) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {k: printable(str(v)) for k, v in record.__dict__.items() if k.isupper()}
            fields.setdefault("PRIORITY", str(_PRIORITY.get(record.levelno, 6)))
            self._send(printable(self.format(record)), SYSLOG_IDENTIFIER="bootsecrets", **fields)
        except Exception:
            self.handleError(record)


class StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "ALERT" if getattr(record, "PRIORITY", None) == "1" else record.levelname
        return f"bootsecrets: {level.lower()}: {printable(record.getMessage())}"


def setup(*, debug: bool = False) -> logging.Logger:
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    for old in list(logger.handlers):
        if getattr(old, "_bootsecrets", False):
            logger.removeHandler(old)
    handler: logging.Handler
    send = _journal_send() if os.environ.get("INVOCATION_ID") else None
    if send is not None:
        handler = JournalHandler(send)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(StderrFormatter())
    setattr(handler, "_bootsecrets", True)  # noqa: B010 (marks our handler for setup() reruns)
    logger.addHandler(handler)
    logger.propagate = True
    return logger


def _journal_send() -> Any:
    try:  # optional: python3-systemd in images, absent on most dev machines
        journal = importlib.import_module("systemd.journal")
    except ImportError:
        return None
    return journal.send


def alert(err: BootsecretsError, **fields: str) -> None:
    """One journal entry at priority alert with the error's stable MESSAGE_ID."""
    extra = {
        "MESSAGE_ID": err.message_id or "",
        "PRIORITY": "1",
        **{k.upper(): v for k, v in fields.items()},
    }
    logging.getLogger(LOGGER).critical("%s", err, extra=extra)
