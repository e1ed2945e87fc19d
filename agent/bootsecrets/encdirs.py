"""Encrypted directories: fscrypt directories on the root disk whose data keys come from
Vault's Transit engine (envelope encryption), unlocked before the units that need them start.

The steps of a bootstrap or refresh:

1. `check` (dircheck.py; before Vault, nothing written): per directory, can the filesystem
   encrypt it, is its owner known, and do the directory and its key record (keyrecord) go together:
   first use (absent or empty, no record or a pending one), locked, or already unlocked.
   Each refusal is its own exit code (16-19) and the run stops before anything is spent.
2. `unlocking` (after the login, concurrently with the secret reads): first use takes a new
   data key (`datakey/plaintext`), writes the pending record, creates the directory with
   its owner and mode, sets the fscrypt policy and completes the record; a locked directory
   has its key decrypted (`decrypt`) and added. A directory that cannot be unlocked is that
   directory's failure (51-53), not the run's: the others go on.
3. `settle`: alert for each failure, keep `<store>/unlocked/<name>` only for the unlocked
   directories and give each unit needing a directory a drop-in asserting those files, so
   that the agent's start or a hand-made one fails closed while a directory is locked;
   `hold_back` leaves the units needing a locked directory out of the start.
4. refresh: `rewrap` each unlocked directory's ciphertext, keeping the new one only when the
   Transit key version moved (see transit.py).
5. `raise_failures` after the deploy: the run ends with the first failure's exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from bootsecrets import fscrypt, fscrypt_types, fsio, keyrecord, logs, transit
from bootsecrets.config import Config
from bootsecrets.context import Run
from bootsecrets.dircheck import DirState, Prepared, check, problem
from bootsecrets.errors import (
    BootsecretsError,
    DataKeyRejected,
    DataLocked,
    TransitKeyMissing,
)
from bootsecrets.keyrecord import KeyRecord
from bootsecrets.model import HELD_BACK, Rendered
from bootsecrets.state import now
from bootsecrets.systemd import unit_file_path, write_dropins

if TYPE_CHECKING:
    from bootsecrets.vault import Vault

log = logging.getLogger(__name__)

DROPIN_NAME = "51-bootsecrets-encrypted.conf"
#: Failures of one directory after the login: the others go on.
DIRECTORY_FAILURES = (DataLocked, TransitKeyMissing, DataKeyRejected)


@dataclasses.dataclass
class Outcome:
    """Per directory name: its record once unlocked, or why it stays locked. `later` holds
    failures that lock nothing now (a rewrap's), reported after the run like the others."""

    unlocked: dict[str, KeyRecord] = dataclasses.field(default_factory=dict)
    failed: dict[str, BootsecretsError] = dataclasses.field(default_factory=dict)
    later: dict[str, BootsecretsError] = dataclasses.field(default_factory=dict)


# --- 2. after the login --------------------------------------------------------------------


@contextlib.contextmanager
def unlocking(
    run: Run, vault: Vault, prepared: tuple[Prepared, ...]
) -> Iterator[Callable[[], Outcome]]:
    """Unlock while the body (the secret reads) runs, every directory at once in a thread
    of its own: they share nothing (each has its own key record, its own Transit request
    and its own ioctls), so n directories cost one round trip to Vault, not n. The
    callable it gives returns the outcome, in config order. Leaving the block waits for
    the threads."""
    pending = [p for p in prepared if p.state is not DirState.UNLOCKED or p.record is None]
    if not pending:
        outcome = Outcome(
            unlocked={p.directory.name: p.record for p in prepared if p.record is not None}
        )
        yield lambda: outcome
        return
    identifiers = {
        p.directory.name: p.record.key_identifier
        for p in prepared
        if p.record is not None and p.record.key_identifier is not None
    }
    with ThreadPoolExecutor(max_workers=len(pending), thread_name_prefix="unlock") as pool:
        futures = {
            p.directory.name: pool.submit(
                unlock_one,
                run,
                vault,
                p,
                {i for n, i in identifiers.items() if n != p.directory.name},
            )
            for p in pending
        }

        def collect() -> Outcome:
            done = Outcome()
            for item in prepared:
                name = item.directory.name
                try:
                    record = futures[name].result() if name in futures else item.record
                except DIRECTORY_FAILURES as err:
                    done.failed[name] = err
                    continue
                assert record is not None  # only an unlocked one with a record is not pending
                done.unlocked[name] = record
            return done

        yield collect


def unlock_one(run: Run, vault: Vault, item: Prepared, others: set[str]) -> KeyRecord:
    """First use or unlock of one directory; `others`: the key identifiers of the other
    directories (fscrypt.unlock)."""
    if item.state is DirState.NEW:
        return _provision(run, vault, item)
    return _unlock(run, vault, item, others)


def _provision(run: Run, vault: Vault, item: Prepared) -> KeyRecord:
    directory = item.directory
    if item.record is None:
        key, wrapped = transit.generate(vault, item.transit_key, item.what)
        record = KeyRecord(
            directory.name,
            "directory",
            str(directory.path),
            directory.transit_mount,
            directory.transit_key,
            wrapped.ciphertext,
            wrapped.key_version,
            None,
            now(),
        )
        try:
            # Before the key reaches the kernel: a run stopped after this finishes from it.
            keyrecord.save(run.paths, record)
        except BaseException:
            transit.zero(key)
            raise
    else:
        record = item.record
        key = transit.decrypt(vault, item.transit_key, record.ciphertext, item.what)
    try:
        _create(item)
        identifier = fscrypt.provision(item.path, key)
    except (fscrypt_types.FscryptError, OSError) as err:
        raise DataLocked(f"{item.what}: the kernel refused to set it up: {problem(err)}") from None
    finally:
        transit.zero(key)
    record = dataclasses.replace(record, key_identifier=identifier)
    keyrecord.save(run.paths, record)
    log.info(
        "%s created and unlocked (Transit key %s v%s, key identifier %s)",
        item.what,
        item.transit_key,
        record.key_version,
        identifier,
        extra={"DIRECTORY": directory.name, "KEY_IDENTIFIER": identifier},
    )
    return record


def _create(item: Prepared) -> None:
    """The directory with its owner and mode (parents: root 0755), or an existing empty one
    given them."""
    item.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        item.path.mkdir(mode=0o700)
    fd = os.open(item.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, *item.owner)
        os.fchmod(fd, item.directory.mode)
    finally:
        os.close(fd)


def _unlock(run: Run, vault: Vault, item: Prepared, others: set[str]) -> KeyRecord:
    record = item.record
    assert record is not None  # LOCKED is only decided with a record
    key = transit.decrypt(vault, item.transit_key, record.ciphertext, item.what)
    try:
        identifier = fscrypt.unlock(item.path, key, other_identifiers=others)
    except fscrypt_types.EncryptedWithOtherKey:
        raise DataKeyRejected(
            f"{item.what}: the key in {keyrecord.record_path(run.paths, record.name)} is not "
            "the directory's key (the record was swapped)"
        ) from None
    except fscrypt_types.FscryptError as err:
        raise DataLocked(f"{item.what}: the kernel refused its key: {err.problem}") from None
    finally:
        transit.zero(key)
    if record.pending:
        record = dataclasses.replace(record, key_identifier=identifier)
        keyrecord.save(run.paths, record)
    log.info(
        "%s unlocked (Transit key %s v%s, key identifier %s)",
        item.what,
        item.transit_key,
        record.key_version,
        identifier,
        extra={"DIRECTORY": item.directory.name, "KEY_IDENTIFIER": identifier},
    )
    return record


# --- 3. units ------------------------------------------------------------------------------


def settle(run: Run, prepared: tuple[Prepared, ...], outcome: Outcome) -> bool:
    """Alert for each directory that stays locked; unlock markers and drop-ins. Returns
    whether a drop-in changed (systemd must reload)."""
    for item in prepared:
        name = item.directory.name
        err = outcome.failed.get(name)
        if err is not None:
            logs.alert(
                err,
                DIRECTORY=name,
                DIRECTORY_PATH=str(item.directory.path),
                TRANSIT_KEY=str(item.transit_key),
                UNIT=",".join(item.directory.units),
            )
    if not run.config.directories:
        return False
    markers = run.paths.store / "unlocked"
    for directory in run.config.directories:
        marker = markers / directory.name
        if directory.name in outcome.unlocked:
            fsio.write_private(
                run.paths.root, marker, b"", 0o600, create_dirs=0o700, memory_only=True
            )
        else:
            fsio.unlink_nofollow(run.paths.root, marker)
    return _write_dropins(run)


def dropin_text(run: Run, unit: str) -> str:
    lines = [
        "# Written by bootsecrets at runtime: the unit starts only while the encrypted",
        "# directories it needs are unlocked (bootsecrets creates these files after each",
        "# unlock; they are gone at reboot). Do not edit.",
        "[Unit]",
    ]
    lines += [
        f"AssertPathExists={unit_file_path(run.paths.store_host / 'unlocked' / d.name)}"
        for d in run.config.directories
        if unit in d.units
    ]
    return "\n".join(lines) + "\n"


def _write_dropins(run: Run) -> bool:
    units = sorted({u for d in run.config.directories for u in d.units})
    texts = {unit: dropin_text(run, unit) for unit in units}
    return bool(write_dropins(run.paths, texts, name=DROPIN_NAME))


def hold_back(config: Config, rendered: Rendered, outcome: Outcome) -> Rendered:
    """The render without the units that need a directory that stays locked (left out like
    an optional unit: not written, not started, and kept as they are if already running)."""
    held: dict[str, str] = {}
    for directory in config.directories:
        if directory.name in outcome.failed:
            for unit in directory.units:
                held.setdefault(unit, directory.name)
    if not held:
        return rendered
    for unit, name in sorted(held.items()):
        log.warning(
            "%s held back: encrypted directory %s is locked",
            unit,
            name,
            extra={"UNIT": unit, "DIRECTORY": name},
        )
    skipped = {
        **rendered.skipped,
        **{u: f"{HELD_BACK}encrypted directory {n} is locked" for u, n in held.items()},
    }
    return Rendered(
        {u: r for u, r in rendered.units.items() if u not in held}, rendered.secrets, skipped
    )


# --- 4. rotation ---------------------------------------------------------------------------


def rewrap(run: Run, vault: Vault, prepared: tuple[Prepared, ...], outcome: Outcome) -> None:
    """Refresh: one rewrap per unlocked directory; the record is replaced only when the
    Transit key version moved. A missing key or a rejected ciphertext alerts and is the
    run's outcome; anything else (a refusal, Vault gone) is a warning: the data stays
    unlocked, and the next refresh tries again."""
    for item in prepared:
        name = item.directory.name
        record = outcome.unlocked.get(name)
        if record is None:
            continue
        try:
            wrapped = transit.rewrap(vault, item.transit_key, record.ciphertext, item.what)
        except (TransitKeyMissing, DataKeyRejected) as err:
            logs.alert(
                err,
                DIRECTORY=name,
                DIRECTORY_PATH=str(item.directory.path),
                TRANSIT_KEY=str(item.transit_key),
            )
            outcome.later[name] = err
            continue
        except BootsecretsError as err:  # refused, or Vault gone: the data stays unlocked
            log.warning(
                "could not rewrap the key of %s: %s", item.what, err, extra={"DIRECTORY": name}
            )
            continue
        if wrapped.key_version > record.key_version:
            record = dataclasses.replace(
                record,
                ciphertext=wrapped.ciphertext,
                key_version=wrapped.key_version,
                rewrapped_at=now(),
            )
            keyrecord.save(run.paths, record)
            outcome.unlocked[name] = record
            log.info(
                "rewrapped the key of %s: Transit key %s v%s",
                item.what,
                item.transit_key,
                record.key_version,
                extra={"DIRECTORY": name},
            )


# --- 5. the run's end ----------------------------------------------------------------------


def raise_failures(outcome: Outcome) -> None:
    for err in (*outcome.failed.values(), *outcome.later.values()):
        raise err


# --- the steps as one run's part (agent.py, through features.py) ---------------------------


class Directories:
    """One run's encrypted directories: checked when made (before Vault), then the steps
    above in order, each on the outcome of the unlock."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.prepared = check(run)
        self.outcome = Outcome()

    @contextlib.contextmanager
    def unlocking(self, vault: Vault) -> Iterator[Callable[[], None]]:
        """`unlocking`; the callable it gives takes the outcome up (once the block is left)."""
        with unlocking(self.run, vault, self.prepared) as unlocked:

            def done() -> None:
                self.outcome = unlocked()

            yield done

    def rewrap(self, vault: Vault) -> None:
        rewrap(self.run, vault, self.prepared, self.outcome)

    def settle(self) -> bool:
        return settle(self.run, self.prepared, self.outcome)

    def hold_back(self, rendered: Rendered) -> Rendered:
        return hold_back(self.run.config, rendered, self.outcome)

    def raise_failures(self) -> None:
        raise_failures(self.outcome)
