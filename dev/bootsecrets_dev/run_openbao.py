"""`bootsecrets-dev-openbao`: a dev OpenBao server for trying bootsecrets by hand.

Starts `bao server -dev` on 127.0.0.1 with a file audit device and prints how to reach it
(the dev root token too, as `bao server -dev` itself does). With `--role`, also enables
AppRole, writes a policy reading the `--read` paths and creates the role; with
`--bootstrap FILE`, mints a response-wrapped secret-id and writes the bootstrap file
(role_id, wrapped_secret_id, vault_addr; mode 0600) exactly as cloud-init would deliver it.
Runs until interrupted (Ctrl-C or SIGTERM), then stops the server and removes its files.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from bootsecrets_dev.openbao import dev_server, policy

READY = "ready: Ctrl-C or SIGTERM stops the server"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bootsecrets-dev-openbao", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--port", type=int, help="listen port (default: a free one)")
    parser.add_argument("--role", help="create this AppRole (policy <role>-policy)")
    parser.add_argument(
        "--read",
        action="append",
        default=[],
        metavar="PATH",
        help="an API path the role may read, e.g. secret/data/app/db (repeatable)",
    )
    parser.add_argument(
        "--bootstrap",
        type=Path,
        metavar="FILE",
        help="write a bootstrap file with a wrapped secret-id for --role",
    )
    parser.add_argument("--wrap-ttl", default="10m", help="the wrapping token's TTL")
    args = parser.parse_args(argv)
    if args.bootstrap and not args.role:
        parser.error("--bootstrap needs --role")
    return args


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with dev_server(args.port) as bao:
        print(f"OpenBao dev server at {bao.addr} (audit log {bao.audit_path})")
        print(f"export VAULT_ADDR={bao.addr}")
        print(f"export VAULT_TOKEN={bao.root_token}")
        if args.role:
            role_id = bao.approle(args.role, policy(*args.read))
            print(f"AppRole {args.role}: reads {', '.join(args.read) or 'nothing'}")
            if args.bootstrap:
                wrapped = bao.wrapped_secret_id(args.role, ttl=args.wrap_ttl)
                write_private(
                    args.bootstrap,
                    json.dumps(
                        {"role_id": role_id, "wrapped_secret_id": wrapped, "vault_addr": bao.addr}
                    )
                    + "\n",
                )
                print(
                    f"bootstrap (wrapped secret-id, single use, {args.wrap_ttl}) "
                    f"written to {args.bootstrap}"
                )
        print(READY, flush=True)
        stop.wait()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
