"""From a render to running units: write a generation, switch `current`, restart what
changed (or what an interrupted run left due), roll back a unit that does not come up.

At boot (and whenever `bootstrap` runs) every start and restart is queued with --no-block:
the units are ordered after bootsecrets.service, which is still starting, so waiting would
deadlock; there is nothing to roll back to either. `refresh` restarts, waits for each unit
and rolls a failed one back to the values it ran with.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import NoReturn

from bootsecrets import logs
from bootsecrets.context import Run, shared_store
from bootsecrets.errors import UnitFailed
from bootsecrets.model import HELD_BACK, Rendered, UnitBytes
from bootsecrets.plan import RefreshPlan, plan_refresh
from bootsecrets.state import SecretState, State, Switch, UnitState, now
from bootsecrets.systemd import dropin_text, write_dropins

log = logging.getLogger(__name__)


def deploy(
    run: Run,
    rendered: Rendered,
    *,
    at_boot: bool,
    reload: bool = False,
    together: Iterable[frozenset[str]] = (),
) -> None:
    """`at_boot`: start every unit (queued); otherwise only what the plan says. `reload`:
    another drop-in changed already (encrypted directories'), so systemd must reload.
    `together`: groups of units that roll back as one (the users of re-issued credentials:
    the old credentials are still valid, the new ones are revoked once none of them holds
    them)."""
    state, restart_due, start_due = recover(run, run.load_state())
    before = dict(state.units)
    live_generation = run.store.current_generation()
    live: dict[str, UnitBytes] = {}
    if live_generation is not None:
        live = {
            u: run.store.read_unit(live_generation, u) for u in (*rendered.units, *rendered.skipped)
        }
    plan = plan_refresh(run.config, rendered, live, restart_due, start_due)
    if write_dropins(run.paths, _dropins(run, rendered.units)) or reload:
        run.systemctl.daemon_reload()
    # Nothing runs with secrets yet (a boot, or a re-provisioning after one): the units'
    # start jobs wait for bootsecrets.service, so queue them and do not wait.
    queue_only = at_boot or live_generation is None
    if at_boot:
        plan = dataclasses.replace(plan, start=tuple(rendered.units))
    units = _unit_states(run, rendered, state, live_generation)
    generation = live_generation
    if plan.switches or generation is None:
        generation = _switch(run, state, rendered, plan, live_generation, units)
        stale = {} if queue_only else run.systemctl.invocation_ids([*plan.restart, *plan.reload])
        units = {
            u: dataclasses.replace(
                s,
                generation=generation,
                values_generation=generation if u in plan.write else s.values_generation,
                stale_invocation=stale.get(u) if u in plan.write else s.stale_invocation,
            )
            for u, s in units.items()
        }
        state = run.save(
            dataclasses.replace(
                state, switching=None, generation=generation, units=units, skipped=rendered.skipped
            )
        )
        log.info(
            "generation %s live; new values for %s", generation, ", ".join(plan.write) or "no unit"
        )

    def restarted(done: tuple[str, ...]) -> None:
        nonlocal state, units
        units = {
            u: dataclasses.replace(s, running_generation=s.values_generation, stale_invocation=None)
            if u in done
            else s
            for u, s in units.items()
        }
        state = run.save(dataclasses.replace(state, units=units))

    failed = _restart(run, plan, restarted, queue_only=queue_only)
    if failed:
        with_them = [
            u
            for group in together
            if group & set(failed)
            for u in sorted(group)
            if u not in failed and u in plan.write
        ]
        _roll_back(
            run,
            rendered,
            state,
            units,
            plan,
            failed,
            live_generation,
            generation,
            with_them=list(dict.fromkeys(with_them)),
            before=before,
        )
    run.store.remove_generations(keep=frozenset({generation}))
    run.record(state, generation=generation, units=units, skipped=rendered.skipped)
    done_text = "; ".join(
        f"{verb} {', '.join(names)}"
        for verb, names in (
            ("started", plan.start),
            ("restarted", plan.restart),
            ("reloaded", plan.reload),
        )
        if names
    )
    if done_text:
        log.info("%s: %s", run.command, done_text)
    elif not plan.switches:
        log.info("%s: nothing changed", run.command)


def recover(run: Run, state: State) -> tuple[State, frozenset[str], frozenset[str]]:
    """Finish the bookkeeping of a run that was stopped: adopt a switch that happened, and
    find the units still due for a restart (or a start: never started by the agent, or held
    back by locked data at rest, so not running)."""
    current = run.store.current_generation()
    if state.switching is not None and state.switching.to == current:
        log.info("finishing an interrupted run: generation %s had gone live", current)
    state = state.settled(current)
    if current is None:
        return state, frozenset(), frozenset()
    held = frozenset(u for u, why in state.skipped.items() if why.startswith(HELD_BACK))
    behind = [u for u, s in state.units.items() if s.behind and s.on_change != "none"]
    if not behind:
        return state, frozenset(), held
    invocations = run.systemctl.invocation_ids(behind)
    restart_due, start_due, units = set(), set(), dict(state.units)
    for unit in behind:
        unit_state, invocation = units[unit], invocations.get(unit)
        if unit_state.running_generation is None and invocation == "":
            start_due.add(unit)
        elif unit_state.restart_pending(invocation):
            restart_due.add(unit)
        else:  # started again since its values changed, or not running: it has them
            units[unit] = dataclasses.replace(
                unit_state,
                running_generation=(
                    unit_state.values_generation if invocation else unit_state.running_generation
                ),
                stale_invocation=None,
            )
    if restart_due or start_due:
        log.info(
            "restarts left due by an earlier run: %s", ", ".join(sorted(restart_due | start_due))
        )
    return (
        dataclasses.replace(state, units=units),
        frozenset(restart_due),
        frozenset(start_due) | held,
    )


def _switch(
    run: Run,
    state: State,
    rendered: Rendered,
    plan: RefreshPlan,
    live: int | None,
    units: Mapping[str, UnitState],
) -> int:
    """Write the new generation, note which units it changes, make it current. The previous
    generation stays until the restarted units are up (a rollback links from it)."""
    kept = {u: live for u in plan.keep if live is not None}
    number = run.store.write_generation(
        {u: rendered.units[u] for u in plan.write},
        run.specs,
        linked=kept,
        shared=shared_store(run.config),
    )
    run.save(
        dataclasses.replace(
            state,
            switching=Switch(
                number, plan.write, {u: units[u].secrets for u in plan.write if u in units}
            ),
        )
    )
    run.store.switch(number)
    return number


def _restart(
    run: Run,
    plan: RefreshPlan,
    restarted: Callable[[tuple[str, ...]], None],
    *,
    queue_only: bool,
) -> list[str]:
    """Start, restart or reload per plan, noting each unit as done (`restarted`) as soon as
    systemd has it, so that a run stopped in between repeats none of them; return the units
    that did not become active."""
    systemctl = run.systemctl
    if plan.start:
        systemctl.start_no_block(list(plan.start))
        restarted(plan.start)
    for unit in (*plan.restart, *plan.reload):
        systemctl.try_restart(unit, reload=unit in plan.reload, block=not queue_only)
        restarted((unit,))
    if queue_only:
        return []
    return [
        u
        for u in plan.restarted
        if systemctl.wait_active(u, run.config.restart_timeout) != "active"
    ]


def _roll_back(
    run: Run,
    rendered: Rendered,
    state: State,
    units: dict[str, UnitState],
    plan: RefreshPlan,
    failed: list[str],
    live: int | None,
    generation: int,
    *,
    with_them: list[str],
    before: Mapping[str, UnitState],
) -> NoReturn:
    """Give the failed units (and `with_them`, units that must not stay on the values they
    share with them) the values they ran with, kept in the previous generation, and restart
    them; alert. A unit restarted only because an earlier run left it due has no older
    values here: it is restarted once more and reported."""
    restorable = [u for u in (*failed, *with_them) if u in plan.write] if live is not None else []
    rollback = generation
    if live is not None and restorable:
        linked = {u: live if u in restorable else generation for u in (*plan.write, *plan.keep)}
        rollback = run.store.write_generation(
            {}, {}, linked=linked, shared=shared_store(run.config)
        )
        run.save(
            dataclasses.replace(
                state,
                switching=Switch(
                    rollback,
                    tuple(restorable),
                    {u: before[u].secrets for u in restorable if u in before},
                ),
            )
        )
        run.store.switch(rollback)
    for unit in (*failed, *(u for u in with_them if u in restorable)):
        run.systemctl.try_restart(unit)
    units = {
        u: dataclasses.replace(
            s,
            generation=rollback,
            values_generation=rollback if u in restorable else s.values_generation,
            running_generation=rollback if u in restorable else s.running_generation,
            secrets=before[u].secrets if u in restorable and u in before else s.secrets,
        )
        for u, s in units.items()
    }
    run.store.remove_generations(keep=frozenset({rollback}))
    paths_changed = sorted(
        {p for u in failed if u in rendered.units for p in rendered.units[u].secret_paths}
    )
    also = [u for u in with_them if u in restorable]
    err = UnitFailed(
        f"{', '.join(failed)} did not become active with new values from "
        f"{', '.join(paths_changed) or 'the config'}; "
        + ("previous values restored" if restorable else "no previous values to restore")
        + (f" (also for {', '.join(also)}, which shared them)" if also else "")
    )
    logs.alert(err, UNIT=",".join(failed), SECRET_PATH=",".join(paths_changed))
    run.record(
        state,
        outcome="rolled-back",
        error=err,
        generation=rollback,
        units=units,
        skipped=rendered.skipped,
    )
    raise err


def _unit_states(
    run: Run, rendered: Rendered, state: State, live: int | None
) -> dict[str, UnitState]:
    """Each unit's record for this run, before its values change: what was read for it now,
    what it runs with as before. Optional units left out keep their record if they keep
    their files."""
    units: dict[str, UnitState] = {}
    fetched = now()
    for service in run.config.services:
        unit = service.unit
        old = state.units.get(unit)
        if unit not in rendered.units:
            if old is not None and unit in rendered.skipped and live is not None:
                units[unit] = old
            continue
        secrets = tuple(
            SecretState(data.name, data.path, data.version, data.lease_duration, fetched)
            for data in (
                rendered.secrets[n] for n in sorted(service.secrets) if n in rendered.secrets
            )
        )
        delivery = tuple(
            d
            for d, on in (
                ("environment", service.uses_environment),
                ("credentials", bool(service.credentials)),
            )
            if on
        )
        base = old or UnitState(generation=live or 0, values_generation=live or 0)
        units[unit] = dataclasses.replace(
            base, delivery=delivery, on_change=service.on_change.value, secrets=secrets
        )
    return units


def _dropins(run: Run, units: Iterable[str]) -> Mapping[str, str]:
    wanted = set(units)
    return {
        s.unit: dropin_text(
            s.unit,
            run.paths,
            env_file=s.uses_environment,
            credentials=[t.name for t in s.credentials],
        )
        for s in run.config.services
        if s.unit in wanted
    }
