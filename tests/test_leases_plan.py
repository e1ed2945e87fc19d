"""bootsecrets.leases: the renew / re-issue / schedule decisions, as tables worked out by
hand from the rule (act at 2/3 of the life, never later than `margin` before the end, runs
at least `floor` apart), plus a simulation against a model of Vault's lease rules."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bootsecrets.leases import (
    Action,
    Certificate,
    Decision,
    Kind,
    Lease,
    Note,
    Policy,
    Reason,
    Step,
    Verb,
    Which,
    issued_lease,
    next_wakeup,
    plan,
    plan_certificate,
    plan_lease,
    refresh_steps,
    renewed,
    rollback_steps,
    status_entry,
    timer_seconds,
)

T = 1_000_000.0
INF = math.inf
P = Policy()  # fraction 2/3, floor 60, margin 60, slack 5


def lease(
    ttl: float = 300,
    *,
    renewable: bool = True,
    max_ttl: float | None = 3600,
    renewed_at: float | None = None,
    duration: float | None = None,
    has_lease_id: bool = True,
) -> Lease:
    return Lease(
        name="db",
        issued_at=T,
        ttl=ttl,
        lease_duration=ttl if duration is None else duration,
        renewable=renewable,
        has_lease_id=has_lease_id,
        renewed_at=renewed_at,
        max_expires_at=None if max_ttl is None else T + max_ttl,
    )


@dataclass(frozen=True)
class Row:
    id: str
    record: Lease
    now: float
    action: Action
    reason: Reason
    due: float | None
    next_action: Action
    notes: frozenset[Note] = frozenset()
    next_run: float = INF
    policy: Policy = P


LEASE_ROWS = [
    # Renewable, ttl 5 min, max_ttl 1 h: renew at 2/3 of each term (T+200), re-issue at
    # 2/3 of the whole life (T+2400).
    Row("fresh", lease(), T + 10, Action.NONE, Reason.NOT_DUE, T + 200, Action.RENEW),
    # An action due within the slack (5 s) is taken now (ttl 1 h: renew at T+2400).
    Row(
        "just outside slack",
        lease(3600, max_ttl=None),
        T + 2394,
        Action.NONE,
        Reason.NOT_DUE,
        T + 2400,
        Action.RENEW,
    ),
    Row(
        "within slack",
        lease(3600, max_ttl=None),
        T + 2396,
        Action.RENEW,
        Reason.RENEWAL_DUE,
        T + 2400,
        Action.RENEW,
    ),
    # 6 s before T+200, but the soonest next run (T+254) is past expiry - margin (T+240).
    Row(
        "due soon, next run too late",
        lease(),
        T + 194,
        Action.RENEW,
        Reason.CANNOT_WAIT,
        T + 200,
        Action.RENEW,
    ),
    Row("renewal due", lease(), T + 250, Action.RENEW, Reason.RENEWAL_DUE, T + 200, Action.RENEW),
    # Renewed at T+2300 (expires T+2600): the re-issue threshold T+2400 comes first.
    Row(
        "threshold next",
        lease(renewed_at=T + 2300),
        T + 2310,
        Action.NONE,
        Reason.NOT_DUE,
        T + 2400,
        Action.REISSUE,
    ),
    Row(
        "threshold reached",
        lease(renewed_at=T + 2300),
        T + 2400,
        Action.REISSUE,
        Reason.THRESHOLD,
        T + 2400,
        Action.REISSUE,
    ),
    Row(
        "expired",
        lease(),
        T + 300,
        Action.REISSUE,
        Reason.EXPIRED,
        T + 300,
        Action.REISSUE,
        frozenset({Note.EXPIRED}),
    ),
    Row(
        "long expired",
        lease(renewed_at=T + 2300),
        T + 9000,
        Action.REISSUE,
        Reason.EXPIRED,
        T + 2600,
        Action.REISSUE,
        frozenset({Note.EXPIRED}),
    ),
    # max_ttl unknown: renew on every term, never re-issue while renewals go through.
    Row(
        "unknown max, not due",
        lease(max_ttl=None),
        T + 100,
        Action.NONE,
        Reason.NOT_DUE,
        T + 200,
        Action.RENEW,
    ),
    Row(
        "unknown max, renewed many times",
        lease(max_ttl=None, renewed_at=T + 86_000),
        T + 86_200,
        Action.RENEW,
        Reason.RENEWAL_DUE,
        T + 86_200,
        Action.RENEW,
    ),
    # Not renewable: the expiry is the end; re-issue at 2/3 of it.
    Row(
        "not renewable, not due",
        lease(renewable=False),
        T + 100,
        Action.NONE,
        Reason.NOT_DUE,
        T + 200,
        Action.REISSUE,
    ),
    Row(
        "not renewable, threshold",
        lease(renewable=False),
        T + 200,
        Action.REISSUE,
        Reason.THRESHOLD,
        T + 200,
        Action.REISSUE,
    ),
    Row(
        "no lease id: as not renewable",
        lease(has_lease_id=False),
        T + 200,
        Action.REISSUE,
        Reason.THRESHOLD,
        T + 200,
        Action.REISSUE,
        frozenset({Note.NO_LEASE_ID}),
    ),
    # Renewal due, but the margin caps the renewal point: ttl 150 -> min(T+100, T+90).
    Row(
        "margin before fraction",
        lease(ttl=150, max_ttl=None),
        T + 85,
        Action.RENEW,
        Reason.RENEWAL_DUE,
        T + 90,
        Action.RENEW,
    ),
    # ttl 200: renewal due at T+133; at T+90 the soonest next run (T+150) is past
    # expiry - margin (T+140): renew now rather than too late...
    Row(
        "cannot wait for the renewal",
        lease(ttl=200, max_ttl=None),
        T + 90,
        Action.RENEW,
        Reason.CANNOT_WAIT,
        T + 400 / 3,
        Action.RENEW,
    ),
    # ...unless the regular timer fires before that anyway.
    Row(
        "regular run comes in time",
        lease(ttl=200, max_ttl=None),
        T + 90,
        Action.NONE,
        Reason.NOT_DUE,
        T + 400 / 3,
        Action.RENEW,
        next_run=T + 100,
    ),
    # A 30-second lease: always due (SHORT_LIFE), renewed at every run, no restart.
    Row(
        "30 s lease, renewable",
        lease(ttl=30, max_ttl=None),
        T + 1,
        Action.RENEW,
        Reason.RENEWAL_DUE,
        T - 30,
        Action.RENEW,
        frozenset({Note.SHORT_LIFE}),
    ),
    Row(
        "30 s lease, not renewable",
        lease(ttl=30, renewable=False),
        T + 1,
        Action.REISSUE,
        Reason.THRESHOLD,
        T - 30,
        Action.REISSUE,
        frozenset({Note.SHORT_LIFE}),
    ),
]

# max_ttl near: ttl 10 min, max_ttl 15 min, floor 5 min. Renewed at T+400, the answer cut
# at the hard end T+900; re-issue threshold T+600 (2/3 of 900); T+900 - margin = T+840.
NEAR = Policy(floor=300)
NEAR_LEASE = lease(ttl=600, max_ttl=900, renewed_at=T + 400, duration=500)
LEASE_ROWS += [
    # At T+550 the soonest next run is T+850: no renewal can keep the lease valid past it
    # plus the margin: re-issue now, before the threshold.
    Row(
        "renewal would not outlast the next run",
        NEAR_LEASE,
        T + 550,
        Action.REISSUE,
        Reason.RENEWAL_TOO_SHORT,
        T + 600,
        Action.REISSUE,
        policy=NEAR,
    ),
    Row(
        "next run still in time",
        NEAR_LEASE,
        T + 530,
        Action.NONE,
        Reason.NOT_DUE,
        T + 600,
        Action.REISSUE,
        policy=NEAR,
    ),
    Row(
        "regular run before the end",
        NEAR_LEASE,
        T + 550,
        Action.NONE,
        Reason.NOT_DUE,
        T + 600,
        Action.REISSUE,
        next_run=T + 599,
        policy=NEAR,
    ),
    Row(
        "not renewable, cannot wait",
        replace(NEAR_LEASE, renewable=False),
        T + 550,
        Action.REISSUE,
        Reason.CANNOT_WAIT,
        T + 600,
        Action.REISSUE,
        policy=NEAR,
    ),
]


@pytest.mark.parametrize("row", LEASE_ROWS, ids=[r.id for r in LEASE_ROWS])
def test_lease_decision(row: Row) -> None:
    got = plan_lease(row.record, row.now, row.next_run, row.policy)
    assert (got.action, got.reason, got.next_action) == (row.action, row.reason, row.next_action)
    assert got.due_at == pytest.approx(row.due)
    assert got.notes == row.notes
    assert got.expires_at == row.record.expires_at
    assert (got.name, got.kind) == ("db", Kind.LEASE)


def test_hard_end_and_expiry() -> None:
    assert lease().expires_at == T + 300
    assert lease(renewed_at=T + 1000, duration=120).expires_at == T + 1120
    assert lease().hard_end == T + 3600
    assert lease(max_ttl=None).hard_end is None
    assert lease(renewable=False, max_ttl=None).hard_end == T + 300
    assert lease(has_lease_id=False).hard_end == T + 300


def test_renewal_answer_shorter_than_asked_reveals_max_ttl() -> None:
    """Vault caps a renewal at max_ttl (tests/test_postgres_fixture.py shows it): the record
    learns its hard end, and planned again in the same run it is re-issued right away."""
    first = issued_lease("db", at=T, lease_duration=300, renewable=True, has_lease_id=True)
    assert first.max_expires_at is None
    full = renewed(first, at=T + 200, lease_duration=299, renewable=True)
    assert full.max_expires_at is None  # within the tolerance: not capped
    assert full.expires_at == T + 499
    capped = renewed(first, at=T + 200, lease_duration=100, renewable=True)
    assert capped.max_expires_at == T + 300
    assert capped.hard_end == T + 300
    again = plan_lease(capped, T + 200, INF, P)
    assert (again.action, again.reason) == (Action.REISSUE, Reason.THRESHOLD)


def test_known_max_ttl_from_config() -> None:
    record = issued_lease(
        "db", at=T, lease_duration=300, renewable=True, has_lease_id=True, max_ttl=3600
    )
    assert record.hard_end == T + 3600
    assert renewed(record, at=T + 200, lease_duration=300, renewable=True).hard_end == T + 3600


def cert(
    not_before: float = T - 30, not_after: float = T + 3570, received_at: float | None = T
) -> Certificate:
    return Certificate("tls", not_before=not_before, not_after=not_after, received_at=received_at)


@dataclass(frozen=True)
class CertRow:
    id: str
    record: Certificate
    now: float
    action: Action
    reason: Reason
    due: float | None
    notes: frozenset[Note] = frozenset()
    next_run: float = INF


CERT_ROWS = [
    # Asked for 1 h at T: not_before T-30 (Vault backdates 30 s), not_after T+3570. Life
    # counted from arrival: re-issue at T + 2/3 * 3570 = T+2380.
    CertRow("fresh", cert(), T + 5, Action.NONE, Reason.NOT_DUE, T + 2380),
    CertRow("just outside slack", cert(), T + 2374, Action.NONE, Reason.NOT_DUE, T + 2380),
    CertRow("threshold", cert(), T + 2376, Action.REISSUE, Reason.THRESHOLD, T + 2380),
    CertRow(
        "expired",
        cert(),
        T + 3570,
        Action.REISSUE,
        Reason.EXPIRED,
        T + 3570,
        frozenset({Note.EXPIRED}),
    ),
    # Arrival unknown (state from an older agent): from not_before.
    CertRow(
        "arrival unknown", cert(received_at=None), T + 5, Action.NONE, Reason.NOT_DUE, T + 2370
    ),
    # Host clock 10 min behind the CA: not valid yet by the local clock. Reported, and
    # the threshold counts from not_before: no re-issue loop.
    CertRow(
        "host clock behind",
        cert(not_before=T + 570, not_after=T + 4200),
        T + 1,
        Action.NONE,
        Reason.NOT_DUE,
        T + 570 + 2 / 3 * 3630,
        frozenset({Note.CLOCK_SKEW}),
    ),
    # Host clock 1000 s ahead: counted from arrival, it is re-issued early (the safe
    # side), not at once.
    CertRow(
        "host clock ahead",
        cert(not_before=T - 1030, not_after=T + 2600),
        T + 1,
        Action.NONE,
        Reason.NOT_DUE,
        T + 2 / 3 * 2600,
    ),
    # Host clock 2 h ahead: expired on arrival. Re-issuing would give the same: nothing,
    # loudly.
    CertRow(
        "expired on arrival",
        cert(not_before=T - 7230, not_after=T - 3600),
        T + 1,
        Action.NONE,
        Reason.CLOCK_AHEAD,
        None,
        frozenset({Note.CLOCK_SKEW, Note.EXPIRED}),
    ),
    # 90 s certificate: the next run (T+61) would be past not_after - margin (T+30).
    CertRow(
        "short certificate",
        cert(not_after=T + 90),
        T + 1,
        Action.REISSUE,
        Reason.CANNOT_WAIT,
        T + 30,
        frozenset({Note.SHORT_LIFE}),
    ),
    CertRow(
        "short, regular run in time",
        cert(not_after=T + 90),
        T + 1,
        Action.NONE,
        Reason.NOT_DUE,
        T + 30,
        frozenset({Note.SHORT_LIFE}),
        next_run=T + 20,
    ),
]


@pytest.mark.parametrize("row", CERT_ROWS, ids=[r.id for r in CERT_ROWS])
def test_certificate_decision(row: CertRow) -> None:
    got = plan_certificate(row.record, row.now, row.next_run, P)
    assert (got.action, got.reason, got.next_action) == (row.action, row.reason, Action.REISSUE)
    assert got.due_at == pytest.approx(row.due)
    assert got.notes == row.notes
    assert got.expires_at == row.record.not_after
    assert got.kind is Kind.CERTIFICATE


def test_fraction_is_configurable() -> None:
    half = Policy(fraction=0.5)
    assert plan_lease(lease(), T + 144, INF, half).action is Action.NONE
    assert plan_lease(lease(), T + 150, INF, half).action is Action.RENEW
    assert plan_certificate(cert(), T + 1779, INF, half).action is Action.NONE
    assert plan_certificate(cert(), T + 1785, INF, half).action is Action.REISSUE


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fraction": 0},
        {"fraction": 1},
        {"fraction": 1.5},
        {"floor": 0},
        {"margin": -1},
        {"slack": -1},
        {"floor": math.inf},
        {"fraction": math.nan},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        Policy(**kwargs)


def test_plan_keeps_order_and_kinds() -> None:
    decisions = plan([cert(), lease(), replace(lease(), name="db2")], T + 10, INF)
    assert [(d.name, d.kind) for d in decisions] == [
        ("tls", Kind.CERTIFICATE),
        ("db", Kind.LEASE),
        ("db2", Kind.LEASE),
    ]


# --- the agent's own schedule ------------------------------------------------------------------


def decision(name: str, due: float | None, action: Action = Action.NONE) -> Decision:
    return Decision(name, Kind.LEASE, action, Reason.NOT_DUE, T + 10_000, Action.RENEW, due)


def test_wakeup_is_the_earliest_due() -> None:
    got = next_wakeup([decision("a", T + 900), decision("b", T + 300), decision("c", None)], T, INF)
    assert (got.at, got.name, got.needed, got.floored) == (T + 300, "b", True, False)


def test_wakeup_never_sooner_than_the_floor() -> None:
    got = next_wakeup([decision("a", T + 10), decision("b", T - 500, Action.REISSUE)], T, INF)
    assert (got.at, got.name, got.needed, got.floored) == (T + 60, "b", True, True)


def test_no_extra_wakeup_when_the_regular_timer_comes_first() -> None:
    got = next_wakeup([decision("a", T + 4000)], T, T + 3600)
    assert got.at == T + 4000
    assert got.needed is False
    assert next_wakeup([decision("a", T + 3000)], T, T + 3600).needed is True


def test_nothing_due() -> None:
    assert next_wakeup([decision("a", None)], T, INF).at is None
    assert next_wakeup([], T, INF).needed is False


def test_timer_seconds_round_up() -> None:
    assert timer_seconds(next_wakeup([decision("a", T + 300.2)], T, INF), T) == 301
    assert timer_seconds(next_wakeup([decision("a", T + 300)], T, INF), T) == 300
    assert timer_seconds(next_wakeup([], T, INF), T) is None


@dataclass
class VaultModel:
    """Vault's lease rules, independent of the planner: a renewal asks for `ttl` and is cut
    at issue + max_ttl; a lease is valid until its expiry."""

    ttl: float
    max_ttl: float
    renewable: bool = True
    #: whether the agent's config tells the planner max_ttl (else a capped renewal does)
    max_ttl_known: bool = True
    issues: int = 0
    renewals: int = 0

    def issue(self, now: float) -> Lease:
        self.issues += 1
        return issued_lease(
            "db",
            at=now,
            lease_duration=self.ttl,
            renewable=self.renewable,
            has_lease_id=True,
            max_ttl=self.max_ttl if self.max_ttl_known else None,
        )

    def renew(self, record: Lease, now: float) -> Lease:
        self.renewals += 1
        duration = min(self.ttl, record.issued_at + self.max_ttl - now)
        return renewed(record, at=now, lease_duration=duration, renewable=True)


def simulate(
    model: VaultModel,
    policy: Policy,
    hours: float,
    regular: float = 3600,
) -> tuple[list[float], list[float]]:
    """Run the agent as systemd would: at the regular timer and at its own wake-ups. Each
    run plans, acts (a capped renewal is planned again in the same run), then schedules.
    Returns the run times and the times of the re-issues."""
    now, record = T, model.issue(T)
    regular_next = T + regular
    runs, reissues = [T], []
    wake = next_wakeup(plan([record], now, regular_next, policy), now, regular_next, policy)
    while now < T + hours * 3600:
        now = min(regular_next, wake.at if wake.at is not None else INF)
        if now == regular_next:
            regular_next += regular
        assert now < record.expires_at, f"lease expired before the run at {now - T}"
        runs.append(now)
        for _ in range(2):
            d = plan_lease(record, now, regular_next, policy)
            if d.action is Action.RENEW:
                record = model.renew(record, now)
                continue  # plan the renewed record again: a capped answer may need more
            if d.action is Action.REISSUE:
                record = model.issue(now)
                reissues.append(now)
            break
        wake = next_wakeup(plan([record], now, regular_next, policy), now, regular_next, policy)
    return runs, reissues


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_simulated_day_renews_on_schedule_and_reissues_once_per_life() -> None:
    """ttl 1 h, max_ttl 24 h, hourly timer: renewals every 40 min (2/3 of the term), a
    re-issue at 2/3 of the 24 h (16 h), the lease never expires, no run closer than the
    floor."""
    model = VaultModel(ttl=3600, max_ttl=86_400)
    runs, reissues = simulate(model, P, hours=24)
    assert [r - T for r in reissues] == [pytest.approx(16 * 3600, abs=P.slack)]
    assert model.issues == 2
    assert min(gaps(runs)) >= P.floor
    assert model.renewals <= 24 * 3600 / 2400 + 2


def test_simulated_day_with_max_ttl_unknown_reissues_when_a_renewal_is_capped() -> None:
    """Without max_ttl in the config, the first capped renewal tells it (at 23 h 20 min
    here): re-issued in that same run, with 40 min of the old lease left, never expired."""
    model = VaultModel(ttl=3600, max_ttl=86_400, max_ttl_known=False)
    runs, reissues = simulate(model, P, hours=24)
    assert min(gaps(runs)) >= P.floor
    assert len(reissues) == 1
    assert 86_400 - 3600 < reissues[0] - T < 86_400 - P.margin


def test_simulated_30_second_lease_cannot_make_the_agent_spin() -> None:
    """A 30 s lease: one run per floor (60 s) at most, every one a renewal, never a tight
    loop. (It does expire between runs: SHORT_LIFE says so.)"""
    model = VaultModel(ttl=30, max_ttl=3600)
    now, record = T, model.issue(T)
    runs = 0
    while now < T + 3600:
        d = plan_lease(record, now, INF, P)
        assert Note.SHORT_LIFE in d.notes
        if d.action is Action.RENEW:
            record = model.renew(record, now) if now < record.expires_at else record
        elif d.action is Action.REISSUE:
            record = model.issue(now)
        wake = next_wakeup(plan([record], now, INF, P), now, INF, P)
        assert wake.at is not None
        assert wake.at - now >= P.floor
        now = wake.at
        runs += 1
    assert runs <= 3600 / P.floor + 1


def test_simulated_short_max_ttl_reissues_before_expiry() -> None:
    """ttl 5 min, max_ttl 15 min, hourly timer: the agent's own wake-ups keep it valid,
    re-issuing at 2/3 of every 15 min."""
    model = VaultModel(ttl=300, max_ttl=900)
    runs, reissues = simulate(model, P, hours=3)
    assert min(gaps(runs)) >= P.floor
    every = gaps([T, *reissues])
    assert len(every) == 3 * 3600 / 600
    assert all(g == pytest.approx(600, abs=P.slack) for g in every), every


def test_simulated_non_renewable_lease() -> None:
    model = VaultModel(ttl=1800, max_ttl=1800, renewable=False)
    runs, reissues = simulate(model, P, hours=4)
    assert model.renewals == 0
    assert min(gaps(runs)) >= P.floor
    every = gaps([T, *reissues])
    assert all(g == pytest.approx(1200, abs=P.slack) for g in every), every


@given(
    ttl=st.floats(1, 86_400 * 30),
    elapsed=st.floats(0, 86_400 * 60),
    renewable=st.booleans(),
    max_ttl=st.one_of(st.none(), st.floats(1, 86_400 * 60)),
    next_in=st.floats(0, 86_400),
)
def test_any_lease_gets_a_consistent_decision(
    ttl: float, elapsed: float, renewable: bool, max_ttl: float | None, next_in: float
) -> None:
    record = issued_lease(
        "db", at=T, lease_duration=ttl, renewable=renewable, has_lease_id=True, max_ttl=max_ttl
    )
    now = T + elapsed
    d = plan_lease(record, now, now + next_in, P)
    if now >= record.expires_at:
        assert d.action is Action.REISSUE
    if d.action is Action.NONE:
        assert d.due_at is not None
        assert d.due_at > now + P.slack
        assert min(now + next_in, now + P.floor) <= record.expires_at - P.margin
    if d.action is Action.RENEW:
        assert record.can_renew
    if not record.can_renew:
        assert d.action is not Action.RENEW
    wake = next_wakeup([d], now, now + next_in, P)
    assert wake.at is not None
    assert wake.at >= now + P.floor


# --- the order of a refresh that re-issues ------------------------------------------------------

USERS = {
    "db": ["app.service", "worker.service"],
    "tls": ["web.service"],
    "cache": ["cache.service"],
}


def acting(name: str, action: Action, kind: Kind = Kind.LEASE) -> Decision:
    return Decision(name, kind, action, Reason.THRESHOLD, T, action, T)


def test_renewals_alone_restart_nothing() -> None:
    steps = refresh_steps(
        [acting("db", Action.RENEW), acting("tls", Action.NONE, Kind.CERTIFICATE)], USERS
    )
    assert steps == (Step(Verb.RENEW, "db", Which.OLD),)


def test_old_lease_revoked_only_after_every_unit_using_it_is_active() -> None:
    steps = refresh_steps(
        [
            acting("db", Action.REISSUE),
            acting("tls", Action.REISSUE, Kind.CERTIFICATE),
            acting("cache", Action.NONE),
        ],
        USERS,
    )
    verbs = [s.verb for s in steps]
    assert steps[:2] == (Step(Verb.ISSUE, "db", Which.NEW), Step(Verb.ISSUE, "tls", Which.NEW))
    assert verbs.index(Verb.RENDER) < verbs.index(Verb.SWITCH) < verbs.index(Verb.RESTART)
    restarted = {s.target for s in steps if s.verb is Verb.RESTART}
    assert restarted == {"app.service", "worker.service", "web.service"}  # not cache
    revoke = steps.index(Step(Verb.REVOKE, "db", Which.OLD))
    waits = [i for i, s in enumerate(steps) if s.verb is Verb.WAIT_ACTIVE]
    assert len(waits) == 3
    assert revoke > max(waits)
    # A certificate without a lease is left to expire.
    assert not any(s.verb is Verb.REVOKE and s.target == "tls" for s in steps)


def test_no_lease_id_means_nothing_to_revoke() -> None:
    d = replace(acting("db", Action.REISSUE), notes=frozenset({Note.NO_LEASE_ID}))
    assert not any(s.verb is Verb.REVOKE for s in refresh_steps([d], USERS))


def test_rollback_keeps_the_old_credentials_and_revokes_the_new() -> None:
    steps = rollback_steps(
        [acting("db", Action.REISSUE), acting("tls", Action.REISSUE, Kind.CERTIFICATE)],
        USERS,
        ["worker.service"],
    )
    assert steps[0] == Step(Verb.SWITCH_BACK)
    assert Step(Verb.REVOKE, "db", Which.NEW) in steps
    assert not any(s.which is Which.OLD for s in steps)
    revoke = steps.index(Step(Verb.REVOKE, "db", Which.NEW))
    assert all(i < revoke for i, s in enumerate(steps) if s.verb is Verb.WAIT_ACTIVE)
    assert {s.target for s in steps if s.verb is Verb.RESTART} == {
        "app.service",
        "worker.service",
        "web.service",
    }
    assert steps[-1] == Step(Verb.ALERT, "worker.service")


def test_status_entry_holds_times_and_names_only() -> None:
    d = plan_lease(lease(has_lease_id=False), T + 10, INF, P)
    assert status_entry(d) == {
        "name": "db",
        "kind": "lease",
        "expires_at": T + 300,
        "action": "none",
        "reason": "not due",
        "next_action": "reissue",
        "next_action_at": T + 200,
        "notes": ["no_lease_id"],
    }
