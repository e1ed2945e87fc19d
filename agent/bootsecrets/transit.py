"""Data keys from Vault's Transit engine (envelope encryption), for data at rest.

Three calls, exactly what the droplet's policy grants (`update` on each path):

* `transit/datakey/plaintext/<key>` (bits=512): a new random data key, in plaintext and
  wrapped by the Transit key; only the wrapped form (the *ciphertext*) is ever stored;
* `transit/decrypt/<key>`: the data key back from its ciphertext, at every unlock;
* `transit/rewrap/<key>`: the ciphertext re-encrypted under the Transit key's latest version,
  without the data key leaving Vault. With only `update` on these paths the agent cannot
  read the key's latest version; rewrap answers with it (`key_version`), so a refresh rewraps
  and keeps the new ciphertext when the version moved.

Key hygiene, best effort in CPython: the plaintext key arrives base64 inside Vault's JSON
answer and is decoded straight into a `bytearray` (no intermediate `bytes`), which the
caller hands to the kernel and zeroes with `zero()`. What cannot be zeroed: the response
body requests read and the `str` JSON decoding made of it (immutable objects, freed but not
overwritten). No key byte, and no ciphertext, is ever part of a message.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bootsecrets.errors import (
    BootsecretsError,
    DataKeyRejected,
    DataLocked,
    PermissionDenied,
    TransitKeyMissing,
    VaultError,
)
from bootsecrets.keyrecord import ciphertext_version

if TYPE_CHECKING:
    from bootsecrets.vault import Vault

KEY_BITS = 512
KEY_BYTES = KEY_BITS // 8
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_DECODE = {char: index for index, char in enumerate(_ALPHABET)}


@dataclasses.dataclass(frozen=True)
class TransitKey:
    mount: str
    name: str

    def path(self, operation: str) -> str:
        return f"{self.mount}/{operation}/{self.name}"

    def __str__(self) -> str:
        return f"{self.mount}/keys/{self.name}"


@dataclasses.dataclass(frozen=True)
class Wrapped:
    """A data key as only Vault can read it."""

    ciphertext: str = dataclasses.field(repr=False)
    key_version: int


def zero(key: bytearray) -> None:
    """Overwrite the key in place (ctypes, so the write cannot be optimised away)."""
    if key:
        ctypes.memset((ctypes.c_char * len(key)).from_buffer(key), 0, len(key))


def generate(vault: Vault, key: TransitKey, what: str) -> tuple[bytearray, Wrapped]:
    """A new 512-bit data key: (plaintext to zero after use, its ciphertext)."""
    data = _call(vault, key, "datakey/plaintext", {"bits": KEY_BITS}, what)
    wrapped = _wrapped(data, key, what)
    plaintext = _decode_key(data.pop("plaintext", None), key)
    del data
    return plaintext, wrapped


def decrypt(vault: Vault, key: TransitKey, ciphertext: str, what: str) -> bytearray:
    """The data key from its ciphertext: a bytearray the caller zeroes after use."""
    data = _call(vault, key, "decrypt", {"ciphertext": ciphertext}, what)
    plaintext = _decode_key(data.pop("plaintext", None), key)
    del data
    return plaintext


def rewrap(vault: Vault, key: TransitKey, ciphertext: str, what: str) -> Wrapped:
    """The ciphertext under the Transit key's latest version (the same data key)."""
    data = _call(vault, key, "rewrap", {"ciphertext": ciphertext}, what)
    return _wrapped(data, key, what)


def _call(
    vault: Vault, key: TransitKey, operation: str, body: dict[str, Any], what: str
) -> dict[str, Any]:
    """One Transit call; pure on Vault's side, so safe to retry. The errors name `what` (the
    data the key is for) and the Transit key."""
    path = key.path(operation)
    try:
        return vault.write(
            path,
            body,
            what=f"{path} for {what}",
            idempotent=True,
            refused=_refused(key, what),
            with_reads=True,
        )
    except PermissionDenied:
        raise DataLocked(f"{what}: permission denied on {path}") from None


def _refused(key: TransitKey, what: str) -> Callable[[int, str], BootsecretsError]:
    def refused(status: int, errors: str) -> BootsecretsError:
        if status == 404 or "encryption key not found" in errors:
            return TransitKeyMissing(
                f"{what}: Transit key {key} does not exist (deleted: the data it protected "
                "is crypto-shredded), or the mount is wrong"
            )
        if "disallowed by policy" in errors:
            return DataLocked(
                f"{what}: Transit key {key} no longer decrypts this key version "
                "(min_decryption_version was raised before this host rewrapped it)"
            )
        return DataKeyRejected(
            f"{what}: Transit key {key} rejected the stored ciphertext ({errors})"
        )

    return refused


def _wrapped(data: dict[str, Any], key: TransitKey, what: str) -> Wrapped:
    ciphertext = data.get("ciphertext")
    version = ciphertext_version(ciphertext) if isinstance(ciphertext, str) else None
    if not isinstance(ciphertext, str) or version is None:
        raise VaultError(f"{what}: Transit key {key} answered without a ciphertext")
    return Wrapped(ciphertext, version)


def _decode_key(text: object, key: TransitKey) -> bytearray:
    """Base64 of exactly 64 bytes, decoded into a new bytearray without a `bytes` copy."""
    if not isinstance(text, str) or len(text) != 88 or not text.endswith("=="):
        raise VaultError(f"Transit key {key} answered without a {KEY_BITS}-bit key")
    out = bytearray(KEY_BYTES)
    accumulator = bits = count = 0
    for char in text[:86]:
        value = _DECODE.get(char)
        if value is None:
            zero(out)
            raise VaultError(f"Transit key {key} answered with a key that is not base64")
        accumulator = ((accumulator << 6) | value) & 0xFFFF
        bits += 6
        if bits >= 8:
            bits -= 8
            out[count] = (accumulator >> bits) & 0xFF
            count += 1
    accumulator = 0
    return out
