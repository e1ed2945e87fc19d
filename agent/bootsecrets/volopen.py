"""Encrypted volumes after the login: format at first use, open at every boot, then have
PID 1 mount them (see blockdev for why PID 1).

First use (a blank device, `format: if-blank`): a new 512-bit data key from
`transit/datakey/plaintext`; the record (volrecord) written as `formatting` with the LUKS
UUID about to be used; luksFormat (LUKS2, the key on cryptsetup's stdin) and the token with
the key's Transit ciphertext imported into the header (luks.format_volume, which checks the
device is blank once more); open; mkfs on the mapping and the filesystem's root given the
configured owner and mode; the record `ready`. A first use cut short is finished at the
next run: the record says `formatting` and the header has its UUID, so mkfs runs on it.

Every boot: the token's ciphertext to `transit/decrypt`, the key to `cryptsetup open` on
stdin, zeroed at once. A key that opens no keyslot means the token was swapped for another
volume's (DataKeyRejected, 53). A volume formatted elsewhere (no record) is adopted: opened,
never formatted.

Then, for every open volume not mounted yet: its mount unit written, one daemon-reload,
`systemctl start <unit>` (blocking: the mount unit is not ordered after bootsecrets.service),
and the mount checked in the mount table by device number (PID 1's mounts propagate into
the agent's namespace) or, failing that, by PID 1 (`systemctl is-active`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid as uuid_module
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from bootsecrets import blockdev, fsio, luks, transit, volrecord
from bootsecrets.context import Run
from bootsecrets.errors import DataKeyRejected, VolumeFailed, VolumeMissing, VolumeNotBlank
from bootsecrets.state import now
from bootsecrets.volcheck import (
    VOLUME_FAILURES,
    Outcome,
    Prepared,
    VolState,
    classify,
    runner_of,
)

if TYPE_CHECKING:
    from bootsecrets.vault import Vault

log = logging.getLogger(__name__)


def settled(prepared: tuple[Prepared, ...]) -> Outcome:
    """The outcome when there is nothing to open: mounted already, or refused."""
    outcome = Outcome()
    for item in prepared:
        if item.failure is not None:
            outcome.failed[item.volume.name] = item.failure
        elif item.state is VolState.MOUNTED and item.token is not None:
            outcome.mounted[item.volume.name] = item.token
    return outcome


def open_all(run: Run, vault: Vault, prepared: tuple[Prepared, ...]) -> Outcome:
    """Every volume at once, each in a thread of its own (they share nothing: each has its
    own device, record and Transit request, so n volumes cost one round trip to Vault, not
    n): a device not there yet waited for until its own deadline, then opened (formatted
    first if new). Then everything open is mounted. Outcomes in order: the volumes that
    were there first, then those waited for."""
    started = time.monotonic()
    order = sorted(prepared, key=lambda p: p.state is VolState.ABSENT)
    with ThreadPoolExecutor(max_workers=len(order), thread_name_prefix="volume") as pool:
        futures = [pool.submit(_wait_and_open, run, vault, item, started) for item in order]
    outcome = Outcome()
    opened: list[tuple[Prepared, luks.TransitToken]] = []
    for first, future in zip(order, futures, strict=True):
        try:
            opened.append(future.result())
        except VOLUME_FAILURES as err:
            outcome.failed[first.volume.name] = err
    _mount_all(run, opened, outcome)
    return outcome


def _wait_and_open(
    run: Run, vault: Vault, first: Prepared, started: float
) -> tuple[Prepared, luks.TransitToken]:
    item = _wait(run, first, started) if first.state is VolState.ABSENT else first
    if item.failure is not None:
        raise item.failure
    return item, _open_one(run, vault, item)


def _wait(run: Run, item: Prepared, started: float) -> Prepared:
    timeout = min(item.volume.attach_timeout, run.config.vault.boot_deadline)
    remaining = started + timeout - time.monotonic()
    log.info(
        "waiting up to %.0f s for %s to be attached",
        max(remaining, 0),
        item.what,
        extra={"VOLUME": item.volume.name},
    )
    if not blockdev.wait_for(item.device, max(remaining, 0)):
        raise VolumeMissing(
            f"{item.what}: not there after {timeout:g} s (the volume is not "
            "attached, or the device path is wrong)"
        )
    return classify(run, item)


def _open_one(run: Run, vault: Vault, item: Prepared) -> luks.TransitToken:
    if item.state is VolState.BLANK:
        return _provision(run, vault, item)
    if item.token is None:  # every state but BLANK (and REFUSED, raised before) has one
        raise RuntimeError(f"{item.what}: no token in state {item.state.value}")
    if item.state is VolState.LOCKED:
        _unlock(run, vault, item, item.token)
    return item.token


def _provision(run: Run, vault: Vault, item: Prepared) -> luks.TransitToken:
    volume, runner = item.volume, runner_of(run)
    key, wrapped = transit.generate(vault, item.transit_key, item.what)
    try:
        uuid = str(uuid_module.uuid4())
        record = volrecord.VolumeRecord(
            volume.name,
            str(volume.device),
            volume.mapper,
            str(volume.mount),
            uuid,
            "formatting",
            volume.transit_mount,
            volume.transit_key,
            now(),
        )
        # Before the device is written: a run stopped after this finishes from it.
        volrecord.save(run.paths, record)
        try:
            token = luks.TransitToken(
                volume.transit_mount, volume.transit_key, wrapped.key_version, wrapped.ciphertext
            )
            luks.format_volume(item.device, key, token, runner, uuid=uuid)
            luks.open_volume(item.device, volume.mapper, key, runner=runner)
        except luks.NotBlank as err:
            raise VolumeNotBlank(f"{item.what}: {err.problem}") from None
        except luks.LuksError as err:
            raise VolumeFailed(f"{item.what}: {err.problem}") from None
    finally:
        transit.zero(key)
    log.info(
        "%s: LUKS2 header written (UUID %s, Transit key %s v%s) and opened as /dev/mapper/%s",
        item.what,
        uuid,
        item.transit_key,
        token.key_version,
        volume.mapper,
        extra={"VOLUME": volume.name, "LUKS_UUID": uuid},
    )
    _make_filesystem(run, item)
    volrecord.save(run.paths, dataclasses.replace(record, state="ready"))
    return token


def _unlock(run: Run, vault: Vault, item: Prepared, token: luks.TransitToken) -> None:
    volume, record = item.volume, item.record
    key = transit.decrypt(vault, item.transit_key, token.ciphertext, item.what)
    try:
        luks.open_volume(item.device, volume.mapper, key, runner=runner_of(run))
    except luks.KeyRejected:
        raise DataKeyRejected(
            f"{item.what}: the key its LUKS2 token decrypts to opens no keyslot (a token "
            "taken from another volume)"
        ) from None
    except luks.LuksError as err:
        raise VolumeFailed(f"{item.what}: {err.problem}") from None
    finally:
        transit.zero(key)
    log.info(
        "%s opened as /dev/mapper/%s (Transit key %s v%s)",
        item.what,
        volume.mapper,
        item.transit_key,
        token.key_version,
        extra={"VOLUME": volume.name},
    )
    if record is not None and record.ready:
        return
    if record is not None:  # `formatting`, and the header is the one it names: finish
        log.info(
            "%s: finishing a first use cut short: making its filesystem",
            item.what,
            extra={"VOLUME": volume.name},
        )
        _make_filesystem(run, item)
    else:
        log.info(
            "%s: formatted elsewhere; adopted (LUKS UUID %s)",
            item.what,
            item.uuid,
            extra={"VOLUME": volume.name},
        )
    volrecord.save(
        run.paths,
        volrecord.VolumeRecord(
            volume.name,
            str(volume.device),
            volume.mapper,
            str(volume.mount),
            item.uuid or "",
            "ready",
            token.mount,
            token.key_name,
            record.created_at if record is not None else now(),
        ),
    )


def _make_filesystem(run: Run, item: Prepared) -> None:
    try:
        blockdev.make_filesystem(item.volume, item.mapper, item.owner, runner_of(run))
    except luks.LuksError as err:
        raise VolumeFailed(f"{item.what}: {err.problem}") from None
    except OSError as err:
        raise VolumeFailed(
            f"{item.what}: its new filesystem's root cannot be given its "
            f"owner and mode: {err.strerror}"
        ) from None
    log.info(
        "%s: %s made on /dev/mapper/%s",
        item.what,
        item.volume.filesystem.value,
        item.volume.mapper,
        extra={"VOLUME": item.volume.name},
    )


def _mount_all(
    run: Run, opened: list[tuple[Prepared, luks.TransitToken]], outcome: Outcome
) -> None:
    waiting = []
    for item, token in opened:
        if blockdev.mounted_from(item.mount, item.mapper):
            outcome.mounted[item.volume.name] = token
        else:
            waiting.append((item, token))
    if not waiting:
        return
    changed = False
    with fsio.open_dir(run.paths.root, run.paths.dropin_root, create=0o755) as units:
        for item, _ in waiting:
            name = blockdev.unit_name_for(item.volume.mount)
            text = blockdev.mount_unit_text(item.volume).encode()
            if units.read_optional(name, 1 << 16) != text:
                units.replace_file(name, text, mode=0o644)
                changed = True
    if changed:
        run.systemctl.daemon_reload()
    for item, token in waiting:
        unit = blockdev.unit_name_for(item.volume.mount)
        result = run.systemctl("start", "--", unit, check=False)
        # The mount table as the agent's namespace sees it, or PID 1's word for it.
        if result.returncode == 0 and (
            blockdev.mounted_from(item.mount, item.mapper)
            or run.systemctl.is_active(unit) == "active"
        ):
            outcome.mounted[item.volume.name] = token
            log.info(
                "%s mounted at %s (%s)",
                item.what,
                item.volume.mount,
                unit,
                extra={"VOLUME": item.volume.name, "UNIT": unit},
            )
            continue
        outcome.failed[item.volume.name] = VolumeFailed(
            f"{item.what}: PID 1 did not mount /dev/mapper/{item.volume.mapper} at "
            f"{item.volume.mount} (`systemctl start {unit}` exited with "
            f"{result.returncode}); see `systemctl status {unit}`"
        )
