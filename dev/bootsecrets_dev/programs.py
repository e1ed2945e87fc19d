"""The installed programs the demo and the benchmark drive, found without relying on PATH.

`bootsecrets` is the agent's console script; `bootsecrets-dev-systemctl` (dev/bin/) is a
recording systemctl stand-in for `bootsecrets ... --systemctl PROGRAM`: it appends each
call's arguments, one line a call, to the file named by BOOTSECRETS_DEV_SYSTEMCTL_LOG, and
answers `is-active` with "active".
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sysconfig
from pathlib import Path

SYSTEMCTL_STANDIN = "bootsecrets-dev-systemctl"
SYSTEMCTL_LOG_ENV = "BOOTSECRETS_DEV_SYSTEMCTL_LOG"


class ProgramMissing(RuntimeError):
    pass


def installed(name: str) -> Path:
    """`name` from this interpreter's scripts directory (e.g. .venv/bin, whether or not it
    is on PATH), else from PATH."""
    path = Path(sysconfig.get_path("scripts")) / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    found = shutil.which(name)
    if found:
        return Path(found)
    raise ProgramMissing(f"{name} is not installed: run `bash scripts/dev-setup`")


@dataclasses.dataclass(frozen=True)
class RecordingSystemctl:
    """The stand-in and the file it records into."""

    program: Path
    log: Path

    def env(self) -> dict[str, str]:
        """What the agent's environment needs for the stand-in to record."""
        return {SYSTEMCTL_LOG_ENV: str(self.log)}

    def calls(self) -> list[list[str]]:
        """Every recorded call's arguments (without the program name), oldest first."""
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return []
        return [line.split() for line in text.splitlines()]

    def started(self) -> set[str]:
        """Units named by `start` calls."""
        return {
            unit
            for call in self.calls()
            if call[:1] == ["start"]
            for unit in call
            if unit.endswith(".service")
        }


def recording_systemctl(log: Path) -> RecordingSystemctl:
    return RecordingSystemctl(installed(SYSTEMCTL_STANDIN), log)
