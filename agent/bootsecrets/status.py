"""`bootsecrets status`: what runs with which secret versions, without a single value.

Everything comes from the state file the last bootstrap/refresh wrote and from systemd
(`is-active`, and each unit's InvocationID to tell whether a restart is still due); Vault is
not contacted, so status works when Vault is down. The `--json` shape is documented in
docs/status.md and versioned by `version`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

from bootsecrets.config import Config, RebootPolicy
from bootsecrets.context import Context
from bootsecrets.identity import load_token
from bootsecrets.state import State
from bootsecrets.store import Store

# The modules of encrypted directories, volumes and leases are loaded only when there is
# such a thing to show (features.py says why).

STATUS_VERSION = 1


def collect(ctx: Context) -> dict[str, Any]:
    config = ctx.load_config()
    store = Store(ctx.paths.with_store(config.store))
    exists = store.paths.store.is_dir()
    live = store.current_generation() if exists else None
    state = State.from_json(store.load_state()).settled(live) if exists else State()
    systemctl = ctx.systemctl()
    behind = [u for u, s in state.units.items() if s.behind]
    invocations = systemctl.invocation_ids(behind) if live is not None else {}
    units = []
    for service in config.services:
        unit_state = state.units.get(service.unit)
        units.append(
            {
                "unit": service.unit,
                "active": systemctl.is_active(service.unit),
                "required": service.required,
                "generation": unit_state.generation if unit_state else None,
                "values_generation": unit_state.values_generation if unit_state else None,
                "running_generation": unit_state.running_generation if unit_state else None,
                "delivery": list(unit_state.delivery) if unit_state else [],
                "on_change": service.on_change.value,
                "secrets": [dataclasses.asdict(s) for s in unit_state.secrets]
                if unit_state
                else [],
                "changed_since_restart": bool(unit_state and unit_state.behind),
                "restart_pending": bool(
                    unit_state
                    and live is not None
                    and unit_state.restart_pending(invocations.get(service.unit))
                ),
                "rendered": unit_state is not None and live is not None,
                "left_out": state.skipped.get(service.unit),
            }
        )
    token: dict[str, Any] | None = dataclasses.asdict(state.token) if state.token else None
    if token and token.get("expires_at"):
        expires = datetime.datetime.fromisoformat(token["expires_at"])
        remaining = (expires - datetime.datetime.now(datetime.UTC)).total_seconds()
        token["ttl_remaining"] = max(0, int(remaining))
    has_token = load_token(config.reboot_policy, store.paths) is not None
    provisioned = live is not None and has_token
    return {
        "version": STATUS_VERSION,
        "reboot_policy": config.reboot_policy.value,
        "provisioned": provisioned,
        "generation": live,
        "token": token,
        "token_kept": has_token,
        "last_run": dataclasses.asdict(state.last_run) if state.last_run else None,
        "last_success": dataclasses.asdict(state.last_success) if state.last_success else None,
        "units": units,
        "directories": _directories(config, store),
        "volumes": _volumes(config, store, ctx),
        "leases": _leases(config, state, ctx.clock()),
        "wakeup_at": state.wakeup_at,
        "action": None if provisioned else _recovery(config.reboot_policy, has_token),
    }


def _directories(config: Config, store: Store) -> list[dict[str, Any]]:
    if not config.directories:
        return []
    from bootsecrets import dirstatus  # noqa: PLC0415 (see the imports)

    return dirstatus.collect(config, store.paths)


def _volumes(config: Config, store: Store, ctx: Context) -> list[dict[str, Any]]:
    if not config.volumes:
        return []
    from bootsecrets import volstatus  # noqa: PLC0415 (see the imports)

    return volstatus.collect(config, store.paths, ctx.block_runner)


def _leases(config: Config, state: State, now: float) -> list[dict[str, Any]]:
    """Every lease and certificate held: expiry, the action due now and the next one, with
    when (epoch seconds, planned as the next run would). No value, no lease ID."""
    if not state.leases:
        return []
    from bootsecrets.leases import status_entry  # noqa: PLC0415 (see the imports)
    from bootsecrets.wakeup import decisions  # noqa: PLC0415

    out = []
    for decision in decisions(config.secrets, state.leases, config.leases, now):
        held = state.leases[decision.name]
        entry = status_entry(decision)
        entry.update(
            path=held.path,
            version=held.version,
            lease=held.has_lease_id,
            issued_at=held.issued_at,
            renewed_at=held.renewed_at,
            max_expires_at=held.max_expires_at,
            serial_number=held.serial_number,
            older=held.older,
            revoke_pending=held.revoke_pending,
        )
        out.append(entry)
    return out


def _at(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="seconds")


def _recovery(policy: RebootPolicy, has_token: bool) -> str:
    if has_token:
        return "run `bootsecrets bootstrap` (or `systemctl restart bootsecrets`)"
    return (
        "re-provision: pipe a new wrapped secret-id into "
        "`bootsecrets refresh --wrapped-secret-id -`"
        + (
            " (reboot policy reprovision keeps no token across reboots)"
            if policy is RebootPolicy.REPROVISION
            else ""
        )
    )


def format_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)


def format_text(report: dict[str, Any]) -> str:
    lines = [
        f"reboot policy: {report['reboot_policy']}",
        f"generation:    {report['generation'] if report['generation'] is not None else '-'}",
    ]
    token = report["token"]
    if token:
        lines.append(
            f"token:         accessor {token.get('accessor')}, "
            f"{token.get('ttl_remaining', '?')}s left, "
            f"{'renewable' if token.get('renewable') else 'not renewable'}"
        )
    else:
        lines.append("token:         none")
    last = report["last_run"]
    if last:
        lines.append(
            f"last run:      {last['command']} at {last['at']}: {last['outcome']}"
            + (f" ({last['error']})" if last.get("error") else "")
        )
    for unit in report["units"]:
        secrets = (
            ", ".join(
                f"{s['path']}" + (f"@v{s['version']}" if s.get("version") else "")
                for s in unit["secrets"]
            )
            or "-"
        )
        flag = ""
        if unit["restart_pending"]:
            flag = " (restart pending: runs with older values)"
        elif unit["changed_since_restart"]:
            flag = " (values changed since last restart)"
        fetched = unit["secrets"][0]["fetched_at"] if unit["secrets"] else "-"
        lines.append(
            f"{unit['unit']}: {unit['active']}, generation "
            f"{unit['generation'] if unit['generation'] is not None else '-'}, "
            f"secrets {secrets}, fetched {fetched}{flag}"
        )
        if unit["left_out"]:
            lines.append(f"  left out: {unit['left_out']}")
    if report["directories"]:
        from bootsecrets import dirstatus  # noqa: PLC0415 (see the imports)

        lines.extend(dirstatus.format_line(d) for d in report["directories"])
    if report["volumes"]:
        from bootsecrets import volstatus  # noqa: PLC0415 (see the imports)

        lines.extend(volstatus.format_line(v) for v in report["volumes"])
    for lease in report["leases"]:
        now = "" if lease["action"] == "none" else f"{lease['action']} now ({lease['reason']}); "
        notes = f" [{', '.join(lease['notes'])}]" if lease["notes"] else ""
        lines.append(
            f"{lease['kind']} {lease['name']} ({lease['path']}) v{lease['version']}: "
            f"expires {_at(lease['expires_at'])}; {now}next {lease['next_action']} "
            f"at {_at(lease['next_action_at'])}{notes}"
        )
    if report["leases"]:
        lines.append(f"wake-up:       {_at(report['wakeup_at'])}")
    if report["action"]:
        lines.append(f"action needed: {report['action']}")
    return "\n".join(lines)
