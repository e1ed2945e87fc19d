"""The cryptsetup edge of encrypted volumes: LUKS2 headers unlocked by a Transit data key.

Key model: a random 512-bit data key from Vault's Transit engine is the passphrase of LUKS2
keyslot 0 (cryptsetup generates the volume key itself). The key only ever reaches
cryptsetup on its standard input (`--key-file=-`, read to EOF, binary-safe): never argv, a
file, the environment, a log line or an exception. The Transit *ciphertext* of that key
lives in a LUKS2 token in the volume's own header, so the volume carries what unlocks it
and nothing readable; `erase` removes the tokens and destroys every keyslot.

Why PBKDF2 with cryptsetup's minimum of 1000 iterations instead of Argon2id: a keyslot KDF
exists to slow down guessing of a *human* passphrase. Our passphrase is 512 uniformly random
bits; guessing it is hopeless at any KDF cost, so Argon2's memory-hardness buys nothing,
while its defaults (up to 1 GiB of memory and ~2 s of CPU, benchmarked per machine) would
cost a small droplet that at every boot, or fail outright on a 512 MiB one.

Never format a device that is not provably blank: no signature found by libblkid's
low-level probing (`blkid -p`: filesystems, RAID, LUKS, partition tables) and the first MiB
all zeros. `format_volume` runs that check itself; there is no way around it.

Every command goes through one `Runner` (argv, optional stdin bytes); tests swap in a
recorder. cryptsetup's exit codes (cryptsetup(8), RETURN CODES): 1 wrong parameters,
2 no permission (bad passphrase), 3 out of memory, 4 wrong device specified,
5 device already exists or device is busy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
import stat
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

log = logging.getLogger(__name__)

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

_RC_BAD_PASSPHRASE = 2
_RC_WRONG_DEVICE = 4
_BLKID_NOTHING_FOUND = 2
_BLKID_AMBIVALENT = 8

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

    def __init__(self, device: Path | str, argv: Sequence[str], returncode: int,
                 stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        detail = f": {last}" if last else ""
        super().__init__(device, f"`{shlex.join(self.argv)}` exited with {returncode}{detail}")


# --- the runner ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, stdin: Stdin | None = None,
                 check: bool = True) -> Completed: ...


def run(argv: Sequence[str], *, stdin: Stdin | None = None, check: bool = True) -> Completed:
    """Run a command without a shell; `stdin` bytes (a key) go to its standard input, which
    is closed when there are none. Output captured; failure raised as CryptsetupFailed.

    With stdout and stderr both piped, `communicate` writes the input from a memoryview of
    the caller's buffer straight into the pipe, so no copy of a key is made here."""
    command = tuple(argv)
    log.debug("running %s%s", shlex.join(command),
              "" if stdin is None else f" ({memoryview(stdin).nbytes} bytes on stdin)")
    with subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        # typeshed says bytes; any buffer works, and bytes() here would copy the key.
        out, err = proc.communicate(cast(bytes | None, stdin))
    result = Completed(command, proc.returncode, out.decode("utf-8", "replace"),
                       err.decode("utf-8", "replace"))
    if check and result.returncode != 0:
        raise CryptsetupFailed(command[-1], command, result.returncode, result.stderr)
    return result


# --- command lines ---------------------------------------------------------------------------


def format_argv(device: Path, uuid: str | None = None) -> tuple[str, ...]:
    """`uuid`: the header's UUID, chosen by the caller (so that a record can name the
    volume before its header exists)."""
    if uuid is not None and not _UUID.fullmatch(uuid):
        raise ValueError("a LUKS UUID is 36 lower-case hex digits and dashes")
    return (CRYPTSETUP, "luksFormat", "--batch-mode", "--type", "luks2",
            "--cipher", CIPHER, "--key-size", str(VOLUME_KEY_BITS),
            "--pbkdf", "pbkdf2", "--hash", "sha256",
            "--pbkdf-force-iterations", str(PBKDF2_MIN_ITERATIONS),
            *(("--uuid", uuid) if uuid is not None else ()),
            "--key-slot", str(KEYSLOT), "--key-file=-", str(device))


def open_argv(device: Path, name: str, *, discard: bool = False,
              readonly: bool = False) -> tuple[str, ...]:
    return (CRYPTSETUP, "open", "--type", "luks2", "--key-file=-",
            "--key-slot", str(KEYSLOT),
            *(("--allow-discards",) if discard else ()),
            *(("--readonly",) if readonly else ()),
            str(device), _mapper_name(name))


def check_key_argv(device: Path) -> tuple[str, ...]:
    return (CRYPTSETUP, "open", "--type", "luks2", "--test-passphrase", "--key-file=-",
            "--key-slot", str(KEYSLOT), str(device))


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


def token_import_argv(device: Path, token_id: int = TOKEN_ID, *,
                      replace: bool = False) -> tuple[str, ...]:
    return (CRYPTSETUP, "token", "import", "--json-file=-", "--token-id", str(token_id),
            *(("--token-replace",) if replace else ()),
            "--key-slot", str(KEYSLOT), str(device))


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


def _key_view(key: bytearray | memoryview) -> memoryview:
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
        return json.dumps({
            "type": TOKEN_TYPE,
            "keyslots": [str(slot) for slot in self.keyslots],
            "schema": TOKEN_SCHEMA,
            "transit_mount": self.mount,
            "key_name": self.key_name,
            "key_version": self.key_version,
            "ciphertext": self.ciphertext,
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: Mapping[str, Any], device: Path | str) -> TransitToken:
        """Parse and validate a token as found in the header (TokenInvalid on any doubt)."""
        expected = {"type", "keyslots", "schema", "transit_mount", "key_name",
                    "key_version", "ciphertext"}
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
        if not isinstance(slots, list) or not slots or not all(
                isinstance(s, str) and s.isdigit() for s in slots):
            raise TokenInvalid(device, "keyslots", "must be a non-empty list of keyslot numbers")
        for field in ("transit_mount", "key_name", "ciphertext"):
            if not isinstance(data[field], str):
                raise TokenInvalid(device, field, "must be a string")
        version = data["key_version"]
        if not isinstance(version, int) or isinstance(version, bool):
            raise TokenInvalid(device, "key_version", "must be an integer")
        try:
            return cls(data["transit_mount"], data["key_name"], version, data["ciphertext"],
                       tuple(int(s) for s in slots))
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
        tokens = {int(tid): str(t.get("type")) if isinstance(t, dict) else ""
                  for tid, t in tokens_raw.items()}
    except ValueError:
        raise TokenInvalid(device, "(header)", "non-numeric keyslot or token id") from None
    ours = sorted(tid for tid, kind in tokens.items() if kind == TOKEN_TYPE)
    if len(ours) > 1:
        raise TokenInvalid(device, "type", f"{len(ours)} {TOKEN_TYPE} tokens in one header")
    if not ours:
        return LuksHeader(keyslots, tokens, None, None)
    token = TransitToken.from_json(tokens_raw[str(ours[0])], device)
    return LuksHeader(keyslots, tokens, ours[0], token)


# --- the blank check -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Blankness:
    size: int  # bytes
    signatures: tuple[str, ...]  # what libblkid found: "ext4", "crypto_LUKS", "gpt", ...
    first_mib_zero: bool

    @property
    def blank(self) -> bool:
        return not self.signatures and self.first_mib_zero


def probe(device: Path, runner: Runner = run) -> Blankness:
    """Read the first MiB ourselves (which also proves the device exists and is readable),
    then ask libblkid for every signature it knows (`blkid -p`, no cache)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DeviceMissing(device, "does not exist (volume not attached yet, or a wrong "
                            "device path)") from None
    except OSError as err:
        raise DeviceMissing(device, f"cannot be opened: {os.strerror(err.errno or 0)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
            raise DeviceMissing(device, "is not a block device")
        size = os.lseek(fd, 0, os.SEEK_END)
        head = b""
        while len(head) < BLANK_CHECK_BYTES:
            chunk = os.pread(fd, BLANK_CHECK_BYTES - len(head), len(head))
            if not chunk:
                break
            head += chunk
    finally:
        os.close(fd)
    first_mib_zero = len(head) == BLANK_CHECK_BYTES and not any(head)
    result = runner(blkid_argv(device), check=False)
    if result.returncode == 0:
        fields = dict(line.partition("=")[::2] for line in result.stdout.splitlines())
        signatures = tuple(fields[key] for key in ("TYPE", "PTTYPE") if fields.get(key))
        signatures = signatures or ("unnamed signature",)
    elif result.returncode == _BLKID_NOTHING_FOUND:
        signatures = ()
    elif result.returncode == _BLKID_AMBIVALENT:
        signatures = ("several (ambivalent probing result)",)
    else:
        raise CryptsetupFailed(device, result.argv, result.returncode, result.stderr)
    return Blankness(size, signatures, first_mib_zero)


def require_blank(device: Path, runner: Runner = run) -> Blankness:
    found = probe(device, runner)
    if not found.blank:
        raise NotBlank(device, found.signatures, found.first_mib_zero)
    return found


# --- volume operations -----------------------------------------------------------------------


def format_volume(device: Path, key: bytearray | memoryview, token: TransitToken,
                  runner: Runner = run, *, uuid: str | None = None) -> LuksHeader:
    """First use: refuse unless the device is provably blank, then luksFormat (LUKS2,
    keyslot 0 with `key` as its passphrase, PBKDF2 at the minimum), import the token and
    read the header back to check both are there. The caller runs mkfs on the opened
    mapping afterwards.

    A crash between luksFormat and the token import leaves a header without a token: the
    next boot fails closed with TokenMissing, and the device, no longer blank, is never
    formatted again by itself (the operator wipes it: `cryptsetup erase`, `wipefs -a`)."""
    view = _key_view(key)
    try:
        require_blank(device, runner)
        _cryptsetup(runner, format_argv(device, uuid), device, stdin=view)
    finally:
        view.release()
    log.info("LUKS2 header written on %s", device)
    _cryptsetup(runner, token_import_argv(device), device, stdin=token.to_json().encode())
    header = read_header(device, runner)
    if header.token != token or KEYSLOT not in header.keyslots:
        raise TokenInvalid(device, "(header)", "the token or keyslot did not read back")
    return header


def read_header(device: Path, runner: Runner = run) -> LuksHeader:
    if not Path(device).exists():
        raise DeviceMissing(device, "does not exist (volume not attached yet, or a wrong "
                            "device path)")
    result = runner(dump_argv(device), check=False)
    if result.returncode != 0:
        if runner(is_luks_argv(device), check=False).returncode != 0:
            raise NotLuks(device, "has no LUKS2 header")
        raise CryptsetupFailed(device, result.argv, result.returncode, result.stderr)
    return parse_dump(result.stdout, device)


def read_token(device: Path, runner: Runner = run) -> TransitToken:
    header = read_header(device, runner)
    if header.token is None:
        raise TokenMissing(device, f"the LUKS2 header has no {TOKEN_TYPE} token")
    return header.token


def update_token(device: Path, token: TransitToken, runner: Runner = run) -> None:
    """Replace the bootsecrets token (after `transit/rewrap`, the key version moved)."""
    header = read_header(device, runner)
    token_id = TOKEN_ID if header.token_id is None else header.token_id
    _cryptsetup(runner, token_import_argv(device, token_id, replace=header.token_id is not None),
                device, stdin=token.to_json().encode())
    if read_header(device, runner).token != token:
        raise TokenInvalid(device, "(header)", "the new token did not read back")


def check_key(device: Path, key: bytearray | memoryview, runner: Runner = run) -> bool:
    """Whether keyslot 0 exists and accepts `key` (`--test-passphrase`: no device-mapper
    needed)."""
    view = _key_view(key)
    if KEYSLOT not in read_header(device, runner).keyslots:
        view.release()
        return False
    try:
        result = runner(check_key_argv(device), stdin=view, check=False)
    finally:
        view.release()
    if result.returncode == 0:
        return True
    if result.returncode == _RC_BAD_PASSPHRASE:
        return False
    raise CryptsetupFailed(device, result.argv, result.returncode, result.stderr)


def open_volume(device: Path, name: str, key: bytearray | memoryview, *,
                discard: bool = False, runner: Runner = run) -> Path:
    """Open the volume as /dev/mapper/<name>; return that path."""
    view = _key_view(key)
    try:
        result = runner(open_argv(device, name, discard=discard), stdin=view, check=False)
    finally:
        view.release()
    if result.returncode == _RC_BAD_PASSPHRASE:
        raise KeyRejected(device, "no keyslot accepts the key from Vault")
    if result.returncode != 0:
        raise CryptsetupFailed(device, result.argv, result.returncode, result.stderr)
    log.info("opened %s as /dev/mapper/%s", device, name)
    return Path("/dev/mapper") / name


def is_open(name: str, runner: Runner = run) -> bool:
    """Whether the mapping is active (`cryptsetup status`: 0 active, 4 inactive)."""
    result = runner(status_argv(name), check=False)
    if result.returncode == 0:
        return True
    if result.returncode == _RC_WRONG_DEVICE:
        return False
    raise CryptsetupFailed(name, result.argv, result.returncode, result.stderr)


def close_volume(name: str, runner: Runner = run) -> bool:
    """Close the mapping; False when it was not open (idempotent)."""
    if not is_open(name, runner):
        return False
    _cryptsetup(runner, close_argv(name), name)
    log.info("closed /dev/mapper/%s", name)
    return True


@dataclasses.dataclass(frozen=True)
class Erasure:
    was_luks: bool
    tokens_removed: tuple[int, ...]
    keyslots_erased: tuple[int, ...]


def erase(device: Path, runner: Runner = run) -> Erasure:
    """Crypto-erase the header: remove every token (`cryptsetup erase` keeps them), then
    destroy every keyslot. Idempotent: a device without LUKS header, or one already erased,
    is reported as such. Close the mapping first."""
    try:
        header = read_header(device, runner)
    except NotLuks:
        return Erasure(False, (), ())
    for token_id in sorted(header.tokens):
        _cryptsetup(runner, token_remove_argv(device, token_id), device)
    if header.keyslots:
        _cryptsetup(runner, erase_argv(device), device)
    after = read_header(device, runner)
    if after.keyslots or after.tokens:
        raise EraseIncomplete(device, "keyslots or tokens are still in the header after erase")
    log.info("erased the LUKS2 keyslots and tokens of %s", device)
    return Erasure(True, tuple(sorted(header.tokens)), header.keyslots)


def _cryptsetup(runner: Runner, argv: tuple[str, ...], device: Path | str, *,
                stdin: Stdin | None = None) -> Completed:
    result = runner(argv, stdin=stdin, check=False)
    if result.returncode != 0:
        raise CryptsetupFailed(device, argv, result.returncode, result.stderr)
    return result
