"""Secret-shaped bytes: one search function per kind of credential, for `imagecheck`.

Each function takes a file's bytes and yields `(offset, matched)`: where the secret starts
and the bytes that identify it (the caller fingerprints them, never shows them). Every
regex starts with a literal so that the engine skips to candidates at memchr speed, and each
function first checks for its anchor substrings, so a file without any costs a few `in`
tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

Hit = tuple[int, bytes]

_WORD = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")

_VAULT_TOKEN = re.compile(rb"hv[sbr]\.[A-Za-z0-9_-]{24,}")
# Legacy (Vault < 1.10) service tokens: `s.` and 24 base62 characters. Its literal prefix
# makes it fast on every file; the mixed-case check is done on each (rare) match.
_VAULT_LEGACY = re.compile(rb"s\.[A-Za-z0-9]{24}(?![A-Za-z0-9_.-])")
_UPPER, _LOWER, _DIGIT = re.compile(rb"[A-Z]"), re.compile(rb"[a-z]"), re.compile(rb"[0-9]")
_TOKEN_ASSIGNMENT = re.compile(
    rb"(?:VAULT|BAO)_TOKEN[ \t]*[=:][ \t]*[\"']?[A-Za-z0-9][^\s\"'$`]{7,}"
)
_PEM_BEGIN = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(rb"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_PEM_LINES = re.compile(rb"\r?\n|(?:\\r)?\\n")  # real line breaks, or JSON's escaped ones
_PEM_BASE64_LINE = re.compile(rb"[A-Za-z0-9+/]{40,}={0,2}")
_PEM_SEARCH = 64 * 1024
_DO_TOKEN = re.compile(rb"do[opr]_v1_[a-f0-9]{64}(?![A-Za-z0-9_])")
_AWS_KEY = re.compile(rb"A(?:KIA|SIA)[A-Z0-9]{16}(?![A-Za-z0-9_])")
_AWS_SECRET = re.compile(
    rb"(?:aws_secret_access_key|AWS_SECRET_ACCESS_KEY)"
    rb"[ \t]*[=:][ \t]*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"
)
_GCP_TYPE = re.compile(rb"\"type\"\s*:\s*\"service_account\"")
_GCP_PRIVATE_KEY = re.compile(rb'"private_key"\s*:\s*"-----BEGIN')
_DOTENV_LINE = re.compile(
    rb"^[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_.]*)[ \t]*=[ \t]*(.*?)[ \t]*$", re.M
)
_DOTENV_SECRET_NAME = re.compile(
    rb"PASS(?:WORD|WD|PHRASE)?|SECRET|TOKEN|KEY|CREDENTIAL|PRIVATE|AUTH|DSN", re.I
)


def _standalone(data: bytes, start: int) -> bool:
    """Not the middle of a longer word."""
    return start == 0 or data[start - 1] not in _WORD


def vault_tokens(data: bytes) -> Iterator[Hit]:
    """`hvs.`/`hvb.`/`hvr.` tokens; legacy `s.` + 24 characters mixing case and digits."""
    if b"hv" in data:
        for match in _VAULT_TOKEN.finditer(data):
            if _standalone(data, match.start()):
                yield match.start(), match.group()
    for match in _VAULT_LEGACY.finditer(data):
        start = match.start()
        if start > 0 and (data[start - 1] in _WORD or data[start - 1] == ord(".")):
            continue  # `this.s.foo...`: part of a longer name
        body = match.group()[2:]
        if _UPPER.search(body) and _LOWER.search(body) and _DIGIT.search(body):
            yield start, match.group()


def vault_token_assignments(data: bytes) -> Iterator[Hit]:
    """`VAULT_TOKEN=`/`BAO_TOKEN=` (or `:`) with a literal value, not a `$VAR` reference."""
    if b"_TOKEN" in data:
        for match in _TOKEN_ASSIGNMENT.finditer(data):
            if _standalone(data, match.start()):
                yield match.start(), match.group()


def private_keys(data: bytes) -> Iterator[Hit]:
    """A PEM/OpenSSH/PGP private key block with a body; the header line alone (documentation
    mentioning it) is not one."""
    if b"PRIVATE KEY" not in data:
        return
    for match in _PEM_BEGIN.finditer(data):
        end = _PEM_END.search(data, match.end(), match.end() + _PEM_SEARCH)
        stop = end.start() if end else min(len(data), match.end() + 4096)
        lines = _PEM_LINES.split(data[match.end() : stop])
        if any(_PEM_BASE64_LINE.fullmatch(line.strip(b" \t\"',")) for line in lines):
            yield match.start(), data[match.start() : end.end() if end else stop]


def do_tokens(data: bytes) -> Iterator[Hit]:
    """DigitalOcean API tokens: `dop_v1_`/`doo_v1_`/`dor_v1_` + 64 hex digits."""
    if b"_v1_" in data:
        for match in _DO_TOKEN.finditer(data):
            if _standalone(data, match.start()):
                yield match.start(), match.group()


def aws_keys(data: bytes) -> Iterator[Hit]:
    """AWS access key ids `AKIA`/`ASIA` + 16; AWS's documented `...EXAMPLE` key is not one."""
    if b"AKIA" in data or b"ASIA" in data:
        for match in _AWS_KEY.finditer(data):
            if _standalone(data, match.start()) and b"EXAMPLE" not in match.group():
                yield match.start(), match.group()


def aws_secret_keys(data: bytes) -> Iterator[Hit]:
    """`aws_secret_access_key = <40 characters>` (credentials files, env files)."""
    if b"ecret_access_key" in data or b"ECRET_ACCESS_KEY" in data:
        for match in _AWS_SECRET.finditer(data):
            if _standalone(data, match.start()) and b"EXAMPLE" not in match.group():
                yield match.start(), match.group()


def gcp_service_accounts(data: bytes) -> Iterator[Hit]:
    """A GCP key file: `"type": "service_account"` with a `"private_key"` (the whole file)."""
    if b"service_account" in data and _GCP_PRIVATE_KEY.search(data):
        for match in _GCP_TYPE.finditer(data):
            if _standalone(data, match.start()):
                yield match.start(), data


def dotenv_secrets(data: bytes) -> Iterator[Hit]:
    """An assignment to a PASSWORD/SECRET/TOKEN/KEY/CREDENTIAL-like name with a non-empty
    literal value (`$VAR` references and comments are not values)."""
    for match in _DOTENV_LINE.finditer(data):
        name, value = match.group(1), match.group(2)
        if not _DOTENV_SECRET_NAME.search(name):
            continue
        if value[:1] in (b'"', b"'") and value[-1:] == value[:1] and len(value) >= 2:
            value = value[1:-1]
        elif b" #" in value:
            value = value.split(b" #", 1)[0].rstrip()
        if value and not value.startswith(b"$"):
            yield match.start(), match.group()
