"""A re-issue killed (SIGKILL) at any point never leaves a unit on revoked credentials, and
the next refresh converges: the unit runs the newest credentials and every other lease is
revoked. Each run is a process of its own (tests/support/leasedriver.py) with a systemd
stand-in that remembers, across processes, which database user each unit was started with;
PostgreSQL says whether that user still exists (a revoked lease drops its role)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.leaseworld import LeaseSandbox, LeaseWorld
from support.openbao import OpenBao
from support.postgres import Postgres, postgres_server
from support.sandbox import Captured

TESTS = Path(__file__).resolve().parent

#: Every systemctl/systemd-run call of a re-issuing refresh, the switch of `current` and
#: the revocation of the old lease, each killed before and after it takes effect.
POINTS = [
    f"{point}:{moment}"
    for point in ("switch", *(f"call{n}" for n in range(1, 6)), "revoke")
    for moment in ("before", "after")
]


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    with postgres_server() as server:
        yield server


class Driver:
    def __init__(self, world: LeaseWorld, tmp_path: Path) -> None:
        self.world = world
        self.tmp = tmp_path
        self.state = tmp_path / "standin.json"
        self.state.write_text(json.dumps({"invocations": {}, "events": [], "calls": []}))

    def run(self, command: str, offset: float, kill: str = "") -> int:
        spec = self.tmp / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "root": str(self.world.sandbox.root),
                    "command": command,
                    "offset": offset,
                    "state": str(self.state),
                    "kill": kill,
                }
            )
        )
        result = subprocess.run(
            [sys.executable, "-m", "support.leasedriver", str(spec)],
            env={**os.environ, "PYTHONPATH": str(TESTS)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.world.sandbox.captured.add(f"{command} stdout", result.stdout)
        self.world.sandbox.captured.add(f"{command} stderr", result.stderr)
        return result.returncode

    def load(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state.read_text())
        return data

    def held(self, unit: str = "app.service") -> str:
        """The database user `unit` was last started with."""
        return str([e for e in self.load()["events"] if e[1] == unit][-1][2])


@pytest.mark.parametrize("kill", POINTS)
def test_a_reissue_killed_anywhere_converges_without_revoking_what_a_unit_holds(
    kill: str,
    openbao: OpenBao,
    pg: Postgres,
    sandbox_root: Path,
    captured: Captured,
    unique: str,
    tmp_path: Path,
) -> None:
    world = LeaseWorld(
        openbao,
        pg,
        LeaseSandbox(sandbox_root, captured, openbao),
        unique,
        default_ttl="5m",
        max_ttl="20m",
    )
    config = world.config()
    config["secrets"]["db"]["max_ttl"] = "6m"
    world.provision(config)
    driver = Driver(world, tmp_path)
    roles_before = pg.roles()
    assert driver.run("bootstrap", 0) == 0
    first = driver.held()
    assert first in pg.roles()

    code = driver.run("refresh", 245, kill)  # the re-issue is due

    assert code in (0, -9)
    assert driver.held() in pg.roles(), f"killed at {kill}: app.service holds a revoked user"
    world.kept()  # its secrets become canaries
    assert driver.run("refresh", 250) == 0
    held = driver.held()
    assert held in pg.roles()
    assert held != first
    kept = world.kept()
    assert kept["older"] == {} and kept["revoke"] == []
    assert world.app_creds()[0] == held
    # Every other user this test's database role made is gone: nothing leaked.
    created = pg.roles() - roles_before
    assert created == {held}

    events = len(driver.load()["events"])
    assert driver.run("refresh", 255) == 0
    assert len(driver.load()["events"]) == events  # converged: nothing restarted again
