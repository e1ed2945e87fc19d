"""What the benchmark runs: the jobs (units x secrets), both agents' inputs for one job, a
measured run of each, the alternating comparison, a no-op refresh, a herd of agents
bootstrapping at once, and our agent's start-up cost.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import secrets as pysecrets
import shutil
import time
from pathlib import Path
from typing import Any

from bootsecrets_dev.envfile import parse
from bootsecrets_dev.openbao import OpenBao, bao_binary, policy
from bootsecrets_dev.programs import RecordingSystemctl, recording_systemctl
from harness import (
    BenchError,
    OursInstall,
    clean_env,
    measure,
    snapshot,
)
from proxy import LatencyProxy

ROLE = "bench"
CREATION_PATH = f"auth/approle/role/{ROLE}/secret-id"
RUN_TIMEOUT = 60.0  # one agent run
AUDIT_SETTLE = 0.1  # after a child exits, before reading the audit log (not timed)
#: systemctl verbs that would restart, reload, start or stop a unit.
RESTARTING = frozenset(
    {"restart", "try-restart", "reload", "try-reload-or-restart", "reload-or-restart"}
    | {"start", "stop"}
)


def setup_approle(bao: OpenBao) -> str:
    """AppRole `bench` (single-use secret-ids) reading secret/data/bench/*; its role-id."""
    return bao.approle(ROLE, policy("secret/data/bench/*"), secret_id_ttl="30m")


def hcl(value: str) -> str:
    return json.dumps(value)  # HCL strings take JSON escapes


def request_kind(path: str) -> str:
    if path == "sys/wrapping/lookup":
        return "lookup"
    if path == "sys/wrapping/unwrap":
        return "unwrap"
    if path.startswith("auth/") and path.endswith("/login"):
        return "login"
    if path.startswith("auth/token/"):
        return path.removeprefix("auth/token/")
    if path.startswith("sys/internal/ui/mounts"):
        return "mount look-up"
    if path.startswith("secret/"):
        return "read"
    if path.startswith(("sys/leases/renew", "sys/leases/revoke")):
        return path.split("/")[2]  # renew, revoke
    if "/creds/" in path:
        return "issue (database)"
    if "/issue/" in path:
        return "issue (certificate)"
    if path.startswith("transit/"):
        return "transit " + path.split("/")[1]  # datakey, decrypt, rewrap
    return path


# --- one job, as both agents are given it ---------------------------------------------------


@dataclasses.dataclass
class Scenario:
    key: str
    title: str
    units: int
    secrets: int
    rtt_ms: float = 0.0
    role: str = ROLE
    values: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    unit_secrets: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"bench/{self.key}"

    def secret_names(self) -> list[str]:
        return [f"s{j}" for j in range(self.secrets)]

    def unit_names(self) -> list[str]:
        return [f"app{i}.service" for i in range(self.units)]

    def prepare(self, bao: OpenBao) -> None:
        """Write the secrets; unit i uses the shared secret s0 plus every U-th other one,
        so every path is used and s0 is used by every unit (read once all the same)."""
        for name in self.secret_names():
            data = {"user": "u-" + pysecrets.token_hex(4), "password": pysecrets.token_hex(16)}
            self.values[name] = data
            bao.put("secret", f"{self.prefix}/{name}", data)
        for i, unit in enumerate(self.unit_names()):
            self.unit_secrets[unit] = ["s0"] + [
                f"s{j}" for j in range(1, self.secrets) if (j - 1) % self.units == i
            ]

    def expected(self, unit: str) -> dict[str, str]:
        out = {}
        for name in self.unit_secrets[unit]:
            out[f"{name.upper()}_USER"] = self.values[name]["user"]
            out[f"{name.upper()}_PASSWORD"] = self.values[name]["password"]
        return out

    def check_env_files(self, env_dir: Path) -> None:
        """Every unit's env file holds exactly the values written to OpenBao."""
        for unit in self.unit_names():
            if parse((env_dir / f"{unit}.env").read_text()) != self.expected(unit):
                raise BenchError(f"{unit}: rendered values differ from OpenBao's")

    @property
    def min_requests(self) -> int:
        return 3 + self.secrets  # lookup + unwrap + login + one read per distinct path

    def ours_config(self, addr: str) -> str:
        lines = [
            "vault:",
            f"  address: {json.dumps(addr)}",
            "  request_timeout: 30",
            "  boot_deadline: 120",
            "approle:",
            f"  role: {self.role}",
            "reboot_policy: reprovision",
            "mounts:",
            "  secret: kv-v2",
            "secrets:",
        ]
        lines += [f"  {n}: secret/{self.prefix}/{n}" for n in self.secret_names()]
        lines.append("services:")
        for unit in self.unit_names():
            lines += [f"  {unit}:", "    environment:"]
            for name in self.unit_secrets[unit]:
                lines.append(f'      {name.upper()}_USER: "{{{{ secrets.{name}.user }}}}"')
                lines.append(f'      {name.upper()}_PASSWORD: "{{{{ secrets.{name}.password }}}}"')
        return "\n".join(lines) + "\n"

    def bao_template(self, unit: str) -> str:
        return "".join(
            f'{{{{ with secret "secret/data/{self.prefix}/{name}" }}}}'
            f'{name.upper()}_USER="{{{{ .Data.data.user }}}}"\n'
            f'{name.upper()}_PASSWORD="{{{{ .Data.data.password }}}}"\n'
            "{{ end }}"
            for name in self.unit_secrets[unit]
        )

    def bao_agent_hcl(self, work: Path, addr: str) -> str:
        """`bao agent` doing the job: AppRole auto-auth with the wrapped secret-id (creation
        path checked), a token sink, one template per unit, exit once rendered."""
        stanzas = "".join(
            "template {\n"
            f"  source = {hcl(str(work / 'templates' / f'{unit}.ctmpl'))}\n"
            f"  destination = {hcl(str(work / 'env' / f'{unit}.env'))}\n"
            '  perms = "0600"\n'
            "  error_on_missing_key = true\n"
            "}\n"
            for unit in self.unit_names()
        )
        return (
            "vault {\n"
            f"  address = {hcl(addr)}\n"
            "}\n"
            "auto_auth {\n"
            '  method "approle" {\n'
            '    mount_path = "auth/approle"\n'
            "    config = {\n"
            f"      role_id_file_path = {hcl(str(work / 'role_id'))}\n"
            f"      secret_id_file_path = {hcl(str(work / 'secret_id'))}\n"
            f"      secret_id_response_wrapping_path = {hcl(CREATION_PATH)}\n"
            "    }\n"
            "  }\n"
            '  sink "file" {\n'
            "    config = {\n"
            f"      path = {hcl(str(work / 'token'))}\n"
            "      mode = 0600\n"
            "    }\n"
            "  }\n"
            "}\n"
            "exit_after_auth = true\n"
            "template_config {\n"
            "  exit_on_retry_failure = true\n"
            "}\n" + stanzas
        )


# --- results ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    agent: str
    ok: bool
    wall: float = 0.0
    maxrss_kb: int = 0
    cpu: float = 0.0
    requests: int = 0
    kinds: dict[str, int] = dataclasses.field(default_factory=dict)
    connections: int = 0
    error: str = ""


@dataclasses.dataclass
class RefreshResult:
    title: str
    walls: list[float] = dataclasses.field(default_factory=list)
    requests: list[int] = dataclasses.field(default_factory=list)
    restarts: list[int] = dataclasses.field(default_factory=list)
    rewritten: list[int] = dataclasses.field(default_factory=list)
    kinds: dict[str, int] = dataclasses.field(default_factory=dict)


# --- the runs -------------------------------------------------------------------------------


class Bench:
    """Both agents on the one server: inputs (not timed), measured runs, their checks."""

    def __init__(
        self, base: Path, bao: OpenBao, role_id: str, ours: OursInstall, *, keep: bool
    ) -> None:
        self.base = base
        self.bao = bao
        self.role_id = role_id
        self.ours = ours.command
        self.ours_python = ours.python
        self.bao_bin = bao_binary()
        self.keep = keep
        self.counter = 0
        self.failures: list[str] = []
        #: The audit entries of the last measured run.
        self.last_entries: list[dict[str, Any]] = []

    def workdir(self, tag: str) -> Path:
        self.counter += 1
        path = self.base / f"{self.counter:04d}-{tag}"
        path.mkdir(mode=0o700)
        return path

    def done_with(self, path: Path) -> None:
        if not self.keep:
            shutil.rmtree(path, ignore_errors=True)

    # inputs (not timed)

    def ours_root(
        self, sc: Scenario, addr: str, tag: str = "ours"
    ) -> tuple[Path, RecordingSystemctl]:
        """A host root with the image config and the bootstrap cloud-init would write."""
        root = self.workdir(f"{sc.key}-{tag}")
        config = root / "etc/bootsecrets/config.yaml"
        config.parent.mkdir(parents=True)
        config.write_text(sc.ours_config(addr))
        store = root / "run/bootsecrets"
        store.mkdir(parents=True, mode=0o700)
        boot = store / "bootstrap.yaml"
        doc = {
            "role_id": self.role_id,
            "wrapped_secret_id": self.bao.wrapped_secret_id(ROLE, ttl="15m"),
            "vault_addr": addr,
        }
        boot.write_text(json.dumps(doc) + "\n")
        boot.chmod(0o600)
        return root, recording_systemctl(root / "systemctl.log")

    def agent_args(self, verb: str, root: Path, systemctl: RecordingSystemctl) -> list[str]:
        """`bootsecrets` arguments for one run against a host root."""
        return [verb, "--root", str(root), "--systemctl", str(systemctl.program)]

    def ours_argv(self, verb: str, root: Path, systemctl: RecordingSystemctl) -> list[str]:
        return [*self.ours, *self.agent_args(verb, root, systemctl)]

    def bao_dir(self, sc: Scenario, addr: str) -> Path:
        work = self.workdir(f"{sc.key}-bao")
        (work / "role_id").write_text(self.role_id)
        (work / "secret_id").write_text(self.bao.wrapped_secret_id(ROLE, ttl="15m"))
        (work / "templates").mkdir()
        for unit in sc.unit_names():
            (work / "templates" / f"{unit}.ctmpl").write_text(sc.bao_template(unit))
        (work / "agent.hcl").write_text(sc.bao_agent_hcl(work, addr))
        return work

    # runs

    def measured(
        self,
        agent: str,
        argv: list[str],
        env: dict[str, str],
        log: Path,
        proxy: LatencyProxy | None,
    ) -> tuple[Run, int]:
        offset = self.bao.audit_offset()
        conns = proxy.connections if proxy else 0
        result = measure(argv, env=env, log=log, timeout=RUN_TIMEOUT)
        time.sleep(AUDIT_SETTLE)  # let the server log what it was answering as we exited
        entries = self.last_entries = self.bao.audit_entries(offset)
        root_accessor = self.bao.root_accessor
        if [e for e in entries if (e.get("auth") or {}).get("accessor") == root_accessor]:
            raise BenchError("the harness's own requests landed in a measured window")
        kinds = collections.Counter(request_kind(e["request"]["path"]) for e in entries)
        run = Run(
            agent,
            result.code == 0,
            result.wall,
            result.maxrss_kb,
            result.cpu,
            len(entries),
            dict(kinds),
            (proxy.connections - conns) if proxy else 0,
        )
        return run, result.code

    def fail(self, run: Run, what: str, err: Exception) -> None:
        run.ok, run.error = False, f"{what}: {err}"
        self.failures.append(run.error)

    def run_ours(self, sc: Scenario, addr: str, proxy: LatencyProxy | None = None) -> Run:
        root, systemctl = self.ours_root(sc, addr)
        log = root / "agent.log"
        env = clean_env(root, systemctl.env())
        run, code = self.measured(
            "ours", self.ours_argv("bootstrap", root, systemctl), env, log, proxy
        )
        try:
            if code != 0:
                raise BenchError(f"exit {code}: {log.read_text()[-800:]}")
            sc.check_env_files(root / "run/bootsecrets/current/env")
            if systemctl.started() != set(sc.unit_names()):
                raise BenchError(f"units started: {sorted(systemctl.started())}")
        except (BenchError, OSError) as err:
            self.fail(run, f"ours {sc.key}", err)
        self.done_with(root)
        return run

    def run_bao(self, sc: Scenario, addr: str, proxy: LatencyProxy | None = None) -> Run:
        work = self.bao_dir(sc, addr)
        log = work / "agent.log"
        argv = [self.bao_bin, "agent", f"-config={work / 'agent.hcl'}"]
        run, code = self.measured("bao", argv, clean_env(work), log, proxy)
        try:
            if code != 0:
                raise BenchError(f"exit {code}: {log.read_text()[-800:]}")
            sc.check_env_files(work / "env")
            if not (work / "token").read_text().strip():
                raise BenchError("no token in the sink")
        except (BenchError, OSError) as err:
            self.fail(run, f"bao {sc.key}", err)
        self.done_with(work)
        return run

    def compare(self, sc: Scenario, runs: int, warmup: int) -> dict[str, list[Run]]:
        """`warmup` pairs, then `runs` of each agent, alternating, on the same job."""
        results: dict[str, list[Run]] = {"ours": [], "bao": []}
        proxy_ctx: contextlib.AbstractContextManager[LatencyProxy | None]
        if sc.rtt_ms:
            lifetime = 60 + (runs + warmup) * 2 * RUN_TIMEOUT
            proxy_ctx = LatencyProxy(self.bao.port, sc.rtt_ms / 2000.0, lifetime=lifetime)
        else:
            proxy_ctx = contextlib.nullcontext()
        with proxy_ctx as proxy:
            addr = f"http://127.0.0.1:{proxy.port}" if proxy else self.bao.addr
            for i in range(warmup + runs):
                pair = [self.run_ours(sc, addr, proxy), self.run_bao(sc, addr, proxy)]
                if i >= warmup:
                    for run in pair:
                        results[run.agent].append(run)
                status = " ".join(
                    f"{r.agent} {r.wall * 1000:.0f}ms/{r.requests}req" + ("" if r.ok else " FAILED")
                    for r in pair
                )
                tag = "warm-up" if i < warmup else f"run {i - warmup + 1}/{runs}"
                print(f"  {sc.title}: {tag}: {status}", flush=True)
        return results

    # refresh with nothing changed

    def refresh_noop(self, sc: Scenario, runs: int) -> RefreshResult:
        """A bootstrap, then `runs` + 1 refreshes with nothing changed (the first a warm-up):
        no restart, no rendered file or drop-in rewritten, and what each cost."""
        root, systemctl = self.ours_root(sc, self.bao.addr, tag="refresh")
        env = clean_env(root, systemctl.env())
        log = root / "agent.log"
        boot = measure(
            self.ours_argv("bootstrap", root, systemctl), env=env, log=log, timeout=RUN_TIMEOUT
        )
        if boot.code != 0:
            raise BenchError(f"bootstrap before refresh failed: {log.read_text()[-800:]}")
        result = RefreshResult(sc.title)
        kinds = collections.Counter[str]()
        for i in range(runs + 1):
            if not self._refresh_once(root, systemctl, env, i, runs, result, kinds):
                break
        result.kinds = {k: v // max(1, len(result.requests)) for k, v in kinds.items()}
        self.done_with(root)
        return result

    def _refresh_once(
        self,
        root: Path,
        systemctl: RecordingSystemctl,
        env: dict[str, str],
        i: int,
        runs: int,
        result: RefreshResult,
        kinds: collections.Counter[str],
    ) -> bool:
        log = root / "agent.log"
        before = snapshot(root)
        calls_before = len(systemctl.calls())
        offset = self.bao.audit_offset()
        run = measure(
            self.ours_argv("refresh", root, systemctl), env=env, log=log, timeout=RUN_TIMEOUT
        )
        time.sleep(AUDIT_SETTLE)
        entries = self.bao.audit_entries(offset)
        if run.code != 0:
            self.failures.append(f"refresh exit {run.code}: {log.read_text()[-800:]}")
            return False
        after = snapshot(root)
        calls = systemctl.calls()[calls_before:]
        changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
        rendered = [p for p in changed if not p.endswith(("state.json", "/lock"))]
        if i == 0:
            return True  # warm-up
        restarts = sum(1 for call in calls if call[:1] and call[0] in RESTARTING)
        result.walls.append(run.wall)
        result.requests.append(len(entries))
        result.restarts.append(restarts)
        result.rewritten.append(len(rendered))
        kinds.update(request_kind(e["request"]["path"]) for e in entries)
        if restarts or rendered:
            self.failures.append(f"no-op refresh restarted {calls} / rewrote {rendered}")
        print(
            f"  refresh (nothing changed): run {i}/{runs}: {run.wall * 1000:.0f}ms "
            f"{len(entries)}req {restarts} restarts {len(rendered)} files",
            flush=True,
        )
        return True
