"""Encoding for systemd's `EnvironmentFile=` and for `LoadCredential=` files.

Every value is written double-quoted. Inside double quotes systemd 252's env-file parser
(src/basic/env-file.c, parse_env_file_internal) keeps every byte, newlines, CR, tabs,
trailing blanks and other control characters included, and unescapes only backslash
followed by one of `"` `\\` `` ` `` `$`; any other backslash pair is kept as is and
backslash-newline is a line continuation (dropped). So escaping exactly those four
characters gives every value back byte for byte, and a value is accepted exactly when
systemd accepts it:

* no NUL: the file is read as a C string;
* valid UTF-8 as systemd defines it (src/basic/utf8.c, utf8_is_valid/unichar_is_valid):
  no surrogates (U+D800-U+DFFF) and no noncharacters (U+FDD0-U+FDEF and U+nFFFE/U+nFFFF in
  every plane). systemd refuses the whole file when one value breaks this and logs that
  value to the journal, so it must never be written;
* `NAME=value` plus its NUL within the kernel's MAX_ARG_STRLEN (128 KiB), or execve() of the
  unit fails with E2BIG (systemd's own bound, env_assignment_is_valid, is ARG_MAX - 1).

And per unit, since all variables go through one execve(): the kernel refuses argv plus
environment (strings, NULs and one pointer each) over a quarter of RLIMIT_STACK, 2 MiB
with the default 8 MiB stack. bootsecrets keeps what it writes for one unit within
MAX_ENVIRONMENT_BYTES (1 MiB), leaving the other half for the command line, the variables
systemd sets itself (PATH, INVOCATION_ID, NOTIFY_SOCKET, CREDENTIALS_DIRECTORY, ...) and the
unit's own Environment=. A unit that lowers LimitSTACK= below 8 MiB lowers that bound too.

Credentials: systemd 252 reads at most CREDENTIAL_SIZE_MAX (1 MiB) per credential and
CREDENTIALS_TOTAL_SIZE_MAX (1 MiB) per unit, counting each credential's name plus its data
(src/core/execute.c, acquire_credentials); more fails the unit's start.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from bootsecrets.errors import EncodeError

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: The kernel's limit on one argv/envp string, its NUL included (32 pages).
MAX_ARG_STRLEN = 128 * 1024
#: What bootsecrets writes for one unit: every NAME=value with its NUL and its pointer.
MAX_ENVIRONMENT_BYTES = 1024 * 1024
POINTER_BYTES = 8
#: systemd 252: one credential, and all of a unit's credentials (name + data each).
CREDENTIAL_SIZE_MAX = 1024 * 1024
CREDENTIALS_TOTAL_SIZE_MAX = 1024 * 1024

#: Variables that change how a process loads code or finds programs: the dynamic loader's
#: and glibc's (its secure-execution list, unsecvars.h), the shell's, and the interpreters'
#: and runtimes' search paths and option hooks. `environment_from` may not produce one
#: (whoever can write the secret would choose the code the unit runs); the config may
#: still set one explicitly under `environment`. Listed in docs/architecture.md.
PROTECTED_NAMES = frozenset(
    {
        "PATH",
        "GCONV_PATH",
        "GETCONF_DIR",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "MALLOC_TRACE",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TMPDIR",
        "TZDIR",
        "IFS",
        "ENV",
        "BASH_ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "CDPATH",
        "PS4",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONINSPECT",
        "PYTHONUSERBASE",
        "PYTHONSAFEPATH",
        "PYTHONPLATLIBDIR",
        "PYTHONBREAKPOINT",
        "PERL5LIB",
        "PERLLIB",
        "PERL5OPT",
        "RUBYLIB",
        "RUBYOPT",
        "GEM_PATH",
        "GEM_HOME",
        "NODE_OPTIONS",
        "NODE_PATH",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS",
        "CLASSPATH",
        "LUA_PATH",
        "LUA_CPATH",
        "LUA_INIT",
        "PHPRC",
        "PHP_INI_SCAN_DIR",
        "TCLLIBPATH",
        "GIT_EXEC_PATH",
        "GIT_SSH",
        "GIT_SSH_COMMAND",
        "OPENSSL_CONF",
        "OPENSSL_ENGINES",
        "OPENSSL_MODULES",
    }
)
PROTECTED_PREFIXES = ("LD_", "BASH_FUNC_", "LUA_INIT_", "PYTHONMALLOC")


def is_protected(name: str) -> bool:
    """Whether `name` changes how a process loads code or finds programs."""
    return name in PROTECTED_NAMES or name.startswith(PROTECTED_PREFIXES)


_SPECIAL = re.compile(r'(["\\`$])')
_NONCHARACTERS = "\ufdd0-\ufdef" + "".join(
    f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17)
)
_REFUSED = re.compile(f"[\x00\ud800-\udfff{_NONCHARACTERS}]")


def env_value_problem(value: str) -> str | None:
    """Why systemd would not give `value` back from an env file, or None. Never the value."""
    bad = _REFUSED.search(value)
    if bad is None:
        return None
    char = ord(bad.group())
    if char == 0:
        return "value contains a NUL byte, which cannot be passed on"
    if 0xD800 <= char <= 0xDFFF:
        return "value is not valid UTF-8 (it holds a lone surrogate)"
    return (
        "value contains a Unicode noncharacter (U+FDD0-U+FDEF, U+FFFE or U+FFFF in some "
        "plane), which systemd refuses"
    )


def encode_assignment(unit: str, name: str, value: str) -> bytes:
    """One `NAME="value"` line, or EncodeError naming unit and variable (never the value)."""
    if not ENV_NAME.match(name):
        raise EncodeError(unit, name, "not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)")
    problem = env_value_problem(value)
    if problem is not None:
        raise EncodeError(unit, name, problem)
    size = assignment_size(name, value)
    if size > MAX_ARG_STRLEN:
        raise EncodeError(
            unit, name, f"value is {size - len(name) - 2} bytes; NAME=value must fit in 128 KiB"
        )
    escaped = _SPECIAL.sub(r"\\\1", value)
    return f'{name}="{escaped}"\n'.encode()


def assignment_size(name: str, value: str) -> int:
    """Bytes of `NAME=value` and its NUL, as execve() copies it."""
    return len(name) + 1 + len(value.encode("utf-8", "surrogatepass")) + 1


def encode(unit: str, assignments: Iterable[tuple[str, str]]) -> bytes:
    """A whole env file. Duplicate names are rejected (systemd would keep the last one), and
    so is an environment larger than MAX_ENVIRONMENT_BYTES."""
    seen: set[str] = set()
    lines = [b"# Written by bootsecrets. Memory-only; do not copy.\n"]
    total = 0
    largest = ("", 0)
    for name, value in assignments:
        if name in seen:
            raise EncodeError(unit, name, "variable is defined twice")
        seen.add(name)
        lines.append(encode_assignment(unit, name, value))
        size = assignment_size(name, value)
        total += size + POINTER_BYTES
        largest = max(largest, (name, size), key=lambda item: item[1])
    if total > MAX_ENVIRONMENT_BYTES:
        raise EncodeError(
            unit,
            largest[0],
            f"the unit's variables total {total} bytes, over the 1 MiB (1048576) a unit may "
            "get: execve() refuses an environment over a quarter of the stack limit. This is "
            "the largest variable; deliver big values as credentials instead",
        )
    return b"".join(lines)


def value_bytes(unit: str, name: str, value: str) -> bytes:
    """A credential's bytes: UTF-8 without NUL, or EncodeError naming unit and credential."""
    if "\x00" in value:
        raise EncodeError(unit, name, "value contains a NUL byte, which cannot be passed on")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise EncodeError(unit, name, "value is not valid UTF-8") from None


def check_credentials(unit: str, credentials: Mapping[str, bytes]) -> None:
    """Refuse credentials systemd 252 would not load (per credential and per unit)."""
    total = 0
    for name, data in credentials.items():
        if len(data) > CREDENTIAL_SIZE_MAX:
            raise EncodeError(unit, name, f"credential is {len(data)} bytes, larger than 1 MiB")
        total += len(name) + len(data)
        if total > CREDENTIALS_TOTAL_SIZE_MAX:
            raise EncodeError(
                unit,
                name,
                "the unit's credentials total more than 1 MiB (1048576, names included) with "
                "this one, which systemd refuses to load",
            )
