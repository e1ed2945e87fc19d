"""Scrub the wrapped secret-id from cloud-init's copies of the user-data on disk.

cloud-init delivers the bootstrap into the memory-only store, but it also keeps the whole
user-data on the root disk for the droplet's life: `/var/lib/cloud/instances/<id>/`
`user-data.txt` (as received), `user-data.txt.i` (the processed MIME message),
`cloud-config.txt` (the merged cloud-config) and `obj.pkl` (its pickled datasource, which
holds the user-data twice). Once the agent has sent the wrapping token for unwrapping it is
spent, but a spent token on disk still says which role and server a droplet belongs to, and
a token whose unwrap never happened (the boot failed before) is live until its TTL ends.

`scrub(token)` replaces every occurrence of the token in cloud-init's files with a fixed
marker of the same length and of the same alphabet (`scrubbed-by-bootsecrets-...`), so that
everything else in them stays byte for byte what it was, SSH keys and other modules
included, and every format stays valid: a pickle's strings carry their length, which does not
change; YAML and MIME see one token-shaped word for another. The agent never unpickles
anything: the replacement is done on the bytes.

The bytes are overwritten in place (`pwrite` + `fsync` on the same inode), not written to a
new file and renamed: a rename would leave the old blocks, token included, in the disk's free
space. The versions cloud-init wrote earlier and replaced itself are in freed blocks already:
bootsecrets-trim.service (fstrim, after this unit) has the disk discard them where it can, and
the end-to-end test scans the whole disk for the token and finds none.

cloud-init fetches the user-data again at later boots (the metadata service serves it for
the droplet's life, a NoCloud seed stays attached) and writes these files again, spent token
included. So every bootstrap also looks for the `wrapped_secret_id` field in them
(`scrub_earlier`) and scrubs the token of any earlier boot it finds: its copy in the store
went with the reboot, nothing will ever use it.

User-data given gzip-compressed (cloud-init accepts it, Terraform's `cloudinit_config`
compresses by default) holds the token only inside compressed bytes: in `user-data.txt` and in
the pickled raw user-data. Each gzip member in a file is decompressed (at most MAX_BYTES in
all per file), scrubbed and compressed again; the new member is written over the old one in
place and padded with zero bytes to the same length, which gzip readers (cloud-init's
included) skip. A member that would come out longer than the old one is left as it is (the
rest of the file is scrubbed) and the file is reported as failed.

Not covered: base64-encoded user-data (the token is not in it as bytes), the metadata
service itself and Terraform's state (see cloud-init/README.md).
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import logging
import os
import re
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

#: Where cloud-init keeps what it got (relative to the root), walked recursively.
CLOUD_DIRS = (Path("var/lib/cloud"),)
#: cloud-init's logs: it does not log the user-data, but a module's output could.
CLOUD_LOGS = (Path("var/log/cloud-init.log"), Path("var/log/cloud-init-output.log"))
MARKER = b"scrubbed-by-bootsecrets-"
#: Bigger files are not read (cloud-init's own files are a few KiB; its logs can grow).
MAX_BYTES = 64 * 1024 * 1024
#: What a token from Vault/OpenBao looks like. Anything shorter could occur by chance in
#: cloud-init's files and must not be replaced there.
_TOKEN = re.compile(rb"[A-Za-z0-9._+/=-]{16,1024}")
#: The field as it stands in cloud-init's copies: the YAML the template renders (raw,
#: processed, pickled) and the same YAML as a quoted string in the merged cloud-config.
_WRAPPED_FIELD = re.compile(
    rb"wrapped_secret_id\\?[\"']?[ \t]*[:=][ \t]*\\?[\"']?([A-Za-z0-9._+/=-]{16,1024})"
)
#: The start of a gzip member (magic, deflate).
_GZIP_MAGIC = b"\x1f\x8b\x08"
_INFLATE_CHUNK = 16 * 1024


@dataclasses.dataclass(frozen=True)
class Scrubbed:
    """What `scrub` did: the files it changed (image paths) and the copies it replaced."""

    files: tuple[str, ...]
    copies: int
    #: Files it could not read or write (image paths); the token may still be in them.
    failed: tuple[str, ...] = ()


def marker(length: int) -> bytes:
    """The replacement for a token of `length` bytes: `scrubbed-by-bootsecrets-scru...`."""
    return (MARKER * (length // len(MARKER) + 1))[:length]


def scrub(token: str, root: Path = Path("/")) -> Scrubbed:
    """Replace every copy of `token` in cloud-init's files under `root` (in place).

    Never raises for a file it cannot handle (it is listed in `failed`); raises ValueError
    for a token that is not token-shaped (too short or with characters a token never has).
    """
    needle = token.encode("ascii", "replace")
    if not _TOKEN.fullmatch(needle):
        raise ValueError("not a token Vault issues: left in cloud-init's files")
    replacement = marker(len(needle))
    files: list[str] = []
    failed: list[str] = []
    copies = 0
    for path in _candidates(root):
        image_path = "/" + path.relative_to(root).as_posix()
        try:
            found, unfit = _replace_in_place(path, needle, replacement)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ELOOP):
                failed.append(image_path)
            continue
        if found:
            files.append(image_path)
            copies += found
        if unfit:
            failed.append(image_path)
    return Scrubbed(tuple(files), copies, tuple(failed))


def scrub_and_log(token: str, root: Path, *, unwrapped: bool) -> Scrubbed | None:
    """`scrub`, with one log line saying what was done and why; never raises.

    `unwrapped`: the token was sent for unwrapping (it is spent). Otherwise the bootstrap
    failed before the unwrap: the token is still live, the copy in the memory-only store is
    kept for a retry, and only the disk copies go.
    """
    why = (
        "the wrapped secret-id was sent for unwrapping"
        if unwrapped
        else "the bootstrap failed before the unwrap; the wrapped secret-id stays in the "
        "memory-only store for a retry, its copies on disk are removed"
    )
    return _scrub_and_log(token, root, why)


def earlier_tokens(root: Path, current: str | None = None) -> list[str]:
    """The wrapped secret-ids in cloud-init's files other than `current` (and than the
    markers of earlier scrubs), in the order found; never raises."""
    found: dict[str, None] = {}
    try:
        for path in _candidates(root):
            try:
                data, _ = _read(path)
            except OSError:
                continue
            for text in (data, *(m.content for m in _gzip_members(data))):
                for match in _WRAPPED_FIELD.finditer(text):
                    token = match.group(1)
                    if token != marker(len(token)):
                        found.setdefault(token.decode("ascii"), None)
    except OSError:  # the walk itself
        pass
    return [t for t in found if t != current]


def scrub_earlier(root: Path, current: str | None) -> None:
    """Scrub the wrapped secret-ids of earlier boots that cloud-init wrote into its files
    again at this boot (`current` is this boot's, handled by `scrub_and_log`); never raises."""
    for token in earlier_tokens(root, current):
        _scrub_and_log(
            token,
            root,
            "cloud-init wrote the user-data of an earlier boot again, with a wrapped "
            "secret-id the agent will never use (spent, or its copy in the store went with "
            "the reboot)",
        )


def _scrub_and_log(token: str, root: Path, why: str) -> Scrubbed | None:
    try:
        done = scrub(token, root)
    except ValueError as err:
        log.warning("cloud-init's copies of the user-data not scrubbed: %s", err)
        return None
    except OSError as err:  # the walk itself failed
        log.warning("cloud-init's copies of the user-data not scrubbed: %s", err.strerror)
        return None
    if done.failed:
        log.warning(
            "%s; could not scrub %s",
            why,
            ", ".join(done.failed),
            extra={"SCRUB_FAILED": ",".join(done.failed)},
        )
    if done.copies:
        log.info(
            "%s: replaced it in cloud-init's files (%s copies: %s)",
            why,
            done.copies,
            ", ".join(done.files),
            extra={"SCRUBBED_FILES": ",".join(done.files)},
        )
    elif not done.failed:
        log.info("%s: no copy in cloud-init's files", why)
    return done


def _candidates(root: Path) -> Iterator[Path]:
    """Regular files under cloud-init's directories (symlinks never followed), its logs."""
    for rel in CLOUD_DIRS:
        top = root / rel
        for dirpath, _dirs, names in os.walk(top, followlinks=False):
            for name in sorted(names):
                yield Path(dirpath) / name
    for rel in CLOUD_LOGS:
        yield root / rel


def _replace_in_place(path: Path, needle: bytes, replacement: bytes) -> tuple[int, bool]:
    """Overwrite each occurrence of `needle` in the regular file `path`, as bytes and inside
    gzip members: the number replaced, and whether a gzip member holding it had to be left
    as it was (scrubbed, it would not fit in its own length).

    Read-only first: a file without the token is never opened for writing.
    """
    data, identity = _read(path)
    patches = [(offset, replacement) for offset in _offsets(data, needle)]
    copies, unfit = len(patches), False
    for member in _gzip_members(data):
        found = len(_offsets(member.content, needle))
        if not found:
            continue
        scrubbed = gzip.compress(
            member.content.replace(needle, replacement), compresslevel=9, mtime=0
        )
        if len(scrubbed) > member.length:
            unfit = True
            continue
        patches.append((member.offset, scrubbed.ljust(member.length, b"\0")))
        copies += found
    if not patches:
        return 0, unfit
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != identity:
            raise OSError(errno.ESTALE, "replaced while being scrubbed")
        for offset, patch in patches:
            os.pwrite(fd, patch, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return copies, unfit


def _offsets(data: bytes, needle: bytes) -> list[int]:
    """Where `needle` starts in `data`, occurrences not overlapping."""
    offsets = []
    start = data.find(needle)
    while start >= 0:
        offsets.append(start)
        start = data.find(needle, start + len(needle))
    return offsets


@dataclasses.dataclass(frozen=True)
class _GzipMember:
    offset: int  # of its first byte in the file
    length: int  # compressed, header and trailer included
    content: bytes


def _gzip_members(data: bytes) -> Iterator[_GzipMember]:
    """The complete gzip members in `data` (a whole file or embedded, as in a pickle), as
    long as what they inflate to stays within MAX_BYTES for the whole file (cloud-init's
    own files hold a few KiB; a file of gzip bombs must not hold up the boot). What is not
    a member (a chance magic, a cut one) is passed over."""
    view = memoryview(data)
    budget = MAX_BYTES
    start = data.find(_GZIP_MAGIC)
    while start >= 0 and budget > 0:
        member, inflated = _inflate(view, start, budget)
        budget -= inflated
        if member is not None:
            yield member
            start = data.find(_GZIP_MAGIC, start + member.length)
        else:
            start = data.find(_GZIP_MAGIC, start + 1)


def _inflate(view: memoryview, start: int, limit: int) -> tuple[_GzipMember | None, int]:
    """The gzip member starting at `start` if it inflates to at most `limit` bytes (else
    None), and how many bytes were inflated to find out. Fed in small chunks, so that
    neither zlib's unconsumed input nor its unused data is ever a copy of the rest of a big
    file."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    pieces: list[bytes] = []
    size = 0
    position = start
    try:
        while not inflater.eof and position < len(view):
            chunk = view[position : position + _INFLATE_CHUNK]
            position += len(chunk)
            piece = inflater.decompress(chunk, limit + 1 - size)
            size += len(piece)
            if inflater.unconsumed_tail or size > limit:
                return None, size
            pieces.append(piece)
    except zlib.error:
        return None, size
    if not inflater.eof:
        return None, size
    end = position - len(inflater.unused_data)
    return _GzipMember(start, end - start, b"".join(pieces)), size


def _read(path: Path) -> tuple[bytes, tuple[int, int]]:
    """A regular file's bytes (nothing for a bigger one than MAX_BYTES) and its identity."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
            return b"", (st.st_dev, st.st_ino)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks), (st.st_dev, st.st_ino)
    finally:
        os.close(fd)
