"""The leased-secrets part (issue 15): one database credential and one certificate, our
agent against `bao agent` with the same templates.

1. Bootstrap, side by side as the other scenarios (alternating runs, each with a fresh
   wrapped secret-id; `bao agent` with `exit_after_auth`): wall, peak RSS, requests.
2. A simulated hour (`Timescale`: TTLs of seconds), both agents at once on their own
   AppRole roles (the audit log tells their requests apart by the token's `role_name`):
   `bao agent` runs as the daemon it is and renews and re-issues on its own schedule; ours
   is bootstrapped, then `bootsecrets refresh` runs each time its wake-up timer would fire
   (`wakeup_at` in state.json: the time `systemd-run --on-active=` was armed for), and
   once right after the bootstrap, when nothing is due (which must make no lease call).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from bootsecrets_dev import vaultapi
from bootsecrets_dev.openbao import OpenBao
from bootsecrets_dev.pki import PkiEngine
from bootsecrets_dev.postgres import DatabaseEngine, Postgres
from bootsecrets_dev.programs import RecordingSystemctl, recording_systemctl
from harness import BenchError, Exit, Running, clean_env, measure
from leasejob import (
    DB_MAX_TTL,
    DB_MOUNT,
    DB_ROLE,
    DB_TTL,
    LEASE_KINDS,
    PKI_MOUNT,
    PKI_ROLE,
    ROLES,
    Timescale,
    audit_time,
    bao_agent_hcl,
    bao_templates,
    check_bao,
    check_ours,
    ours_config,
    policy_hcl,
    role_of,
)
from scenarios import AUDIT_SETTLE, RUN_TIMEOUT, Bench, Run, request_kind


@dataclasses.dataclass
class HourResult:
    """One agent over the simulated hour, after its bootstrap."""

    agent: str
    kinds: dict[str, int]  # requests after the bootstrap, by kind
    runs: int = 0  # ours: refreshes started by its wake-up timer
    walls: list[float] = dataclasses.field(default_factory=list)  # ours: of those refreshes
    cpu: float = 0.0  # s: ours: bootstrap + refreshes; bao: the daemon, bootstrap included
    maxrss_kb: int = 0  # ours: the largest run; bao: the daemon
    restarts: dict[str, int] = dataclasses.field(default_factory=dict)  # ours, per unit
    noop_kinds: dict[str, int] = dataclasses.field(default_factory=dict)  # ours: nothing due
    noop_wall: float = 0.0
    #: ours: the requests of each refresh of the hour, by kind (in order)
    per_run: list[dict[str, int]] = dataclasses.field(default_factory=list)

    @property
    def lease_calls(self) -> int:
        return sum(self.kinds.get(k, 0) for k in LEASE_KINDS)


@dataclasses.dataclass
class LeaseResults:
    hour: float  # real seconds of the simulated hour
    ttls: dict[str, int]  # real seconds
    postgres: str = ""  # the server's version
    bootstrap: dict[str, list[Run]] = dataclasses.field(default_factory=dict)
    hours: dict[str, HourResult] = dataclasses.field(default_factory=dict)


class LeasePart:
    """The engines, roles and both agents' inputs on the one server; the runs."""

    def __init__(self, bench: Bench, pg: Postgres, scale: Timescale) -> None:
        self.bench = bench
        self.bao: OpenBao = bench.bao
        self.pg = pg
        self.scale = scale
        db = DatabaseEngine(self.bao, pg, mount=DB_MOUNT)
        db.role(
            DB_ROLE,
            default_ttl=f"{scale.seconds(DB_TTL)}s",
            max_ttl=f"{scale.seconds(DB_MAX_TTL)}s",
        )
        pki = PkiEngine(self.bao, mount=PKI_MOUNT, ca_name="bootsecrets bench CA")
        pki.role(PKI_ROLE, allowed_domains=["bench.test"], max_ttl="72h")
        self.ca_pem = pki.ca_pem
        self.role_ids = {
            agent: self.bao.approle(role, policy_hcl(agent), secret_id_ttl="30m")
            for agent, role in ROLES.items()
        }

    # inputs (not timed)

    def ours_root(self, tag: str) -> tuple[Path, RecordingSystemctl]:
        root = self.bench.workdir(f"leases-{tag}")
        config = root / "etc/bootsecrets/config.yaml"
        config.parent.mkdir(parents=True)
        config.write_text(ours_config(self.bao.addr, self.scale))
        store = root / "run/bootsecrets"
        store.mkdir(parents=True, mode=0o700)
        wrapped = self.bao.wrapped_secret_id(ROLES["ours"], ttl="15m")
        doc = {"role_id": self.role_ids["ours"], "wrapped_secret_id": wrapped}
        (store / "bootstrap.yaml").write_text(json.dumps({**doc, "vault_addr": self.bao.addr}))
        (store / "bootstrap.yaml").chmod(0o600)
        return root, recording_systemctl(root / "systemctl.log")

    def bao_dir(self, tag: str, *, exit_after_auth: bool) -> Path:
        work = self.bench.workdir(f"leases-{tag}")
        (work / "role_id").write_text(self.role_ids["bao"])
        (work / "secret_id").write_text(self.bao.wrapped_secret_id(ROLES["bao"], ttl="15m"))
        (work / "templates").mkdir()
        (work / "out").mkdir()
        for name, text in bao_templates(self.scale).items():
            (work / "templates" / name).write_text(text)
        hcl_text = bao_agent_hcl(work, self.bao.addr, self.scale, exit_after_auth=exit_after_auth)
        (work / "agent.hcl").write_text(hcl_text)
        return work

    def bao_argv(self, work: Path) -> list[str]:
        return [self.bench.bao_bin, "agent", f"-config={work / 'agent.hcl'}"]

    # 1. bootstrap, side by side

    def run_ours(self) -> Run:
        root, systemctl = self.ours_root("ours")
        argv = self.bench.ours_argv("bootstrap", root, systemctl)
        log = root / "agent.log"
        run, code = self.bench.measured("ours", argv, clean_env(root, systemctl.env()), log, None)
        try:
            if code != 0:
                raise BenchError(f"exit {code}: {log.read_text()[-800:]}")
            check_ours(root, self.pg, self.ca_pem)
        except (BenchError, OSError) as err:
            self.bench.fail(run, "ours leases bootstrap", err)
        self.bench.done_with(root)
        return run

    def run_bao(self) -> Run:
        work = self.bao_dir("bao", exit_after_auth=True)
        log = work / "agent.log"
        run, code = self.bench.measured("bao", self.bao_argv(work), clean_env(work), log, None)
        try:
            if code != 0:
                raise BenchError(f"exit {code}: {log.read_text()[-800:]}")
            check_bao(work, self.pg, self.ca_pem)
        except (BenchError, OSError) as err:
            self.bench.fail(run, "bao leases bootstrap", err)
        self.bench.done_with(work)
        return run

    def compare(self, runs: int, warmup: int) -> dict[str, list[Run]]:
        results: dict[str, list[Run]] = {"ours": [], "bao": []}
        for i in range(warmup + runs):
            pair = [self.run_ours(), self.run_bao()]
            if i >= warmup:
                for run in pair:
                    results[run.agent].append(run)
            status = " ".join(
                f"{r.agent} {r.wall * 1000:.0f}ms/{r.requests}req" + ("" if r.ok else " FAILED")
                for r in pair
            )
            tag = "warm-up" if i < warmup else f"run {i - warmup + 1}/{runs}"
            print(f"  leases bootstrap: {tag}: {status}", flush=True)
        return results

    # 2. the simulated hour

    def hour(self) -> dict[str, HourResult]:
        root, systemctl = self.ours_root("hour-ours")
        work = self.bao_dir("hour-bao", exit_after_auth=False)
        env = clean_env(root, systemctl.env())
        offset = self.bao.audit_offset()
        started = time.time()
        end = started + self.scale.hour
        daemon = Running(self.bao_argv(work), env=clean_env(work), log=work / "agent.log")
        ours = HourResult("ours", {})
        try:
            boot = self._ours_run("bootstrap", root, systemctl, env)
            ours.cpu, ours.maxrss_kb = boot.cpu, boot.maxrss_kb
            booted = time.time()
            noop = self._ours_run("refresh", root, systemctl, env)
            ours.noop_wall = noop.wall
            after_noop = time.time()
            bao_booted = self._rendered_at(work, started + RUN_TIMEOUT)
            print(
                f"  leases hour: both agents up; ours runs at its wake-ups, "
                f"{self.scale.hour:.0f} s in all",
                flush=True,
            )
            windows = []
            while (at := self._wakeup_at(root)) <= end:
                time.sleep(max(0.0, at - time.time()))
                began = time.time()
                run = self._ours_run("refresh", root, systemctl, env)
                windows.append((began, time.time()))
                ours.runs += 1
                ours.walls.append(run.wall)
                ours.cpu += run.cpu
                ours.maxrss_kb = max(ours.maxrss_kb, run.maxrss_kb)
            time.sleep(max(0.0, end - time.time()))
            stopped = daemon.stop()
        finally:
            if daemon.proc.returncode is None:
                daemon.stop(grace=2.0)
        time.sleep(AUDIT_SETTLE)
        entries = self.bao.audit_entries(offset)
        bao = self._bao_result(entries, bao_booted, end, stopped)
        ours.kinds = _kinds(entries, ROLES["ours"], after_noop, float("inf"))
        ours.noop_kinds = _kinds(entries, ROLES["ours"], booted, after_noop)
        ours.per_run = [_kinds(entries, ROLES["ours"], a, b) for a, b in windows]
        ours.restarts = dict(
            collections.Counter(
                call[-1] for call in systemctl.calls() if call[:1] == ["try-restart"]
            )
        )
        self._check_after_the_hour(root, work, ours, bao)
        self.bench.done_with(root)
        self.bench.done_with(work)
        return {"ours": ours, "bao": bao}

    def _ours_run(
        self, verb: str, root: Path, systemctl: RecordingSystemctl, env: dict[str, str]
    ) -> Exit:
        log = root / "agent.log"
        argv = self.bench.ours_argv(verb, root, systemctl)
        result = measure(argv, env=env, log=log, timeout=RUN_TIMEOUT)
        if result.code != 0:
            raise BenchError(
                f"ours {verb} in the lease hour: exit {result.code}: {log.read_text()[-800:]}"
            )
        return result

    @staticmethod
    def _wakeup_at(root: Path) -> float:
        state: dict[str, Any] = json.loads((root / "run/bootsecrets/state.json").read_text())
        at = state.get("wakeup_at")
        if not isinstance(at, int | float):
            raise BenchError("ours armed no wake-up after a run with leased secrets")
        return float(at)

    @staticmethod
    def _rendered_at(work: Path, give_up: float) -> float:
        """When `bao agent` had first rendered both files (their mtimes, read long before
        its first re-render)."""
        files = [work / "out" / name for name in ("app.service.env", "web.pem")]
        while not all(f.exists() for f in files):
            if time.time() > give_up:
                raise BenchError(f"bao agent rendered nothing in the lease hour: see {work}")
            time.sleep(0.05)
        return max(os.stat(f).st_mtime for f in files)

    def _bao_result(
        self, entries: list[dict[str, Any]], booted: float, end: float, stopped: Exit
    ) -> HourResult:
        return HourResult(
            "bao",
            _kinds(entries, ROLES["bao"], booted, end),
            cpu=stopped.cpu,
            maxrss_kb=stopped.maxrss_kb,
        )

    def _check_after_the_hour(
        self, root: Path, work: Path, ours: HourResult, bao: HourResult
    ) -> None:
        """What each agent holds at the end still logs in and verifies; ours acted on its
        leases, and made no lease call when nothing was due."""
        for agent, check, where in (("ours", check_ours, root), ("bao", check_bao, work)):
            try:
                check(where, self.pg, self.ca_pem)
            except (BenchError, OSError) as err:
                self.bench.failures.append(f"{agent} after the lease hour: {err}")
        noop_calls = sum(ours.noop_kinds.get(k, 0) for k in LEASE_KINDS)
        if noop_calls:
            self.bench.failures.append(
                f"ours: a refresh with nothing due made {noop_calls} lease calls"
            )
        if not ours.lease_calls:
            self.bench.failures.append("ours renewed and re-issued nothing in the lease hour")

    def cleanup(self) -> None:
        """Every lease revoked (the database roles dropped) before PostgreSQL stops, so the
        server's expiry manager does not retry them against a stopped database."""
        vaultapi.revoke_prefix(self.bao, f"{DB_MOUNT}/creds/")


def _kinds(entries: list[dict[str, Any]], role: str, after: float, until: float) -> dict[str, int]:
    """Requests made with `role`'s tokens logged in (after, until], by kind."""
    return dict(
        collections.Counter(
            request_kind(e["request"]["path"])
            for e in entries
            if role_of(e) == role and after < audit_time(e) <= until
        )
    )


def run_leases(bench: Bench, pg: Postgres, hour: float, runs: int, warmup: int) -> LeaseResults:
    """The whole part on the bench's server and `pg`."""
    scale = Timescale(hour)
    part = LeasePart(bench, pg, scale)
    results = LeaseResults(hour, scale.ttls(), pg.psql("SHOW server_version"))
    try:
        results.bootstrap = part.compare(runs, warmup)
        try:
            results.hours = part.hour()
        except BenchError as err:
            bench.failures.append(f"lease hour: {err}")
    finally:
        part.cleanup()
    return results
