"""What the kernel edge of encrypted directories (`fscrypt`) reports: its errors and its
results, as plain types. `str()` of an error names the path and the problem; no type here
ever holds key bytes."""

from __future__ import annotations

import dataclasses
import enum
import errno
import os
from pathlib import Path

from bootsecrets.fscrypt_uapi import (
    FSCRYPT_MODE_AES_256_CTS,
    FSCRYPT_MODE_AES_256_XTS,
    FSCRYPT_POLICY_FLAGS_PAD_32,
)

# --- errors ----------------------------------------------------------------------------------


class FscryptError(Exception):
    """Root of this module's failures. `str()` names the path and the problem, nothing else."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class FscryptUnsupported(FscryptError):
    """The filesystem or the kernel cannot encrypt this path (tmpfs, ext4 without the
    `encrypt` feature, a kernel without CONFIG_FS_ENCRYPTION, another filesystem)."""


class NotADirectory(FscryptError):
    """The path exists and is not a directory."""


class DirectoryNotEmpty(FscryptError):
    """First use of a directory that already holds entries: never encrypt over data."""


class NotEncrypted(FscryptError):
    """The directory has no encryption policy (yet)."""


class EncryptedWithOtherKey(FscryptError):
    """The directory is encrypted, but under another key (or another policy) than the one
    given; a key that does not match is never left added by us."""


class FscryptOSError(FscryptError):
    """Any other refusal by the kernel: the operation and the errno name."""

    def __init__(self, path: Path | str, operation: str, code: int) -> None:
        self.operation = operation
        self.errno = code
        name = errno.errorcode.get(code, str(code))
        super().__init__(path, f"{operation} failed: {name} ({os.strerror(code)})")


# --- results -------------------------------------------------------------------------------


class KeyState(enum.Enum):
    ABSENT = 1
    PRESENT = 2
    INCOMPLETELY_REMOVED = 3  # removed, but files still in use keep it alive


@dataclasses.dataclass(frozen=True)
class KeyStatus:
    state: KeyState
    added_by_self: bool  # this uid holds a claim to the key
    user_count: int


@dataclasses.dataclass(frozen=True)
class Removal:
    """What FS_IOC_REMOVE_ENCRYPTION_KEY(_ALL_USERS) reported."""

    was_present: bool  # False: nothing to remove (ENOKEY), an idempotent no-op
    files_busy: bool  # some files are still open: they stay readable until closed
    other_users: bool  # only our claim went; other users keep the key added

    @property
    def locked(self) -> bool:
        """True when the key is gone and every file it unlocked is locked again."""
        return not self.files_busy and not self.other_users


@dataclasses.dataclass(frozen=True)
class Policy:
    version: int  # 1 or 2 (the kernel's code for v1 is 0)
    contents_mode: int
    filenames_mode: int
    flags: int
    key_identifier: str  # hex; for v1, the 8-byte descriptor

    @property
    def is_ours(self) -> bool:
        """Policy v2 with the modes and flags this module sets."""
        return (self.version, self.contents_mode, self.filenames_mode, self.flags) == (
            2,
            FSCRYPT_MODE_AES_256_XTS,
            FSCRYPT_MODE_AES_256_CTS,
            FSCRYPT_POLICY_FLAGS_PAD_32,
        )


@dataclasses.dataclass(frozen=True)
class Filesystem:
    kind: str  # "ext4" or "f2fs"
    mount_root: Path  # the root directory of the filesystem holding the path
