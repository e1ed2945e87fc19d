"""Several encrypted directories (or volumes) are unlocked together: one Transit request
each, all in flight at once while the secrets are read, so that n of them cost one round
trip to Vault, not n (docs/performance.md).

A gate between the agent and the real OpenBao holds each Transit request until as many are
waiting as the host has directories (or volumes), and records the most it held at once. An
agent that sent them one after another would leave the first waiting alone: the gate gives
up after GATE_WAIT seconds (less than the agent's request timeout) and lets it through, and
the count says 1.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootsecrets import blockdev, fscrypt
from support.fakehttp import FakeServer, Reply, Request, Upstream, serving
from support.loopfs import LoopFs, ext4_loop
from support.openbao import OpenBao
from support.sandbox import Captured
from support.transit import create_key, grant, mounted_in
from support.volumes import Volumes, volume_world
from support.world import World
from test_encdirs import simulate_reboot

GATE_WAIT = 10.0
NAMES = ("alpha", "beta", "gamma")


class Gate:
    """A FakeServer handler passing every request on to OpenBao, Transit requests only once
    `expected` of them wait together (`arm`)."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(1)
        self.waiting = 0
        self.most = 0
        self.transit: list[str] = []

    def arm(self, expected: int) -> None:
        with self.lock:
            self.barrier = threading.Barrier(expected, timeout=GATE_WAIT)
            self.most = 0
            self.transit = []

    def __call__(self, request: Request, reply: Reply) -> None:
        if request.path.startswith("/v1/transit/"):
            with self.lock:
                self.waiting += 1
                self.most = max(self.most, self.waiting)
                self.transit.append(request.path.removeprefix("/v1/"))
                barrier = self.barrier
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
            with self.lock:
                self.waiting -= 1
        self.upstream(request, reply)


@pytest.fixture
def gated(openbao: OpenBao) -> Iterator[tuple[Gate, FakeServer]]:
    gate = Gate(Upstream(openbao.addr))
    with serving(gate) as server:
        yield gate, server


def through(server: FakeServer) -> dict[str, Any]:
    """The config's `vault:` for an agent that reaches OpenBao through the gate."""
    return {"address": server.addr, "boot_deadline": 60, "request_timeout": 30}


@pytest.fixture
def encfs() -> Iterator[LoopFs]:
    with ext4_loop(encrypt=True) as fs:
        yield fs


def test_directories_are_unlocked_together(
    world: World,
    openbao: OpenBao,
    encfs: LoopFs,
    gated: tuple[Gate, FakeServer],
) -> None:
    gate, server = gated
    key = world.role
    create_key(openbao, key)
    grant(world, key)
    config = world.config(reboot_policy="persist-token", vault=through(server))
    config["encrypted_directories"] = {
        name: {"path": f"/srv/{name}", "units": ["app.service"]} for name in NAMES
    }
    world.sandbox.write_config(config)
    world.sandbox.write_bootstrap(world.role_id, openbao.wrapped_secret_id(world.role))
    with mounted_in(encfs, world.sandbox.root / "srv") as srv:
        gate.arm(len(NAMES))
        code, _, err = world.sandbox.run("bootstrap")  # first use: a new data key each
        assert code == 0, err
        assert gate.transit == [f"transit/datakey/plaintext/{key}"] * len(NAMES)
        assert gate.most == len(NAMES)
        assert all(fscrypt.is_unlocked(srv / name) for name in NAMES)

        simulate_reboot(world.sandbox, encfs, srv)
        world.sandbox.runner.calls.clear()
        assert not any(fscrypt.is_unlocked(srv / name) for name in NAMES)
        gate.arm(len(NAMES))
        code, _, err = world.sandbox.run("bootstrap")  # second boot: a decrypt each
        assert code == 0, err
        assert gate.transit == [f"transit/decrypt/{key}"] * len(NAMES)
        assert gate.most == len(NAMES)
        assert all(fscrypt.is_unlocked(srv / name) for name in NAMES)
        assert world.sandbox.started_units() == ["app.service", "worker.service"]


def test_volumes_are_opened_together(
    openbao: OpenBao,
    sandbox_root: Path,
    captured: Captured,
    unique: str,
    gated: tuple[Gate, FakeServer],
) -> None:
    gate, server = gated
    with volume_world(openbao, sandbox_root, captured, unique) as vols:
        opened_together(vols, gate, server)


def opened_together(vols: Volumes, gate: Gate, server: FakeServer) -> None:
    key = vols.transit()
    names = NAMES[:2]
    for name in names:
        vols.image(name)
    vols.provision(
        vols.config(volumes=vols.section(**{n: {} for n in names}), vault=through(server))
    )
    gate.arm(len(names))
    code, _, err = vols.sandbox.run("bootstrap")  # first use: formatted, opened, mounted
    assert code == 0, err
    assert gate.transit == [f"transit/datakey/plaintext/{key}"] * len(names)
    assert gate.most == len(names)

    vols.reboot()
    gate.arm(len(names))
    code, _, err = vols.sandbox.run("bootstrap")  # every boot: a decrypt each
    assert code == 0, err
    assert gate.transit == [f"transit/decrypt/{key}"] * len(names)
    assert gate.most == len(names)
    for name in names:
        assert blockdev.mounted_from(
            vols.mount_point(name), vols.sandbox.root / "dev/mapper" / name
        )
