"""An independent parser for systemd's EnvironmentFile= format, written from systemd's rules
(the state machine of src/basic/env-file.c, parse_env_file_internal, as of systemd 252),
used to read env files in tests, the demo and the benchmark. It is deliberately not shared
with the agent package, and tests/test_envfile.py checks it against systemd's own parser.

Rules: lines starting with # or ; (after leading whitespace) are comments; KEY=VALUE with
whitespace around the key ignored; unquoted values have trailing whitespace stripped and
backslash escapes the next character (backslash-newline continues the line); single quotes
keep everything literally; inside double quotes only \\" \\\\ \\` \\$ are unescaped, other
backslash pairs are kept as they are, backslash-newline is a continuation, and raw newlines
and CR are part of the value. Adjacent quoted/unquoted parts concatenate.
"""

from __future__ import annotations

import re

NEWLINE = "\n\r"
WHITESPACE = " \t\n\r"
COMMENTS = "#;"
DQUOTE_ESCAPABLE = '"\\`$'
VALID_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class InvalidName(ValueError):
    pass


def parse(text: str) -> dict[str, str]:
    result: dict[str, str] = {}
    state = "PRE_KEY"
    key: list[str] = []
    value: list[str] = []
    last_value_whitespace = -1
    last_key_whitespace = -1

    def push() -> None:
        name = "".join(key)
        if last_key_whitespace >= 0:
            name = name[:last_key_whitespace]
        if not VALID_NAME.match(name):
            raise InvalidName("invalid variable name in env file")
        result[name] = "".join(value)

    for c in text:
        if state == "PRE_KEY":
            if c in COMMENTS:
                state = "COMMENT"
            elif c not in WHITESPACE:
                state = "KEY"
                last_key_whitespace = -1
                key = [c]
        elif state == "KEY":
            if c in NEWLINE:
                state = "PRE_KEY"
                key = []
            elif c == "=":
                state = "PRE_VALUE"
                last_value_whitespace = -1
                value = []
            else:
                if c in WHITESPACE:
                    if last_key_whitespace < 0:
                        last_key_whitespace = len(key)
                else:
                    last_key_whitespace = -1
                key.append(c)
        elif state == "PRE_VALUE":
            if c in NEWLINE:
                state = "PRE_KEY"
                push()
                key, value = [], []
            elif c == "'":
                state = "SINGLE_QUOTE_VALUE"
            elif c == '"':
                state = "DOUBLE_QUOTE_VALUE"
            elif c == "\\":
                state = "VALUE_ESCAPE"
            elif c not in WHITESPACE:
                state = "VALUE"
                value.append(c)
        elif state == "VALUE":
            if c in NEWLINE:
                state = "PRE_KEY"
                if last_value_whitespace >= 0:
                    del value[last_value_whitespace:]
                push()
                key, value = [], []
            elif c == "\\":
                state = "VALUE_ESCAPE"
                last_value_whitespace = -1
            else:
                if c in WHITESPACE:
                    if last_value_whitespace < 0:
                        last_value_whitespace = len(value)
                else:
                    last_value_whitespace = -1
                value.append(c)
        elif state == "VALUE_ESCAPE":
            state = "VALUE"
            if c not in NEWLINE:
                value.append(c)
        elif state == "SINGLE_QUOTE_VALUE":
            if c == "'":
                state = "PRE_VALUE"
            else:
                value.append(c)
        elif state == "DOUBLE_QUOTE_VALUE":
            if c == '"':
                state = "PRE_VALUE"
            elif c == "\\":
                state = "DOUBLE_QUOTE_VALUE_ESCAPE"
            else:
                value.append(c)
        elif state == "DOUBLE_QUOTE_VALUE_ESCAPE":
            state = "DOUBLE_QUOTE_VALUE"
            if c in DQUOTE_ESCAPABLE:
                value.append(c)
            elif c == "\n":
                pass
            else:
                value.append("\\")
                value.append(c)
        elif state == "COMMENT":
            if c == "\\":
                state = "COMMENT_ESCAPE"
            elif c in NEWLINE:
                state = "PRE_KEY"
        elif state == "COMMENT_ESCAPE":
            state = "COMMENT"

    if state in (
        "PRE_VALUE",
        "VALUE",
        "VALUE_ESCAPE",
        "SINGLE_QUOTE_VALUE",
        "DOUBLE_QUOTE_VALUE",
        "DOUBLE_QUOTE_VALUE_ESCAPE",
    ):
        if state == "VALUE" and last_value_whitespace >= 0:
            del value[last_value_whitespace:]
        push()
    return result
