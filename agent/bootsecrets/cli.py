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
from bootsecrets.errors import BootsecretsError, UsageError
from bootsecrets.paths import Paths

EPILOG = """\
commands:
  bootstrap     first boot: unwrap the secret-id from user-data, log in to Vault, render
                env files into the memory-only store and start the units (run by
                bootsecrets.service)
  refresh       re-read secrets and restart only the units whose values changed; with
                `--wrapped-secret-id -` re-provision from a new wrapped secret-id on stdin
  status        per unit: generation, secret paths and versions, active state; token TTL
  image-check   scan an image tree for secrets and unclean state before snapshotting

exit codes: 0 ok, 2 usage, 10 config, 11 bootstrap/user-data, 12 store, 13 template,
  14 value cannot be encoded, 15 lock busy, 20 Vault error, 21 Vault unreachable,
  22 wrapped secret-id unknown/expired, 23 wrapping creation path mismatch (tampering),
  24 wrapped secret-id already unwrapped (interception), 25 login denied,
  26 permission denied on a path, 27 secret or key missing, 28 token revoked/expired,
  29 not provisioned, 30 systemctl failed, 31 unit failed after restart (rolled back),
  32 answer to unwrap/login lost, 33 Vault's TLS certificate does not verify,
  40 image-check findings, 41 image tree unreadable,
  130/143 interrupted. See README.md.
"""


class Interrupted(BootsecretsError):
    exit_code = 143
    hint = "nothing half-written was left behind; run the command again"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                        help="treat DIR as / for every host path (tests, image trees)")
    common.add_argument("--debug", action="store_true",
                        help="log debug messages and show tracebacks")
    common.add_argument("--systemctl", default="systemctl", metavar="PROGRAM",
                        help="run PROGRAM instead of systemctl (a stand-in for sandboxes)")
    locked = argparse.ArgumentParser(add_help=False)
    locked.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                        help="wait this long for another bootstrap/refresh to finish "
                        "(default 60)")
    parser = argparse.ArgumentParser(
        prog="bootsecrets",
        description="Secrets from Vault/OpenBao into systemd units of a secret-free image.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bootsecrets {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("bootstrap", parents=[common, locked], help="first-boot bootstrap",
                        description="Log in with the wrapped secret-id from "
                        "/run/bootsecrets/bootstrap.yaml (or the kept token), render and "
                        "start the units.")
    refresh = commands.add_parser("refresh", parents=[common, locked],
                                  help="apply rotated secrets",
                                  description="Re-read secrets; restart only changed units.")
    refresh.add_argument("--wrapped-secret-id", metavar="-", dest="wrapped",
                         help="read a new wrapped secret-id (or a bootstrap document) from "
                         "standard input and re-provision; only `-` is accepted")
    status = commands.add_parser("status", parents=[common], help="show what runs with what")
    status.add_argument("--json", action="store_true", help="stable JSON (docs/status.md)")
    check = commands.add_parser("image-check", parents=[common],
                                help="scan an image tree for secrets and unclean state")
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
    """Run the CLI. `context` (an agent.Context) replaces systemctl/Vault hooks in tests."""
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
            traceback.print_exc(file=sys.stderr)
        print(f"bootsecrets: error: {err}", file=sys.stderr)
        if err.hint:
            print(f"bootsecrets: what to do: {err.hint}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("bootsecrets: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        print(f"bootsecrets: internal error ({type(err).__name__}); run with --debug and "
              "report it", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.umask(previous_umask)


def _dispatch(args: argparse.Namespace, context: object | None, stdin: TextIO,
              out: TextIO) -> int:
    if args.command == "image-check":
        from bootsecrets import imagecheck  # noqa: PLC0415

        findings = imagecheck.scan(args.root)
        out.write(imagecheck.format_json(findings, args.root) if args.json
                  else imagecheck.format_text(findings, args.root))
        if findings:
            raise imagecheck.findings_error(findings, args.root)
        return 0

    from bootsecrets import agent, process  # noqa: PLC0415 (hvac and jinja2 only when needed)

    if args.command in ("bootstrap", "refresh"):
        process.harden()  # secrets will be in this process's memory from here on

    ctx = context if isinstance(context, agent.Context) else agent.Context(
        paths=Paths(args.root), systemctl_program=args.systemctl)
    ctx.lock_wait = getattr(args, "wait", ctx.lock_wait)
    if args.command == "bootstrap":
        agent.bootstrap(ctx)
    elif args.command == "refresh":
        wrapped = None
        if args.wrapped is not None:
            if args.wrapped != "-":
                raise UsageError("--wrapped-secret-id takes only `-`: pipe the token on "
                                 "standard input, never on the command line")
            wrapped = _read_stdin(stdin)
        agent.refresh(ctx, wrapped_secret_id=wrapped)
    elif args.command == "status":
        from bootsecrets import status  # noqa: PLC0415

        report = status.collect(ctx)
        print(status.format_json(report) if args.json else status.format_text(report), file=out)
    return 0


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
