"""A herd of our agents bootstrapping at once against the one server: all launched together,
each importing what `bootstrap` imports, then released through one gate."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import selectors
import subprocess
import time
from pathlib import Path

from bootsecrets_dev.programs import RecordingSystemctl
from harness import BenchError, clean_env, kill, reaped, track
from scenarios import AUDIT_SETTLE, Bench, Scenario


@dataclasses.dataclass
class HerdResult:
    title: str
    count: int
    ok: int
    launched: float  # s to spawn them all
    ready: float  # s from the first spawn until every one had imported
    slots: int
    times: list[float]  # completion after the gate opened, of those that succeeded
    rss: list[int]
    requests: int
    server_cpu: float
    agents_cpu: float


#: Each herd agent: take a job slot, import everything `bootsecrets bootstrap` imports, give
#: the slot back, say it is ready, wait at the gate, then run the console script's entry
#: point with the rest of its arguments.
HERD_AGENT = (
    "import os, sys\n"
    "jobs_r, jobs_w, ready_w, gate_r = map(int, sys.argv[1:5])\n"
    "os.read(jobs_r, 1)\n"
    "import bootsecrets.cli\n"
    "bootsecrets.cli.prepare_process()\n"
    "import bootsecrets.agent, bootsecrets.vault\n"
    "os.write(jobs_w, b'+'); os.close(jobs_r); os.close(jobs_w)\n"
    "os.write(ready_w, b'r'); os.close(ready_w)\n"
    "os.read(gate_r, 1); os.close(gate_r)\n"
    "sys.argv[1:] = sys.argv[5:]\n"
    "bootsecrets.cli.run()\n"
)


@dataclasses.dataclass
class HerdMember:
    proc: subprocess.Popen[bytes]
    root: Path
    code: int | None = None
    completion: float = 0.0  # s after the gate opened
    maxrss_kb: int = 0
    cpu: float = 0.0


def wait_readable(fd: int, timeout: float) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(max(0.0, timeout)))


class Herd:
    """`count` agents, all launched together, released at the same instant.

    On a fleet every machine pays its own interpreter start-up on its own CPU; here all of
    them share 2 cores. So each agent process starts, takes a job slot (at most `slots`
    import at once), imports everything `bootsecrets bootstrap` imports, gives the slot back
    and waits at a gate. When all are ready the gate opens (one close() wakes every one of
    them) and each runs `bootsecrets.cli.run()` with `bootstrap ...` as its arguments.
    Completion is measured from the gate opening to each process's exit.
    """

    def __init__(self, bench: Bench, sc: Scenario, count: int, timeout: float, slots: int):
        self.bench = bench
        self.sc = sc
        self.count = count
        self.timeout = timeout
        self.slots = slots
        self.members: dict[int, HerdMember] = {}
        self.started = 0.0  # perf_counter() at the first spawn
        self.launched = self.ready_after = 0.0

    def run(self) -> HerdResult:
        bench = self.bench
        roots = [
            bench.ours_root(self.sc, bench.bao.addr, tag=f"herd{i}") for i in range(self.count)
        ]
        jobs_r, jobs_w = os.pipe()
        ready_r, ready_w = os.pipe()
        gate_r, gate_w = os.pipe()
        os.write(jobs_w, b"+" * self.slots)
        sel = selectors.DefaultSelector()
        offset, server_cpu = 0, 0.0
        try:
            self._launch(roots, (jobs_r, jobs_w, ready_w, gate_r), sel)
            for fd in (jobs_r, jobs_w, ready_w, gate_r):
                os.close(fd)
            self._wait_ready(ready_r)
            offset = bench.bao.audit_offset()
            server_cpu = bench.bao.cpu_seconds()
            os.close(gate_w)  # every agent wakes up now
            gate_w = -1
            self._reap(sel, time.perf_counter())
        finally:
            for fd in (ready_r, gate_w):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            for key in list(sel.get_map().values()):
                os.close(key.fd)
            sel.close()
            for member in self.members.values():
                kill(member.proc, grace=2.0)
        time.sleep(AUDIT_SETTLE)
        result = self._result(
            requests=len(bench.bao.audit_entries(offset)),
            server_cpu=bench.bao.cpu_seconds() - server_cpu,
        )
        for root, _ in roots:
            bench.done_with(root)
        return result

    def _launch(
        self,
        roots: list[tuple[Path, RecordingSystemctl]],
        fds: tuple[int, ...],
        sel: selectors.BaseSelector,
    ) -> None:
        self.started = time.perf_counter()
        for root, systemctl in roots:
            with (root / "agent.log").open("ab") as out:
                proc = subprocess.Popen(
                    [
                        self.bench.ours_python,
                        "-c",
                        HERD_AGENT,
                        *map(str, fds),
                        *self.bench.agent_args("bootstrap", root, systemctl),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=clean_env(root, systemctl.env()),
                    pass_fds=fds,
                )
            track(proc)
            sel.register(os.pidfd_open(proc.pid), selectors.EVENT_READ, proc.pid)
            self.members[proc.pid] = HerdMember(proc, root)
        self.launched = time.perf_counter() - self.started

    def _wait_ready(self, ready_r: int) -> None:
        ready = 0
        give_up = time.monotonic() + self.timeout
        while ready < self.count and time.monotonic() < give_up:
            if not wait_readable(ready_r, give_up - time.monotonic()):
                break
            chunk = os.read(ready_r, 4096)
            if not chunk:
                break  # every writer gone: some died before getting ready
            ready += len(chunk)
        self.ready_after = time.perf_counter() - self.started
        if ready < self.count:
            raise BenchError(
                f"herd: only {ready}/{self.count} agents got ready in {self.timeout:.0f}s"
            )

    def _reap(self, sel: selectors.BaseSelector, released: float) -> None:
        deadline = released + self.timeout
        done = 0
        while done < self.count:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            for key, _ in sel.select(min(left, 1.0)):
                sel.unregister(key.fd)
                os.close(key.fd)
                member = self.members[key.data]
                _, status, usage = os.wait4(member.proc.pid, 0)
                member.completion = time.perf_counter() - released
                member.code = reaped(member.proc, status)
                member.maxrss_kb = int(usage.ru_maxrss)
                member.cpu = usage.ru_utime + usage.ru_stime
                done += 1

    def _succeeded(self, member: HerdMember) -> bool:
        if member.code != 0:
            return False
        try:
            self.sc.check_env_files(member.root / "run/bootsecrets/current/env")
        except (BenchError, OSError):
            return False
        return True

    def _result(self, *, requests: int, server_cpu: float) -> HerdResult:
        done = [m for m in self.members.values() if m.code is not None]
        ok = 0
        for member in done:
            if self._succeeded(member):
                ok += 1
            else:
                log = (member.root / "agent.log").read_text()[-400:]
                self.bench.failures.append(
                    f"herd agent in {member.root.name}: exit {member.code}: {log}"
                )
        if len(done) < self.count:
            self.bench.failures.append(
                f"herd: {self.count - len(done)} agents still running "
                f"{self.timeout:.0f}s after the gate opened (killed)"
            )
        return HerdResult(
            title=self.sc.title,
            count=self.count,
            ok=ok,
            launched=self.launched,
            ready=self.ready_after,
            slots=self.slots,
            times=[m.completion for m in done if m.code == 0],
            rss=[m.maxrss_kb for m in done],
            requests=requests,
            server_cpu=server_cpu,
            agents_cpu=sum(m.cpu for m in done),
        )
