"""Leased secrets in a run (docs/leases.md): renew, issue and re-issue what the planner
(leases.py) says is due, hand the values to the render, and after the units are settled
revoke every old lease no unit holds any more; then arm the agent's own wake-up.

    with leasing.scheduled(run):                   # the wake-up, after any outcome
        ...log in...
        with leasing.Session(run, vault, at_boot=...) as leases:
            rendered = read_and_render(config, vault, leases.prepare())
            deploy(run, rendered, at_boot=..., together=leases.together())

Why no unit ever holds revoked credentials: a new issue is saved (leasestore) before it is
rendered; an old lease is revoked only once state.json — written by deploy after each
restart, and only after the restarted units were seen active — shows that no unit using the
secret has files rendered from it and none is behind on a restart. A run stopped anywhere
leaves the old lease alive, and the next run (which settles the interrupted switch and
restarts what is due first) revokes it. A run that fails before its new generation goes
live revokes what it issued (nothing uses it); a unit that fails on new credentials is
rolled back with every other user of them (deploy's `together`) to the old ones, still
valid, and the new lease is revoked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from bootsecrets import leasestore, logs, vaultleases
from bootsecrets.config import SecretRef
from bootsecrets.context import Run
from bootsecrets.errors import (
    BootsecretsError,
    CertificateRefused,
    LeaseExpired,
    LeaseIssueFailed,
    LeaseRenewalRefused,
    LeaseRevokeFailed,
    UnitFailed,
)
from bootsecrets.leases import (
    Action,
    Certificate,
    Lease,
    Note,
    plan,
    renewed,
)
from bootsecrets.leasespec import CertificateSpec, policy_for
from bootsecrets.leasestore import Held, Kept
from bootsecrets.model import SecretData
from bootsecrets.state import State

if TYPE_CHECKING:
    from bootsecrets.vault import Vault

log = logging.getLogger(__name__)

#: Which problem a run ends with when it has several (each is logged when it happens).
_SEVERITY = (
    LeaseExpired,
    LeaseRenewalRefused,
    LeaseIssueFailed,
    CertificateRefused,
    LeaseRevokeFailed,
)


class Session:
    """One run's leased secrets. `prepare()` before the render; the context manager's exit
    settles them after deploy (or after a failure)."""

    def __init__(self, run: Run, vault: Vault, *, at_boot: bool) -> None:
        self.run = run
        self.vault = vault
        self.at_boot = at_boot
        self.kept = leasestore.load(run.paths)
        self.issued: list[Held] = []
        self.problems: list[BootsecretsError] = []
        self.live_before = run.store.current_generation()

    @property
    def active(self) -> bool:
        """Whether this run has leased secrets to look after (and so needs Vault after
        deploy)."""
        return bool(
            self.kept.current
            or self.kept.older
            or self.kept.revoke
            or any(r.leased for r in self.run.config.secrets.values())
        )

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.active:
            return
        if err is None:
            self._settle(rolled_back=False)
            self._finish()
        elif isinstance(err, UnitFailed):
            self._settle(rolled_back=True)
        else:
            with contextlib.suppress(BootsecretsError, OSError):  # the first error matters
                self._failed()

    # --- before the render ------------------------------------------------------------------

    def prepare(self) -> dict[str, SecretData | BootsecretsError]:
        """Per leased secret in use: the values to render it with (kept, renewed or newly
        issued), or why there are none (for a unit's `required` to decide)."""
        out: dict[str, SecretData | BootsecretsError] = {}
        for ref in self.run.config.used_secrets():
            if ref.spec is None:
                continue
            held = self.kept.current.get(ref.name)
            if held is not None and (held.path, held.request) != (
                ref.full_path,
                leasestore.request_of(ref),
            ):
                log.info(
                    "%s changed in the image config: issuing anew",
                    ref.name,
                    extra={"SECRET_PATH": ref.full_path},
                )
                held = None
            try:
                out[ref.name] = self._one(ref, held).secret()
            except BootsecretsError as err:
                # The old issue stays: still valid (or, expired, the units' best bet).
                out[ref.name] = held.secret() if held is not None else err
                self._problem(err)
        if self.active:
            self._save()
        return out

    def _one(self, ref: SecretRef, held: Held | None) -> Held:
        if held is None:
            return self._issue(ref, None)
        now = self.run.ctx.clock()
        policy = policy_for(self.run.config.leases, ref.spec)
        decision = plan((held.record,), now, math.inf, policy)[0]
        refused: BootsecretsError | None = None
        if decision.action is Action.RENEW and isinstance(held.record, Lease):
            try:
                held = self._renew(ref, held)
                decision = plan((held.record,), now, math.inf, policy)[0]
            except BootsecretsError as err:
                log.warning(
                    "renewing %s (%s) failed (%s): re-issuing",
                    ref.name,
                    ref.full_path,
                    err,
                    extra={"SECRET_PATH": ref.full_path},
                )
                refused = err
                decision = dataclasses.replace(decision, action=Action.REISSUE)
        if decision.action is not Action.REISSUE:
            return held
        try:
            new = self._issue(ref, held)
        except LeaseIssueFailed as err:
            if Note.EXPIRED in decision.notes:
                raise LeaseExpired(ref.name, ref.full_path, f"expired and {err.problem}") from None
            if refused is not None:
                raise LeaseIssueFailed(
                    ref.name, ref.full_path, f"renewal refused ({refused}); {err.problem}"
                ) from None
            raise
        if Note.EXPIRED in decision.notes:
            self._problem(
                LeaseExpired(
                    ref.name, ref.full_path, "had expired before it was replaced; re-issued"
                )
            )
        if refused is not None:
            self._problem(
                LeaseRenewalRefused(
                    ref.name, ref.full_path, f"renewal refused ({refused}); re-issued"
                )
            )
        return new

    def _renew(self, ref: SecretRef, held: Held) -> Held:
        record = held.record
        assert isinstance(record, Lease)
        at = self.run.ctx.clock()
        duration, renewable = vaultleases.renew_lease(
            self.vault, held.lease_id, int(record.ttl), what=f"renew the lease of {ref.full_path}"
        )
        new = dataclasses.replace(
            held, record=renewed(record, at=at, lease_duration=duration, renewable=renewable)
        )
        self._keep(dataclasses.replace(self.kept, current={**self.kept.current, ref.name: new}))
        log.info(
            "renewed the lease of %s (%s, version %s) for %ss",
            ref.name,
            ref.full_path,
            held.version,
            duration,
            extra={"SECRET_PATH": ref.full_path},
        )
        return new

    def _issue(self, ref: SecretRef, old: Held | None) -> Held:
        """Issue, and keep it (with its lease ID) before anything else can happen."""
        spec = ref.spec
        at = self.run.ctx.clock()
        body = spec.body() if isinstance(spec, CertificateSpec) else None
        # Nothing to fall back on (boot, first issue): retry like a read. With old
        # credentials still valid: give up rather than risk a lease whose answer was lost.
        idempotent = self.at_boot or old is None
        try:
            grant = vaultleases.issue(self.vault, ref, body, idempotent=idempotent)
            held = leasestore.from_grant(ref, grant, at, self.kept.next_version(ref.name))
        except (CertificateRefused, LeaseIssueFailed):
            raise
        except BootsecretsError as err:
            raise LeaseIssueFailed(ref.name, ref.full_path, f"could not be issued: {err}") from None
        previous = self.kept.current.get(ref.name)
        older = (*self.kept.older.get(ref.name, ()), *((previous,) if previous is not None else ()))
        self._keep(
            dataclasses.replace(
                self.kept,
                current={**self.kept.current, ref.name: held},
                older={**self.kept.older, ref.name: older},
            )
        )
        self.issued.append(held)
        what = "certificate" if isinstance(held.record, Certificate) else "credentials"
        log.info(
            "issued %s for %s (%s, version %s) valid until %s",
            what,
            ref.name,
            ref.full_path,
            held.version,
            _when(held.expires_at),
            extra={"SECRET_PATH": ref.full_path, "SECRET_VERSION": str(held.version)},
        )
        return held

    def together(self) -> tuple[frozenset[str], ...]:
        """Units that roll back as one: the users of a secret whose current issue some of
        them do not hold yet (re-issued in this run, or by an interrupted one)."""
        if not self.active:
            return ()
        state = self.run.load_state()
        groups = []
        for name, held in self.kept.current.items():
            users = self.run.config.users(name)
            if any(_holds(state, u, name) != held.version for u in users):
                groups.append(frozenset(users))
        return tuple(groups)

    # --- after deploy -----------------------------------------------------------------------

    def _settle(self, *, rolled_back: bool) -> None:
        """Adopt what the units hold (after a rollback: the old issue is current again),
        retire what none holds, revoke retired leases."""
        state, config = self.run.load_state(), self.run.config

        def users(name: str) -> tuple[str, ...]:
            ref = config.secrets.get(name)
            return config.users(name) if ref is not None and ref.leased else ()

        self._keep(
            reconcile(self.kept, state, users, rolled_back=rolled_back, at_boot=self.at_boot)
        )
        self._revoke_retired()
        self._save()

    def _revoke_retired(self) -> None:
        now = self.run.ctx.clock()
        for retired in self.kept.revoke:
            what = f"revoke an old lease of {retired.path}"
            try:
                if retired.expires_at > now:
                    vaultleases.revoke_lease(self.vault, retired.lease_id, what=what)
                    log.info(
                        "revoked an old lease of %s (%s)",
                        retired.name,
                        retired.path,
                        extra={"SECRET_PATH": retired.path},
                    )
            except BootsecretsError as err:
                self._problem(
                    LeaseRevokeFailed(
                        retired.name, retired.path, f"an old lease was not revoked ({err})"
                    )
                )
                continue
            self._keep(
                dataclasses.replace(
                    self.kept, revoke=tuple(r for r in self.kept.revoke if r is not retired)
                )
            )

    def _failed(self) -> None:
        """The run failed. If its new generation never went live, nothing uses what it
        issued: revoke it and make the old issue current again."""
        if self.issued and self.run.store.current_generation() == self.live_before:
            kept = self.kept
            for held in reversed(self.issued):
                older = kept.older.get(held.name, ())
                current = dict(kept.current)
                if older and older[-1].version < held.version:
                    current[held.name] = older[-1]
                    older = older[:-1]
                else:
                    current.pop(held.name, None)
                kept = dataclasses.replace(
                    kept,
                    current=current,
                    older={**kept.older, held.name: older},
                    revoke=(*kept.revoke, *((held.retired(),) if held.lease_id else ())),
                )
            self._keep(kept)
            log.info(
                "the run failed before its new values went live: revoking the %d "
                "lease(s) it issued",
                len(self.issued),
            )
            self._revoke_retired()
        self._save()

    def _finish(self) -> None:
        """Raise the worst problem of the run (each was logged when it happened). At boot a
        problem that left the units startable is only logged: bootsecrets.service failing
        would stop every unit that Requires= it."""
        if not self.problems or self.at_boot:
            return
        worst = min(
            self.problems,
            key=lambda e: next(
                (i for i, cls in enumerate(_SEVERITY) if isinstance(e, cls)), len(_SEVERITY)
            ),
        )
        raise worst

    def _problem(self, err: BootsecretsError) -> None:
        self.problems.append(err)
        fields = {"SECRET_PATH": getattr(err, "path", "")}
        if err.message_id and isinstance(err, LeaseRevokeFailed):
            log.error("%s", err, extra={"MESSAGE_ID": err.message_id, **fields})
        elif err.message_id:
            logs.alert(err, **fields)

    def _keep(self, kept: Kept) -> None:
        self.kept = kept
        leasestore.save(self.run.paths, kept)

    def _save(self) -> None:
        """The copy in state.json, for status."""
        state = self.run.load_state()
        self.run.save(dataclasses.replace(state, leases=leasestore.to_state(self.kept)))


def reconcile(
    kept: Kept,
    state: State,
    users: Callable[[str], tuple[str, ...]],
    *,
    rolled_back: bool,
    at_boot: bool,
) -> Kept:
    """Per secret: which issues the units' files hold (state.json); after a rollback the
    newest of them is current again; an issue no unit holds (and not current) is retired.
    A unit behind on a restart may run anything older than its files: keep all of it. At
    boot, units already running were not restarted (`start` leaves them be), so an old
    lease replaced then is left to expire, not revoked. A secret no unit uses any more is
    retired whole."""
    current, older, revoke = dict(kept.current), dict(kept.older), list(kept.revoke)
    for name in sorted({*kept.current, *kept.older}):
        versions = kept.versions(name)
        if not users(name):
            current.pop(name, None)
        held_by = {_holds(state, u, name) for u in users(name)} - {None}
        held = {v for v in held_by if v in versions}
        behind = any(state.units[u].behind for u in users(name) if u in state.units)
        top = current.get(name)
        if rolled_back and top is not None and held and top.version not in held:
            top = current[name] = versions[max(held)]
        keep = held | ({top.version} if top is not None else set())
        if behind:
            keep |= {v for v in versions if v <= max(held, default=0)}
        older[name] = tuple(
            h
            for v, h in sorted(versions.items())
            if v in keep and (top is None or v != top.version)
        )
        for version, old in sorted(versions.items()):
            if version in keep:
                continue
            if old.lease_id and not at_boot:
                revoke.append(old.retired())
            log.info(
                "%s version %s is no longer used%s",
                name,
                version,
                "" if old.lease_id and not at_boot else ": left to expire",
            )
        if top is None and not older[name]:
            older.pop(name)
    return Kept(current, {n: hs for n, hs in older.items() if hs}, tuple(revoke))


def _holds(state: State, unit: str, name: str) -> int | None:
    """The issue (version) of `name` the unit's files were rendered from."""
    unit_state = state.units.get(unit)
    if unit_state is None:
        return None
    return next((s.version for s in unit_state.secrets if s.name == name), None)


def _when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="seconds")
