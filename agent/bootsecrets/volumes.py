"""Encrypted volumes: LUKS2 on block volumes (DigitalOcean Volumes), opened at boot with a
data key from Vault's Transit engine whose ciphertext is in the volume's own LUKS2 header,
mounted by PID 1, and only then given to the units that need them.

The steps of a bootstrap or refresh, as for encrypted directories (encdirs):

1. `check` (before Vault, volcheck): per volume, what is on its device, writing nothing:
   blank (first use), a bootsecrets LUKS2 volume (its token read and checked against the
   config and the host's record, volrecord), already open or mounted, not there yet, or
   refused. Unlike a directory's refusal, a volume's is that volume's failure (54-59, or
   51-53 later at Vault): the units needing it stay down, the others start.
2. `unlocking` (after the login, in a thread of its own while the secrets are read):
   volopen does the work, every volume at once in a thread of its own (a device not there
   yet waited for; first use: format, mkfs; every boot: decrypt, open), then has PID 1
   mount what is open.
3. `settle`: alert for each failure; every unit needing a volume gets a drop-in binding it
   to the volume's mount (blockdev.dependency_dropin); `hold_back` leaves the units needing
   a volume that is not mounted out of the start.
4. refresh: `rewrap` each open volume's token, replaced in the header only when the Transit
   key version moved.
5. `raise_failures` after the deploy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from bootsecrets import blockdev, logs, luks, transit, volopen
from bootsecrets.config import Config
from bootsecrets.context import Run
from bootsecrets.errors import BootsecretsError, DataKeyRejected, TransitKeyMissing
from bootsecrets.model import HELD_BACK, Rendered
from bootsecrets.systemd import write_dropins
from bootsecrets.volcheck import (
    VOLUME_FAILURES,
    Outcome,
    Prepared,
    VolState,
    check,
    runner_of,
)

if TYPE_CHECKING:
    from bootsecrets.vault import Vault

log = logging.getLogger(__name__)

__all__ = [
    "DROPIN_NAME",
    "VOLUME_FAILURES",
    "Outcome",
    "Prepared",
    "Volumes",
    "check",
    "hold_back",
    "raise_failures",
    "rewrap",
    "settle",
    "unlocking",
]

DROPIN_NAME = blockdev.VOLUME_DROPIN


# --- 2. after the login --------------------------------------------------------------------


@contextlib.contextmanager
def unlocking(
    run: Run, vault: Vault, prepared: tuple[Prepared, ...]
) -> Iterator[Callable[[], Outcome]]:
    """Open and mount in a thread of its own while the body (the secret reads) runs; the
    callable it gives returns the outcome. Leaving the block waits for the thread."""
    if all(p.state in (VolState.MOUNTED, VolState.REFUSED) for p in prepared):
        outcome = volopen.settled(prepared)
        yield lambda: outcome
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="volumes") as pool:
        future = pool.submit(volopen.open_all, run, vault, prepared)
        yield future.result


# --- 3. units ------------------------------------------------------------------------------


def settle(run: Run, prepared: tuple[Prepared, ...], outcome: Outcome) -> bool:
    """Alert for each volume not mounted; the units' drop-ins. Returns whether a drop-in
    changed (systemd must reload)."""
    for item in prepared:
        err = outcome.failed.get(item.volume.name)
        if err is not None:
            logs.alert(
                err,
                VOLUME=item.volume.name,
                DEVICE=str(item.volume.device),
                MOUNT_POINT=str(item.volume.mount),
                TRANSIT_KEY=str(item.transit_key),
                UNIT=",".join(item.volume.units),
            )
    if not run.config.volumes:
        return False
    units = sorted({u for v in run.config.volumes for u in v.units})
    texts = {
        unit: blockdev.dependency_dropin(
            [blockdev.unit_name_for(v.mount) for v in run.config.volumes if unit in v.units]
        )
        for unit in units
    }
    return bool(write_dropins(run.paths, texts, name=DROPIN_NAME))


def hold_back(config: Config, rendered: Rendered, outcome: Outcome) -> Rendered:
    """The render without the units needing a volume that is not mounted (left out like an
    optional unit: not written, not started, kept as they are if already running)."""
    held: dict[str, str] = {}
    for volume in config.volumes:
        if volume.name in outcome.failed:
            for unit in volume.units:
                held.setdefault(unit, volume.name)
    if not held:
        return rendered
    for unit, name in sorted(held.items()):
        log.warning(
            "%s held back: encrypted volume %s is not mounted",
            unit,
            name,
            extra={"UNIT": unit, "VOLUME": name},
        )
    skipped = {
        **rendered.skipped,
        **{u: f"{HELD_BACK}encrypted volume {n} is not mounted" for u, n in held.items()},
    }
    return Rendered(
        {u: r for u, r in rendered.units.items() if u not in held}, rendered.secrets, skipped
    )


# --- 4. rotation ---------------------------------------------------------------------------


def rewrap(run: Run, vault: Vault, prepared: tuple[Prepared, ...], outcome: Outcome) -> None:
    """Refresh: one rewrap per mounted volume; its header's token is replaced only when the
    Transit key version moved. A missing key or a rejected ciphertext alerts; anything else
    is a warning (the volume stays open; the next refresh tries again)."""
    runner = runner_of(run)
    for item in prepared:
        name = item.volume.name
        token = outcome.mounted.get(name)
        if token is None:
            continue
        key = transit.TransitKey(token.mount, token.key_name)
        try:
            wrapped = transit.rewrap(vault, key, token.ciphertext, item.what)
        except (TransitKeyMissing, DataKeyRejected) as err:
            logs.alert(err, VOLUME=name, DEVICE=str(item.volume.device), TRANSIT_KEY=str(key))
            outcome.later[name] = err
            continue
        except BootsecretsError as err:
            log.warning(
                "could not rewrap the key of %s: %s", item.what, err, extra={"VOLUME": name}
            )
            continue
        if wrapped.key_version <= token.key_version:
            continue
        new = dataclasses.replace(
            token, key_version=wrapped.key_version, ciphertext=wrapped.ciphertext
        )
        try:
            luks.update_token(item.device, new, runner)
        except luks.LuksError as err:
            log.warning(
                "could not write the rewrapped token of %s: %s",
                item.what,
                err.problem,
                extra={"VOLUME": name},
            )
            continue
        outcome.mounted[name] = new
        log.info(
            "rewrapped the key of %s: Transit key %s v%s",
            item.what,
            key,
            new.key_version,
            extra={"VOLUME": name},
        )


# --- 5. the run's end ----------------------------------------------------------------------


def raise_failures(outcome: Outcome) -> None:
    for err in (*outcome.failed.values(), *outcome.later.values()):
        raise err


# --- the steps as one run's part (agent.py, through features.py) ---------------------------


class Volumes:
    """One run's encrypted volumes: checked when made (before Vault), then the steps above
    in order, each on the outcome of the unlock."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.prepared = check(run)
        self.outcome = Outcome()

    @contextlib.contextmanager
    def unlocking(self, vault: Vault) -> Iterator[Callable[[], None]]:
        """`unlocking`; the callable it gives takes the outcome up (once the block is left)."""
        with unlocking(self.run, vault, self.prepared) as mounted:

            def done() -> None:
                self.outcome = mounted()

            yield done

    def rewrap(self, vault: Vault) -> None:
        rewrap(self.run, vault, self.prepared, self.outcome)

    def settle(self) -> bool:
        return settle(self.run, self.prepared, self.outcome)

    def hold_back(self, rendered: Rendered) -> Rendered:
        return hold_back(self.run.config, rendered, self.outcome)

    def raise_failures(self) -> None:
        raise_failures(self.outcome)
