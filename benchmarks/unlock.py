"""The unlock part (issue 13): what encrypted directories add to a bootstrap.

The 5 x 20 job with 0, 1 and 4 fscrypt directories (each needed by one unit), on an ext4
with the `encrypt` feature on a loop device (root, as CI), bind-mounted at <root>/srv of
each run's host root. Per round: the job without directories (the baseline), first use of
1 and of 4 new directories (one `transit/datakey/plaintext` each), then a "reboot" (the
filesystem unmounted and mounted again: the kernel forgets every key; the store and
runtime drop-ins wiped) and a second boot of the same roots (one `transit/decrypt` each),
every run with a fresh wrapped secret-id. On loopback and through the 40 ms RTT proxy.

The agent unlocks in a thread of its own while it reads the secrets; whether the Transit
requests overlap the reads is read from the server's side: the audit log's arrival times
of the reads and of the Transit requests, relative to the login. `bao agent` has nothing
like it: no row for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bootsecrets_dev import vaultapi
from bootsecrets_dev.loopfs import LoopFs, ext4_loop, sh
from bootsecrets_dev.openbao import policy
from bootsecrets_dev.programs import recording_systemctl
from harness import BenchError, clean_env
from leasejob import audit_time
from proxy import LatencyProxy
from scenarios import RUN_TIMEOUT, Bench, Run, Scenario, request_kind

ROLE = "bench-unlock"
KEY = "bench-unlock"
DIRECTORIES = (1, 4)


@dataclasses.dataclass
class Cell:
    """The runs of one kind of bootstrap on one link."""

    link: str
    dirs: int
    boot: str  # "" (no directories), "first use", "second boot"
    #: in round order; without directories two a round (one in each half)
    runs: list[Run] = dataclasses.field(default_factory=list)
    #: per run, ms after the login's arrival: (first read, last read, first Transit request,
    #: last Transit request); the Transit ones are 0 without directories
    arrivals: list[tuple[float, float, float, float]] = dataclasses.field(default_factory=list)

    @property
    def title(self) -> str:
        return "no encrypted directory" if not self.dirs else f"{self.dirs} x {self.boot}"


@dataclasses.dataclass
class UnlockResults:
    cells: list[Cell] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Host:
    """One run's host root with the ext4 bound at <root>/srv."""

    root: Path
    dirs: int
    bound: bool = False


class UnlockPart:
    def __init__(self, bench: Bench, fs: LoopFs) -> None:
        self.bench = bench
        self.bao = bench.bao
        self.fs = fs
        vaultapi.enable_engine(self.bao, "transit", "transit")
        vaultapi.write(self.bao, f"transit/keys/{KEY}", {})
        self.sc = Scenario("unlock", "5 units x 20 secrets", 5, 20, role=ROLE)
        self.sc.prepare(self.bao)
        transit = "\n".join(
            f'path "transit/{op}/{KEY}" {{ capabilities = ["update"] }}'
            for op in ("datakey/plaintext", "decrypt", "rewrap")
        )
        self.role_id = self.bao.approle(
            ROLE, policy(f"secret/data/{self.sc.prefix}/*") + "\n" + transit, secret_id_ttl="30m"
        )
        self.rounds = 0

    # hosts (not timed)

    def host(self, dirs: int, addr: str) -> Host:
        self.rounds += 1
        host = Host(self.bench.workdir(f"unlock-{dirs}"), dirs)
        config = host.root / "etc/bootsecrets/config.yaml"
        config.parent.mkdir(parents=True)
        text = self.sc.ours_config(addr)
        if dirs:
            # Absent at first use: created by the agent, in a fresh parent each round.
            parent = f"/srv/r{self.rounds:04d}"
            text += "encrypted_directories:\n" + "".join(
                f"  d{i}:\n    path: {parent}/d{i}\n    transit_key: {KEY}\n"
                f"    units: [app{i}.service]\n"
                for i in range(dirs)
            )
            self.bind(host)
            (host.root / parent.lstrip("/")).mkdir()
        config.write_text(text)
        return host

    def bind(self, host: Host) -> None:
        target = host.root / "srv"
        target.mkdir(exist_ok=True)
        sh(["mount", "--bind", str(self.fs.mountpoint), str(target)])
        host.bound = True

    def unbind(self, host: Host) -> None:
        if host.bound:
            sh(["umount", str(host.root / "srv")])
            host.bound = False

    def boot(self, host: Host, addr: str) -> None:
        """As at every boot: an empty store with the bootstrap cloud-init writes, no
        runtime drop-ins."""
        store = host.root / "run/bootsecrets"
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(host.root / "run/systemd", ignore_errors=True)
        store.mkdir(parents=True, mode=0o700)
        wrapped = self.bao.wrapped_secret_id(ROLE, ttl="15m")
        doc = {"role_id": self.role_id, "wrapped_secret_id": wrapped, "vault_addr": addr}
        (store / "bootstrap.yaml").write_text(json.dumps(doc) + "\n")
        (store / "bootstrap.yaml").chmod(0o600)

    # runs

    def run(self, host: Host, addr: str, proxy: LatencyProxy | None, cell: Cell, boot: str) -> Run:
        self.boot(host, addr)
        systemctl = recording_systemctl(host.root / "systemctl.log")
        log = host.root / "agent.log"
        argv = self.bench.ours_argv("bootstrap", host.root, systemctl)
        run, code = self.bench.measured(
            "ours", argv, clean_env(host.root, systemctl.env()), log, proxy
        )
        try:
            if code != 0:
                raise BenchError(f"exit {code}: {log.read_text()[-800:]}")
            self.sc.check_env_files(host.root / "run/bootsecrets/current/env")
            expected = "transit datakey" if boot == "first use" else "transit decrypt"
            transit = {k: v for k, v in run.kinds.items() if k.startswith("transit")}
            if transit != ({expected: host.dirs} if host.dirs else {}):
                raise BenchError(f"Transit requests {transit}, expected {host.dirs} {expected}")
            for i in range(host.dirs):
                if not (host.root / f"run/bootsecrets/unlocked/d{i}").exists():
                    raise BenchError(f"d{i} is not unlocked")
        except (BenchError, OSError) as err:
            self.bench.fail(run, f"unlock {cell.link} {cell.title}", err)
        cell.arrivals.append(arrivals(self.bench.last_entries))
        return run

    def round(
        self,
        turn: int,
        addr: str,
        proxy: LatencyProxy | None,
        cells: dict[tuple[int, str], Cell],
        measured: bool,
    ) -> None:
        """First use of 1 and 4 directories and a bootstrap without any; a reboot; a second
        boot of the two and again one without any. The order within each half turns from
        round to round, so that no kind always runs first."""
        hosts = [self.host(n, addr) for n in (0, *DIRECTORIES)]
        plain, encrypted = hosts[0], hosts[1:]

        def one(host: Host, boot: str) -> None:
            cell = cells[(host.dirs, boot if host.dirs else "")]
            run = self.run(host, addr, proxy, cell, boot)
            if measured:
                cell.runs.append(run)

        try:
            for host in _turned(hosts, turn):
                one(host, "first use")
            with self.rebooted(encrypted):
                for host in _turned([plain, *encrypted], turn):
                    one(host, "second boot")
        finally:
            for host in hosts:
                self.unbind(host)
                self.bench.done_with(host.root)
        status = " ".join(
            f"{c.title}: {c.runs[-1].wall * 1000:.0f}ms"
            for c in cells.values()
            if c.runs and measured
        )
        print(f"  unlock, {next(iter(cells.values())).link}: {status or 'warm-up'}", flush=True)

    @contextlib.contextmanager
    def rebooted(self, hosts: list[Host]) -> Iterator[None]:
        """The kernel forgets the keys: every bind and the filesystem unmounted, mounted
        again, bound again."""
        for host in hosts:
            self.unbind(host)
        self.fs.remount()
        for host in hosts:
            self.bind(host)
        yield

    def link(self, name: str, rtt_ms: float, runs: int, warmup: int) -> list[Cell]:
        kinds = [(0, ""), *((n, b) for n in DIRECTORIES for b in ("first use", "second boot"))]
        cells = {k: Cell(name, k[0], k[1]) for k in kinds}
        proxy_ctx: contextlib.AbstractContextManager[LatencyProxy | None]
        if rtt_ms:
            lifetime = 60 + (runs + warmup) * 5 * RUN_TIMEOUT
            proxy_ctx = LatencyProxy(self.bao.port, rtt_ms / 2000.0, lifetime=lifetime)
        else:
            proxy_ctx = contextlib.nullcontext()
        with proxy_ctx as proxy:
            addr = f"http://127.0.0.1:{proxy.port}" if proxy else self.bao.addr
            for i in range(warmup + runs):
                self.round(i, addr, proxy, cells, measured=i >= warmup)
        for cell in cells.values():
            cell.arrivals = cell.arrivals[-len(cell.runs) :] if cell.runs else []
        return list(cells.values())


def _turned(hosts: list[Host], turn: int) -> list[Host]:
    k = turn % len(hosts)
    return hosts[k:] + hosts[:k]


def arrivals(entries: list[dict[str, Any]]) -> tuple[float, float, float, float]:
    """(first read, last read, first Transit, last Transit) arrival, ms after the login's."""
    kinds = [(request_kind(e["request"]["path"]), audit_time(e)) for e in entries]
    login = next((t for k, t in kinds if k == "login"), None)
    reads = [t for k, t in kinds if k == "read"]
    transit = [t for k, t in kinds if k.startswith("transit")]
    if login is None or not reads:
        return (0.0, 0.0, 0.0, 0.0)

    def ms(t: float) -> float:
        return (t - login) * 1000

    first_t, last_t = (ms(min(transit)), ms(max(transit))) if transit else (0.0, 0.0)
    return (ms(min(reads)), ms(max(reads)), first_t, last_t)


def median_arrivals(cell: Cell) -> tuple[float, float, float, float]:
    if not cell.arrivals:
        return (0.0, 0.0, 0.0, 0.0)
    a, b, c, d = (statistics.median(x[i] for x in cell.arrivals) for i in range(4))
    return (a, b, c, d)


def run_unlock(bench: Bench, runs: int, warmup: int) -> UnlockResults:
    results = UnlockResults()
    with ext4_loop(encrypt=True, size_mib=64) as fs:
        part = UnlockPart(bench, fs)
        results.cells += part.link("loopback", 0.0, runs, warmup)
        results.cells += part.link("40 ms RTT", 40.0, runs, warmup)
    return results
