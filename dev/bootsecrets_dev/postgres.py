"""A real PostgreSQL (Debian's `postgresql` package) on a free loopback port, and OpenBao's
database secrets engine pointed at it.

`postgres_server()` runs `initdb` + `pg_ctl` in a temporary directory (the tests' fixture
and the benchmark's leases part), as the `postgres` user when run as root (PostgreSQL
refuses to run as root; CI is root), listening on 127.0.0.1 only (its Unix socket lives in
the temporary directory), password authentication (scram-sha-256) everywhere. The
superuser password and every password handed out by `database/creds/<role>` through
`DatabaseEngine.creds` become leak-guard canaries (`bootsecrets_dev.openbao.CANARIES`).

Passwords reach `psql` through `PGPASSWORD` in its environment, never its argv.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootsecrets_dev import vaultapi
from bootsecrets_dev.openbao import CANARIES, OpenBao, free_port

INSTALL_HINT = (
    "install Debian's PostgreSQL: `apt-get update && apt-get install -y postgresql` "
    "(scripts/install-test-deps does it)"
)


def pg_bindir() -> Path:
    """The newest /usr/lib/postgresql/<major>/bin (Debian keeps initdb/pg_ctl off PATH);
    else the directory of an `initdb` on PATH."""
    majors = sorted(
        (
            p
            for p in Path("/usr/lib/postgresql").glob("*/bin")
            if (p / "initdb").is_file() and p.parent.name.isdigit()
        ),
        key=lambda p: int(p.parent.name),
    )
    if majors:
        return majors[-1]
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError(f"PostgreSQL's initdb is missing: {INSTALL_HINT}")


def psql_binary() -> str:
    bindir_psql = pg_bindir() / "psql"
    if bindir_psql.is_file():
        return str(bindir_psql)
    found = shutil.which("psql")
    if not found:
        raise RuntimeError(f"psql is missing: {INSTALL_HINT}")
    return found


@dataclass(frozen=True)
class _RunAs:
    """Whom the server runs as: `postgres` when we are root, else ourselves."""

    uid: int
    gid: int
    name: str

    @classmethod
    def pick(cls) -> _RunAs:
        if os.geteuid() != 0:
            return cls(os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name)
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError(f"there is no `postgres` user: {INSTALL_HINT}") from None
        return cls(entry.pw_uid, entry.pw_gid, entry.pw_name)

    def popen_kwargs(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


class PostgresError(RuntimeError):
    """A psql command failed: its stderr (which never holds the password) is the message."""


class Postgres:
    """A running server. `superuser` is `postgres`; its password is a canary."""

    def __init__(self, workdir: Path, port: int, password: str, run_as: _RunAs) -> None:
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.log_path = workdir / "postgres.log"
        self.host = "127.0.0.1"
        self.port = port
        self.superuser = "postgres"
        self.password = password
        self.run_as = run_as

    def _env(self, password: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            PGPASSWORD=password,
            PGCONNECT_TIMEOUT="10",
            HOME=str(self.workdir),
            PGSSLMODE="disable",
            PSQLRC="/dev/null",
            LC_ALL="C.UTF-8",
        )
        return env

    def psql(
        self,
        sql: str,
        *,
        user: str | None = None,
        password: str | None = None,
        database: str = "postgres",
    ) -> str:
        """Run `sql` with psql over TCP as `user` (default: the superuser); return the
        unaligned, tuples-only output. Raises PostgresError with psql's stderr."""
        argv = [
            psql_binary(),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            user or self.superuser,
            "-d",
            database,
            "-c",
            sql,
        ]
        result = subprocess.run(
            argv,
            env=self._env(password or self.password),
            text=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise PostgresError(
                f"psql as {user or self.superuser} failed "
                f"({result.returncode}): {result.stderr.strip()}"
            )
        return result.stdout.strip()

    def whoami(self, user: str, password: str) -> str:
        """Log in as `user` with `password` and return `current_user` (proves the login)."""
        return self.psql("SELECT current_user", user=user, password=password)

    def roles(self) -> set[str]:
        return set(self.psql("SELECT rolname FROM pg_roles").splitlines())

    def valid_until(self, role: str) -> str:
        """pg_roles.rolvaliduntil of `role` as an epoch (text), '' when unset."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", role):
            raise ValueError("unexpected role name")
        query = (
            "SELECT coalesce(extract(epoch FROM rolvaliduntil)::bigint::text, '') "  # noqa: S608
            f"FROM pg_roles WHERE rolname = '{role}'"
        )  # the name is checked above
        return self.psql(query)

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(pg_bindir() / "pg_ctl"), "-D", str(self.datadir), *args],
            env=self._env(""),
            text=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=120,
            check=check,
            cwd=self.workdir,
            **self.run_as.popen_kwargs(),
        )

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        return None

    def start(self) -> None:
        """Start it again after `stop()` (a database outage and its end), same port."""
        result = self.pg_ctl("start", "-w", "-t", "120", "-l", str(self.log_path), check=False)
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed ({result.returncode}): {result.stderr}")

    def stop(self, mode: str = "fast") -> None:
        """Shut down (`fast`: clean, committed data kept, as in an outage a test ends with
        `start()`; `immediate`: a crash, for teardown); SIGKILL to the postmaster if
        pg_ctl cannot do it."""
        pid = self.postmaster_pid()
        result = self.pg_ctl("stop", "-m", mode, "-w", "-t", "30", check=False)
        if result.returncode != 0 and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            give_up = time.monotonic() + 10
            while time.monotonic() < give_up and _alive(pid):
                time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _initdb(pg: Postgres) -> None:
    pwfile = pg.workdir / "pwfile"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pg.password + "\n")
    os.chown(pwfile, pg.run_as.uid, pg.run_as.gid)
    try:
        subprocess.run(
            [
                str(pg_bindir() / "initdb"),
                "-D",
                str(pg.datadir),
                "-U",
                pg.superuser,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            env=pg._env(""),
            text=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=300,
            check=True,
            cwd=pg.workdir,
            **pg.run_as.popen_kwargs(),
        )
    finally:
        pwfile.unlink()
    # Settings in the config file rather than `pg_ctl -o` (which pg_ctl hands to a shell).
    with (pg.datadir / "postgresql.conf").open("a", encoding="utf-8") as conf:
        conf.write(
            f"\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = "
            f"'{pg.workdir}'\nfsync = off\n"
            "full_page_writes = off\nmax_connections = 50\nshared_buffers = 16MB\n"
        )


def _start(pg: Postgres, attempts: int = 3) -> None:
    """pg_ctl start on a free port; another free port when someone took it meanwhile."""
    conf = pg.datadir / "postgresql.conf"
    for attempt in range(attempts):
        with conf.open("a", encoding="utf-8") as f:
            f.write(f"port = {pg.port}\n")  # the last assignment wins
        result = pg.pg_ctl("start", "-w", "-t", "120", "-l", str(pg.log_path), check=False)
        if result.returncode == 0:
            return
        log = pg.log_path.read_text(errors="replace") if pg.log_path.exists() else ""
        if "could not bind" in log and attempt + 1 < attempts:
            pg.port = free_port()
            continue
        raise RuntimeError(
            f"pg_ctl start failed ({result.returncode}): "
            f"{result.stdout}{result.stderr}\n{log[-3000:]}"
        )


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A fresh cluster on 127.0.0.1 and a free port, removed (processes and files) after."""
    run_as = _RunAs.pick()
    workdir = Path(tempfile.mkdtemp(prefix="postgres-"))
    os.chown(workdir, run_as.uid, run_as.gid)
    password = "pg-super-" + secrets.token_hex(16)
    CANARIES.add(password)
    pg = Postgres(workdir, free_port(), password, run_as)
    try:
        _initdb(pg)
        _start(pg)
        yield pg
    finally:
        try:
            if pg.datadir.exists():
                pg.stop("immediate")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


# --- OpenBao's database secrets engine ---------------------------------------------------------

CREATION = (
    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"
    ' GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{{name}}";'
)


@dataclass(frozen=True)
class Creds:
    """One answer of `database/creds/<role>`; the password is a canary."""

    username: str
    password: str
    lease_id: str
    lease_duration: int
    renewable: bool


class DatabaseEngine:
    """OpenBao's database engine at `mount`, with one connection (`name`) to `pg` through
    the built-in postgresql plugin, root credentials as the test's superuser."""

    def __init__(
        self, bao: OpenBao, pg: Postgres, *, mount: str = "database", name: str = "pg"
    ) -> None:
        self.bao = bao
        self.pg = pg
        self.mount = mount
        self.name = name
        vaultapi.enable_engine(bao, "database", mount)
        vaultapi.write(
            bao,
            f"{mount}/config/{name}",
            {
                "plugin_name": "postgresql-database-plugin",
                "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@{pg.host}:"
                f"{pg.port}/postgres?sslmode=disable",
                "username": pg.superuser,
                "password": pg.password,
                "allowed_roles": "*",
                "verify_connection": True,
            },
        )

    def role(
        self, role: str, *, default_ttl: str = "2m", max_ttl: str = "10m", creation: str = CREATION
    ) -> None:
        """A dynamic role; revocation and renewal use the plugin's defaults (drop the role;
        ALTER ROLE ... VALID UNTIL)."""
        vaultapi.write(
            self.bao,
            f"{self.mount}/roles/{role}",
            {
                "db_name": self.name,
                "creation_statements": [creation],
                "default_ttl": default_ttl,
                "max_ttl": max_ttl,
            },
        )

    def creds(self, role: str) -> Creds:
        response = vaultapi.read(self.bao, f"{self.mount}/creds/{role}")
        data = response["data"]
        CANARIES.add(str(data["password"]))
        return Creds(
            username=str(data["username"]),
            password=str(data["password"]),
            lease_id=str(response["lease_id"]),
            lease_duration=int(response["lease_duration"]),
            renewable=bool(response["renewable"]),
        )
