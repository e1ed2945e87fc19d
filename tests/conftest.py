"""Shared fixtures: a real OpenBao dev server, sandboxed host roots on tmpfs, the leak guard.

The classes and checks live in tests/support/ (sandbox.py, openbao.py, world.py); the names
below stay importable from here (`from conftest import Sandbox, read_env_file, mode_of`).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.openbao import CANARIES, OpenBao, dev_server
from support.sandbox import (
    STORE_EXCLUDED,
    Captured,
    Sandbox,
    assert_nothing_rendered,
    find_leaks,
    mode_of,
    read_env_file,
)
from support.world import World

__all__ = [
    "STORE_EXCLUDED",
    "Captured",
    "Sandbox",
    "assert_nothing_rendered",
    "find_leaks",
    "mode_of",
    "read_env_file",
]

#: The default outage of tests/test_ha.py's "Vault comes back" test, in seconds.
VAULT_OUTAGE = 10.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--vault-outage",
        type=float,
        default=VAULT_OUTAGE,
        metavar="SECONDS",
        help="how long Vault stays down in test_ha's outage test (default %(default)s; "
        "the agent's backoff reaches its 4 s cap after about 4 s)",
    )


@pytest.fixture(scope="session")
def vault_outage(request: pytest.FixtureRequest) -> float:
    outage = request.config.getoption("--vault-outage")
    assert isinstance(outage, float)
    return outage


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBao]:
    with dev_server() as server:
        yield server


@pytest.fixture
def captured() -> Captured:
    return Captured()


@pytest.fixture(autouse=True)
def leak_guard(
    captured: Captured,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[None]:
    """After every test: no secret value, wrapped token or secret-id created through the
    OpenBao helpers appears in a log record (any field), stdout, stderr, a systemctl argv,
    or a file of a sandbox root outside the memory-only store and the token file."""
    caplog.set_level(logging.DEBUG, logger="bootsecrets")
    yield
    out, err = capsys.readouterr()
    places = [("stdout", out), ("stderr", err), *captured.texts]
    for record in caplog.records:
        places.append((f"log record {record.name}", record.getMessage()))
        places.append((f"log record fields {record.name}", repr(record.__dict__)))
        if record.exc_info:
            places.append(("log traceback", logging.Formatter().formatException(record.exc_info)))
    for runner in captured.runners:
        places.extend(("systemctl argv", " ".join(call)) for call in runner.calls)
    for root in captured.roots:
        for path in root.rglob("*"):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and not path.is_symlink() and not rel.startswith(STORE_EXCLUDED):
                places.append((f"file {rel}", path.read_bytes().decode("utf-8", "replace")))
    leaks = find_leaks(places, CANARIES)
    assert not leaks, f"secret material leaked into: {leaks}"


@pytest.fixture
def sandbox_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="bootsecrets-test-", dir="/dev/shm"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sandbox(sandbox_root: Path, captured: Captured) -> Sandbox:
    return Sandbox(sandbox_root, captured, None)


@pytest.fixture
def unique() -> str:
    """A name unique to this test, for roles and secret paths on the shared server."""
    return "t" + secrets.token_hex(4)


@pytest.fixture
def world(openbao: OpenBao, sandbox: Sandbox, unique: str) -> World:
    """A role and secrets on the shared server, and a sandbox configured to use them."""
    sandbox.openbao = openbao
    return World(openbao, sandbox, unique)
