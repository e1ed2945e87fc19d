"""The outcomes of data at rest: encrypted directories and volumes, and decommission. A
directory's or a volume's failure is its own: the units needing it stay down, the others
start (bootsecrets.service counts these exit codes as success: systemd/README.md)."""

from __future__ import annotations

from bootsecrets.errors.base import BootsecretsError, VaultError

# --- data at rest: checked before Vault ---------------------------------------------------


class EncryptionUnsupported(BootsecretsError):
    """An encrypted directory cannot be made at its path: tmpfs, ext4 without `encrypt`, a
    kernel without fscrypt, another filesystem, a filesystem's root, or read-only here."""

    exit_code = 16
    summary = (
        "an encrypted directory cannot be made here (tmpfs, ext4 without `encrypt`, "
        "no fscrypt in the kernel, read-only)"
    )
    hint = (
        "put the directory on an ext4 filesystem with the encrypt feature (or f2fs), "
        "writable by bootsecrets.service; see docs/operations.md (data at rest)"
    )


class DataNotEmpty(BootsecretsError):
    """First use of an encrypted directory whose path already holds data."""

    exit_code = 17
    summary = (
        "refusing to encrypt over existing data (a non-empty directory at first use, "
        "or not a directory)"
    )
    hint = (
        "nothing was changed: move the data away, or point the config at an absent or "
        "empty directory, then run again"
    )


class KeyRecordInvalid(BootsecretsError):
    """The stored (Transit-encrypted) data key of encrypted data is missing or unreadable."""

    exit_code = 18
    summary = "the stored data key of an encrypted directory is missing or unreadable"
    hint = (
        "restore the key record under /var/lib/bootsecrets/keys from a backup (it is "
        "worthless without Vault); docs/operations.md (data at rest) says what else to do"
    )


class KeyMismatch(BootsecretsError):
    """The directory and its stored key do not go together: it is missing, not encrypted, or
    encrypted with another key than the record names."""

    exit_code = 19
    summary = (
        "an encrypted directory and its stored data key do not match (directory "
        "missing, not encrypted, or encrypted with another key)"
    )
    hint = (
        "nothing was changed: find out who replaced the directory or the key record; "
        "docs/operations.md (data at rest) says how to start the directory afresh"
    )


# --- data at rest: found at Vault or by the kernel -------------------------------------


class DataLocked(VaultError):
    """Vault refused the data key of encrypted data (permission denied, or its key version
    retired by min_decryption_version before this host rewrapped it), or the kernel refused
    it: that data stays locked, the units needing it stay down, the others run."""

    exit_code = 51
    summary = (
        "encrypted data stays locked: Vault (or the kernel) refused its key; the units "
        "needing it stay down, the others start (alert)"
    )
    message_id = "1a52b0e751ae42bda35d65f7fd42bce5"
    hint = (
        "grant the role's policy `update` on the Transit key's datakey, decrypt and rewrap "
        "paths (docs/operations.md); then `bootsecrets refresh` unlocks the data and starts "
        "the units held back"
    )


class TransitKeyMissing(VaultError):
    """The Transit key (or its mount) no longer exists: the data under it is crypto-shredded."""

    exit_code = 52
    summary = (
        "the Transit key of encrypted data no longer exists (crypto-shredded): it "
        "cannot be unlocked again (alert)"
    )
    message_id = "ae03788be16f4724812dfb05da47b02e"
    hint = (
        "if the key was deleted on purpose, the data is gone for good: run "
        "`bootsecrets decommission`; otherwise check the transit mount and key names"
    )


class DataKeyRejected(VaultError):
    """Transit rejected the stored ciphertext (altered), or it decrypts to a key that is not
    the directory's (swapped): tampering."""

    exit_code = 53
    summary = (
        "the stored key of encrypted data was rejected by Transit or is not the "
        "data's key: tampering (alert)"
    )
    message_id = "e0ad47d1f8574517bb24b305fe590e35"
    hint = (
        "someone altered or swapped the stored key (a key record under "
        "/var/lib/bootsecrets/keys, or the token in a volume's LUKS2 header): restore it "
        "from a backup and find out who wrote it"
    )


# --- data at rest: encrypted volumes (one volume's failure; the others go on) -------------


class VolumeMissing(BootsecretsError):
    """The volume's device did not appear within its attach timeout."""

    exit_code = 54
    summary = (
        "an encrypted volume's device did not appear in time (not attached, or a wrong "
        "device path); the units needing it stay down, the others start (alert)"
    )
    message_id = "828e10e321f54f25888badc6c71be618"
    hint = (
        "attach the volume (Terraform: the droplet's volume_ids) or fix `device:` in the "
        "image config; `bootsecrets refresh` then opens it and starts the units held back"
    )


class VolumeNotBlank(BootsecretsError):
    """First use of a volume whose device holds something bootsecrets did not write."""

    exit_code = 55
    summary = (
        "refusing to format an encrypted volume: its device holds a filesystem, a "
        "partition table, another LUKS header or data; left untouched (alert)"
    )
    message_id = "64bb98387183496d8a0288723f815bdf"
    hint = (
        "nothing was changed: point `device:` at the right volume, or, if what is on it "
        "is not needed, wipe it (`wipefs -a`, then zero its first MiB); see "
        "docs/operations.md (data at rest)"
    )


class VolumeBlank(BootsecretsError):
    """The device is blank and the config does not allow formatting it."""

    exit_code = 56
    summary = "an encrypted volume's device is blank and the config says `format: never` (alert)"
    message_id = "72147c00798746e4834d52a736686aa3"
    hint = (
        "attach the volume that holds the data, or set `format: if-blank` for a new "
        "volume in the image config"
    )


class VolumeTokenInvalid(BootsecretsError):
    """The LUKS2 header has no bootsecrets token, or one that is not what bootsecrets
    writes."""

    exit_code = 57
    summary = (
        "an encrypted volume's LUKS2 header has no bootsecrets token, or an altered "
        "one: tampering, or a first use cut short (alert)"
    )
    message_id = "cf97d789113d4e329395dd46c687d9de"
    hint = (
        "nothing was changed: find out who wrote the header; restore it from a header "
        "backup (`cryptsetup luksHeaderRestore`), or start the volume afresh "
        "(docs/operations.md, data at rest)"
    )


class VolumeMismatch(BootsecretsError):
    """Another volume than the one this host formatted, or one whose token names another
    Transit key than the config."""

    exit_code = 58
    summary = (
        "another volume is attached than the one this host formatted (another LUKS "
        "UUID, or blank where it was), or its token names another Transit key (alert)"
    )
    message_id = "337ff6cfad4a4a448e41b6bceb24befe"
    hint = (
        "nothing was changed: attach the volume this host formatted; to adopt another "
        "one on purpose, delete its record under /var/lib/bootsecrets/volumes "
        "(docs/operations.md, data at rest)"
    )


class VolumeFailed(BootsecretsError):
    """cryptsetup, mkfs or the mount failed (or device-mapper is out of reach)."""

    exit_code = 59
    summary = (
        "an encrypted volume could not be opened, formatted or mounted (cryptsetup, "
        "mkfs or the mount failed, or device-mapper is out of bootsecrets' reach) "
        "(alert)"
    )
    message_id = "56e50effe57b4399affcec349d6ed59a"
    hint = (
        "the message names the command and its error; an image with volumes needs "
        "systemd/encrypted-volumes.conf as a drop-in of bootsecrets.service and "
        "bootsecrets-refresh.service (docs/operations.md, data at rest)"
    )


# --- decommission -------------------------------------------------------------------------


class DecommissionIncomplete(BootsecretsError):
    exit_code = 50
    summary = "decommission: a step failed (every step is reported; run it again)"
    hint = "every step is idempotent: fix what the failed step names and run it again"
