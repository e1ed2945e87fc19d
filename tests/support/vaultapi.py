"""Typed calls to OpenBao's HTTP API for set-up and checks: from the installed dev package
(dev/bootsecrets_dev/vaultapi.py, shared with the benchmark), re-exported for the tests'
`from support.vaultapi import ...`."""

from bootsecrets_dev.vaultapi import (
    call,
    enable_engine,
    lookup,
    mounts,
    read,
    renew,
    revoke,
    revoke_prefix,
    write,
)

__all__ = [
    "call",
    "enable_engine",
    "lookup",
    "mounts",
    "read",
    "renew",
    "revoke",
    "revoke_prefix",
    "write",
]
