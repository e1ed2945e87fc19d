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
import logging
import os
import shlex
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, cast

from bootsecrets.luksformat import (
    BLANK_CHECK_BYTES,
    BLKID_AMBIVALENT,
    BLKID_NOTHING_FOUND,
    CRYPTSETUP,
    KEY_SIZE,
    KEYSLOT,
    RC_BAD_PASSPHRASE,
    RC_WRONG_DEVICE,
    TOKEN_ID,
    TOKEN_TYPE,
    CryptsetupFailed,
    DeviceMissing,
    EraseIncomplete,
    KeyRejected,
    LuksError,
    LuksHeader,
    NotBlank,
    NotLuks,
    Stdin,
    TokenInvalid,
    TokenMissing,
    TransitToken,
    blkid_argv,
    check_key_argv,
    close_argv,
    dump_argv,
    erase_argv,
    format_argv,
    is_luks_argv,
    key_view,
    open_argv,
    parse_dump,
    status_argv,
    token_export_argv,
    token_import_argv,
    token_remove_argv,
)

log = logging.getLogger(__name__)

__all__ = [
    "CRYPTSETUP",
    "KEY_SIZE",
    "TOKEN_TYPE",
    "Blankness",
    "Completed",
    "CryptsetupFailed",
    "DeviceMissing",
    "Erasure",
    "KeyRejected",
    "LuksError",
    "LuksHeader",
    "NotBlank",
    "NotLuks",
    "Runner",
    "Stdin",
    "TokenInvalid",
    "TokenMissing",
    "TransitToken",
    "blkid_argv",
    "check_key",
    "check_key_argv",
    "close_argv",
    "close_volume",
    "dump_argv",
    "erase",
    "erase_argv",
    "format_argv",
    "format_volume",
    "is_luks_argv",
    "is_open",
    "open_argv",
    "open_volume",
    "parse_dump",
    "probe",
    "read_header",
    "read_token",
    "require_blank",
    "run",
    "status_argv",
    "token_export_argv",
    "token_import_argv",
    "token_remove_argv",
    "update_token",
]

# --- the runner ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""


class Runner(Protocol):
    def __call__(
        self, argv: Sequence[str], *, stdin: Stdin | None = None, check: bool = True
    ) -> Completed: ...


def run(argv: Sequence[str], *, stdin: Stdin | None = None, check: bool = True) -> Completed:
    """Run a command without a shell; `stdin` bytes (a key) go to its standard input, which
    is closed when there are none. Output captured; failure raised as CryptsetupFailed.

    With stdout and stderr both piped, `communicate` writes the input from a memoryview of
    the caller's buffer straight into the pipe, so no copy of a key is made here."""
    command = tuple(argv)
    log.debug(
        "running %s%s",
        shlex.join(command),
        "" if stdin is None else f" ({memoryview(stdin).nbytes} bytes on stdin)",
    )
    with subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        # typeshed says bytes; any buffer works, and bytes() here would copy the key.
        out, err = proc.communicate(cast(bytes | None, stdin))
    result = Completed(
        command, proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    )
    if check and result.returncode != 0:
        raise CryptsetupFailed(command[-1], command, result.returncode, result.stderr)
    return result


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
        raise DeviceMissing(
            device, "does not exist (volume not attached yet, or a wrong device path)"
        ) from None
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
    elif result.returncode == BLKID_NOTHING_FOUND:
        signatures = ()
    elif result.returncode == BLKID_AMBIVALENT:
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


def format_volume(
    device: Path,
    key: bytearray | memoryview,
    token: TransitToken,
    runner: Runner = run,
    *,
    uuid: str | None = None,
) -> LuksHeader:
    """First use: refuse unless the device is provably blank, then luksFormat (LUKS2,
    keyslot 0 with `key` as its passphrase, PBKDF2 at the minimum), import the token and
    read the header back to check both are there. The caller runs mkfs on the opened
    mapping afterwards.

    A crash between luksFormat and the token import leaves a header without a token: the
    next boot fails closed with TokenMissing, and the device, no longer blank, is never
    formatted again by itself (the operator wipes it: `cryptsetup erase`, `wipefs -a`)."""
    view = key_view(key)
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
        raise DeviceMissing(
            device, "does not exist (volume not attached yet, or a wrong device path)"
        )
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
    _cryptsetup(
        runner,
        token_import_argv(device, token_id, replace=header.token_id is not None),
        device,
        stdin=token.to_json().encode(),
    )
    if read_header(device, runner).token != token:
        raise TokenInvalid(device, "(header)", "the new token did not read back")


def check_key(device: Path, key: bytearray | memoryview, runner: Runner = run) -> bool:
    """Whether keyslot 0 exists and accepts `key` (`--test-passphrase`: no device-mapper
    needed)."""
    view = key_view(key)
    if KEYSLOT not in read_header(device, runner).keyslots:
        view.release()
        return False
    try:
        result = runner(check_key_argv(device), stdin=view, check=False)
    finally:
        view.release()
    if result.returncode == 0:
        return True
    if result.returncode == RC_BAD_PASSPHRASE:
        return False
    raise CryptsetupFailed(device, result.argv, result.returncode, result.stderr)


def open_volume(
    device: Path,
    name: str,
    key: bytearray | memoryview,
    *,
    discard: bool = False,
    runner: Runner = run,
) -> Path:
    """Open the volume as /dev/mapper/<name>; return that path."""
    view = key_view(key)
    try:
        result = runner(open_argv(device, name, discard=discard), stdin=view, check=False)
    finally:
        view.release()
    if result.returncode == RC_BAD_PASSPHRASE:
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
    if result.returncode == RC_WRONG_DEVICE:
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


def _cryptsetup(
    runner: Runner, argv: tuple[str, ...], device: Path | str, *, stdin: Stdin | None = None
) -> Completed:
    result = runner(argv, stdin=stdin, check=False)
    if result.returncode != 0:
        raise CryptsetupFailed(device, argv, result.returncode, result.stderr)
    return result
