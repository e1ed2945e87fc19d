"""Encoding for systemd's `EnvironmentFile=` (and credential files).

Every value is written double-quoted. Inside double quotes systemd's env-file parser
(src/basic/env-file.c) keeps every byte, newlines and CR included, and unescapes only
backslash followed by one of `"` `\\` `` ` `` `$`; any other backslash pair is kept as is and
backslash-newline is a line continuation (dropped). So escaping exactly those four
characters round-trips any string. What cannot be represented is rejected: NUL (C strings),
invalid UTF-8 (systemd ignores such assignments), and a NAME=value longer than the kernel's
MAX_ARG_STRLEN (131072 bytes including the NUL), which execve() refuses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from bootsecrets.errors import EncodeError

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
MAX_ARG_STRLEN = 128 * 1024
_SPECIAL = re.compile(r'(["\\`$])')


def value_bytes(unit: str, name: str, value: str) -> bytes:
    """The value as UTF-8, or EncodeError naming unit and variable (never the value)."""
    if "\x00" in value:
        raise EncodeError(unit, name, "value contains a NUL byte, which cannot be passed on")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise EncodeError(unit, name, "value is not valid UTF-8") from None


def encode_assignment(unit: str, name: str, value: str) -> bytes:
    if not ENV_NAME.match(name):
        raise EncodeError(unit, name, "not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)")
    raw = value_bytes(unit, name, value)
    if len(name) + 1 + len(raw) + 1 > MAX_ARG_STRLEN:
        raise EncodeError(
            unit, name, f"value is {len(raw)} bytes; NAME=value must fit in 128 KiB"
        )
    escaped = _SPECIAL.sub(r"\\\1", value)
    return f'{name}="{escaped}"\n'.encode()


def encode(unit: str, assignments: Iterable[tuple[str, str]]) -> bytes:
    """A whole env file. Duplicate names are rejected (systemd would keep the last one)."""
    seen: set[str] = set()
    lines = [b"# Written by bootsecrets. Memory-only; do not copy.\n"]
    for name, value in assignments:
        if name in seen:
            raise EncodeError(unit, name, "variable is defined twice")
        seen.add(name)
        lines.append(encode_assignment(unit, name, value))
    return b"".join(lines)
