"""The agent's own schedule (docs/leases.md): after every run with leased secrets, a transient
timer, `bootsecrets-wakeup.timer`, starts `bootsecrets-refresh.service` before the earliest
lease or certificate deadline (never sooner than `leases.floor`).

    systemctl stop bootsecrets-wakeup.timer
    systemd-run --unit=bootsecrets-wakeup --on-active=<s>s ... \\
        /usr/bin/systemctl start --no-block bootsecrets-refresh.service

A transient timer rather than a runtime drop-in on bootsecrets-refresh.timer: no file, no
`daemon-reload` (which re-reads every unit and would make a refresh with nothing due
expensive), a monotonic clock (`OnActiveSec=`: immune to the clock steps of a first boot),
and the regular timer's `RandomizedDelaySec=` left alone. The wake-up starts the same
hardened service as the regular timer, so runs stay serialized (by the unit and the lock).
Like everything under /run it is gone at reboot, when bootstrap plans afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping

from bootsecrets import leasestore
from bootsecrets.config import SecretRef
from bootsecrets.context import Run
from bootsecrets.errors import (
    BootsecretsError,
    CertificateRefused,
    CommandFailed,
    Interrupted,
    LeaseExpired,
    LeaseIssueFailed,
    LeaseRenewalRefused,
    LeaseRevokeFailed,
    PermissionDenied,
    SecretMissing,
    UnitFailed,
    VaultError,
    VaultUnreachable,
)
from bootsecrets.leases import Action, Decision, Policy, next_wakeup, plan, timer_seconds
from bootsecrets.leasespec import policy_for
from bootsecrets.state import LeasedState
from bootsecrets.systemd import Runner, Systemctl

log = logging.getLogger(__name__)

UNIT = "bootsecrets-wakeup"
TIMER = f"{UNIT}.timer"
REFRESH = "bootsecrets-refresh.service"
SYSTEMCTL = "/usr/bin/systemctl"


def command(systemd_run: str, seconds: int) -> list[str]:
    """The systemd-run argv of a wake-up in `seconds` (names and numbers only)."""
    return [
        systemd_run,
        f"--unit={UNIT}",
        "--description=bootsecrets: next lease deadline",
        f"--on-active={seconds}s",
        "--timer-property=AccuracySec=1s",
        "--timer-property=RemainAfterElapse=no",
        "--property=Type=oneshot",
        "--collect",
        "--quiet",
        SYSTEMCTL,
        "start",
        "--no-block",
        REFRESH,
    ]


def arm(runner: Runner, systemd_run: str, systemctl: Systemctl, seconds: int) -> bool:
    """Replace the wake-up with one in `seconds`; False (and a warning) if systemd refused:
    the regular timer is then the only one left."""
    disarm(systemctl)
    result = runner(command(systemd_run, seconds), check=False)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        log.warning(
            "could not arm %s (%s exited with %d%s): the next refresh is the regular "
            "timer's, which may come after a lease's deadline",
            TIMER,
            systemd_run,
            result.returncode,
            f": {detail}" if detail else "",
            extra={"UNIT": TIMER},
        )
        return False
    log.info("next run in %ss (%s)", seconds, TIMER, extra={"UNIT": TIMER})
    return True


def disarm(systemctl: Systemctl) -> None:
    """Stop a pending wake-up; "not loaded" (none armed) is no error."""
    systemctl("stop", "--", TIMER, check=False)


#: Outcomes a run on the agent's own schedule may fix: after them the wake-up is armed
#: again. Others (a tampered or lost token, a bad config) need an operator, and retrying
#: every `floor` seconds would only repeat their alert.
_RETRIED = (
    VaultUnreachable,
    PermissionDenied,
    SecretMissing,
    CommandFailed,
    Interrupted,
    UnitFailed,
    LeaseIssueFailed,
    CertificateRefused,
    LeaseRevokeFailed,
    LeaseExpired,
    LeaseRenewalRefused,
)


@contextlib.contextmanager
def scheduled(run: Run) -> Iterator[None]:
    """After the run, arm the wake-up for the earliest deadline: after success, and after a
    failure the next run may fix (a re-issue that failed is then due: in `floor` seconds).
    After a rollback (a unit failed on new credentials, which every retry restarts it
    with), the retry comes halfway to the old credentials' end instead."""
    leased = any(r.leased for r in run.config.secrets.values())
    try:
        yield
    except BaseException as err:
        if leased and (type(err) is VaultError or isinstance(err, _RETRIED)):
            with contextlib.suppress(BootsecretsError, OSError):
                _arm(run, backoff=isinstance(err, UnitFailed))
        raise
    if leased:
        with contextlib.suppress(BootsecretsError, OSError):
            _arm(run, backoff=False)


def decisions(
    config_secrets: Mapping[str, SecretRef],
    kept_state: Mapping[str, LeasedState],
    policy: Policy,
    now: float,
) -> list[Decision]:
    """The planner's decisions for `status` and the wake-up: from state.json's copy."""
    out: list[Decision] = []
    for name, leased in kept_state.items():
        ref = config_secrets.get(name)
        record = leasestore.from_state(name, leased)
        out.extend(
            plan(
                (record,), now, math.inf, policy_for(policy, ref.spec if ref is not None else None)
            )
        )
    return out


def _arm(run: Run, *, backoff: bool) -> None:
    kept = leasestore.load(run.paths)
    now, policy = run.ctx.clock(), run.config.leases
    found = decisions(run.config.secrets, leasestore.to_state(kept), policy, now)
    if backoff:
        found = [
            d
            if d.action is Action.NONE
            else dataclasses.replace(
                d, due_at=now + max(0.0, (d.expires_at - policy.margin - now) / 2)
            )
            for d in found
        ]
    wake = next_wakeup(found, now, math.inf, policy)
    at = wake.at
    if kept.revoke:  # retried revocations: at the floor
        at = min(at if at is not None else math.inf, now + policy.floor)
    systemctl = run.systemctl
    if at is None:
        disarm(systemctl)
    else:
        seconds = timer_seconds(dataclasses.replace(wake, at=at), now)
        assert seconds is not None
        if not arm(run.ctx.runner, run.ctx.systemd_run_program, systemctl, seconds):
            at = None
    run.save(dataclasses.replace(run.load_state(), wakeup_at=at))
