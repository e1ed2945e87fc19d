"""What bootsecrets writes and reads on a LUKS2 volume: the cryptsetup command lines (the key
only ever on standard input), the `bootsecrets-transit` token in the header and the parsed
`luksDump`, and the errors of the LUKS edge. No I/O: `luks` runs the commands.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CRYPTSETUP = "cryptsetup"
BLKID = "blkid"
KEY_SIZE = 64  # bytes: a 512-bit Transit data key (`bits=512`)
KEYSLOT = 0
TOKEN_ID = 0
TOKEN_TYPE = "bootsecrets-transit"  # noqa: S105 (a LUKS2 token type, not a password)
TOKEN_SCHEMA = 1
PBKDF2_MIN_ITERATIONS = 1000  # cryptsetup refuses fewer for pbkdf2
BLANK_CHECK_BYTES = 1 << 20
CIPHER = "aes-xts-plain64"
VOLUME_KEY_BITS = 512  # AES-256-XTS

RC_BAD_PASSPHRASE = 2
RC_WRONG_DEVICE = 4
BLKID_NOTHING_FOUND = 2
BLKID_AMBIVALENT = 8

_MAPPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,126}")
_MOUNT = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
_KEY_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_CIPHERTEXT = re.compile(r"vault:v([1-9][0-9]*):[A-Za-z0-9+/]+={0,2}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

Stdin = bytes | bytearray | memoryview

# --- errors ----------------------------------------------------------------------------------


class LuksError(Exception):
    """Root of this module's failures: names the device (or mapping) and the problem; never
    a key, and never the token's ciphertext."""

    def __init__(self, device: Path | str, problem: str) -> None:
        self.device = str(device)
        self.problem = problem
        super().__init__(f"{device}: {problem}")


class DeviceMissing(LuksError):
    """The device does not exist (a volume not attached yet, a wrong path) or is not a
    block device."""


class NotBlank(LuksError):
    """The device holds a signature or data: it is never formatted."""

    def __init__(self, device: Path | str, signatures: Sequence[str], first_mib_zero: bool):
        self.signatures = tuple(signatures)
        found = [f"signature {', '.join(signatures)}"] if signatures else []
        if not first_mib_zero:
            found.append("non-zero bytes in the first MiB")
        super().__init__(device, f"is not blank ({'; '.join(found)}); refusing to format it")


class NotLuks(LuksError):
    """The device has no LUKS2 header."""


class TokenMissing(LuksError):
    """The LUKS2 header has no bootsecrets-transit token: nothing to unlock it with."""


class TokenInvalid(LuksError):
    """The token (or the header) is not what bootsecrets writes: names the field."""

    def __init__(self, device: Path | str, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(device, f"LUKS2 token field {field}: {reason}")


class EraseIncomplete(LuksError):
    """Keyslots or tokens are still in the header after `erase`."""


class KeyRejected(LuksError):
    """No keyslot accepts the key (cryptsetup exit code 2)."""


class CryptsetupFailed(LuksError):
    """A command failed otherwise. Its argv never holds a key, so it is shown, with the last
    line of its stderr."""

    def __init__(
        self, device: Path | str, argv: Sequence[str], returncode: int, stderr: str
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        detail = f": {last}" if last else ""
        super().__init__(device, f"`{shlex.join(self.argv)}` exited with {returncode}{detail}")


# --- command lines ---------------------------------------------------------------------------


def format_argv(device: Path, uuid: str | None = None) -> tuple[str, ...]:
    """`uuid`: the header's UUID, chosen by the caller (so that a record can name the
    volume before its header exists)."""
    if uuid is not None and not _UUID.fullmatch(uuid):
        raise ValueError("a LUKS UUID is 36 lower-case hex digits and dashes")
    return (
        CRYPTSETUP,
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--cipher",
        CIPHER,
        "--key-size",
        str(VOLUME_KEY_BITS),
        "--pbkdf",
        "pbkdf2",
        "--hash",
        "sha256",
        "--pbkdf-force-iterations",
        str(PBKDF2_MIN_ITERATIONS),
        *(("--uuid", uuid) if uuid is not None else ()),
        "--key-slot",
        str(KEYSLOT),
        "--key-file=-",
        str(device),
    )


def open_argv(
    device: Path, name: str, *, discard: bool = False, readonly: bool = False
) -> tuple[str, ...]:
    return (
        CRYPTSETUP,
        "open",
        "--type",
        "luks2",
        "--key-file=-",
        "--key-slot",
        str(KEYSLOT),
        *(("--allow-discards",) if discard else ()),
        *(("--readonly",) if readonly else ()),
        str(device),
        _mapper_name(name),
    )


def check_key_argv(device: Path) -> tuple[str, ...]:
    return (
        CRYPTSETUP,
        "open",
        "--type",
        "luks2",
        "--test-passphrase",
        "--key-file=-",
        "--key-slot",
        str(KEYSLOT),
        str(device),
    )


def close_argv(name: str) -> tuple[str, ...]:
    return (CRYPTSETUP, "close", _mapper_name(name))


def status_argv(name: str) -> tuple[str, ...]:
    return (CRYPTSETUP, "status", _mapper_name(name))


def erase_argv(device: Path) -> tuple[str, ...]:
    return (CRYPTSETUP, "erase", "--batch-mode", str(device))


def is_luks_argv(device: Path) -> tuple[str, ...]:
    return (CRYPTSETUP, "isLuks", "--type", "luks2", str(device))


def dump_argv(device: Path) -> tuple[str, ...]:
    return (CRYPTSETUP, "luksDump", "--dump-json-metadata", str(device))


def token_import_argv(
    device: Path, token_id: int = TOKEN_ID, *, replace: bool = False
) -> tuple[str, ...]:
    return (
        CRYPTSETUP,
        "token",
        "import",
        "--json-file=-",
        "--token-id",
        str(token_id),
        *(("--token-replace",) if replace else ()),
        "--key-slot",
        str(KEYSLOT),
        str(device),
    )


def token_export_argv(device: Path, token_id: int = TOKEN_ID) -> tuple[str, ...]:
    return (CRYPTSETUP, "token", "export", "--token-id", str(token_id), str(device))


def token_remove_argv(device: Path, token_id: int) -> tuple[str, ...]:
    return (CRYPTSETUP, "token", "remove", "--token-id", str(token_id), str(device))


def blkid_argv(device: Path) -> tuple[str, ...]:
    return (BLKID, "-p", "-o", "export", str(device))


def _mapper_name(name: str) -> str:
    if not _MAPPER_NAME.fullmatch(name):
        raise ValueError(f"invalid device-mapper name {name!r}")
    return name


def key_view(key: bytearray | memoryview) -> memoryview:
    view = memoryview(key)
    if view.nbytes != KEY_SIZE or not view.c_contiguous:
        raise ValueError(f"a volume key is {KEY_SIZE} contiguous bytes")
    return view.cast("B") if view.format != "B" else view


# --- the token -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TransitToken:
    """The LUKS2 token bootsecrets writes: what Transit key wraps the keyslot's passphrase,
    and the ciphertext. Worthless without Vault."""

    mount: str  # the Transit mount, e.g. "transit"
    key_name: str
    key_version: int  # the version the ciphertext was made with (its `vault:vN:` prefix)
    ciphertext: str
    keyslots: tuple[int, ...] = (KEYSLOT,)

    def __post_init__(self) -> None:
        _validate_token_fields(self, "(new token)")

    def to_json(self) -> str:
        return json.dumps(
            {
                "type": TOKEN_TYPE,
                "keyslots": [str(slot) for slot in self.keyslots],
                "schema": TOKEN_SCHEMA,
                "transit_mount": self.mount,
                "key_name": self.key_name,
                "key_version": self.key_version,
                "ciphertext": self.ciphertext,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any], device: Path | str) -> TransitToken:
        """Parse and validate a token as found in the header (TokenInvalid on any doubt)."""
        expected = {
            "type",
            "keyslots",
            "schema",
            "transit_mount",
            "key_name",
            "key_version",
            "ciphertext",
        }
        unknown = sorted(set(data) - expected)
        if unknown:
            raise TokenInvalid(device, unknown[0], "unknown field")
        for field in sorted(expected):
            if field not in data:
                raise TokenInvalid(device, field, "missing")
        if data["type"] != TOKEN_TYPE:
            raise TokenInvalid(device, "type", f"not {TOKEN_TYPE}")
        if data["schema"] != TOKEN_SCHEMA or isinstance(data["schema"], bool):
            raise TokenInvalid(device, "schema", f"must be {TOKEN_SCHEMA}")
        slots = data["keyslots"]
        if (
            not isinstance(slots, list)
            or not slots
            or not all(isinstance(s, str) and s.isdigit() for s in slots)
        ):
            raise TokenInvalid(device, "keyslots", "must be a non-empty list of keyslot numbers")
        for field in ("transit_mount", "key_name", "ciphertext"):
            if not isinstance(data[field], str):
                raise TokenInvalid(device, field, "must be a string")
        version = data["key_version"]
        if not isinstance(version, int) or isinstance(version, bool):
            raise TokenInvalid(device, "key_version", "must be an integer")
        try:
            return cls(
                data["transit_mount"],
                data["key_name"],
                version,
                data["ciphertext"],
                tuple(int(s) for s in slots),
            )
        except TokenInvalid as err:
            raise TokenInvalid(device, err.field, err.reason) from None


def _validate_token_fields(token: TransitToken, device: str) -> None:
    if not _MOUNT.fullmatch(token.mount) or ".." in token.mount.split("/"):
        raise TokenInvalid(device, "transit_mount", "must be a mount path")
    if not _KEY_NAME.fullmatch(token.key_name) or token.key_name in (".", ".."):
        raise TokenInvalid(device, "key_name", "must be a Transit key name")
    if token.key_version < 1:
        raise TokenInvalid(device, "key_version", "must be at least 1")
    match = _CIPHERTEXT.fullmatch(token.ciphertext)
    if match is None:
        raise TokenInvalid(device, "ciphertext", "must be Transit ciphertext (vault:vN:...)")
    if int(match.group(1)) != token.key_version:
        raise TokenInvalid(device, "key_version", "does not match the ciphertext's version")
    if not token.keyslots or any(slot < 0 for slot in token.keyslots):
        raise TokenInvalid(device, "keyslots", "must name at least one keyslot")


# --- the header ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LuksHeader:
    """What `luksDump --dump-json-metadata` says, reduced to what bootsecrets needs."""

    keyslots: tuple[int, ...]
    tokens: Mapping[int, str]  # token id -> type
    token_id: int | None  # the bootsecrets-transit token, if any
    token: TransitToken | None


def parse_dump(text: str, device: Path | str) -> LuksHeader:
    """Parse the LUKS2 JSON metadata. The token is validated only if present; a header with
    two bootsecrets tokens is refused (TokenInvalid)."""
    try:
        data = json.loads(text)
    except ValueError:
        raise TokenInvalid(device, "(header)", "luksDump did not print JSON") from None
    if not isinstance(data, dict):
        raise TokenInvalid(device, "(header)", "not a JSON object")
    keyslots_raw = data.get("keyslots")
    tokens_raw = data.get("tokens")
    if not isinstance(keyslots_raw, dict) or not isinstance(tokens_raw, dict):
        raise TokenInvalid(device, "(header)", "no keyslots/tokens objects")
    try:
        keyslots = tuple(sorted(int(slot) for slot in keyslots_raw))
        tokens = {
            int(tid): str(t.get("type")) if isinstance(t, dict) else ""
            for tid, t in tokens_raw.items()
        }
    except ValueError:
        raise TokenInvalid(device, "(header)", "non-numeric keyslot or token id") from None
    ours = sorted(tid for tid, kind in tokens.items() if kind == TOKEN_TYPE)
    if len(ours) > 1:
        raise TokenInvalid(device, "type", f"{len(ours)} {TOKEN_TYPE} tokens in one header")
    if not ours:
        return LuksHeader(keyslots, tokens, None, None)
    token = TransitToken.from_json(tokens_raw[str(ours[0])], device)
    return LuksHeader(keyslots, tokens, ours[0], token)
