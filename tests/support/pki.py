"""OpenBao's PKI engine with a root CA, and independent checks of what it issues: from the
installed dev package (dev/bootsecrets_dev/pki.py, shared with the benchmark), re-exported
for the tests' `from support.pki import ...`."""

from bootsecrets_dev.pki import (
    Issued,
    Names,
    PkiEngine,
    key_matches,
    load,
    names,
    serial_int,
    tls_handshake,
    verifies_against,
)

__all__ = [
    "Issued",
    "Names",
    "PkiEngine",
    "key_matches",
    "load",
    "names",
    "serial_int",
    "tls_handshake",
    "verifies_against",
]
