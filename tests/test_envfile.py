"""The EnvironmentFile= encoder against an independent parser of systemd's rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootsecrets.envfile import MAX_ARG_STRLEN, encode, encode_assignment
from bootsecrets.errors import EncodeError
from systemd_envfile import parse

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True)
# Any text systemd can carry: every code point except NUL and lone surrogates.
VALUES = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
                 max_size=300)
AWKWARD = [
    'say "hi"', "back\\slash", "\\", "ends with backslash\\", "$HOME and ${PATH}", "`id`",
    "# not a comment", "a;b", "  leading", "trailing  ", "\ttab\t", "cr\rlf", "multi\nline\n",
    "\n", "\\\n", "\\n literal", "quote at end\"", "'single'", "naïve café ☃ 日本",
    "", " ", "=", "a=b=c", '\\"', "\\$", "\\`", "\\\\", "line1\r\nline2",
]


@pytest.mark.parametrize("value", AWKWARD)
def test_awkward_values_round_trip(value: str) -> None:
    assert parse(encode("app.service", [("VALUE", value)]).decode()) == {"VALUE": value}


@given(st.dictionaries(NAMES, VALUES, max_size=8))
@settings(max_examples=400)
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


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("before\x00after-secret", "NUL"),
        ("lone \udc80 surrogate-secret", "UTF-8"),
        ("x" * (MAX_ARG_STRLEN + 1), "128 KiB"),
    ],
)
def test_unrepresentable_values_are_rejected_without_the_value(value: str, problem: str) -> None:
    with pytest.raises(EncodeError) as err:
        encode_assignment("db.service", "PASSWORD", value)
    message = str(err.value)
    assert problem in message
    assert "db.service" in message and "PASSWORD" in message
    assert "secret" not in message and "xxxx" not in message


def test_largest_value_that_fits_is_accepted() -> None:
    name = "BIG"
    value = "y" * (MAX_ARG_STRLEN - len(name) - 2)
    assert parse(encode_assignment("a.service", name, value).decode()) == {name: value}
    with pytest.raises(EncodeError):
        encode_assignment("a.service", name, value + "y")


def test_duplicate_variable_is_rejected() -> None:
    with pytest.raises(EncodeError, match="defined twice"):
        encode("a.service", [("A", "1"), ("A", "2")])


def test_parser_follows_systemd_rules_for_unquoted_and_single_quoted() -> None:
    # The independent parser itself, on hand-written systemd input (not encoder output).
    text = ("# comment\n; other comment\n  A = plain value  \nB='single $x \\n'\n"
            'C="x\\ny\\$z\\"q"\nD=esc\\ aped\nE="keep \\a pair"\nF=\n')
    assert parse(text) == {
        "A": "plain value", "B": "single $x \\n", "C": 'x\\ny$z"q', "D": "esc aped",
        "E": "keep \\a pair", "F": "",
    }
