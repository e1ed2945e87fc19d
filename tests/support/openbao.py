"""The dev-OpenBao helper, from the installed dev package (dev/bootsecrets_dev/openbao.py):
a real `bao server -dev` on a free loopback port with a file audit device, and helpers to
set it up like a user. Re-exported here for the tests' `from support.openbao import ...`.

Every secret value and wrapped token created through it is added to `CANARIES`, which the
leak guard (tests/conftest.py) looks for in everything a test captured.
"""

from bootsecrets_dev.openbao import (
    CANARIES,
    OpenBao,
    OpenBaoMissing,
    bao_binary,
    dev_server,
    free_port,
    policy,
    wait_healthy,
)

__all__ = [
    "CANARIES",
    "OpenBao",
    "OpenBaoMissing",
    "bao_binary",
    "dev_server",
    "free_port",
    "policy",
    "wait_healthy",
]
