"""A real PostgreSQL on a loopback port and OpenBao's database engine on it: from the installed
dev package (dev/bootsecrets_dev/postgres.py, shared with the benchmark), re-exported for
the tests' `from support.postgres import ...`."""

from bootsecrets_dev.postgres import (
    CREATION,
    INSTALL_HINT,
    Creds,
    DatabaseEngine,
    Postgres,
    PostgresError,
    pg_bindir,
    postgres_server,
    psql_binary,
)

__all__ = [
    "CREATION",
    "INSTALL_HINT",
    "Creds",
    "DatabaseEngine",
    "Postgres",
    "PostgresError",
    "pg_bindir",
    "postgres_server",
    "psql_binary",
]
