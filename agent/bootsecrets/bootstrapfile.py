"""The bootstrap user-data delivers (`/run/bootsecrets/bootstrap.yaml`, written by
cloud-init), or that `refresh --wrapped-secret-id -` reads from standard input."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from bootsecrets.errors import BootstrapError
from bootsecrets.vaultconfig import parse_address
from bootsecrets.yamldoc import Node, parse_document, read_document

TOKEN_SHAPE = re.compile(r"[\x21-\x7e]{1,1024}\Z")


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """What user-data delivers. `repr` hides the wrapped secret-id."""

    role_id: str = dataclasses.field(repr=False)
    wrapped_secret_id: str = dataclasses.field(repr=False)
    vault_addr: str | None = None


BOOTSTRAP_FIELDS = frozenset({"role_id", "wrapped_secret_id"})


def load_bootstrap(path: Path) -> Bootstrap:
    """The user-data bootstrap file: role_id, wrapped_secret_id, optional vault_addr.
    Never read through a symlink: the single-use token must be in the store, where the
    agent deletes it."""
    return _bootstrap(read_document(path, BootstrapError, follow_symlinks=False))


def parse_bootstrap(data: bytes, source: str = "<stdin>") -> Bootstrap:
    """A bootstrap document given on standard input (`refresh --wrapped-secret-id -`)."""
    return _bootstrap(parse_document(data, source, BootstrapError))


def _bootstrap(doc: Node) -> Bootstrap:
    fields = doc.mapping(BOOTSTRAP_FIELDS, frozenset({"vault_addr"}))
    tokens = {
        key: fields[key].matching(TOKEN_SHAPE, "a token: printable ASCII, no spaces, <= 1024 bytes")
        for key in sorted(BOOTSTRAP_FIELDS)
    }
    addr = parse_address(fields["vault_addr"]) if "vault_addr" in fields else None
    return Bootstrap(tokens["role_id"], tokens["wrapped_secret_id"], addr)


def parse_wrapped_secret_id(text: str, source: str = "<stdin>") -> str:
    """A wrapped secret-id given on standard input (one line, surrounding space ignored)."""
    token = text.strip()
    if not TOKEN_SHAPE.match(token):
        raise BootstrapError(
            source,
            None,
            "wrapped_secret_id",
            "must be one token: printable ASCII, no spaces, <= 1024 bytes",
        )
    return token
