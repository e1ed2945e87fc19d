"""include/uapi/linux/fscrypt.h in Python: the constants, the ioctl argument structs and the
request numbers fscrypt.py uses (policy v2 only), and linux/magic.h's filesystem types. No
logic: `fscrypt` is the API."""

from __future__ import annotations

import ctypes

KEY_SIZE = 64  # bytes; AES-256-XTS needs a 512-bit master key
IDENTIFIER_SIZE = 16  # FSCRYPT_KEY_IDENTIFIER_SIZE
FSCRYPT_POLICY_V1 = 0
FSCRYPT_POLICY_V2 = 2
FSCRYPT_MODE_AES_256_XTS = 1
FSCRYPT_MODE_AES_256_CTS = 4
FSCRYPT_POLICY_FLAGS_PAD_32 = 0x03
FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER = 2
FSCRYPT_KEY_REMOVAL_STATUS_FLAG_FILES_BUSY = 0x1
FSCRYPT_KEY_REMOVAL_STATUS_FLAG_OTHER_USERS = 0x2
FSCRYPT_KEY_STATUS_FLAG_ADDED_BY_SELF = 0x1

# statfs(2) f_type values (linux/magic.h)
EXT4_SUPER_MAGIC = 0xEF53
F2FS_SUPER_MAGIC = 0xF2F52010
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6

_u8, _u32, _u64 = ctypes.c_uint8, ctypes.c_uint32, ctypes.c_uint64


class PolicyV1(ctypes.Structure):
    _fields_ = (
        ("version", _u8),
        ("contents_encryption_mode", _u8),
        ("filenames_encryption_mode", _u8),
        ("flags", _u8),
        ("master_key_descriptor", _u8 * 8),
    )


class PolicyV2(ctypes.Structure):
    _fields_ = (
        ("version", _u8),
        ("contents_encryption_mode", _u8),
        ("filenames_encryption_mode", _u8),
        ("flags", _u8),
        ("log2_data_unit_size", _u8),
        ("reserved", _u8 * 3),
        ("master_key_identifier", _u8 * IDENTIFIER_SIZE),
    )


class PolicyUnion(ctypes.Union):
    _fields_ = (("version", _u8), ("v1", PolicyV1), ("v2", PolicyV2))


class GetPolicyExArg(ctypes.Structure):
    _fields_ = (("policy_size", _u64), ("policy", PolicyUnion))


class KeySpecifier(ctypes.Structure):
    _fields_ = (("type", _u32), ("reserved", _u32), ("u", _u8 * 32))


class AddKeyArg(ctypes.Structure):
    _fields_ = (
        ("key_spec", KeySpecifier),
        ("raw_size", _u32),
        ("key_id", _u32),
        ("flags", _u32),
        ("reserved", _u32 * 7),
        # `__u8 raw[]` follows in the kernel's struct; it is not part of the ioctl's size.
    )


IOCTL_BUFSZ = 1024  # CPython's fcntl.ioctl copies mutable buffers up to this size


class AddKeyBuffer(ctypes.Structure):
    _fields_ = (
        ("arg", AddKeyArg),
        ("raw", _u8 * KEY_SIZE),
        ("pad", _u8 * (IOCTL_BUFSZ + 1 - ctypes.sizeof(AddKeyArg) - KEY_SIZE)),
    )


class RemoveKeyArg(ctypes.Structure):
    _fields_ = (
        ("key_spec", KeySpecifier),
        ("removal_status_flags", _u32),
        ("reserved", _u32 * 5),
    )


class GetKeyStatusArg(ctypes.Structure):
    _fields_ = (
        ("key_spec", KeySpecifier),
        ("reserved", _u32 * 6),
        ("status", _u32),
        ("status_flags", _u32),
        ("user_count", _u32),
        ("out_reserved", _u32 * 13),
    )


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("f") << 8) | nr


_IOC_WRITE, _IOC_READ = 1, 2
FS_IOC_SET_ENCRYPTION_POLICY = _ioc(_IOC_READ, 19, ctypes.sizeof(PolicyV1))
FS_IOC_GET_ENCRYPTION_POLICY_EX = _ioc(_IOC_READ | _IOC_WRITE, 22, 9)  # __u8[9]
FS_IOC_ADD_ENCRYPTION_KEY = _ioc(_IOC_READ | _IOC_WRITE, 23, ctypes.sizeof(AddKeyArg))
FS_IOC_REMOVE_ENCRYPTION_KEY = _ioc(_IOC_READ | _IOC_WRITE, 24, ctypes.sizeof(RemoveKeyArg))
FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS = _ioc(
    _IOC_READ | _IOC_WRITE, 25, ctypes.sizeof(RemoveKeyArg)
)
FS_IOC_GET_ENCRYPTION_KEY_STATUS = _ioc(_IOC_READ | _IOC_WRITE, 26, ctypes.sizeof(GetKeyStatusArg))
