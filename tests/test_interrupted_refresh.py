"""A refresh stopped at any point (SIGKILL, SIGTERM) leaves no restart forgotten: the next
refresh restarts every unit whose live values are newer than what it runs with, exactly
once, and `status` shows the restart as pending in between.

The refresh runs as its own process (`python -m bootsecrets.cli`) with a stand-in systemctl
program that behaves like systemd where it matters here: a (re)start gives the unit a new
InvocationID (`systemctl show`), and what the unit would read at that moment — the sha256 of
its env file through `current` — is recorded. At the chosen call the stand-in kills the
refresh, before or after doing what it was asked (systemd finishes a queued job even when the
systemctl client dies).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import Sandbox
from support.openbao import OpenBao
from support.world import World

STANDIN = textwrap.dedent("""\
    import hashlib, json, os, signal, sys, time
    state_path = os.environ["STANDIN_STATE"]
    with open(state_path) as f:
        state = json.load(f)
    argv = sys.argv[1:]
    state["count"] += 1
    kill = os.environ.get("STANDIN_KILL", "")
    at, when, signum = (kill.split(":") + ["", "", ""])[:3] if kill else ("", "", "")
    def save():
        tmp = state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, state_path)
    def maybe_kill(moment):
        if at == str(state["count"]) and when == moment:
            save()
            os.kill(os.getppid(), int(signum))
            time.sleep(30)
    maybe_kill("before")
    units = argv[argv.index("--") + 1:] if "--" in argv else []
    out = ""
    verb = argv[0] if argv else ""
    if verb in ("start", "restart", "try-restart", "try-reload-or-restart"):
        for unit in units:
            if verb.startswith("try-") and unit not in state["invocations"]:
                continue
            if verb != "try-reload-or-restart":  # a reload keeps the unit's invocation
                state["invocations"][unit] = os.urandom(16).hex()
            env = os.path.join(os.environ["STANDIN_STORE"], "current", "env", unit + ".env")
            digest = hashlib.sha256(open(env, "rb").read()).hexdigest()
            state["events"].append([verb, unit, digest])
    elif verb == "show":
        out = "\\n".join(f"Id={u}\\nInvocationID={state['invocations'].get(u, '')}\\n"
                        for u in units)
    elif verb == "is-active":
        out = "active\\n"
    state["calls"].append(argv)
    save()
    maybe_kill("after")
    sys.stdout.write(out)
""")

UNITS = ("app.service", "worker.service", "api.service")


def three_units(world: World) -> dict[str, Any]:
    config = world.config()
    config["services"]["api.service"] = {"environment": {"API_KEY": "{{ secrets.api.key }}"}}
    config["services"]["app.service"]["environment"] = {"DB_PASSWORD": "{{ secrets.db.password }}"}
    return config


class StandIn:
    def __init__(self, sandbox: Sandbox, tmp_path: Path) -> None:
        self.sandbox = sandbox
        self.program = tmp_path / "systemctl"
        self.program.write_text(f"#!{sys.executable}\n{STANDIN}")
        self.program.chmod(0o755)
        self.state_path = tmp_path / "standin.json"
        # The units run already (as after a bootstrap): each has an invocation.
        self.save(
            {"count": 0, "calls": [], "events": [], "invocations": {u: f"boot-{u}" for u in UNITS}}
        )

    def load(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state_path.read_text())
        return data

    def save(self, data: dict[str, Any]) -> None:
        self.state_path.write_text(json.dumps(data))

    def reset_count(self) -> None:
        data = self.load()
        data["count"] = 0
        self.save(data)

    def run(self, *args: str, kill: str = "") -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "STANDIN_STATE": str(self.state_path),
            "STANDIN_STORE": str(self.sandbox.store),
            "STANDIN_KILL": kill,
        }
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bootsecrets.cli",
                *args,
                "--root",
                str(self.sandbox.root),
                "--systemctl",
                str(self.program),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.sandbox.captured.add("refresh stdout", result.stdout)
        self.sandbox.captured.add("refresh stderr", result.stderr)
        return result


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def rotated(world: World, openbao: OpenBao) -> World:
    world.provision(services=three_units(world)["services"])
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err
    # Two of three units get new values: db (app, worker) rotates, api does not.
    openbao.put(
        "secret",
        f"{world.unique}/db",
        {"username": "app", "password": "canary-rotated-" + os.urandom(8).hex()},
    )
    return world


# The calls a refresh with two changed units makes: show (after the switch),
# try-restart app, try-reload-or-restart worker, is-active x2.
KILL_POINTS = [
    f"{call}:{moment}:{signum}"
    for call in range(1, 6)
    for moment in ("before", "after")
    for signum in (int(signal.SIGKILL), int(signal.SIGTERM))
]
WORKER_RELOAD_CALL = 3


@pytest.mark.parametrize("kill", KILL_POINTS)
def test_refresh_killed_at_any_call_converges_on_the_next(
    rotated: World, tmp_path: Path, kill: str
) -> None:
    sandbox = rotated.sandbox
    standin = StandIn(sandbox, tmp_path)

    first = standin.run("refresh", kill=kill)
    assert first.returncode in (-signal.SIGKILL, 143), first.stderr
    done_when_killed = {e[1] for e in standin.load()["events"]}
    pending = {
        u["unit"]: u["restart_pending"]
        for u in json.loads(standin.run("status", "--json").stdout)["units"]
    }
    standin.reset_count()
    second = standin.run("refresh")
    assert second.returncode == 0, second.stderr

    newest = {u: digest(sandbox.env_file(u)) for u in UNITS}
    events = standin.load()["events"]
    for unit in ("app.service", "worker.service"):
        mine = [e for e in events if e[1] == unit]
        assert mine and all(e[2] == newest[unit] for e in mine), (unit, events)
        # A restart shows as a new InvocationID, so it is never repeated; a reload keeps
        # the invocation, so one that completed just as the run died is done again.
        repeated_reload = unit == "worker.service" and kill.startswith(
            f"{WORKER_RELOAD_CALL}:after:"
        )
        assert len(mine) == (2 if repeated_reload else 1), (unit, events)
    assert [e for e in events if e[1] == "api.service"] == []
    # status told in between which restarts were still due.
    assert pending["api.service"] is False
    assert pending["app.service"] is ("app.service" not in done_when_killed)
    # Now nothing is pending, and a third refresh does nothing.
    after = json.loads(standin.run("status", "--json").stdout)["units"]
    assert not any(u["restart_pending"] for u in after), after
    before_third = len(standin.load()["events"])
    assert standin.run("refresh").returncode == 0
    assert len(standin.load()["events"]) == before_third


def test_status_shows_a_restart_left_pending(rotated: World, tmp_path: Path) -> None:
    sandbox = rotated.sandbox
    standin = StandIn(sandbox, tmp_path)
    # Killed right after the switch, before it could look at or restart any unit.
    assert (
        standin.run("refresh", kill=f"1:before:{int(signal.SIGKILL)}").returncode == -signal.SIGKILL
    )
    report = json.loads(standin.run("status", "--json").stdout)
    pending = {u["unit"]: u["restart_pending"] for u in report["units"]}
    assert pending == {"app.service": True, "worker.service": True, "api.service": False}
    text = standin.run("status").stdout
    assert "app.service: active" in text and "restart pending" in text
