"""The safe file primitives (bootsecrets.fsio) on real filesystems: a tmpfs sandbox under
/dev/shm and a disk directory under /var/tmp as the place a symlink would lead to.

Every writing case checks that nothing appeared or changed at the symlink's target; every
reading case that it returns at once with a reason naming what the file is."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bootsecrets import errors, fsio
from bootsecrets.errors import StoreError
from bootsecrets.fsread import FileMissing, FileRefused, shown


@pytest.fixture
def shm() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="bootsecrets-fsio-", dir="/dev/shm"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def disk() -> Iterator[Path]:
    """A directory on the root disk (ext4 here): where a followed symlink would put bytes."""
    path = Path(tempfile.mkdtemp(prefix="bootsecrets-disk-", dir="/var/tmp"))
    assert fstype(path) not in (fsio.TMPFS_MAGIC, fsio.RAMFS_MAGIC), (
        "/var/tmp must be disk-backed for these tests"
    )
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fstype(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return fsio.fstatfs_type(fd, path)
    finally:
        os.close(fd)


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (what a followed symlink would have changed)."""
    return {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def timed(fn: Callable[[], object]) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        fn()
    except BaseException as err:
        return err, time.monotonic() - started
    return None, time.monotonic() - started


# --- reading ------------------------------------------------------------------------------


def test_reads_a_regular_file(shm: Path) -> None:
    (shm / "f").write_bytes(b"abc")
    assert fsio.read_regular_file(shm / "f", 3) == b"abc"


def test_fifo_is_refused_without_blocking(shm: Path) -> None:
    os.mkfifo(shm / "fifo")
    result: list[BaseException | None] = []
    reader = threading.Thread(
        target=lambda: result.append(timed(lambda: fsio.read_regular_file(shm / "fifo", 100))[0]),
        daemon=True,
    )
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the thread, then fail
        with open(shm / "fifo", "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert isinstance(result[0], FileRefused)
    assert result[0].reason == "is a FIFO, not a regular file"


def test_device_through_a_symlink_is_refused(shm: Path) -> None:
    (shm / "zero").symlink_to("/dev/zero")
    with pytest.raises(FileRefused) as caught:
        fsio.read_regular_file(shm / "zero", 1024)
    assert caught.value.reason == "is a character device, not a regular file"
    with pytest.raises(FileRefused) as caught:
        fsio.read_regular_file(shm / "zero", 1024, follow_symlinks=False)
    assert caught.value.reason == ("is a symlink to a character device; refusing to follow it")


def test_symlink_to_a_regular_file_is_followed_only_when_allowed(shm: Path, disk: Path) -> None:
    (disk / "config.yaml").write_bytes(b"x: 1\n")
    (shm / "config.yaml").symlink_to(disk / "config.yaml")
    assert fsio.read_regular_file(shm / "config.yaml", 100) == b"x: 1\n"
    with pytest.raises(FileRefused, match="is a symlink to a regular file; refusing"):
        fsio.read_regular_file(shm / "config.yaml", 100, follow_symlinks=False)
    (shm / "dangling").symlink_to(shm / "nothing")
    with pytest.raises(FileRefused, match=r"is a symlink \(dangling\)"):
        fsio.read_regular_file(shm / "dangling", 100, follow_symlinks=False)


def test_directory_missing_socket_and_loop(shm: Path) -> None:
    (shm / "dir").mkdir()
    with pytest.raises(FileRefused) as caught:
        fsio.read_regular_file(shm / "dir", 100)
    assert caught.value.reason == "is a directory, not a regular file"
    with pytest.raises(FileMissing) as missing:
        fsio.read_regular_file(shm / "none", 100)
    assert missing.value.reason == "does not exist"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(shm / "sock"))
        with pytest.raises(FileRefused) as caught:
            fsio.read_regular_file(shm / "sock", 100)
    assert caught.value.reason == "is a socket, not a regular file"
    (shm / "loop").symlink_to(shm / "loop")
    with pytest.raises(FileRefused, match="cannot read: Too many levels of symbolic links"):
        fsio.read_regular_file(shm / "loop", 100)


def test_size_is_checked_before_reading_and_the_read_is_bounded(shm: Path) -> None:
    (shm / "big").write_bytes(b"x" * 2048)
    with pytest.raises(FileRefused) as caught:
        fsio.read_regular_file(shm / "big", 1024)
    assert caught.value.reason == "is larger than 1 KiB"
    assert fsio.read_regular_file(shm / "big", 2048) == b"x" * 2048
    # A regular file whose size says 0 but that yields more (as a file growing between the
    # fstat and the read would): the read stops at limit + 1 bytes and refuses.
    proc = Path("/proc/self/status")
    assert proc.stat().st_size == 0
    with pytest.raises(FileRefused) as caught:
        fsio.read_regular_file(proc, 10)
    assert caught.value.reason == "is larger than 10 bytes"


def test_anchored_read_refuses_a_symlinked_directory(shm: Path, disk: Path) -> None:
    (disk / "state.json").write_text("{}")
    (shm / "run").symlink_to(disk)
    with pytest.raises(FileRefused) as caught:
        fsio.read_regular_file(shm / "run/state.json", 100, anchor=shm)
    assert caught.value.path == shm / "run"
    assert caught.value.reason == "is a symlink; refusing to follow it"
    with pytest.raises(FileMissing):
        fsio.read_regular_file(shm / "nothing/state.json", 100, anchor=shm)


def test_unreadable_file_names_the_errno(shm: Path) -> None:
    (shm / "secret").write_text("x")
    (shm / "secret").chmod(0)
    pid = os.fork()
    if pid == 0:  # as nobody, the kernel refuses the open
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                fsio.read_regular_file(shm / "secret", 10)
            except FileRefused as err:
                code = 0 if err.reason == "cannot read: Permission denied" else 2
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0


# --- writing --------------------------------------------------------------------------------


def test_write_private_creates_with_mode_and_replaces_atomically(shm: Path) -> None:
    target = shm / "var/lib/bootsecrets/token"
    fsio.write_private(shm, target, b"one", 0o600, create_dirs=0o700)
    assert target.read_bytes() == b"one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((shm / "var/lib").stat().st_mode) == 0o755
    inode = target.stat().st_ino
    fsio.write_private(shm, target, b"two", 0o640)
    assert target.read_bytes() == b"two" and target.stat().st_ino != inode
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(os.listdir(target.parent)) == ["token"]  # no temporary left


@pytest.mark.parametrize("link", ["var", "var/lib", "var/lib/bootsecrets"])
def test_write_private_refuses_a_symlinked_directory(shm: Path, disk: Path, link: str) -> None:
    (shm / link).parent.mkdir(parents=True, exist_ok=True)
    (shm / link).symlink_to(disk)
    (disk / "lib/bootsecrets").mkdir(parents=True)
    before = snapshot(disk)
    with pytest.raises(StoreError) as caught:
        fsio.write_private(
            shm, shm / "var/lib/bootsecrets/token", b"canary", 0o600, create_dirs=0o700
        )
    assert caught.value.exit_code == errors.StoreError.exit_code == 12
    assert str(caught.value) == f"{shm / link} is a symlink; refusing to follow it"
    assert snapshot(disk) == before
    assert sorted(os.listdir(disk)) == ["lib"] and os.listdir(disk / "lib/bootsecrets") == []


def test_write_private_refuses_a_symlinked_file(shm: Path, disk: Path) -> None:
    (disk / "token").write_bytes(b"old")
    (shm / "token").symlink_to(disk / "token")
    with pytest.raises(StoreError, match="token is a symlink; refusing to follow it"):
        fsio.write_private(shm, shm / "token", b"canary")
    assert (disk / "token").read_bytes() == b"old" and (shm / "token").is_symlink()
    assert sorted(os.listdir(shm)) == ["token"]


def test_write_private_memory_only_checks_where_the_bytes_go(shm: Path, disk: Path) -> None:
    fsio.write_private(shm, shm / "token", b"x", memory_only=True)
    with pytest.raises(errors.StoreError, match="is on a disk-backed filesystem"):
        fsio.write_private(disk, disk / "token", b"canary", memory_only=True)
    assert os.listdir(disk) == []


def test_existing_directory_is_not_replaced(shm: Path) -> None:
    (shm / "file").mkdir()
    with pytest.raises(StoreError, match="file is a directory, not a regular file"):
        fsio.write_private(shm, shm / "file", b"x")
    assert os.listdir(shm) == ["file"] and os.listdir(shm / "file") == []


@pytest.fixture
def tiny_tmpfs(shm: Path) -> Iterator[Path]:
    """A 16 KiB tmpfs: writing more fails with ENOSPC half-way, a real mid-write fault."""
    mount_point = shm / "tiny"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount_point)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True, stdin=subprocess.DEVNULL)


def test_failed_write_leaves_no_temporary_and_the_old_file(tiny_tmpfs: Path, shm: Path) -> None:
    fsio.write_private(shm, tiny_tmpfs / "state.json", b"old")
    with pytest.raises(OSError) as caught:
        fsio.write_private(shm, tiny_tmpfs / "state.json", b"x" * (1 << 20))
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(tiny_tmpfs) == ["state.json"]
    assert (tiny_tmpfs / "state.json").read_bytes() == b"old"


def test_create_file_sets_owner_and_mode_before_the_first_byte(shm: Path) -> None:
    with fsio.open_dir(shm, shm) as directory:
        directory.create_file("f", b"data", mode=0o400, uid=65534, gid=65534)
        with pytest.raises(StoreError, match="already exists"):
            directory.create_file("f", b"again", mode=0o400)
    st = (shm / "f").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o400)


def test_unlink_nofollow_removes_the_symlink_not_its_target(shm: Path, disk: Path) -> None:
    (disk / "bootstrap.yaml").write_text("keep")
    (shm / "bootstrap.yaml").symlink_to(disk / "bootstrap.yaml")
    fsio.unlink_nofollow(shm, shm / "bootstrap.yaml")
    assert not os.path.lexists(shm / "bootstrap.yaml")
    assert (disk / "bootstrap.yaml").read_text() == "keep"
    fsio.unlink_nofollow(shm, shm / "bootstrap.yaml")  # missing is fine
    fsio.unlink_nofollow(shm, shm / "no/such/dir/file")
    (shm / "store").symlink_to(disk)
    with pytest.raises(StoreError, match="store is a symlink"):
        fsio.unlink_nofollow(shm, shm / "store/bootstrap.yaml")
    assert (disk / "bootstrap.yaml").read_text() == "keep"


def test_open_dir_refuses_dotdot_files_and_symlinks(shm: Path, disk: Path) -> None:
    with pytest.raises(errors.StoreError, match=r"`\.\.` is not allowed"):
        fsio.open_dir(shm, shm / "a/../b")
    (shm / "file").write_text("")
    with pytest.raises(StoreError, match="file is a regular file, not a directory"):
        fsio.open_dir(shm, shm / "file/x", create=0o700)
    (shm / "link").symlink_to(disk)
    with pytest.raises(StoreError, match="link is a symlink"):
        fsio.open_dir(shm, shm / "link/x", create=0o700)
    assert os.listdir(disk) == []
    with fsio.open_dir(shm, shm / "a/b", create=0o711) as created:
        assert created.path == shm / "a/b"
    assert stat.S_IMODE((shm / "a/b").stat().st_mode) == 0o711  # exactly, umask or not


def test_check_tree(shm: Path, disk: Path) -> None:
    fsio.check_tree(shm, shm / "missing/dir", files=["token"])  # nothing there: fine
    (shm / "d").mkdir()
    (shm / "d/token").write_text("")
    (shm / "d/sub").mkdir()
    fsio.check_tree(shm, shm / "d", files=["token", "absent"], dirs=["sub"])
    (shm / "d/identity.json").symlink_to(disk / "x")
    with pytest.raises(StoreError, match=r"identity\.json is a symlink; refusing to follow it"):
        fsio.check_tree(shm, shm / "d", files=["identity.json"])
    (shm / "d/unit.d").symlink_to(disk)
    with pytest.raises(StoreError, match=r"unit\.d is a symlink; refusing to follow it"):
        fsio.check_tree(shm, shm / "d", dirs=["unit.d"])


def test_link_from_refuses_a_symlink(shm: Path, disk: Path) -> None:
    (disk / "env").write_text("old")
    (shm / "a").mkdir()
    (shm / "b").mkdir()
    (shm / "a/ok").write_text("ok")
    (shm / "a/bad").symlink_to(disk / "env")
    with fsio.open_dir(shm, shm / "a") as source, fsio.open_dir(shm, shm / "b") as target:
        target.link_from(source, "ok")
        with pytest.raises(StoreError, match="bad is a symlink; refusing to follow it"):
            target.link_from(source, "bad")
    assert os.listdir(shm / "b") == ["ok"]
    assert (shm / "b/ok").stat().st_ino == (shm / "a/ok").stat().st_ino


def test_remove_tree_never_follows(shm: Path, disk: Path) -> None:
    (disk / "keep").write_text("keep")
    (shm / "t/sub").mkdir(parents=True)
    (shm / "t/sub/f").write_text("")
    (shm / "t/sub/link").symlink_to(disk)
    (shm / "t/link").symlink_to(disk / "keep")
    with fsio.open_dir(shm, shm) as directory:
        directory.remove_tree("t")
    assert not (shm / "t").exists()
    assert snapshot(disk) == {"keep": b"keep"}


def test_lock_file_must_be_a_regular_file(shm: Path, disk: Path) -> None:
    (shm / "lock").symlink_to(disk / "lock")
    os.mkfifo(shm / "fifo")
    with fsio.open_dir(shm, shm) as directory:
        with pytest.raises(StoreError, match="lock is a symlink; refusing to follow it"):
            directory.open_lock("lock")
        with pytest.raises(StoreError, match="fifo is a FIFO, not a regular file"):
            directory.open_lock("fifo")
        os.close(directory.open_lock("new"))
    assert os.listdir(disk) == []


def test_shown_escapes_control_characters() -> None:
    assert shown("/run/a\nb\x1b[31m\x85\udcff") == "/run/a\\x0ab\\x1b[31m\\x85\\xff"
    assert shown("/run/ok ☃ \\x") == "/run/ok ☃ \\x"


def test_exclusive_directory_refuses_anything_already_there(shm: Path, disk: Path) -> None:
    """The temporary generation (and its env/, credentials/<unit>/) is made fresh: a symlink
    raced into its name is refused, not used."""
    (shm / ".tmp-1-abcd").symlink_to(disk)
    with fsio.open_dir(shm, shm) as directory:
        with pytest.raises(StoreError, match=r"\.tmp-1-abcd already exists"):
            directory.child(".tmp-1-abcd", create=0o700, exclusive=True)
        with pytest.raises(StoreError, match=r"\.tmp-1-abcd is a symlink; refusing"):
            directory.child(".tmp-1-abcd", create=0o700)
    assert os.listdir(disk) == []
