"""The systemd edge: one `run()` for subprocesses, runtime drop-ins, systemctl verbs.

`systemctl` is only ever given unit names and verbs: secrets reach units through files the
manager reads (EnvironmentFile=, LoadCredential=), never through argv.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from bootsecrets.errors import CommandFailed
from bootsecrets.paths import Paths
from bootsecrets.store import write_private

log = logging.getLogger(__name__)

AGENT_UNIT = "bootsecrets.service"
#: Verbs after which a unit runs in a new invocation (a reload keeps its invocation).
_STARTING_VERBS = frozenset({"start", "restart", "try-restart", "try-reload-or-restart"})


@dataclasses.dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, check: bool = True) -> Completed: ...


def run(argv: Sequence[str], *, check: bool = True) -> Completed:
    """Run a command: no shell, stdin closed, output captured, failure raised with argv."""
    command = tuple(argv)
    log.debug("running %s", shlex.join(command))
    proc = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )
    result = Completed(command, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise CommandFailed(command, proc.returncode, proc.stderr)
    return result


@dataclasses.dataclass
class RecordingRunner:
    """A stand-in for systemctl: records every argv, answers from a table.

    `answers` maps an argv tuple to (returncode, stdout); `unit_states` gives what
    `is-active UNIT` prints (default "active").
    """

    answers: dict[tuple[str, ...], tuple[int, str]] = dataclasses.field(default_factory=dict)
    unit_states: dict[str, str] = dataclasses.field(default_factory=dict)
    calls: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
    on_call: Callable[[tuple[str, ...]], None] | None = None
    #: Each unit's InvocationID, as `show` reports it: a (re)start gives it a new one.
    invocations: dict[str, str] = dataclasses.field(default_factory=dict)

    def __call__(self, argv: Sequence[str], *, check: bool = True) -> Completed:
        command = tuple(argv)
        self.calls.append(command)
        log.debug("running %s (recorded)", shlex.join(command))
        units = command[command.index("--") + 1:] if "--" in command else ()
        if len(command) > 1 and command[1] in _STARTING_VERBS:
            for unit in units:
                self.invocations[unit] = f"{len(self.calls):032x}"
        if self.on_call is not None:
            self.on_call(command)
        code, out = self.answers.get(command, (0, ""))
        if len(command) >= 3 and command[1] == "is-active":
            state = self.unit_states.get(command[-1], "active")
            code, out = (0 if state == "active" else 3), state + "\n"
        if len(command) >= 2 and command[1] == "show" and command not in self.answers:
            out = "\n".join(f"Id={u}\nInvocationID={self.invocations.get(u, '')}\n"
                            for u in units)
        if check and code != 0:
            raise CommandFailed(command, code, "")
        return Completed(command, code, out, "")

    def verbs(self) -> list[tuple[str, ...]]:
        """The recorded calls without the `systemctl` program name."""
        return [call[1:] for call in self.calls]


def dropin_text(
    unit: str,
    paths: Paths,
    *,
    env_file: bool,
    credentials: Iterable[str] = (),
) -> str:
    base = paths.current_host
    lines = [
        "# Written by bootsecrets at runtime; gone at reboot, so the unit never starts",
        "# without its secrets. Do not edit.",
        "[Unit]",
        f"After={AGENT_UNIT}",
        f"Requires={AGENT_UNIT}",
        "",
        "[Service]",
    ]
    if env_file:
        lines.append(f"EnvironmentFile={base}/env/{unit}.env")
    for name in credentials:
        lines.append(f"LoadCredential={name}:{base}/credentials/{unit}/{name}")
    return "\n".join(lines) + "\n"


def write_dropins(paths: Paths, texts: Mapping[str, str]) -> list[str]:
    """Write each unit's runtime drop-in (atomically); return the units whose text changed."""
    changed = []
    for unit, text in texts.items():
        path = paths.dropin(unit)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            if path.read_text() == text:
                continue
        except FileNotFoundError:
            pass
        write_private(path, text.encode(), 0o644)
        changed.append(unit)
    return changed


class Systemctl:
    def __init__(self, runner: Runner = run, program: str = "systemctl") -> None:
        self._run = runner
        self._program = program

    def __call__(self, *args: str, check: bool = True) -> Completed:
        return self._run((self._program, *args), check=check)

    def daemon_reload(self) -> None:
        self("daemon-reload")

    def start_no_block(self, units: Sequence[str]) -> None:
        """Queue start jobs. --no-block: the units are ordered after bootsecrets.service,
        which is still starting while we run, so waiting here would deadlock."""
        if units:
            self("start", "--no-block", "--", *units)

    def try_restart(self, unit: str, *, reload: bool = False, block: bool = True) -> None:
        verb = "try-reload-or-restart" if reload else "try-restart"
        self(verb, *(() if block else ("--no-block",)), "--", unit)

    def invocation_ids(self, units: Sequence[str]) -> dict[str, str | None]:
        """Each unit's InvocationID: "" when it is not running, None when systemd could not
        tell. A unit started again (by anyone) has a new one."""
        if not units:
            return {}
        result = self("show", "--property=Id,InvocationID", "--", *units, check=False)
        found: dict[str, str | None] = dict.fromkeys(units)
        if result.returncode != 0:
            return found
        for block in result.stdout.split("\n\n"):
            fields = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
            if fields.get("Id") in found:
                found[fields["Id"]] = fields.get("InvocationID", "")
        return found

    def is_active(self, unit: str) -> str:
        return self("is-active", "--", unit, check=False).stdout.strip() or "unknown"

    def wait_active(
        self, unit: str, timeout: float, *, sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> str:
        """Poll until `unit` is active (returns "active") or failed/timeout (returns state)."""
        give_up = clock() + timeout
        while True:
            state = self.is_active(unit)
            if state == "active":
                return state
            if state in ("failed", "inactive") or clock() >= give_up:
                return state
            sleep(0.5)
