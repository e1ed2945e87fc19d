"""The kernel edge of encrypted directories: Linux's native fscrypt, policy v2, by ioctl.

No fscrypt/fscryptctl binary is involved: the structs and request numbers are those of
include/uapi/linux/fscrypt.h, and the semantics those of
Documentation/filesystems/fscrypt.rst ("User API").

Key hygiene: a master key is 64 raw bytes that the caller holds in a `bytearray` (or a
`memoryview` of one) and zeroes itself. This module copies it exactly once, into the ctypes
buffer handed to FS_IOC_ADD_ENCRYPTION_KEY, and zeroes that buffer before returning, error
or not. The buffer is larger than CPython's 1024-byte ioctl scratch buffer on purpose: for
a larger mutable buffer `fcntl.ioctl` passes our memory to the kernel directly instead of
copying it onto its own C stack, where it would stay unzeroed. No key byte is ever part of
an exception, a log line or a return value; messages name the path and the operation.

Keys are added, queried and removed through the root directory of the filesystem, as the
kernel docs recommend: an open descriptor on the encrypted directory itself would count as
an in-use file and keep the directory unlocked after FS_IOC_REMOVE_ENCRYPTION_KEY.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from bootsecrets import fscrypt_uapi
from bootsecrets.fscrypt_types import (
    DirectoryNotEmpty,
    EncryptedWithOtherKey,
    Filesystem,
    FscryptError,
    FscryptOSError,
    FscryptUnsupported,
    KeyState,
    KeyStatus,
    NotADirectory,
    NotEncrypted,
    Policy,
    Removal,
)
from bootsecrets.fscrypt_uapi import (
    EXT4_SUPER_MAGIC,
    F2FS_SUPER_MAGIC,
    FS_IOC_ADD_ENCRYPTION_KEY,
    FS_IOC_GET_ENCRYPTION_KEY_STATUS,
    FS_IOC_GET_ENCRYPTION_POLICY_EX,
    FS_IOC_REMOVE_ENCRYPTION_KEY,
    FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS,
    FS_IOC_SET_ENCRYPTION_POLICY,
    FSCRYPT_KEY_REMOVAL_STATUS_FLAG_FILES_BUSY,
    FSCRYPT_KEY_REMOVAL_STATUS_FLAG_OTHER_USERS,
    FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER,
    FSCRYPT_KEY_STATUS_FLAG_ADDED_BY_SELF,
    FSCRYPT_MODE_AES_256_CTS,
    FSCRYPT_MODE_AES_256_XTS,
    FSCRYPT_POLICY_FLAGS_PAD_32,
    FSCRYPT_POLICY_V2,
    RAMFS_MAGIC,
    TMPFS_MAGIC,
    AddKeyBuffer,
    GetKeyStatusArg,
    GetPolicyExArg,
    KeySpecifier,
    PolicyUnion,
    PolicyV2,
    RemoveKeyArg,
)
from bootsecrets.process import libc

log = logging.getLogger(__name__)

KEY_SIZE = fscrypt_uapi.KEY_SIZE
IDENTIFIER_SIZE = fscrypt_uapi.IDENTIFIER_SIZE


# --- checks --------------------------------------------------------------------------------


def filesystem_type(path: Path) -> int:
    """statfs(2) f_type of the filesystem holding `path`."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64
    if libc().statfs(os.fsencode(path), buf) != 0:
        raise FscryptOSError(path, "statfs", ctypes.get_errno())
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


def kernel_supports(kind: str, sysfs: Path = Path("/sys")) -> bool:
    """Whether the running kernel was built with fscrypt for this filesystem: ext4 and f2fs
    list an `encryption` feature in sysfs only under CONFIG_FS_ENCRYPTION."""
    return (sysfs / "fs" / kind / "features" / "encryption").exists()


def mount_root(path: Path) -> Path:
    """The root directory of the filesystem (mount) holding the existing `path`."""
    current = Path(os.path.realpath(path))
    device = current.stat().st_dev
    while current != current.parent and current.parent.stat().st_dev == device:
        current = current.parent
    return current


def check_support(path: Path, *, sysfs: Path = Path("/sys")) -> Filesystem:
    """Can a directory at `path` (existing or not) be encrypted? Raise FscryptUnsupported
    with the reason when not; nothing is changed either way.

    The kernel is the judge of the last step: FS_IOC_GET_ENCRYPTION_POLICY_EX on an existing
    directory of the filesystem answers ENODATA (not encrypted, but it could be) where
    encryption works, EOPNOTSUPP where the superblock lacks the `encrypt` feature."""
    existing = Path(os.path.abspath(path))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectory(existing, "not a directory")
    fstype = filesystem_type(existing)
    if fstype in (TMPFS_MAGIC, RAMFS_MAGIC):
        raise FscryptUnsupported(
            path,
            "is on tmpfs/ramfs, which cannot hold encrypted directories (and is not "
            "persistent); use a directory on the ext4 root disk",
        )
    kinds = {EXT4_SUPER_MAGIC: "ext4", F2FS_SUPER_MAGIC: "f2fs"}
    if fstype not in kinds:
        raise FscryptUnsupported(
            path,
            f"is on a filesystem without fscrypt support (statfs type {fstype:#x}); "
            "it must be ext4 (with the encrypt feature) or f2fs",
        )
    kind = kinds[fstype]
    existing = Path(os.path.realpath(existing))  # the probe below opens with O_NOFOLLOW
    if not kernel_supports(kind, sysfs):
        raise FscryptUnsupported(
            path, f"the running kernel has no fscrypt for {kind} (CONFIG_FS_ENCRYPTION)"
        )
    root = mount_root(existing)
    try:
        with _opened(existing) as fd:
            _get_policy(fd, existing)
    except FscryptOSError as err:
        if err.errno == errno.EOPNOTSUPP:
            feature = "encrypt" if kind == "ext4" else "encryption"
            raise FscryptUnsupported(
                path,
                f"the {kind} filesystem mounted at {root} does not have the {feature} "
                f"feature (tune2fs -O encrypt on its device, or mkfs with -O {feature})",
            ) from None
        raise
    return Filesystem(kind, root)


def directory_is_empty(path: Path) -> bool:
    """True for an existing directory without entries. Raise NotADirectory for a file."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise NotADirectory(path, "exists and is not a directory")
    with os.scandir(path) as entries:
        return next(entries, None) is None


# --- policies -----------------------------------------------------------------------------


@contextmanager
def _opened(path: Path) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except NotADirectoryError:
        raise NotADirectory(path, "not a directory (or a symlink)") from None
    except OSError as err:
        raise FscryptOSError(path, "open", err.errno or errno.EIO) from None
    try:
        yield fd
    finally:
        os.close(fd)


def _ioctl(fd: int, request: int, arg: ctypes.Structure, path: Path, operation: str) -> None:
    try:
        fcntl.ioctl(fd, request, arg, True)
    except OSError as err:
        code = err.errno or errno.EIO
        if code == errno.ENOTTY:
            raise FscryptUnsupported(
                path, "the filesystem does not implement encryption (ENOTTY)"
            ) from None
        raise FscryptOSError(path, operation, code) from None


def _get_policy(fd: int, path: Path) -> Policy | None:
    arg = GetPolicyExArg()
    arg.policy_size = ctypes.sizeof(PolicyUnion)
    try:
        _ioctl(fd, FS_IOC_GET_ENCRYPTION_POLICY_EX, arg, path, "FS_IOC_GET_ENCRYPTION_POLICY_EX")
    except FscryptOSError as err:
        if err.errno == errno.ENODATA:
            return None
        raise
    if arg.policy.version == FSCRYPT_POLICY_V2:
        v2 = arg.policy.v2
        return Policy(
            2,
            v2.contents_encryption_mode,
            v2.filenames_encryption_mode,
            v2.flags,
            bytes(v2.master_key_identifier).hex(),
        )
    v1 = arg.policy.v1
    return Policy(
        1,
        v1.contents_encryption_mode,
        v1.filenames_encryption_mode,
        v1.flags,
        bytes(v1.master_key_descriptor).hex(),
    )


def get_policy(path: Path) -> Policy | None:
    """The directory's (or file's) encryption policy; None when it is not encrypted."""
    with _opened(path) as fd:
        return _get_policy(fd, path)


def set_policy(path: Path, key_identifier: str) -> None:
    """Make the empty directory `path` encrypted under the key (already added): policy v2,
    AES-256-XTS contents, AES-256-CTS filenames, filenames padded to 32 bytes (the kernel
    docs' recommendation). On a directory that already has exactly this policy it is a
    no-op (the kernel verifies instead of setting)."""
    identifier = _parse_identifier(key_identifier)
    policy = PolicyV2()
    policy.version = FSCRYPT_POLICY_V2
    policy.contents_encryption_mode = FSCRYPT_MODE_AES_256_XTS
    policy.filenames_encryption_mode = FSCRYPT_MODE_AES_256_CTS
    policy.flags = FSCRYPT_POLICY_FLAGS_PAD_32
    policy.master_key_identifier[:] = list(identifier)
    with _opened(path) as fd:
        try:
            _ioctl(fd, FS_IOC_SET_ENCRYPTION_POLICY, policy, path, "FS_IOC_SET_ENCRYPTION_POLICY")
        except FscryptOSError as err:
            if err.errno == errno.EEXIST:
                raise EncryptedWithOtherKey(
                    path, "is already encrypted with another key or policy"
                ) from None
            if err.errno == errno.ENOTEMPTY:
                raise DirectoryNotEmpty(
                    path,
                    "is not empty; refusing to encrypt a directory that holds data",
                ) from None
            if err.errno == errno.EOPNOTSUPP:
                raise FscryptUnsupported(
                    path, "the filesystem does not have the encrypt feature"
                ) from None
            if err.errno == errno.EPERM:
                raise FscryptOSError(
                    path,
                    "FS_IOC_SET_ENCRYPTION_POLICY (the root "
                    "directory of a filesystem cannot be encrypted)",
                    errno.EPERM,
                ) from None
            raise


# --- keys ----------------------------------------------------------------------------------


def _parse_identifier(key_identifier: str) -> bytes:
    try:
        raw = bytes.fromhex(key_identifier)
    except ValueError:
        raw = b""
    if len(raw) != IDENTIFIER_SIZE:
        raise ValueError(f"a key identifier is {IDENTIFIER_SIZE * 2} hex digits")
    return raw


def _key_spec(spec: KeySpecifier, key_identifier: str) -> None:
    spec.type = FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER
    spec.u[:IDENTIFIER_SIZE] = list(_parse_identifier(key_identifier))


def _key_view(key: bytearray | memoryview) -> memoryview:
    view = memoryview(key)
    if view.nbytes != KEY_SIZE or not view.c_contiguous:
        raise ValueError(f"an fscrypt master key is {KEY_SIZE} contiguous bytes")
    return view.cast("B") if view.format != "B" else view


def add_key(path: Path, key: bytearray | memoryview) -> str:
    """Add a v2 master key to the filesystem holding `path`; return its key identifier (hex,
    the kernel's hash of the key). Adding a key that is already present is not an error (the
    kernel records the claim). The caller zeroes its own copy of the key."""
    view = _key_view(key)
    root = mount_root(path)
    buf = AddKeyBuffer()
    try:
        buf.arg.key_spec.type = FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER
        buf.arg.raw_size = KEY_SIZE
        raw_offset = AddKeyBuffer.raw.offset
        memoryview(buf).cast("B")[raw_offset : raw_offset + KEY_SIZE] = view
        with _opened(root) as fd:
            _ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, buf, path, "FS_IOC_ADD_ENCRYPTION_KEY")
        return bytes(buf.arg.key_spec.u[:IDENTIFIER_SIZE]).hex()
    finally:
        ctypes.memset(ctypes.addressof(buf), 0, ctypes.sizeof(buf))
        view.release()


def key_status(path: Path, key_identifier: str) -> KeyStatus:
    """Whether the key is present in the filesystem holding `path`, for whom."""
    arg = GetKeyStatusArg()
    _key_spec(arg.key_spec, key_identifier)
    with _opened(mount_root(path)) as fd:
        _ioctl(fd, FS_IOC_GET_ENCRYPTION_KEY_STATUS, arg, path, "FS_IOC_GET_ENCRYPTION_KEY_STATUS")
    return KeyStatus(
        KeyState(arg.status),
        bool(arg.status_flags & FSCRYPT_KEY_STATUS_FLAG_ADDED_BY_SELF),
        int(arg.user_count),
    )


def remove_key(path: Path, key_identifier: str, *, all_users: bool = True) -> Removal:
    """Remove the key from the filesystem holding `path`, locking every file it unlocked
    that is not in use. Idempotent: an absent key is `Removal(was_present=False, ...)`.

    `all_users` (root only, the default for the agent) removes every user's claim; without
    it only this uid's claim goes. Calling it again after `files_busy` retries locking the
    files that were closed since."""
    arg = RemoveKeyArg()
    _key_spec(arg.key_spec, key_identifier)
    request = FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS if all_users else FS_IOC_REMOVE_ENCRYPTION_KEY
    operation = "FS_IOC_REMOVE_ENCRYPTION_KEY" + ("_ALL_USERS" if all_users else "")
    with _opened(mount_root(path)) as fd:
        try:
            _ioctl(fd, request, arg, path, operation)
        except FscryptOSError as err:
            if err.errno == errno.ENOKEY:
                return Removal(was_present=False, files_busy=False, other_users=False)
            raise
    flags = arg.removal_status_flags
    return Removal(
        was_present=True,
        files_busy=bool(flags & FSCRYPT_KEY_REMOVAL_STATUS_FLAG_FILES_BUSY),
        other_users=bool(flags & FSCRYPT_KEY_REMOVAL_STATUS_FLAG_OTHER_USERS),
    )


# --- the directory-level steps the agent uses --------------------------------------------


def provision(path: Path, key: bytearray | memoryview, *, sysfs: Path = Path("/sys")) -> str:
    """First use: `path` must be an existing, empty directory on a filesystem that supports
    encryption. Add the key, set the policy, return the key identifier. Every check runs
    before the key reaches the kernel; the directory is left untouched on any refusal."""
    check_support(path, sysfs=sysfs)
    if not path.exists():
        raise NotADirectory(path, "does not exist; create it (owner, mode) first")
    if not directory_is_empty(path):
        raise DirectoryNotEmpty(
            path, "is not empty; refusing to encrypt a directory that holds data"
        )
    existing = get_policy(path)
    if existing is not None:
        raise EncryptedWithOtherKey(path, "is already encrypted")
    identifier = add_key(path, key)
    try:
        set_policy(path, identifier)
    except FscryptError:
        remove_key(path, identifier, all_users=False)
        raise
    log.info("encrypted directory %s created (key identifier %s)", path, identifier)
    return identifier


def unlock(
    path: Path, key: bytearray | memoryview, *, other_identifiers: Collection[str] = ()
) -> str:
    """Add the key of the encrypted directory `path`; return its identifier.

    A key whose identifier is not the directory's raises EncryptedWithOtherKey after this
    uid's claim to it is taken back out of the kernel, unless it is one of
    `other_identifiers` (the keys of the caller's other directories, which a swapped
    ciphertext would otherwise lock as a side effect)."""
    policy = get_policy(path)
    if policy is None:
        raise NotEncrypted(path, "is not an encrypted directory")
    if policy.version != 2:
        raise EncryptedWithOtherKey(path, "uses a v1 encryption policy, not v2")
    identifier = add_key(path, key)
    if identifier != policy.key_identifier:
        if identifier not in other_identifiers:
            remove_key(path, identifier, all_users=False)
        raise EncryptedWithOtherKey(path, "the key given is not the directory's key")
    return identifier


def lock(path: Path) -> Removal:
    """Remove the key of the encrypted directory `path` from the kernel (all users)."""
    policy = get_policy(path)
    if policy is None:
        raise NotEncrypted(path, "is not an encrypted directory")
    if policy.version != 2:
        raise EncryptedWithOtherKey(path, "uses a v1 encryption policy, not v2")
    return remove_key(path, policy.key_identifier)


def is_unlocked(path: Path) -> bool:
    """Whether the key of the encrypted directory `path` is present (fully) in the kernel."""
    policy = get_policy(path)
    if policy is None:
        raise NotEncrypted(path, "is not an encrypted directory")
    return key_status(path, policy.key_identifier).state is KeyState.PRESENT
