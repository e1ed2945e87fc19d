"""Leased secrets: when to renew, when to re-issue, and when the agent must run next.

Pure decisions, no I/O, no clock: every function takes `now` (seconds since the epoch, the
local clock) and records of what the agent knows about each lease or certificate, never a
secret value and never the lease ID itself (only whether there is one). docs/leases.md has
the design these decisions serve.

Times in the records are local-clock times taken when the *request was sent* (a lower
bound of when Vault started the TTL, so expiries computed from them are never late) and
durations as Vault returned them. A lease's life is measured on the local clock only, so
clock skew between host and Vault cannot move it; a certificate's validity is absolute
(its peers judge it with their own clocks), so skew is detected and reported instead.

The rule for both kinds: act at `fraction` (default 2/3) of the life, and never later than
`margin` seconds (time a run needs to re-issue and restart units) before the end. The agent
runs at least `floor` seconds apart on its own schedule, so a lease shorter than
`floor + margin` is acted on at every run (and reported as SHORT_LIFE), never in a loop.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

#: A renewal answer shorter than asked by more than this was capped (max_ttl reached).
CAP_TOLERANCE = 2.0


class Action(enum.Enum):
    NONE = "none"
    RENEW = "renew"
    REISSUE = "reissue"


class Reason(enum.Enum):
    """Why a decision is what it is; `value` is what status shows."""

    NOT_DUE = "not due"
    RENEWAL_DUE = "renewal due"
    THRESHOLD = "re-issue threshold reached"
    #: No renewal can keep the lease valid past the next run: its max_ttl is near.
    RENEWAL_TOO_SHORT = "a renewal would not outlast the next run"
    #: The next run cannot come before the end minus the margin: act now, not then.
    CANNOT_WAIT = "the next run would be too late"
    EXPIRED = "expired"
    #: A certificate already expired by the local clock when it was issued: the host's
    #: clock is ahead of the CA's; re-issuing would give the same, so nothing is done.
    CLOCK_AHEAD = "expired on arrival: the host clock is ahead"


class Note(enum.Enum):
    """Something the operator should hear about, beside the action."""

    #: The life is shorter than floor + margin: every run acts on it. Raise the TTL.
    SHORT_LIFE = "shorter than the agent's floor plus margin: acted on at every run"
    #: A certificate not valid yet by the local clock (host clock behind the CA's), or
    #: expired on arrival (host clock ahead).
    CLOCK_SKEW = "certificate validity does not match the host clock"
    #: Already expired: the units held dead credentials (the agent did not run in time).
    EXPIRED = "expired before it was replaced"
    #: Vault gave a duration but no lease ID: it cannot be renewed or revoked.
    NO_LEASE_ID = "no lease ID: cannot be renewed or revoked"


class Kind(enum.Enum):
    LEASE = "lease"
    CERTIFICATE = "certificate"


@dataclass(frozen=True)
class Policy:
    """The schedule's knobs (config `leases:`; docs/leases.md). Seconds."""

    fraction: float = 2 / 3
    floor: float = 60.0
    margin: float = 60.0
    #: An action due within `slack` is taken now: timers fire late, never early, and a
    #: wake-up rounded to whole seconds must not find its action "not due yet".
    slack: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError("fraction must be between 0 and 1 (exclusive)")
        if not self.floor > 0:
            raise ValueError("floor must be positive")
        if self.margin < 0 or self.slack < 0:
            raise ValueError("margin and slack must not be negative")
        if not all(math.isfinite(x) for x in (self.fraction, self.floor, self.margin, self.slack)):
            raise ValueError("policy values must be finite")


@dataclass(frozen=True)
class Lease:
    """What the agent keeps about one lease: no value, no lease ID (only whether it has
    one). `ttl` is the duration of the issuing answer, which each renewal asks for again;
    `lease_duration` is that of the last answer (issue or renewal), counted from
    `renewed_at` (or `issued_at` before any renewal)."""

    name: str
    issued_at: float
    ttl: float
    lease_duration: float
    renewable: bool
    has_lease_id: bool = True
    renewed_at: float | None = None
    #: issued_at + max_ttl when known: from the config, or learned from a capped renewal.
    max_expires_at: float | None = None

    @property
    def expires_at(self) -> float:
        return (
            self.issued_at if self.renewed_at is None else self.renewed_at
        ) + self.lease_duration

    @property
    def can_renew(self) -> bool:
        return self.renewable and self.has_lease_id

    @property
    def hard_end(self) -> float | None:
        """When no renewal can carry it further; None while unknown (renewable, max_ttl
        not known yet)."""
        if not self.can_renew:
            return self.expires_at
        if self.max_expires_at is None:
            return None
        return max(self.max_expires_at, self.expires_at)


@dataclass(frozen=True)
class Certificate:
    """What the agent keeps about one certificate: its validity (the `not_before` and
    `expiration` of Vault's answer, absolute times) and when it was requested (local)."""

    name: str
    not_before: float
    not_after: float
    received_at: float | None = None


Record = Lease | Certificate


def issued_lease(
    name: str,
    *,
    at: float,
    lease_duration: float,
    renewable: bool,
    has_lease_id: bool,
    max_ttl: float | None = None,
) -> Lease:
    """The record of a lease Vault just issued; `at` is when the request was sent."""
    return Lease(
        name=name,
        issued_at=at,
        ttl=lease_duration,
        lease_duration=lease_duration,
        renewable=renewable,
        has_lease_id=has_lease_id,
        max_expires_at=None if max_ttl is None else at + max_ttl,
    )


def renewed(lease: Lease, *, at: float, lease_duration: float, renewable: bool) -> Lease:
    """The record after a renewal asked for `lease.ttl` at `at` and got `lease_duration`.
    Less than asked means Vault capped it at max_ttl: the hard end is now known."""
    max_expires_at = lease.max_expires_at
    if lease_duration + CAP_TOLERANCE < lease.ttl:
        capped = at + lease_duration
        max_expires_at = capped if max_expires_at is None else min(max_expires_at, capped)
    return replace(
        lease,
        renewed_at=at,
        lease_duration=lease_duration,
        renewable=renewable,
        max_expires_at=max_expires_at,
    )


@dataclass(frozen=True)
class Decision:
    """What to do about one record in this run, and what comes after.

    `action` is for now. `next_action` at `due_at` is what the record needs next if
    nothing is done now (when `action` is not NONE, `due_at` is already past: if the
    action fails the record stays as it was and the wake-up retries after the floor).
    `due_at` None: nothing the agent can schedule (the regular timer re-checks)."""

    name: str
    kind: Kind
    action: Action
    reason: Reason
    expires_at: float
    next_action: Action
    due_at: float | None
    notes: frozenset[Note] = field(default_factory=frozenset)


def _earliest_next_run(now: float, next_run: float, policy: Policy) -> float:
    """The soonest the agent can run again: its own wake-ups are at least `floor` apart;
    the regular timer may come sooner."""
    return min(next_run, now + policy.floor)


def plan_lease(lease: Lease, now: float, next_run: float, policy: Policy) -> Decision:
    """Renew while a renewal keeps the lease valid past the next run; re-issue at the
    fraction of its life (issue to hard end), when no renewal can carry it past the next
    run (its max_ttl is near), or when it is not renewable."""
    notes: set[Note] = set()
    if not lease.has_lease_id:
        notes.add(Note.NO_LEASE_ID)
    if lease.ttl < policy.floor + policy.margin:
        notes.add(Note.SHORT_LIFE)
    expires = lease.expires_at

    def decide(action: Action, reason: Reason, due: float | None, next_action: Action) -> Decision:
        return Decision(
            lease.name, Kind.LEASE, action, reason, expires, next_action, due, frozenset(notes)
        )

    if now >= expires:
        notes.add(Note.EXPIRED)
        return decide(Action.REISSUE, Reason.EXPIRED, expires, Action.REISSUE)

    earliest = _earliest_next_run(now, next_run, policy)
    end = lease.hard_end
    reissue_due = None
    if end is not None:
        reissue_due = min(
            lease.issued_at + policy.fraction * (end - lease.issued_at), end - policy.margin
        )
        if now >= reissue_due - policy.slack:
            return decide(Action.REISSUE, Reason.THRESHOLD, reissue_due, Action.REISSUE)
        if earliest > end - policy.margin:
            # Nothing but a new lease can last until the next run.
            reason = Reason.RENEWAL_TOO_SHORT if lease.can_renew else Reason.CANNOT_WAIT
            return decide(Action.REISSUE, reason, reissue_due, Action.REISSUE)
    if not lease.can_renew:
        assert reissue_due is not None  # not renewable: the hard end is the expiry
        return decide(Action.NONE, Reason.NOT_DUE, reissue_due, Action.REISSUE)

    base = lease.issued_at if lease.renewed_at is None else lease.renewed_at
    renew_due = min(base + policy.fraction * lease.lease_duration, expires - policy.margin)
    if reissue_due is not None and reissue_due <= renew_due:
        return decide(Action.NONE, Reason.NOT_DUE, reissue_due, Action.REISSUE)
    if now >= renew_due - policy.slack:
        return decide(Action.RENEW, Reason.RENEWAL_DUE, renew_due, Action.RENEW)
    if earliest > expires - policy.margin:
        return decide(Action.RENEW, Reason.CANNOT_WAIT, renew_due, Action.RENEW)
    return decide(Action.NONE, Reason.NOT_DUE, renew_due, Action.RENEW)


def plan_certificate(cert: Certificate, now: float, next_run: float, policy: Policy) -> Decision:
    """Re-issue at the fraction of the validity, counted from when it arrived (or
    not_before when later: a host clock behind the CA's), and only then."""
    notes: set[Note] = set()

    def decide(action: Action, reason: Reason, due: float | None) -> Decision:
        return Decision(
            cert.name,
            Kind.CERTIFICATE,
            action,
            reason,
            cert.not_after,
            Action.REISSUE,
            due,
            frozenset(notes),
        )

    if cert.received_at is not None and cert.received_at >= cert.not_after:
        notes.update((Note.CLOCK_SKEW, Note.EXPIRED))
        return decide(Action.NONE, Reason.CLOCK_AHEAD, None)
    start = cert.not_before if cert.received_at is None else max(cert.not_before, cert.received_at)
    if cert.not_after - start < policy.floor + policy.margin:
        notes.add(Note.SHORT_LIFE)
    if cert.not_before > now + policy.slack:
        notes.add(Note.CLOCK_SKEW)
    if now >= cert.not_after:
        notes.add(Note.EXPIRED)
        return decide(Action.REISSUE, Reason.EXPIRED, cert.not_after)
    due = min(start + policy.fraction * (cert.not_after - start), cert.not_after - policy.margin)
    if now >= due - policy.slack:
        return decide(Action.REISSUE, Reason.THRESHOLD, due)
    if _earliest_next_run(now, next_run, policy) > cert.not_after - policy.margin:
        return decide(Action.REISSUE, Reason.CANNOT_WAIT, due)
    return decide(Action.NONE, Reason.NOT_DUE, due)


def plan(
    records: Iterable[Record], now: float, next_run: float, policy: Policy = Policy()
) -> tuple[Decision, ...]:
    """One decision per record, in the records' order. `next_run` is when the regular
    refresh timer fires next (math.inf when unknown or disabled)."""
    return tuple(
        plan_lease(r, now, next_run, policy)
        if isinstance(r, Lease)
        else plan_certificate(r, now, next_run, policy)
        for r in records
    )


@dataclass(frozen=True)
class Wakeup:
    """When the agent must run next on its own schedule.

    `at` is the earliest `due_at` across the records, never sooner than `now + floor`;
    None when nothing is due at all. `needed` is False when the regular timer fires
    first anyway (then no extra timer is required, though arming one does no harm).
    `name` is the record that set it; `floored` tells the floor pushed it later."""

    at: float | None
    name: str | None
    needed: bool
    floored: bool


def next_wakeup(
    decisions: Iterable[Decision], now: float, next_run: float, policy: Policy = Policy()
) -> Wakeup:
    due = [(d.due_at, d.name) for d in decisions if d.due_at is not None]
    if not due:
        return Wakeup(None, None, False, False)
    due_at, name = min(due)
    at = max(due_at, now + policy.floor)
    return Wakeup(at, name, at < next_run, at > due_at)


def timer_seconds(wakeup: Wakeup, now: float) -> int | None:
    """Whole seconds from `now` to the wake-up for a monotonic timer (OnActiveSec=),
    rounded up: a timer that fires a fraction early would find nothing due."""
    if wakeup.at is None:
        return None
    return max(1, math.ceil(wakeup.at - now))


# --- ordering of a refresh that re-issues ----------------------------------------------------


class Verb(enum.Enum):
    RENEW = "renew"
    ISSUE = "issue"
    RENDER = "render the new generation (the current one is kept)"
    SWITCH = "switch current to the new generation"
    RESTART = "restart or reload per on_change"
    WAIT_ACTIVE = "wait until active"
    REVOKE = "revoke"
    SWITCH_BACK = "switch current back to the previous generation"
    ALERT = "alert"


class Which(enum.Enum):
    """Which credentials of a record a step is about."""

    OLD = "old"
    NEW = "new"


@dataclass(frozen=True)
class Step:
    verb: Verb
    #: a record name (RENEW, ISSUE, REVOKE, ALERT) or a unit (RESTART, WAIT_ACTIVE)
    target: str = ""
    which: Which | None = None


def refresh_steps(
    decisions: Sequence[Decision], users: Mapping[str, Iterable[str]]
) -> tuple[Step, ...]:
    """The order of a refresh that acts on `decisions`; `users` maps a record to the units
    rendered from it. Renewals first (no restart). Then every re-issue, one render and
    switch, restarts of only the units that use a re-issued record, and only once each
    of those is active the old leases are revoked: no unit ever holds revoked
    credentials. Certificates without a lease are not revoked (they expire; revoking
    would only grow the CRL)."""
    renew = [d.name for d in decisions if d.action is Action.RENEW]
    reissue = [d for d in decisions if d.action is Action.REISSUE]
    steps = [Step(Verb.RENEW, name, Which.OLD) for name in renew]
    if not reissue:
        return tuple(steps)
    steps += [Step(Verb.ISSUE, d.name, Which.NEW) for d in reissue]
    units = sorted({u for d in reissue for u in users.get(d.name, ())})
    steps += [Step(Verb.RENDER), Step(Verb.SWITCH)]
    steps += [Step(Verb.RESTART, u) for u in units]
    steps += [Step(Verb.WAIT_ACTIVE, u) for u in units]
    steps += [
        Step(Verb.REVOKE, d.name, Which.OLD)
        for d in reissue
        if d.kind is Kind.LEASE and Note.NO_LEASE_ID not in d.notes
    ]
    return tuple(steps)


def rollback_steps(
    reissued: Sequence[Decision], users: Mapping[str, Iterable[str]], failed_units: Iterable[str]
) -> tuple[Step, ...]:
    """After a unit failed to become active on re-issued credentials: back to the previous
    generation (whose credentials were not revoked, so they still work), restart the
    units that had restarted, wait for them, then revoke the *new* leases (nothing uses
    them any more) and alert. The old leases stay; the next run tries again."""
    names = [d.name for d in reissued]
    units = sorted({u for n in names for u in users.get(n, ())})
    steps = [Step(Verb.SWITCH_BACK)]
    steps += [Step(Verb.RESTART, u) for u in units]
    steps += [Step(Verb.WAIT_ACTIVE, u) for u in units]
    steps += [Step(Verb.REVOKE, d.name, Which.NEW) for d in reissued if d.kind is Kind.LEASE]
    steps += [Step(Verb.ALERT, u) for u in sorted(set(failed_units))]
    return tuple(steps)


def status_entry(decision: Decision) -> dict[str, object]:
    """What `status --json` shows for one record (epoch seconds; no value, no lease ID)."""
    return {
        "name": decision.name,
        "kind": decision.kind.value,
        "expires_at": decision.expires_at,
        "action": decision.action.value,
        "reason": decision.reason.value,
        "next_action": decision.next_action.value,
        "next_action_at": decision.due_at,
        "notes": sorted(n.name.lower() for n in decision.notes),
    }
