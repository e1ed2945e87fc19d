"""The leak guard itself: it must see a canary wherever a test could capture one."""

from __future__ import annotations

import logging

import pytest

from conftest import find_leaks


def test_finds_a_canary_in_any_captured_text() -> None:
    canary = "canary-guard-7f3a9c"
    places = [("stdout", "ok"), ("log record", f"value={canary}"), ("argv", "systemctl start")]
    assert find_leaks(places, {canary}) == [("log record", "cana…")]
    assert find_leaks([("stderr", "nothing here")], {canary}) == []


def test_records_of_the_agent_logger_are_captured_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The guard reads caplog; it must see the agent's debug records, where argv is logged.
    logging.getLogger("bootsecrets.systemd").debug("running %s", "systemctl daemon-reload")
    assert any("daemon-reload" in r.getMessage() for r in caplog.records)
