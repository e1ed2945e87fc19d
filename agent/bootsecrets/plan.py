"""What a run does to the units, decided without I/O: which files to write, which to keep,
which units to start, restart or reload.

`plan_refresh` compares what was rendered with what the live generation holds, byte for
byte, and adds the restarts an earlier run left due (state.UnitState.restart_pending).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from bootsecrets.config import Config
from bootsecrets.model import Rendered, UnitBytes
from bootsecrets.serviceconfig import OnChange

#: What a unit has in a generation: its env file (None if none) and its credentials.
NOTHING: UnitBytes = (None, {})


@dataclasses.dataclass(frozen=True)
class RefreshPlan:
    #: Units whose bytes change: written into the new generation.
    write: tuple[str, ...] = ()
    #: Units whose files are kept (hard-linked from the live generation): unchanged, or an
    #: optional unit that could not be rendered this time and keeps what it runs with.
    keep: tuple[str, ...] = ()
    #: Units new to this host: started.
    start: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    reload: tuple[str, ...] = ()
    #: Units whose values change without a restart (on_change: none).
    switch_only: tuple[str, ...] = ()

    @property
    def switches(self) -> bool:
        """A new generation goes live."""
        return bool(self.write)

    @property
    def restarted(self) -> tuple[str, ...]:
        """Every unit (re)started or reloaded, in the order it is done."""
        return (*self.start, *self.restart, *self.reload)


def plan_refresh(
    config: Config,
    rendered: Rendered,
    live: Mapping[str, UnitBytes],
    restart_due: frozenset[str] = frozenset(),
    start_due: frozenset[str] = frozenset(),
) -> RefreshPlan:
    """`live`: each unit's bytes in the live generation (absent or NOTHING: none).
    `restart_due`: units whose values went live in an earlier run that did not restart them;
    `start_due`: units an earlier run rendered and did not get to start, or held back."""
    write: list[str] = []
    keep: list[str] = []
    start: list[str] = []
    restart: list[str] = []
    reload: list[str] = []
    switch_only: list[str] = []
    for service in config.services:
        unit = service.unit
        current = live.get(unit, NOTHING)
        if unit not in rendered.units:
            if unit in rendered.skipped and current != NOTHING:
                keep.append(unit)
            continue
        out = rendered.units[unit]
        changed = current != (out.env_file, dict(out.credentials))
        (write if changed else keep).append(unit)
        if (changed and current == NOTHING) or unit in start_due:
            start.append(unit)
        elif changed or unit in restart_due:
            if service.on_change is OnChange.RESTART:
                restart.append(unit)
            elif service.on_change is OnChange.RELOAD:
                reload.append(unit)
            else:
                switch_only.append(unit)
    return RefreshPlan(
        tuple(write), tuple(keep), tuple(start), tuple(restart), tuple(reload), tuple(switch_only)
    )
