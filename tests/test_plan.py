"""plan.plan_refresh as a table, without OpenBao or a store: what a run writes, keeps,
starts, restarts or reloads, from what was rendered, what is live and what is still due."""

from __future__ import annotations

import dataclasses

import pytest

from bootsecrets.config import Config, RebootPolicy
from bootsecrets.model import Rendered, RenderedUnit, UnitBytes
from bootsecrets.plan import NOTHING, RefreshPlan, plan_refresh
from bootsecrets.serviceconfig import OnChange, Service, Template
from bootsecrets.vaultconfig import VaultSettings

A, B, C = "a.service", "b.service", "c.service"
OLD, NEW = b'X="old"\n', b'X="new"\n'


def config(**on_change: OnChange) -> Config:
    template = Template("X", "{{ secrets.s.x }}", frozenset({"s"}))
    services = tuple(
        Service(
            unit,
            environment=(template,),
            on_change=on_change.get(unit[0], OnChange.RESTART),
            required=unit != C,
        )
        for unit in (A, B, C)
    )
    return Config(
        source="config.yaml",
        vault=VaultSettings(addresses=("http://v:8200",)),
        approle_mount="approle",
        role="r",
        reboot_policy=RebootPolicy.REPROVISION,
        secrets={},
        services=services,
    )


def rendered(units: dict[str, bytes], skipped: tuple[str, ...] = ()) -> Rendered:
    return Rendered(
        {u: RenderedUnit(u, env) for u, env in units.items()},
        {},
        dict.fromkeys(skipped, "left out"),
    )


def live(**env: bytes) -> dict[str, UnitBytes]:
    return {f"{u}.service": (e, {}) for u, e in env.items()}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    config: Config
    rendered: Rendered
    live: dict[str, UnitBytes]
    expected: RefreshPlan
    restart_due: frozenset[str] = frozenset()
    start_due: frozenset[str] = frozenset()


ROWS = [
    Row(
        "nothing live: every unit is new and started",
        config(),
        rendered({A: NEW, B: NEW}),
        {},
        RefreshPlan(write=(A, B), start=(A, B)),
    ),
    Row(
        "nothing changed: nothing to do",
        config(),
        rendered({A: OLD, B: OLD}),
        live(a=OLD, b=OLD),
        RefreshPlan(keep=(A, B)),
    ),
    Row(
        "one changed: only it is written and restarted",
        config(),
        rendered({A: NEW, B: OLD}),
        live(a=OLD, b=OLD),
        RefreshPlan(write=(A,), keep=(B,), restart=(A,)),
    ),
    Row(
        "on_change reload",
        config(a=OnChange.RELOAD),
        rendered({A: NEW, B: OLD}),
        live(a=OLD, b=OLD),
        RefreshPlan(write=(A,), keep=(B,), reload=(A,)),
    ),
    Row(
        "on_change none: switched, not restarted",
        config(a=OnChange.NONE),
        rendered({A: NEW, B: OLD}),
        live(a=OLD, b=OLD),
        RefreshPlan(write=(A,), keep=(B,), switch_only=(A,)),
    ),
    Row(
        "a credential changed, the env file did not",
        config(),
        Rendered({A: RenderedUnit(A, OLD, {"k": b"2"}), B: RenderedUnit(B, OLD)}, {}, {}),
        {A: (OLD, {"k": b"1"}), B: (OLD, {})},
        RefreshPlan(write=(A,), keep=(B,), restart=(A,)),
    ),
    Row(
        "a unit new to a live host is started, not restarted",
        config(),
        rendered({A: OLD, B: NEW}),
        live(a=OLD),
        RefreshPlan(write=(B,), keep=(A,), start=(B,)),
    ),
    Row(
        "an optional unit left out keeps its live files",
        config(),
        rendered({A: OLD, B: OLD}, skipped=(C,)),
        live(a=OLD, b=OLD, c=OLD),
        RefreshPlan(keep=(A, B, C)),
    ),
    Row(
        "an optional unit left out with nothing live gets nothing",
        config(),
        rendered({A: OLD, B: OLD}, skipped=(C,)),
        live(a=OLD, b=OLD),
        RefreshPlan(keep=(A, B)),
    ),
    Row(
        "a restart left due by an interrupted run, bytes unchanged",
        config(),
        rendered({A: NEW, B: OLD}),
        live(a=NEW, b=OLD),
        RefreshPlan(keep=(A, B), restart=(A,)),
        restart_due=frozenset({A}),
    ),
    Row(
        "due and changed again: restarted once",
        config(),
        rendered({A: NEW, B: OLD}),
        live(a=OLD, b=OLD),
        RefreshPlan(write=(A,), keep=(B,), restart=(A,)),
        restart_due=frozenset({A}),
    ),
    Row(
        "a reload left due",
        config(b=OnChange.RELOAD),
        rendered({A: OLD, B: NEW}),
        live(a=OLD, b=NEW),
        RefreshPlan(keep=(A, B), reload=(B,)),
        restart_due=frozenset({B}),
    ),
    Row(
        "a start left due (rendered, never started)",
        config(),
        rendered({A: OLD, B: OLD}),
        live(a=OLD, b=OLD),
        RefreshPlan(keep=(A, B), start=(B,)),
        start_due=frozenset({B}),
    ),
    Row(
        "a unit no longer in the config is dropped",
        config(),
        rendered({A: OLD, B: OLD}),
        live(a=OLD, b=OLD, z=OLD),
        RefreshPlan(keep=(A, B)),
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_plan_refresh(row: Row) -> None:
    plan = plan_refresh(row.config, row.rendered, row.live, row.restart_due, row.start_due)
    assert plan == row.expected
    assert plan.switches == bool(row.expected.write)
    assert set(plan.restarted) <= set(row.rendered.units)


def test_nothing_is_the_empty_pair() -> None:
    assert NOTHING == (None, {})
