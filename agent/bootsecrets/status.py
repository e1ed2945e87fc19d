"""`bootsecrets status`: what runs with which secret versions, without a single value.

Everything comes from the state file the last bootstrap/refresh wrote and from
`systemctl is-active`; Vault is not contacted, so status works when Vault is down.
The `--json` shape is documented in docs/status.md and versioned by `version`.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from bootsecrets.agent import Context, load_token
from bootsecrets.config import RebootPolicy, load_config
from bootsecrets.store import Store

STATUS_VERSION = 1


def collect(ctx: Context) -> dict[str, Any]:
    config = load_config(ctx.paths.config, env=ctx.env)
    store = Store(ctx.paths.with_store(config.store))
    state = store.load_state() if store.paths.store.is_dir() else {}
    live = store.current_generation() if store.paths.store.is_dir() else None
    systemctl = ctx.systemctl()
    units = []
    recorded = state.get("units") or {}
    skipped = state.get("skipped") or {}
    for service in config.services:
        unit_state = recorded.get(service.unit) or {}
        units.append({
            "unit": service.unit,
            "active": systemctl.is_active(service.unit),
            "required": service.required,
            "generation": unit_state.get("generation"),
            "delivery": unit_state.get("delivery", []),
            "on_change": service.on_change.value,
            "secrets": unit_state.get("secrets", []),
            "changed_since_restart": bool(
                unit_state and unit_state.get("values_generation", 0)
                > unit_state.get("restarted_generation", 0)),
            "rendered": bool(unit_state) and live is not None,
            "left_out": skipped.get(service.unit),
        })
    token = dict(state.get("token") or {})
    if token.get("expires_at"):
        expires = datetime.datetime.fromisoformat(token["expires_at"])
        remaining = (expires - datetime.datetime.now(datetime.UTC)).total_seconds()
        token["ttl_remaining"] = max(0, int(remaining))
    has_token = load_token(config, store.paths) is not None
    provisioned = live is not None and has_token
    return {
        "version": STATUS_VERSION,
        "reboot_policy": config.reboot_policy.value,
        "provisioned": provisioned,
        "generation": live,
        "token": token or None,
        "token_kept": has_token,
        "last_run": state.get("last_run"),
        "last_success": state.get("last_success"),
        "units": units,
        "action": None if provisioned else _recovery(config.reboot_policy, has_token),
    }


def _recovery(policy: RebootPolicy, has_token: bool) -> str:
    if has_token:
        return "run `bootsecrets bootstrap` (or `systemctl restart bootsecrets`)"
    return ("re-provision: pipe a new wrapped secret-id into "
            "`bootsecrets refresh --wrapped-secret-id -`"
            + (" (reboot policy reprovision keeps no token across reboots)"
               if policy is RebootPolicy.REPROVISION else ""))


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
        lines.append(f"last run:      {last['command']} at {last['at']}: {last['outcome']}"
                     + (f" ({last['error']})" if last.get("error") else ""))
    for unit in report["units"]:
        secrets = ", ".join(
            f"{s['path']}" + (f"@v{s['version']}" if s.get("version") else "")
            for s in unit["secrets"]
        ) or "-"
        flag = " (values changed since last restart)" if unit["changed_since_restart"] else ""
        fetched = unit["secrets"][0]["fetched_at"] if unit["secrets"] else "-"
        lines.append(f"{unit['unit']}: {unit['active']}, generation "
                     f"{unit['generation'] if unit['generation'] is not None else '-'}, "
                     f"secrets {secrets}, fetched {fetched}{flag}")
        if unit["left_out"]:
            lines.append(f"  left out: {unit['left_out']}")
    if report["action"]:
        lines.append(f"action needed: {report['action']}")
    return "\n".join(lines)
