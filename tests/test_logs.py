"""The journal handler (a unit test of one function: there is no journald on a build host;
the VM test runs the real one): alerts carry MESSAGE_ID, priority 1 and their fields, and
nothing implicit such as the format arguments."""

from __future__ import annotations

import logging
from typing import Any

from bootsecrets import logs
from bootsecrets.errors import WrappingPathMismatch


class Recorder:
    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, message: str, **fields: Any) -> None:
        self.entries.append((message, fields))


def test_alert_goes_to_the_journal_with_message_id_and_priority_alert() -> None:
    recorder = Recorder()
    handler = logs.JournalHandler(recorder)
    logger = logging.getLogger(logs.LOGGER)
    logger.addHandler(handler)
    try:
        logs.alert(
            WrappingPathMismatch("created at sys/wrapping/wrap"),
            ROLE="web",
            CREATION_PATH="sys/wrapping/wrap",
        )
    finally:
        logger.removeHandler(handler)
    [(message, fields)] = recorder.entries
    assert message == "created at sys/wrapping/wrap"
    assert fields["MESSAGE_ID"] == WrappingPathMismatch.message_id
    assert fields["PRIORITY"] == "1"
    assert fields["SYSLOG_IDENTIFIER"] == "bootsecrets"
    assert (fields["ROLE"], fields["CREATION_PATH"]) == ("web", "sys/wrapping/wrap")


def test_structured_fields_pass_and_format_arguments_do_not() -> None:
    recorder = Recorder()
    handler = logs.JournalHandler(recorder)
    logger = logging.getLogger("bootsecrets.test")
    logger.addHandler(handler)
    try:
        logger.info(
            "read %s", "secret/app/db", extra={"SECRET_PATH": "secret/app/db", "SECRET_VERSION": 3}
        )
    finally:
        logger.removeHandler(handler)
    [(message, fields)] = recorder.entries
    assert message == "read secret/app/db"
    assert fields["SECRET_PATH"] == "secret/app/db" and fields["SECRET_VERSION"] == "3"
    assert fields["PRIORITY"] == "6"
    assert all(key.isupper() for key in fields)  # no args, msg or other record internals
