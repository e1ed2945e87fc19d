"""Command line: parse, run one command, map the outcome to an exit code (here only)."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn, TextIO

from bootsecrets import __version__
from bootsecrets.errors import BootsecretsError, Interrupted, UsageError, exit_codes
from bootsecrets.paths import Paths

COMMANDS = """\
commands:
  bootstrap     first boot: unwrap the secret-id from user-data, log in to Vault, render
                env files into the memory-only store and start the units (run by
                bootsecrets.service)
  refresh       re-read secrets and restart only the units whose values changed; with
                `--wrapped-secret-id -` re-provision from a new wrapped secret-id on stdin
  status        per unit: generation, secret paths and versions, active state; token TTL;
                each encrypted directory: locked or unlocked, Transit key version; each
                encrypted volume: open or closed, mounted, Transit key version; every lease
                and certificate: expiry, next action and when
  decommission  stop the units, revoke the leases, unmount, close and erase the encrypted
                volumes, lock the encrypted directories, delete their stored keys, the
                rendered store and the runtime drop-ins, revoke the Vault token
  revoke-leases revoke every lease the agent holds (database credentials), e.g. before a
                droplet is destroyed; the units keep running on revoked credentials
  image-check   scan an image tree for secrets and unclean state before snapshotting
"""


def epilog() -> str:
    """The commands and the exit-code table (errors.exit_codes(), the one source)."""
    width = max(len(str(code)) for code, _ in exit_codes())
    lines = [f"  {code:>{width}}  {summary}" for code, summary in exit_codes()]
    return f"{COMMANDS}\nexit codes:\n" + "\n".join(lines) + "\nSee README.md.\n"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        metavar="DIR",
        help="treat DIR as / for every host path (tests, image trees)",
    )
    common.add_argument(
        "--debug", action="store_true", help="log debug messages and show tracebacks"
    )
    common.add_argument(
        "--systemctl",
        default="systemctl",
        metavar="PROGRAM",
        help="run PROGRAM instead of systemctl (a stand-in for sandboxes)",
    )
    common.add_argument(
        "--systemd-run",
        default=None,
        metavar="PROGRAM",
        dest="systemd_run",
        help="run PROGRAM instead of systemd-run to arm the lease wake-up "
        "timer (default: systemd-run, or the --systemctl stand-in if given)",
    )
    locked = argparse.ArgumentParser(add_help=False)
    locked.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="wait this long for another bootstrap/refresh to finish (default 60)",
    )
    parser = argparse.ArgumentParser(
        prog="bootsecrets",
        description="Secrets from Vault/OpenBao into systemd units of a secret-free image.",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bootsecrets {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "bootstrap",
        parents=[common, locked],
        help="first-boot bootstrap",
        description="Log in with the wrapped secret-id from "
        "/run/bootsecrets/bootstrap.yaml (or the kept token), render and "
        "start the units.",
    )
    refresh = commands.add_parser(
        "refresh",
        parents=[common, locked],
        help="apply rotated secrets",
        description="Re-read secrets; restart only changed units.",
    )
    refresh.add_argument(
        "--wrapped-secret-id",
        metavar="-",
        dest="wrapped",
        help="read a new wrapped secret-id (or a bootstrap document) from "
        "standard input and re-provision; only `-` is accepted",
    )
    status = commands.add_parser("status", parents=[common], help="show what runs with what")
    status.add_argument("--json", action="store_true", help="stable JSON (docs/status.md)")
    decommission = commands.add_parser(
        "decommission",
        parents=[common, locked],
        help="crypto-shred this host's side: lock data, delete keys, revoke the token",
        description="Stop the units, unmount, close and erase the encrypted volumes "
        "(their LUKS2 keyslots and tokens), remove the encrypted directories' keys from the "
        "kernel, delete the stored ciphertexts, the rendered store and the drop-ins, and "
        "revoke the Vault token. Each step is idempotent and reported.",
    )
    decommission.add_argument(
        "--yes",
        action="store_true",
        help="do it without asking (required when standard input is not a terminal)",
    )
    decommission.add_argument("--json", action="store_true", help="the steps as JSON")
    commands.add_parser(
        "revoke-leases",
        parents=[common, locked],
        help="revoke every lease the agent holds",
        description="Revoke every lease the agent holds (database "
        "credentials) with the kept token, and stop the lease wake-up "
        "timer: for decommission (docs/leases.md).",
    )
    check = commands.add_parser(
        "image-check", parents=[common], help="scan an image tree for secrets and unclean state"
    )
    check.add_argument("--json", action="store_true", help="findings as JSON")
    return parser


def _on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    # Raised inside whatever is running, so its cleanup (temporary generation, lock) runs.
    raise Interrupted("stopped by SIGTERM")


def _read_stdin(stdin: TextIO) -> str:
    if stdin.isatty():
        print("paste the wrapped secret-id, then press Ctrl-D:", file=sys.stderr)
    return stdin.read(64 * 1024)


def main(
    argv: Sequence[str] | None = None,
    *,
    context: object | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """Run the CLI. `context` (a context.Context) replaces systemctl/Vault hooks in tests."""
    out = stdout or sys.stdout
    args = _parser().parse_args(argv)
    from bootsecrets import logs  # noqa: PLC0415

    logs.setup(debug=args.debug)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    previous_umask = os.umask(0o077)
    try:
        return _dispatch(args, context, stdin or sys.stdin, out)
    except BootsecretsError as err:
        if args.debug:
            _print_traceback(err)
        print(f"bootsecrets: error: {err}", file=sys.stderr)
        if err.hint:
            print(f"bootsecrets: what to do: {err.hint}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("bootsecrets: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            _print_traceback(err)
        print(
            f"bootsecrets: internal error ({type(err).__name__}); run with --debug and report it",
            file=sys.stderr,
        )
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.umask(previous_umask)


def _print_traceback(err: BaseException) -> None:
    """Where it failed (--debug), with each exception's message only when it is one of ours:
    built from names, never values. Another exception's text may quote what it choked on
    (a token, a value), so only its type is shown."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    for exc in reversed(chain):
        print("Traceback (most recent call last):", file=sys.stderr)
        traceback.print_tb(exc.__traceback__, file=sys.stderr)
        text = str(exc) if isinstance(exc, BootsecretsError) else "(message not shown)"
        print(f"{type(exc).__module__}.{type(exc).__qualname__}: {text}", file=sys.stderr)


def _dispatch(args: argparse.Namespace, context: object | None, stdin: TextIO, out: TextIO) -> int:
    if args.command == "image-check":
        from bootsecrets import imagecheck  # noqa: PLC0415

        findings = imagecheck.scan(args.root)
        out.write(
            imagecheck.format_json(findings, args.root)
            if args.json
            else imagecheck.format_text(findings, args.root)
        )
        if findings:
            raise imagecheck.findings_error(findings, args.root)
        return 0

    from bootsecrets import agent, process  # noqa: PLC0415 (hvac and jinja2 only when needed)
    from bootsecrets.context import Context  # noqa: PLC0415

    if args.command in ("bootstrap", "refresh", "decommission", "revoke-leases"):
        process.harden()  # secrets will be in this process's memory from here on

    systemd_run = args.systemd_run or (
        "systemd-run" if args.systemctl == "systemctl" else args.systemctl
    )
    ctx = (
        context
        if isinstance(context, Context)
        else Context(
            paths=Paths(args.root),
            systemctl_program=args.systemctl,
            systemd_run_program=systemd_run,
        )
    )
    ctx.lock_wait = getattr(args, "wait", ctx.lock_wait)
    if args.command == "bootstrap":
        agent.bootstrap(ctx)
    elif args.command == "refresh":
        wrapped = None
        if args.wrapped is not None:
            if args.wrapped != "-":
                raise UsageError(
                    "--wrapped-secret-id takes only `-`: pipe the token on "
                    "standard input, never on the command line"
                )
            wrapped = _read_stdin(stdin)
        agent.refresh(ctx, wrapped_secret_id=wrapped)
    elif args.command == "decommission":
        from bootsecrets import decommission  # noqa: PLC0415

        if not args.yes:
            _confirm(stdin)
        steps = decommission.decommission(ctx, wait=ctx.lock_wait)
        out.write(
            (decommission.format_json(steps) if args.json else decommission.format_text(steps))
            + "\n"
        )
        decommission.check(steps)
    elif args.command == "revoke-leases":
        agent.revoke_leases(ctx)
    elif args.command == "status":
        from bootsecrets import status  # noqa: PLC0415

        report = status.collect(ctx)
        print(status.format_json(report) if args.json else status.format_text(report), file=out)
    return 0


def _confirm(stdin: TextIO) -> None:
    """Without --yes: ask on a terminal, refuse otherwise (a script must say --yes)."""
    if not stdin.isatty():
        raise UsageError("decommission needs --yes when standard input is not a terminal")
    print(
        "This stops the units, erases the encrypted volumes' keyslots, locks the "
        "encrypted directories for good (their stored keys are deleted) and revokes this "
        "host's Vault token.\n"
        "Type `decommission` to go on:",
        file=sys.stderr,
    )
    if stdin.readline(64).strip() != "decommission":
        raise UsageError("decommission not confirmed; nothing was done")


def prepare_process() -> None:
    """What `run()` sets up before anything is imported (see there)."""
    sys.modules.setdefault("charset_normalizer", None)  # type: ignore[arg-type]
    sys.modules.setdefault("chardet", None)  # type: ignore[arg-type]
    warnings.filterwarnings("ignore", message="Unable to find acceptable character detection")
    gc.disable()


def run() -> NoReturn:
    """The console script (what bootsecrets.service runs): `main()` in a process of its own.

    On a small job, start-up and exit cost more than the work (docs/performance.md), and
    this process runs one command and ends, so three things a library must not do are done
    here, for this process only:

    * requests imports a character-set detector at import time (~10 ms) that is never used:
      Vault answers JSON with a charset, and requests falls back to UTF-8 without a detector
      (a supported set-up; its warning about it is silenced);
    * the cyclic garbage collector is off: loading hvac, requests and urllib3 allocates
      thousands of objects and sets it off repeatedly for nothing, and a command's garbage
      is bounded by its job (peak RSS is measured in benchmarks/);
    * the process ends with os._exit() once output and log handlers are flushed, skipping
      the interpreter's module-by-module teardown (~30 ms). Everything main() opened has
      been closed by then (Vault.close() joins its threads), and logging's atexit hook, the
      one that matters here, is run first.
    """
    prepare_process()
    code = 1
    try:
        code = main()
    except SystemExit as stop:  # argparse: --help, --version, usage errors
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # main() maps every outcome; this is a bug, so say where
        traceback.print_exc()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                code = code or 1  # output lost (a closed pipe): the caller must know
        os._exit(code)


if __name__ == "__main__":
    run()
