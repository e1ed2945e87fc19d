"""Runs one bootsecrets command in a process of its own and SIGKILLs it at a chosen point:
`python -m support.leasedriver SPEC.json` (tests/test_interrupted_reissue.py).

SPEC: {"root", "command", "offset" (seconds added to the agent's clock), "state" (the
systemd stand-in's file), "kill": "" or "<point>:<before|after>"}; a point is `call<N>`
(the N-th systemctl/systemd-run call of this process), `switch` (Store.switch: `current`
moves) or `revoke` (vaultleases.revoke_lease). SIGKILL: nothing of the agent's cleanup runs.

The systemd stand-in keeps its state in a file, so that every process sees the same units:
a (re)start gives the unit a new InvocationID and records the database user its env file
holds at that moment (`events`; the user name, never the password), which is what the unit
runs with from then on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bootsecrets import cli, vaultleases
from bootsecrets.context import Context
from bootsecrets.paths import Paths
from bootsecrets.store import Store
from bootsecrets.systemd import Completed
from bootsecrets_dev.envfile import parse

STARTING = ("start", "restart", "try-restart", "try-reload-or-restart")


def _kill_at(kill: str, point: str, moment: str) -> None:
    if kill == f"{point}:{moment}":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(30)


@dataclasses.dataclass
class StandIn:
    """systemctl and systemd-run, as far as the agent can tell."""

    state_path: Path
    store: Path
    kill: str
    count: int = 0

    def load(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state_path.read_text())
        return data

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def __call__(self, argv: Sequence[str], *, check: bool = True) -> Completed:
        self.count += 1
        point = f"call{self.count}"
        _kill_at(self.kill, point, "before")
        state = self.load()
        command = tuple(argv)
        units = command[command.index("--") + 1 :] if "--" in command else ()
        out = ""
        verb = command[1] if len(command) > 1 else ""
        if command[0].endswith("systemctl") and verb in STARTING:
            for unit in units:
                if verb.startswith("try-") and unit not in state["invocations"]:
                    continue
                state["invocations"][unit] = os.urandom(16).hex()
                env = self.store / "current" / "env" / f"{unit}.env"
                held = parse(env.read_text()).get("DB_USER", "") if env.exists() else ""
                state["events"].append([verb, unit, held])
        elif verb == "show":
            out = "\n".join(
                f"Id={u}\nInvocationID={state['invocations'].get(u, '')}\n" for u in units
            )
        elif verb == "is-active":
            out = "active\n"
        state["calls"].append(list(command))
        self.save(state)
        _kill_at(self.kill, point, "after")
        return Completed(command, 0, out, "")


def _wrap(owner: object, name: str, point: str, kill: str) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _kill_at(kill, point, "before")
        result = original(*args, **kwargs)
        _kill_at(kill, point, "after")
        return result

    setattr(owner, name, wrapped)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    root, kill, offset = Path(spec["root"]), spec["kill"], float(spec["offset"])
    _wrap(Store, "switch", "switch", kill)
    _wrap(vaultleases, "revoke_lease", "revoke", kill)
    runner = StandIn(Path(spec["state"]), root / "run/bootsecrets", kill)
    ctx = Context(paths=Paths(root), runner=runner, env={}, clock=lambda: time.time() + offset)
    return cli.main([spec["command"], "--root", str(root)], context=ctx)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
