"""The systemd edge: one `run()` for subprocesses, runtime drop-ins, systemctl verbs.

`systemctl` is only ever given unit names and verbs: secrets reach units through files the
manager reads (EnvironmentFile=, LoadCredential=), never through argv.

A path in a drop-in is written so that PID 1 reads back exactly that path. systemd's unit
parser (conf-parser.c, load-fragment.c) takes the rest of the line after `=` with surrounding
whitespace stripped, joins a line ending in a backslash with the next, drops a line that is
not valid UTF-8 (by its own rules: no surrogates, no noncharacters), then expands specifiers
(`%x`; `%%` is a literal `%`); EnvironmentFile= keeps quotes and backslashes literally and
simplifies `//` and `/./`; LoadCredential= splits off the credential name at the first `:`
and takes the rest as the path, which must be normalized. So `%` is written `%%`, and a path
that is relative, not normalized, has a control character (a newline would start a new
directive), a character systemd refuses, leading/trailing whitespace or a trailing backslash,
or is longer than PATH_MAX, cannot be represented: `unit_file_path` refuses it (StoreError,
exit 12: the store cannot be named in a unit file, so it is not usable).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import subprocess
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Protocol

from bootsecrets import fsio
from bootsecrets.errors import CommandFailed, StoreError
from bootsecrets.fsread import shown
from bootsecrets.paths import DROPIN_NAME, Paths

log = logging.getLogger(__name__)

AGENT_UNIT = "bootsecrets.service"
#: Verbs after which a unit runs in a new invocation (a reload keeps its invocation).
_STARTING_VERBS = frozenset({"start", "restart", "try-restart", "try-reload-or-restart"})
#: systemd's credential_name_valid() allows more; this is what the config allows, and all of
#: it is literal in a unit file (no `%`, `:`, backslash, quote or whitespace).
CREDENTIAL_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}\Z")
PATH_MAX = 4096
NAME_MAX = 255
MAX_DROPIN = 1 << 20


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
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
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
        units = command[command.index("--") + 1 :] if "--" in command else ()
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
            out = "\n".join(f"Id={u}\nInvocationID={self.invocations.get(u, '')}\n" for u in units)
        if check and code != 0:
            raise CommandFailed(command, code, "")
        return Completed(command, code, out, "")

    def verbs(self) -> list[tuple[str, ...]]:
        """The recorded calls without the `systemctl` program name."""
        return [call[1:] for call in self.calls]


class _NotInUnitFile(StoreError):
    """A path (or name) a drop-in cannot carry so that systemd reads it back: the store is
    not usable (exit 12); an outcome of StoreError's, not one of its own."""

    hint = (
        "set `store:` in the image config to a plain absolute path under /run (no control "
        "characters; it must survive systemd's unit-file parser) and rebuild the image"
    )


def _unichar_is_valid(code: int) -> bool:
    """systemd's unichar_is_valid (src/basic/utf8.c): what utf8_is_valid accepts."""
    return not (
        code >= 0x110000
        or 0xD800 <= code <= 0xDFFF
        or 0xFDD0 <= code <= 0xFDEF
        or code & 0xFFFE == 0xFFFE
    )


def _unrepresentable(text: str) -> str | None:
    if not text.startswith("/"):
        return "is not absolute"
    parts = text.split("/")[1:]
    if any(part in ("", ".", "..") for part in parts):
        return "is not normalized (empty, `.` or `..` component, or a trailing slash)"
    for char in text:
        if unicodedata.category(char) == "Cc":
            return "contains a control character"
        if not _unichar_is_valid(ord(char)):
            return "contains a character systemd does not accept as UTF-8"
    if text.endswith((" ", "\\")):  # stripped, or a line continuation
        return "ends with a space or a backslash"
    encoded = text.encode("utf-8")
    if len(encoded) >= PATH_MAX:
        return f"is longer than {PATH_MAX - 1} bytes"
    if any(len(part.encode("utf-8")) > NAME_MAX for part in parts):
        return f"has a component longer than {NAME_MAX} bytes"
    return None


def unit_file_path(path: PurePosixPath | os.PathLike[str]) -> str:
    """`path` as the value of a unit-file setting that systemd reads back as exactly this path
    (specifiers escaped). StoreError (exit 12) if systemd could not read it back."""
    text = os.fspath(path)
    problem = _unrepresentable(text)
    if problem is not None:
        raise _NotInUnitFile(
            f"the path {shown(text)} cannot be written into a systemd unit file: it {problem}"
        )
    return text.replace("%", "%%")


def _unit_component(unit: str) -> str:
    if "/" in unit or unit in ("", ".", ".."):
        raise _NotInUnitFile(f"unit name {shown(unit)} cannot name a file")
    return unit


def dropin_text(
    unit: str,
    paths: Paths,
    *,
    env_file: bool,
    credentials: Iterable[str] = (),
) -> str:
    """The runtime drop-in of `unit`; every path in it escaped for systemd's unit parser."""
    base = paths.current_host
    unit = _unit_component(unit)
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
        lines.append(f"EnvironmentFile={unit_file_path(base / 'env' / f'{unit}.env')}")
    for name in credentials:
        if not CREDENTIAL_ID.match(name):
            raise _NotInUnitFile(
                f"credential name {shown(name)} cannot be written into a systemd unit file"
            )
        source = unit_file_path(base / "credentials" / unit / name)
        lines.append(f"LoadCredential={name}:{source}")
    return "\n".join(lines) + "\n"


def check_dropins(paths: Paths, units: Iterable[str]) -> None:
    """Before any work: refuse (StoreError) a symlink on the way to the drop-in directory,
    as a unit's `<unit>.d`, or as its drop-in file. Creates nothing."""
    names = [_unit_component(unit) for unit in units]
    fsio.check_tree(paths.root, paths.dropin_root, dirs=[f"{name}.d" for name in names])
    for name in names:
        fsio.check_tree(paths.root, paths.dropin_root / f"{name}.d", files=[DROPIN_NAME])


def write_dropins(paths: Paths, texts: Mapping[str, str], *, name: str = DROPIN_NAME) -> list[str]:
    """Write each unit's runtime drop-in `name` (atomically); return the units whose text
    changed.

    The directories are reached and the files replaced without following a symlink below
    `paths.root` (StoreError, exit 12, naming what was refused)."""
    changed: list[str] = []
    if not texts:
        return changed
    with fsio.open_dir(paths.root, paths.dropin_root, create=0o755) as dropin_root:
        for unit, text in texts.items():
            data = text.encode()
            with dropin_root.child(f"{_unit_component(unit)}.d", create=0o755) as unit_dir:
                if unit_dir.read_optional(name, MAX_DROPIN) == data:
                    continue
                unit_dir.replace_file(name, data, mode=0o644)
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
        self,
        unit: str,
        timeout: float,
        *,
        sleep: Callable[[float], None] = time.sleep,
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
