"""The EnvironmentFile= encoder against systemd 252's own parser (libsystemd-shared, through
ctypes), against the kernel's execve() limits, and against an independent parser of
systemd's rules (tests/systemd_envfile.py, itself checked against the real one here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootsecrets.envfile import (
    CREDENTIAL_SIZE_MAX,
    CREDENTIALS_TOTAL_SIZE_MAX,
    MAX_ARG_STRLEN,
    MAX_ENVIRONMENT_BYTES,
    POINTER_BYTES,
    check_credentials,
    encode,
    encode_assignment,
    env_value_problem,
)
from bootsecrets.errors import EncodeError
from support.libsystemd import libsystemd
from systemd_envfile import parse

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True)
#: Unicode's noncharacters: U+FDD0..U+FDEF and the last two code points of every plane.
NONCHARACTERS = "".join(chr(c) for c in range(0xFDD0, 0xFDF0)) + "".join(
    chr(plane << 16 | last) for plane in range(17) for last in (0xFFFE, 0xFFFF)
)
# Any text systemd can carry: every code point except NUL, lone surrogates, noncharacters.
VALUES = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00" + NONCHARACTERS),
    max_size=300,
)
#: Where systemd's parser and validator have rules: quoting, escapes, comments, blanks,
#: line ends, controls, the UTF-8 edges (surrogates, noncharacters in several planes).
EDGES = [
    '"',
    "\\",
    "`",
    "$",
    "'",
    "#",
    ";",
    "=",
    " ",
    "\t",
    "\n",
    "\r",
    "\v",
    "\f",
    "\x00",
    "\x01",
    "\x1b",
    "\x7f",
    "\x80",
    "\x85",
    "\xa0",
    "\u2028",
    "\ufeff",
    "\ud800",
    "\udbff",
    "\udc00",
    "\udfff",
    "\ufdcf",
    "\ufdd0",
    "\ufdef",
    "\ufdf0",
    "\ufffd",
    "\ufffe",
    "\uffff",
    "\U00010000",
    "\U0001fffe",
    "\U0001ffff",
    "\U0002fffe",
    "\U000efffe",
    "\U000fffff",
    "\U0010fffd",
    "\U0010fffe",
    "\U0010ffff",
    "é",
    "☃",
]
EDGY_VALUES = st.text(st.one_of(st.sampled_from(EDGES), st.characters()), max_size=40)
AWKWARD = [
    'say "hi"',
    "back\\slash",
    "\\",
    "ends with backslash\\",
    "$HOME and ${PATH}",
    "`id`",
    "# not a comment",
    "a;b",
    "  leading",
    "trailing  ",
    "\ttab\t",
    "cr\rlf",
    "multi\nline\n",
    "\n",
    "\\\n",
    "\\n literal",
    'quote at end"',
    "'single'",
    "naïve café ☃ 日本",
    "",
    " ",
    "=",
    "a=b=c",
    '\\"',
    "\\$",
    "\\`",
    "\\\\",
    "line1\r\nline2",
    "ends in CR\r",
    "\\\r\n",
    "\x1b[31mred\x1b[0m",
    "del\x7f",
    "\ufffd replacement",
    "\U0001f600 emoji",
]


def naive_line(name: str, value: str) -> bytes:
    """The line the encoder's quoting gives, written whatever the value holds: what systemd
    would read if the encoder let `value` through."""
    escaped = re.sub(r'(["\\`$])', r"\\\1", value)
    return f'{name}="{escaped}"\n'.encode("utf-8", "surrogatepass")


def as_assignment(name: str, value: str) -> bytes:
    return f"{name}={value}".encode("utf-8", "surrogatepass")


# --- against systemd's own parser ----------------------------------------------------------------


@pytest.mark.parametrize("value", AWKWARD)
def test_awkward_values_come_back_from_systemd_byte_for_byte(value: str) -> None:
    data = encode("app.service", [("VALUE", value)])
    assert libsystemd().environment(data) == [as_assignment("VALUE", value)]
    assert parse(data.decode()) == {"VALUE": value}


@given(NAMES, EDGY_VALUES)
@settings(max_examples=1500)
def test_encoder_accepts_exactly_what_systemd_gives_back(name: str, value: str) -> None:
    """accepted by the encoder <=> systemd's parser returns exactly NAME=value."""
    try:
        data = encode("app.service", [(name, value)])
    except EncodeError as err:
        assert "app.service" in str(err) and name in str(err)
        data = naive_line(name, value)
        assert libsystemd().environment(data) != [as_assignment(name, value)]
    else:
        assert libsystemd().environment(data) == [as_assignment(name, value)]


@given(st.dictionaries(NAMES, VALUES, max_size=8))
@settings(max_examples=300)
def test_whole_files_come_back_from_systemd(env: dict[str, str]) -> None:
    data = encode("app.service", env.items())
    got = libsystemd().environment(data)
    assert got is not None
    assert sorted(got) == sorted(as_assignment(k, v) for k, v in env.items())


def test_every_code_point_is_accepted_exactly_when_systemd_accepts_it() -> None:
    """All 1 114 112 code points: the encoder's rule against systemd's UTF-8 validator
    (utf8_is_valid), one by one for those refused, and every accepted one through
    load_env_file in files of 64 KiB values."""
    systemd = libsystemd()
    accepted: list[str] = []
    for code_point in range(0x110000):
        char = chr(code_point)
        ours = env_value_problem(char) is None
        raw = char.encode("utf-8", "surrogatepass")
        theirs = code_point != 0 and systemd.utf8_is_valid(raw)
        assert ours == theirs, f"U+{code_point:04X}: ours {ours}, systemd {theirs}"
        assert ours == (code_point != 0 and systemd.unichar_is_valid(code_point))
        if ours:
            accepted.append(char)
    assert len(accepted) == 0x110000 - 1 - 2048 - len(NONCHARACTERS)
    for start in range(0, len(accepted), 16 * 1024):
        value = "".join(accepted[start : start + 16 * 1024])
        data = encode("app.service", [("CHARS", value)])
        assert systemd.environment(data) == [as_assignment("CHARS", value)]


@pytest.mark.parametrize(
    ("char", "problem"),
    [
        ("\x00", "NUL"),
        ("\ud800", "UTF-8"),
        ("\udfff", "UTF-8"),
        ("\ufdd0", "noncharacter"),
        ("\ufdef", "noncharacter"),
        ("\ufffe", "noncharacter"),
        ("\uffff", "noncharacter"),
        ("\U0001fffe", "noncharacter"),
        ("\U0010ffff", "noncharacter"),
    ],
)
def test_values_systemd_refuses_are_refused_naming_unit_and_variable(
    char: str,
    problem: str,
) -> None:
    value = f"secret-value{char}tail"
    with pytest.raises(EncodeError) as err:
        encode("db.service", [("OK", "fine"), ("PASSWORD", value)])
    message = str(err.value)
    assert problem in message and "db.service" in message and "PASSWORD" in message
    assert "secret-value" not in message and "tail" not in message
    assert err.value.exit_code == 14
    # ...and systemd would not have given it back: it refuses the whole file, or (NUL) cuts
    # the value short.
    got = libsystemd().environment(naive_line("OK", "fine") + naive_line("PASSWORD", value))
    assert got is None or as_assignment("PASSWORD", value) not in got


@given(st.text(st.sampled_from("AB_1 \t\n\r=\"'\\#;$`xé"), max_size=60))
@settings(max_examples=1000)
def test_the_independent_parser_agrees_with_systemd(text: str) -> None:
    """tests/systemd_envfile.py (used by other tests to read env files) is systemd's parser:
    same assignments, and an invalid name exactly where systemd would drop one."""
    loaded = libsystemd().load_env_file(text.encode())
    assert loaded is not None
    try:
        ours = parse(text)
    except ValueError:  # InvalidName
        assert not all(libsystemd().env_assignment_is_valid(a) for a in loaded)
        return
    theirs = dict(a.decode().split("=", 1) for a in loaded)
    assert ours == theirs


# --- sizes: the kernel's execve() limits ----------------------------------------------------------

EXEC_CHILD = r"""
import errno, json, os, resource, sys
env = json.load(open(sys.argv[1]))
argv = json.load(open(sys.argv[2]))
# The stack limit systemd gives services unless LimitSTACK= says otherwise (the kernel's).
resource.setrlimit(resource.RLIMIT_STACK,
                   (8 << 20, resource.getrlimit(resource.RLIMIT_STACK)[1]))
try:
    os.execve("/bin/true", argv, env)
except OSError as err:
    print(errno.errorcode[err.errno])
    sys.exit(3)
"""


def execve(env: dict[str, str], argv: list[str], tmp_path: Path) -> str:
    """'ok' if the kernel runs /bin/true with that environment and argv, else the errno."""
    env_file, argv_file = tmp_path / "env.json", tmp_path / "argv.json"
    env_file.write_text(json.dumps(env))
    argv_file.write_text(json.dumps(argv))
    result = subprocess.run(
        [sys.executable, "-c", EXEC_CHILD, str(env_file), str(argv_file)],
        capture_output=True,
        text=True,
        check=False,
        env={},
    )
    return "ok" if result.returncode == 0 else result.stdout.strip() or result.stderr


def fill(total: int, prefix: str = "V") -> dict[str, str]:
    """Variables whose NAME=value strings, NULs and pointers add up to exactly `total`, each
    as long as the kernel allows or evenly shorter."""
    name_length = len(prefix) + 3
    per_variable = name_length + 2 + POINTER_BYTES
    count = -(-total // (MAX_ARG_STRLEN + POINTER_BYTES))
    base, extra = divmod(total - count * per_variable, count)
    return {f"{prefix}{i:03d}": "x" * (base + (i < extra)) for i in range(count)}


def test_longest_assignment_is_accepted_and_execs(tmp_path: Path) -> None:
    name = "BIG"
    value = "y" * (MAX_ARG_STRLEN - len(name) - 2)  # NAME=value and its NUL: 128 KiB
    data = encode("a.service", [(name, value)])
    assert libsystemd().environment(data) == [as_assignment(name, value)]
    assert execve({name: value}, ["true"], tmp_path) == "ok"
    with pytest.raises(EncodeError, match="128 KiB") as err:
        encode_assignment("a.service", name, value + "y")
    assert "yyyy" not in str(err.value)
    # ...which the kernel indeed refuses (MAX_ARG_STRLEN).
    assert execve({name: value + "y"}, ["true"], tmp_path) == "E2BIG"


def test_largest_environment_accepted_still_execs_with_room_to_spare(tmp_path: Path) -> None:
    env = fill(MAX_ENVIRONMENT_BYTES)
    encode("a.service", env.items())  # accepted: exactly at the bound
    # What systemd adds for a service, the unit's own Environment= and a long command line:
    # the other half of the 2 MiB an 8 MiB stack allows.
    systemd_vars = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "INVOCATION_ID": "0" * 32,
        "JOURNAL_STREAM": "8:12345",
        "SYSTEMD_EXEC_PID": "1234",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "CREDENTIALS_DIRECTORY": "/run/credentials/app.service",
        "HOME": "/",
        "USER": "app",
        "LOGNAME": "app",
        "SHELL": "/usr/sbin/nologin",
        "RUNTIME_DIRECTORY": "/run/app",
    }
    unit_own = fill(700 * 1024, prefix="OWN")
    argv = ["true", *("--flag=" + "a" * 1000 for _ in range(200))]
    assert execve({**env, **systemd_vars, **unit_own}, argv, tmp_path) == "ok"


def test_environment_over_the_bound_is_refused_naming_unit_and_largest_variable() -> None:
    env = fill(MAX_ENVIRONMENT_BYTES)
    first = next(iter(env))
    env[first] += "x"
    with pytest.raises(EncodeError) as err:
        encode("big.service", env.items())
    message = str(err.value)
    assert "big.service" in message and "1 MiB" in message and first in message
    assert "xxxx" not in message


def test_twenty_values_of_120000_bytes_are_refused_as_execve_would(tmp_path: Path) -> None:
    env = {f"V{i}": "v" * 120_000 for i in range(20)}
    with pytest.raises(EncodeError, match="1 MiB") as err:
        encode("app.service", env.items())
    assert err.value.exit_code == 14 and "app.service" in str(err.value)
    assert execve(env, ["true"], tmp_path) == "E2BIG"


# --- credentials ------------------------------------------------------------------------------


def test_credentials_within_systemds_limits_are_accepted() -> None:
    check_credentials("a.service", {"key": b"k" * (CREDENTIAL_SIZE_MAX - 3)})
    half = CREDENTIALS_TOTAL_SIZE_MAX // 2
    check_credentials("a.service", {"a": b"a" * (half - 1), "b": b"b" * (half - 1)})


@pytest.mark.parametrize(
    ("credentials", "culprit"),
    [
        ({"key": b"k" * (CREDENTIAL_SIZE_MAX + 1)}, "key"),
        ({"key": b"k" * (CREDENTIAL_SIZE_MAX - 2)}, "key"),  # its name counts too
        ({"a": b"a" * 600_000, "b": b"b" * 600_000}, "b"),
    ],
)
def test_credentials_over_systemds_limits_are_refused(
    credentials: dict[str, bytes],
    culprit: str,
) -> None:
    with pytest.raises(EncodeError) as err:
        check_credentials("tls.service", credentials)
    message = str(err.value)
    assert "tls.service" in message and f"variable {culprit}:" in message
    assert "1 MiB" in message and "kkkk" not in message and "bbbb" not in message


# --- the encoder's own rules, read back with the independent parser -----------------------------


@given(st.dictionaries(NAMES, VALUES, max_size=8))
@settings(max_examples=200)
def test_any_representable_value_round_trips(env: dict[str, str]) -> None:
    assert parse(encode("app.service", env.items()).decode("utf-8")) == env


@given(NAMES, VALUES)
def test_every_line_is_a_double_quoted_assignment(name: str, value: str) -> None:
    line = encode_assignment("app.service", name, value).decode()
    assert line.startswith(f'{name}="') and line.endswith('"\n')


@pytest.mark.parametrize("name", ["MY-KEY", "export K", "1ABC", "", "A B", "é", "A\nB", "K="])
def test_invalid_names_are_rejected_naming_unit_and_variable(name: str) -> None:
    with pytest.raises(EncodeError) as err:
        encode_assignment("app.service", name, "secret-value-123")
    assert "app.service" in str(err.value)
    assert "not a valid variable name" in str(err.value)
    assert "secret-value-123" not in str(err.value)
    # systemd drops such an assignment (logging it, value included).
    assert libsystemd().environment(naive_line(name, "v")) != [as_assignment(name, "v")]


def test_duplicate_variable_is_rejected() -> None:
    with pytest.raises(EncodeError, match="defined twice"):
        encode("a.service", [("A", "1"), ("A", "2")])


def test_parser_follows_systemd_rules_for_unquoted_and_single_quoted() -> None:
    # The independent parser itself, on hand-written systemd input (not encoder output).
    text = (
        "# comment\n; other comment\n  A = plain value  \nB='single $x \\n'\n"
        'C="x\\ny\\$z\\"q"\nD=esc\\ aped\nE="keep \\a pair"\nF=\n'
    )
    expected = {
        "A": "plain value",
        "B": "single $x \\n",
        "C": 'x\\ny$z"q',
        "D": "esc aped",
        "E": "keep \\a pair",
        "F": "",
    }
    assert parse(text) == expected
    assert libsystemd().environment(text.encode()) == [
        f"{k}={v}".encode() for k, v in expected.items()
    ]


@pytest.mark.parametrize("total", [MAX_ENVIRONMENT_BYTES, 700 * 1024, 5000])
def test_fill_makes_exactly_the_size_asked(total: int) -> None:
    env = fill(total)
    assert sum(len(k) + len(v) + 2 + POINTER_BYTES for k, v in env.items()) == total
    assert all(len(k) + len(v) + 1 < MAX_ARG_STRLEN for k, v in env.items())
