"""Revocation on demand: `bootsecrets revoke-leases` and decommission revoke every lease the
agent holds (docs/leases.md), outside the run's own schedule (leasing.py)."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from bootsecrets import leasestore, vaultleases, wakeup
from bootsecrets.context import Run
from bootsecrets.errors import BootsecretsError, LeaseRevokeFailed
from bootsecrets.leasestore import Held, Kept
from bootsecrets.paths import Paths

if TYPE_CHECKING:
    from bootsecrets.vault import Vault

log = logging.getLogger(__name__)


def revoke_all(run: Run, vault: Vault) -> None:
    """`bootsecrets revoke-leases`: every lease the agent holds revoked, the wake-up stopped,
    state.json's copy updated. LeaseRevokeFailed (the first) if any could not be."""
    revoked, failed = revoke_kept(run.paths, vault)
    wakeup.disarm(run.systemctl)
    run.save(
        dataclasses.replace(
            run.load_state(), wakeup_at=None, leases=leasestore.to_state(leasestore.load(run.paths))
        )
    )
    log.info("revoked %d lease(s); %d could not be", revoked, len(failed))
    if failed:
        raise failed[0]


def revoke_kept(paths: Paths, vault: Vault) -> tuple[int, list[LeaseRevokeFailed]]:
    """Revoke every lease in `leases.json` (current, older, waiting), synchronously (each
    database role is gone when Vault answers), and forget the revoked ones; for
    decommission, with a Vault session on the kept token. Certificates have no lease and
    are kept. Returns how many were revoked and what could not be (still listed)."""
    kept = leasestore.load(paths)
    failed: list[LeaseRevokeFailed] = []
    revoked = 0
    for name, path, lease_id in kept.lease_ids():
        try:
            vaultleases.revoke_lease(vault, lease_id, what=f"revoke a lease of {path}")
        except BootsecretsError as err:
            failed.append(LeaseRevokeFailed(name, path, f"not revoked ({err})"))
            continue

        def gone(held: Held, lease_id: str = lease_id) -> bool:
            return held.lease_id == lease_id

        kept = Kept(
            current={n: h for n, h in kept.current.items() if not gone(h)},
            older={n: tuple(h for h in hs if not gone(h)) for n, hs in kept.older.items()},
            revoke=tuple(r for r in kept.revoke if r.lease_id != lease_id),
        )
        leasestore.save(paths, kept)
        revoked += 1
    return revoked, failed
