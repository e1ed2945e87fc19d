"""fscrypt against the real kernel: ext4 with and without `encrypt` on loop devices, tmpfs.

The proof that matters: after the key is removed, the raw image holds neither the content
nor the name of a file written into the encrypted directory, while the same file on an
unencrypted filesystem is plainly there (the positive control that makes the zero count
mean something). Needs root, as CI runs.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bootsecrets import fscrypt, fscrypt_types, fscrypt_uapi
from bootsecrets.fscrypt_types import KeyState, Removal
from support.loopfs import LoopFs, ext4_loop, tmpfs_mount

FILE_NAME = "canary-quarterly-payroll-7f3a.csv"
CONTENT = b"CANARY-CONTENT-d41d8cd98f00b204e9800998ecf8427e\n" * 64


@pytest.fixture
def encfs() -> Iterator[LoopFs]:
    with ext4_loop(encrypt=True) as fs:
        yield fs


@pytest.fixture
def plainfs() -> Iterator[LoopFs]:
    with ext4_loop(encrypt=False) as fs:
        yield fs


@pytest.fixture
def tmpfs() -> Iterator[Path]:
    with tmpfs_mount() as path:
        yield path


def new_key() -> bytearray:
    return bytearray(secrets.token_bytes(fscrypt.KEY_SIZE))


def identifier_of(fs: LoopFs, key: bytearray) -> str:
    """The kernel's identifier for `key` (add it, note the identifier, take it out again)."""
    identifier = fscrypt.add_key(fs.mountpoint, key)
    fscrypt.remove_key(fs.mountpoint, identifier)
    return identifier


def new_directory(fs: LoopFs, name: str = "data") -> Path:
    path = fs.mountpoint / name
    path.mkdir(mode=0o700)
    return path


def key_texts(key: bytearray) -> list[str]:
    raw = bytes(key)
    return [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode(), repr(raw)[2:-1]]


def assert_no_key_in(texts: list[str], key: bytearray) -> None:
    for text in texts:
        for form in key_texts(key):
            assert form not in text


# --- the kernel interface itself -------------------------------------------------------------


def test_request_numbers_and_struct_sizes_are_the_kernels() -> None:
    # The values of include/uapi/linux/fscrypt.h on x86_64 (as also listed by Go's x/sys/unix).
    assert fscrypt_uapi.FS_IOC_SET_ENCRYPTION_POLICY == 0x800C6613
    assert fscrypt_uapi.FS_IOC_GET_ENCRYPTION_POLICY_EX == 0xC0096616
    assert fscrypt_uapi.FS_IOC_ADD_ENCRYPTION_KEY == 0xC0506617
    assert fscrypt_uapi.FS_IOC_REMOVE_ENCRYPTION_KEY == 0xC0406618
    assert fscrypt_uapi.FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS == 0xC0406619
    assert fscrypt_uapi.FS_IOC_GET_ENCRYPTION_KEY_STATUS == 0xC080661A
    assert ctypes.sizeof(fscrypt_uapi.PolicyV2) == 24
    assert ctypes.sizeof(fscrypt_uapi.KeySpecifier) == 40
    assert ctypes.sizeof(fscrypt_uapi.GetPolicyExArg) == 8 + 24


# --- the proof: no plaintext on disk -------------------------------------------------------


def test_encrypted_directory_leaves_no_plaintext_in_the_raw_image(encfs: LoopFs) -> None:
    directory = new_directory(encfs)
    key = new_key()
    identifier = fscrypt.provision(directory, key)

    policy = fscrypt.get_policy(directory)
    assert policy is not None and policy.is_ours and policy.key_identifier == identifier
    (directory / FILE_NAME).write_bytes(CONTENT)
    (directory / "sub").mkdir()
    (directory / "sub" / FILE_NAME).write_bytes(CONTENT)
    assert fscrypt.is_unlocked(directory)

    removal = fscrypt.lock(directory)
    assert removal == Removal(was_present=True, files_busy=False, other_users=False)
    assert removal.locked
    assert not fscrypt.is_unlocked(directory)
    listing = os.listdir(directory)
    assert len(listing) == 2 and FILE_NAME not in listing and "sub" not in listing
    for encoded in listing:  # no-key names: base64 of the ciphertext
        assert FILE_NAME.encode() not in base64.urlsafe_b64decode(encoded + "==")
    with pytest.raises(FileNotFoundError):
        (directory / FILE_NAME).read_bytes()
    encoded_file = next(name for name in listing if (directory / name).is_file())
    with pytest.raises(OSError) as raised:
        (directory / encoded_file).read_bytes()
    assert raised.value.errno == errno.ENOKEY

    encfs.unmount()
    assert encfs.count_in_image(CONTENT[:48]) == 0
    assert encfs.count_in_image(b"CANARY-CONTENT") == 0
    assert encfs.count_in_image(FILE_NAME.encode()) == 0

    # After a "reboot" the directory is locked until the same key is added again.
    encfs.mount()
    assert not fscrypt.is_unlocked(directory)
    assert FILE_NAME not in os.listdir(directory)
    assert fscrypt.unlock(directory, key) == identifier
    assert sorted(os.listdir(directory)) == sorted([FILE_NAME, "sub"])
    assert (directory / FILE_NAME).read_bytes() == CONTENT
    assert (directory / "sub" / FILE_NAME).read_bytes() == CONTENT


def test_positive_control_the_same_canary_is_found_without_encryption(plainfs: LoopFs) -> None:
    directory = new_directory(plainfs)
    (directory / FILE_NAME).write_bytes(CONTENT)
    plainfs.unmount()
    assert plainfs.count_in_image(CONTENT[:48]) >= 1
    assert plainfs.count_in_image(FILE_NAME.encode()) >= 1


def test_positive_control_an_unlocked_directory_writes_ciphertext_only(encfs: LoopFs) -> None:
    """Even while the key is added, the disk only ever gets ciphertext: unmounting with the
    directory unlocked (no key removal) still leaves no plaintext in the image."""
    directory = new_directory(encfs)
    fscrypt.provision(directory, new_key())
    (directory / FILE_NAME).write_bytes(CONTENT)
    encfs.unmount()
    assert encfs.count_in_image(b"CANARY-CONTENT") == 0
    assert encfs.count_in_image(FILE_NAME.encode()) == 0


# --- keys -------------------------------------------------------------------------------------


def test_a_different_key_cannot_unlock_and_is_not_left_in_the_kernel(encfs: LoopFs) -> None:
    directory = new_directory(encfs)
    key = new_key()
    fscrypt.provision(directory, key)
    (directory / FILE_NAME).write_bytes(CONTENT)
    fscrypt.lock(directory)
    wrong = new_key()
    wrong_identifier = identifier_of(encfs, wrong)

    with pytest.raises(fscrypt_types.EncryptedWithOtherKey) as raised:
        fscrypt.unlock(directory, wrong)
    assert str(directory) in str(raised.value)
    assert fscrypt.key_status(directory, wrong_identifier).state is KeyState.ABSENT
    assert not fscrypt.is_unlocked(directory)
    assert FILE_NAME not in os.listdir(directory)


def test_a_swapped_key_of_another_directory_does_not_lock_that_directory(encfs: LoopFs) -> None:
    first, second = new_directory(encfs, "first"), new_directory(encfs, "second")
    first_key, second_key = new_key(), new_key()
    fscrypt.provision(first, first_key)
    second_identifier = fscrypt.provision(second, second_key)
    (second / FILE_NAME).write_bytes(CONTENT)
    fscrypt.lock(first)

    with pytest.raises(fscrypt_types.EncryptedWithOtherKey):
        fscrypt.unlock(first, second_key, other_identifiers={second_identifier})
    assert fscrypt.is_unlocked(second)
    assert (second / FILE_NAME).read_bytes() == CONTENT

    # Without naming it, the stray claim is taken back, which locks `second`: the reason
    # the parameter exists.
    with pytest.raises(fscrypt_types.EncryptedWithOtherKey):
        fscrypt.unlock(first, second_key)
    assert not fscrypt.is_unlocked(second)


def test_busy_files_are_reported_on_removal_and_locked_on_retry(encfs: LoopFs) -> None:
    directory = new_directory(encfs)
    identifier = fscrypt.provision(directory, new_key())
    (directory / FILE_NAME).write_bytes(CONTENT)

    with (directory / FILE_NAME).open("rb") as handle:
        removal = fscrypt.lock(directory)
        assert removal == Removal(was_present=True, files_busy=True, other_users=False)
        assert not removal.locked
        status = fscrypt.key_status(directory, identifier)
        assert status.state is KeyState.INCOMPLETELY_REMOVED
        assert not fscrypt.is_unlocked(directory)
        assert handle.read() == CONTENT  # an open file stays readable until closed

    retried = fscrypt.lock(directory)
    assert retried == Removal(was_present=True, files_busy=False, other_users=False)
    assert fscrypt.key_status(directory, identifier).state is KeyState.ABSENT
    assert FILE_NAME not in os.listdir(directory)
    again = fscrypt.lock(directory)  # idempotent
    assert again == Removal(was_present=False, files_busy=False, other_users=False)


def test_key_status_and_claims_of_other_users(encfs: LoopFs) -> None:
    directory = new_directory(encfs)
    key = new_key()
    identifier = fscrypt.provision(directory, key)
    status = fscrypt.key_status(directory, identifier)
    assert status == fscrypt_types.KeyStatus(KeyState.PRESENT, added_by_self=True, user_count=1)
    assert fscrypt.add_key(encfs.mountpoint, key) == identifier  # a second add: same claim
    assert fscrypt.key_status(directory, identifier).user_count == 1

    # Another uid proves knowledge of the key and gets its own claim (v2 keys need no
    # privilege to add).
    encfs.mountpoint.parent.chmod(0o755)
    assert add_key_as(65534, encfs.mountpoint, key) == identifier
    status = fscrypt.key_status(directory, identifier)
    assert status == fscrypt_types.KeyStatus(KeyState.PRESENT, added_by_self=True, user_count=2)

    only_ours = fscrypt.remove_key(directory, identifier, all_users=False)
    assert only_ours == Removal(was_present=True, files_busy=False, other_users=True)
    status = fscrypt.key_status(directory, identifier)
    assert status == fscrypt_types.KeyStatus(KeyState.PRESENT, added_by_self=False, user_count=1)
    assert fscrypt.is_unlocked(directory)

    everyone = fscrypt.lock(directory)  # all users: what decommission does
    assert everyone == Removal(was_present=True, files_busy=False, other_users=False)
    status = fscrypt.key_status(directory, identifier)
    assert status == fscrypt_types.KeyStatus(KeyState.ABSENT, added_by_self=False, user_count=0)


def add_key_as(uid: int, path: Path, key: bytearray) -> str:
    """FS_IOC_ADD_ENCRYPTION_KEY from a forked child running as `uid`."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgid(uid)
            os.setuid(uid)
            os.write(write_end, fscrypt.add_key(path, key).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return answer


# --- refusals before anything is spent -----------------------------------------------------


def test_support_on_an_encrypt_filesystem_for_a_path_not_created_yet(encfs: LoopFs) -> None:
    found = fscrypt.check_support(encfs.mountpoint / "not" / "yet")
    assert found == fscrypt_types.Filesystem("ext4", encfs.mountpoint)


def test_ext4_without_the_encrypt_feature_is_refused(plainfs: LoopFs) -> None:
    directory = new_directory(plainfs)
    with pytest.raises(fscrypt_types.FscryptUnsupported) as raised:
        fscrypt.check_support(directory)
    assert "encrypt feature" in str(raised.value) and str(directory) in str(raised.value)
    key = new_key()
    with pytest.raises(fscrypt_types.FscryptUnsupported):
        fscrypt.provision(directory, key)
    assert fscrypt.directory_is_empty(directory)
    # The kernel agrees: adding a key there is refused with EOPNOTSUPP.
    with pytest.raises(fscrypt_types.FscryptOSError) as kernel:
        fscrypt.add_key(directory, key)
    assert kernel.value.errno == errno.EOPNOTSUPP


def test_tmpfs_is_refused(tmpfs: Path) -> None:
    with pytest.raises(fscrypt_types.FscryptUnsupported) as raised:
        fscrypt.check_support(tmpfs / "data")
    assert "tmpfs" in str(raised.value) and str(tmpfs / "data") in str(raised.value)
    # The kernel agrees: tmpfs does not implement the ioctls at all.
    (tmpfs / "data").mkdir()
    with pytest.raises(fscrypt_types.FscryptUnsupported) as kernel:
        fscrypt.add_key(tmpfs / "data", new_key())
    assert "ENOTTY" in str(kernel.value)


def test_other_filesystems_are_refused() -> None:
    with pytest.raises(fscrypt_types.FscryptUnsupported, match="without fscrypt support"):
        fscrypt.check_support(Path("/proc/self/bootsecrets-data"))


def test_a_kernel_without_fscrypt_is_refused(encfs: LoopFs, tmp_path: Path) -> None:
    # The host kernel has fscrypt; a sysfs without ext4's `encryption` feature file stands
    # for one built without CONFIG_FS_ENCRYPTION.
    sysfs = tmp_path / "sys"
    (sysfs / "fs/ext4/features").mkdir(parents=True)
    (sysfs / "fs/ext4/features/metadata_csum_seed").touch()
    assert fscrypt.kernel_supports("ext4")
    assert not fscrypt.kernel_supports("ext4", sysfs)
    with pytest.raises(fscrypt_types.FscryptUnsupported) as raised:
        fscrypt.check_support(encfs.mountpoint / "data", sysfs=sysfs)
    assert "CONFIG_FS_ENCRYPTION" in str(raised.value)


def test_a_non_empty_directory_is_never_encrypted(encfs: LoopFs) -> None:
    directory = new_directory(encfs)
    (directory / "existing").write_bytes(b"data written before")
    key = new_key()
    identifier = identifier_of(encfs, key)
    assert not fscrypt.directory_is_empty(directory)
    with pytest.raises(fscrypt_types.DirectoryNotEmpty) as raised:
        fscrypt.provision(directory, key)
    assert str(directory) in str(raised.value)
    assert fscrypt.get_policy(directory) is None
    assert fscrypt.key_status(directory, identifier).state is KeyState.ABSENT
    # The kernel refuses too, on its own.
    fscrypt.add_key(directory, key)
    with pytest.raises(fscrypt_types.DirectoryNotEmpty):
        fscrypt.set_policy(directory, identifier)


def test_an_encrypted_directory_is_not_provisioned_again(encfs: LoopFs) -> None:
    directory = new_directory(encfs)
    identifier = fscrypt.provision(directory, new_key())
    other = new_key()
    other_identifier = identifier_of(encfs, other)
    with pytest.raises(fscrypt_types.EncryptedWithOtherKey):
        fscrypt.provision(directory, other)
    assert fscrypt.key_status(directory, other_identifier).state is KeyState.ABSENT
    # The kernel's own check: another policy on an encrypted directory is EEXIST.
    fscrypt.add_key(directory, other)
    with pytest.raises(fscrypt_types.EncryptedWithOtherKey):
        fscrypt.set_policy(directory, other_identifier)
    fscrypt.set_policy(directory, identifier)  # the same policy again: verified, no error


def test_missing_paths_files_and_plain_directories(encfs: LoopFs) -> None:
    (encfs.mountpoint / "lost+found").rmdir()
    identifier = fscrypt.add_key(encfs.mountpoint, new_key())
    with pytest.raises(fscrypt_types.FscryptOSError) as raised:  # ext4 never encrypts its root
        fscrypt.set_policy(encfs.mountpoint, identifier)
    assert raised.value.errno == errno.EPERM and "root directory" in str(raised.value)
    with pytest.raises(fscrypt_types.NotADirectory):
        fscrypt.provision(encfs.mountpoint / "absent", new_key())
    a_file = encfs.mountpoint / "file"
    a_file.write_bytes(b"x")
    with pytest.raises(fscrypt_types.NotADirectory):
        fscrypt.directory_is_empty(a_file)
    with pytest.raises(fscrypt_types.NotADirectory):
        fscrypt.get_policy(a_file)
    plain = new_directory(encfs, "plain")
    assert fscrypt.get_policy(plain) is None
    with pytest.raises(fscrypt_types.NotEncrypted):
        fscrypt.unlock(plain, new_key())
    with pytest.raises(fscrypt_types.NotEncrypted):
        fscrypt.lock(plain)


# --- key hygiene --------------------------------------------------------------------------


def test_the_ioctl_buffer_is_handed_over_directly_and_zeroed(
    encfs: LoopFs,
    tmpfs: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Any] = []
    real_ioctl = fcntl.ioctl

    def spy(fd: int, request: int, arg: Any, mutate: bool = True) -> Any:
        if request == fscrypt_uapi.FS_IOC_ADD_ENCRYPTION_KEY:
            seen.append(arg)
            assert bytes(arg)[80 : 80 + fscrypt.KEY_SIZE] == bytes(key)
        return real_ioctl(fd, request, arg, mutate)

    monkeypatch.setattr(fcntl, "ioctl", spy)
    key = new_key()
    before = bytes(key)
    fscrypt.add_key(encfs.mountpoint, memoryview(key))
    assert len(seen) == 1
    assert ctypes.sizeof(seen[0]) > 1024  # CPython copies smaller buffers to its C stack
    assert bytes(seen[0]) == bytes(ctypes.sizeof(seen[0]))  # our copy is zeroed
    assert bytes(key) == before  # the caller's buffer is the caller's to zero

    with pytest.raises(fscrypt_types.FscryptUnsupported):  # zeroed when the kernel refuses too
        fscrypt.add_key(tmpfs, key)
    assert len(seen) == 2
    assert bytes(seen[1]) == bytes(ctypes.sizeof(seen[1]))


def test_no_key_material_in_errors_or_logs(
    encfs: LoopFs,
    tmpfs: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="bootsecrets")
    key = new_key()
    texts: list[str] = []
    (tmpfs / "d").mkdir()
    directory = new_directory(encfs)
    fscrypt.provision(directory, key)
    fscrypt.lock(directory)
    attempts: list[Callable[[], object]] = [
        lambda: fscrypt.add_key(tmpfs / "d", key),
        lambda: fscrypt.provision(tmpfs / "d", key),
        lambda: fscrypt.unlock(directory, new_key()),
        lambda: fscrypt.unlock(new_directory(encfs, "plain"), key),
        lambda: fscrypt.add_key(directory, key[:32]),
    ]
    for attempt in attempts:
        with pytest.raises((fscrypt_types.FscryptError, ValueError)) as raised:
            attempt()
        texts += [str(raised.value), repr(raised.value), repr(raised.value.args)]
    texts += [record.getMessage() for record in caplog.records]
    texts += [repr(record.__dict__) for record in caplog.records]
    assert any("encrypted directory" in text for text in texts)  # the logs were captured
    assert_no_key_in(texts, key)


def test_wrong_key_sizes_are_refused_before_the_kernel(encfs: LoopFs) -> None:
    for size in (0, 32, 63, 65):
        with pytest.raises(ValueError, match="64 contiguous bytes"):
            fscrypt.add_key(encfs.mountpoint, bytearray(size))
    with pytest.raises(ValueError, match="32 hex digits"):
        fscrypt.key_status(encfs.mountpoint, "abcd")
