#!/usr/bin/python3
"""bootsecrets demo application: proves which secret values a unit runs with, without leaking them.

GET / answers JSON:
  {"unit": ..., "pid": ..., "invocation_id": $INVOCATION_ID,
   "sha256": {VAR: sha256-hex of its value}        for every variable starting with DEMO_
                                                   (plus any named with --hash-var),
   "credentials": {name: sha256-hex of the file}}  for every file in $CREDENTIALS_DIRECTORY
  (+ "data": {"file": name, "sha256": digest of its content, "starts": n}   with --data-dir)

--data-dir DIR: at each start, the value of DEMO_CANARY goes once into DIR/notes-<digest
prefix>.txt (0600, never replaced) and a line into DIR/starts.log: a unit that writes data
where bootsecrets encrypted it (an fscrypt directory, a LUKS2 volume), and proves after a
reboot that the data is still readable. --tls-cert/--tls-key NAME: serve HTTPS with these
files from $CREDENTIALS_DIRECTORY (a certificate bootsecrets issued from Vault's PKI).

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
import ssl

PREFIX = "DEMO_"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_data(directory: pathlib.Path) -> str:
    """The canary into its file (once), a line into starts.log; the file's name."""
    value = os.environb[(PREFIX + "CANARY").encode()]
    name = f"notes-{digest(value)[:16]}.txt"
    path = directory / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as handle:
            handle.write(value + b"\n")
            os.fsync(handle.fileno())
    fd = os.open(directory / "starts.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as handle:
        handle.write(b"start\n")
        os.fsync(handle.fileno())
    return name


def data_report(directory: pathlib.Path, name: str) -> dict[str, object]:
    starts = (directory / "starts.log").read_bytes().count(b"start\n")
    return {"file": name, "sha256": digest((directory / name).read_bytes()), "starts": starts}


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
    parser.add_argument("--data-dir", type=pathlib.Path, help="write DEMO_CANARY here once")
    parser.add_argument("--tls-cert", metavar="NAME", help="credential: certificate chain")
    parser.add_argument("--tls-key", metavar="NAME", help="credential: private key")
    args = parser.parse_args()
    data_file = write_data(args.data_dir) if args.data_dir else None

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in ("/", "/health"):
                self.send_error(404)
                return
            doc = report(args.unit, args.hash_var)
            if args.data_dir and data_file:
                doc["data"] = data_report(args.data_dir, data_file)
            body = json.dumps(doc, sort_keys=True).encode()
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
        if args.tls_cert and args.tls_key:
            credentials = pathlib.Path(os.environ["CREDENTIALS_DIRECTORY"])
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(credentials / args.tls_cert, credentials / args.tls_key)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        print(f"{args.unit}: listening on {args.bind}:{args.port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
