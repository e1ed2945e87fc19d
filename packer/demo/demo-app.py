#!/usr/bin/python3
"""bootsecrets demo application: proves which secret values a unit runs with, without leaking them.

GET / answers JSON:
  {"unit": ..., "pid": ..., "invocation_id": $INVOCATION_ID,
   "sha256": {VAR: sha256-hex of its value}        for every variable starting with DEMO_
                                                   (plus any named with --hash-var),
   "credentials": {name: sha256-hex of the file}}  for every file in $CREDENTIALS_DIRECTORY

Only digests ever leave the process; values are never printed, logged or put in argv. Request
logging is off (the Debian 12 journal is persistent, on disk). Standard library only, run by
/usr/bin/python3, so it needs nothing from the image beyond the distribution's Python.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import pathlib
import socketserver

PREFIX = "DEMO_"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def report(unit: str, extra_vars: list[str]) -> dict[str, object]:
    names = sorted({n for n in os.environ if n.startswith(PREFIX)} | set(extra_vars))
    env_hashes = {
        name: digest(os.environb[name.encode()]) for name in names if name.encode() in os.environb
    }
    credentials: dict[str, str] = {}
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        for path in sorted(pathlib.Path(cred_dir).iterdir()):
            if path.is_file():
                credentials[path.name] = digest(path.read_bytes())
    return {
        "unit": unit,
        "pid": os.getpid(),
        "invocation_id": os.environ.get("INVOCATION_ID", ""),
        "sha256": env_hashes,
        "credentials": credentials,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unit", required=True, help="unit name to report")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="0.0.0.0")  # noqa: S104 - reached via QEMU hostfwd
    parser.add_argument(
        "--hash-var",
        action="append",
        default=[],
        metavar="NAME",
        help="also report the digest of this variable (names only, not values)",
    )
    args = parser.parse_args()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in ("/", "/health"):
                self.send_error(404)
                return
            body = json.dumps(report(args.unit, args.hash_var), sort_keys=True).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *a: object) -> None:
            return  # no request log: nothing about requests goes to the journal

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    with Server((args.bind, args.port), Handler) as server:
        print(f"{args.unit}: listening on {args.bind}:{args.port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
