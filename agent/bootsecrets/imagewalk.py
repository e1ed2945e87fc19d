"""The image-check engine: walk an image tree once and apply a table of rules to it.

`walk(root, rules)` visits every directory, symlink and regular file below `root` (never
following a symlink, skipping `/proc`, `/sys`, `/dev` and, on a live system, any memory-only
or virtual filesystem mounted below the root: not part of a snapshot), applies each rule's
predicate and returns the `Finding`s. It opens only regular files (with `O_NOFOLLOW`, never
a FIFO or device), reads each inode once (hard links share the result) and at most
`MAX_CONTENT_BYTES` of it, and fingerprints what matched without keeping it. The rules
themselves, and what they mean, are in `imagecheck`.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from bootsecrets.errors import ImageCheckUnreadable

#: Files larger than this are not content-scanned (path rules still apply).
MAX_CONTENT_BYTES = 4 * 1024 * 1024
_HEAD = 8192
_SKIP_TOP = frozenset({"proc", "sys", "dev"})
_VIRTUAL_FS = frozenset(
    {
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "tmpfs",
        "ramfs",
        "cgroup",
        "cgroup2",
        "securityfs",
        "debugfs",
        "tracefs",
        "mqueue",
        "hugetlbfs",
        "pstore",
        "bpf",
        "configfs",
        "fusectl",
        "autofs",
        "binfmt_misc",
        "efivarfs",
        "rpc_pipefs",
        "nsfs",
    }
)
# First bytes of files whose content a text regex cannot meaningfully search.
_BINARY_MAGIC = (
    b"\x7fELF",
    b"\x1f\x8b",
    b"\xfd7zXZ\x00",
    b"\x28\xb5\x2f\xfd",
    b"BZh91AY&SY",
    b"\x5d\x00\x00\x80\x00",
    b"PK\x03\x04",
    b"!<arch>\n",
    b"\x89PNG\r\n\x1a\n",
    b"GIF8",
    b"\xff\xd8\xff",
    b"\xde\x12\x04\x95",
    b"\x95\x04\x12\xde",
    b"hsqs",
)
_PYCACHE = re.compile(r"(.*)/__pycache__/([^/.]+)\.[a-z]+-\d+(?:\.opt-\d)?\.pyc\Z")
_MERGED_USR = frozenset({"bin", "sbin", "lib", "lib32", "lib64", "libx32"})


class Kind(enum.Enum):
    FILE = "file"
    DIR = "directory"
    LINK = "symlink"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One thing in the tree: image path (`/etc/...`), its last component, kind, size."""

    path: str
    name: str
    kind: Kind
    size: int = 0

    @property
    def parent(self) -> str:
        return self.path[: -len(self.name) - 1]

    def under(self, *dirs: str) -> bool:
        return any(self.path.startswith(d.rstrip("/") + "/") for d in dirs)

    def child_of(self, *dirs: str) -> bool:
        """Directly inside one of `dirs`."""
        return self.parent in dirs


#: A content rule's search: (offset of the match or None for the whole file, matched bytes).
Search = Callable[[bytes], Iterable[tuple[int | None, bytes]]]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the rule table: a path rule sets `entry` (the entry itself is the finding),
    a content rule `reads` and `search` (which files, what in their bytes), a tree rule
    `tree`; a rule with none of them is reported by the walk itself (`unreadable`)."""

    id: str
    #: What the rule finds, and what to do about it (shown with every finding).
    fix: str
    #: The DigitalOcean Marketplace check (img_check.sh 1.8.1 / 90-cleanup.sh) it covers.
    marketplace: str = ""
    entry: Callable[[Entry], bool] | None = None
    reads: Callable[[Entry], bool] | None = None
    search: Search | None = None
    #: Matches in a file exactly as a Debian package shipped it are public, not findings.
    public_if_packaged: bool = False
    #: A tree rule: the image path of what the tree lacks, or None.
    tree: Callable[[Path], str | None] | None = None


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing found. `path` is the path inside the image, starting with `/`."""

    path: str
    rule: str
    fingerprint: str
    line: int | None = None

    def sort_key(self) -> tuple[str, int, str, str]:
        return (self.path, self.line or 0, self.rule, self.fingerprint)


def fingerprint(data: bytes) -> str:
    """`sha256:` and 16 hex digits: identifies, never reveals."""
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def walk(root: Path, rules: Sequence[Rule]) -> list[Finding]:
    """Every finding of `rules` in the image tree at `root`, sorted by path, line and rule.

    Raises `ImageCheckUnreadable` when `root` is missing, not a directory or unreadable.
    """
    root = _check_root(root)
    scanner = _Scanner(root, _virtual_mounts(root), rules)
    scanner.walk()
    for rule in rules:
        missing = rule.tree(root) if rule.tree is not None else None
        if missing is not None:
            scanner.add(missing, rule.id, "")
    return sorted(set(scanner.findings), key=Finding.sort_key)


def _check_root(root: Path) -> Path:
    try:
        resolved = root.resolve(strict=True)
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        raise ImageCheckUnreadable(f"{root}: no such directory") from None
    except PermissionError:
        raise ImageCheckUnreadable(f"{root}: permission denied") from None
    except OSError as err:
        raise ImageCheckUnreadable(f"{root}: cannot be read ({err.strerror})") from None
    if not stat.S_ISDIR(mode):
        raise ImageCheckUnreadable(f"{root}: not a directory")
    try:
        with os.scandir(resolved) as it:
            next(it, None)
    except OSError as err:
        raise ImageCheckUnreadable(f"{root}: cannot list it ({err.strerror})") from None
    return resolved


def _virtual_mounts(root: Path) -> frozenset[str]:
    """Mount points strictly below `root` whose filesystem is memory-only or virtual."""
    try:
        text = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    prefix = str(root).rstrip("/") + "/"
    found = set()
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if right.split()[0] in _VIRTUAL_FS and point.startswith(prefix):
            found.add(point)
    return frozenset(found)


class _Scanner:
    def __init__(self, root: Path, skip_mounts: frozenset[str], rules: Sequence[Rule]) -> None:
        self.root = str(root).rstrip("/")
        self.skip_mounts = skip_mounts
        self.path_rules = tuple(r for r in rules if r.entry is not None)
        self.content_rules = tuple(r for r in rules if r.reads is not None)
        self.findings: list[Finding] = []
        self._by_inode: dict[tuple[int, int], list[Finding]] = {}
        self._packaged: dict[str, str] | None = None

    def add(self, path: str, rule: str, fp: str, line: int | None = None) -> None:
        self.findings.append(Finding(path, rule, fp, line))

    def walk(self) -> None:
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            try:
                with os.scandir(self.root + rel_dir + "/") as it:
                    entries = list(it)
            except FileNotFoundError:
                continue
            except OSError:
                self.add(rel_dir or "/", "unreadable", "")
                continue
            for dirent in entries:
                rel = f"{rel_dir}/{dirent.name}"
                try:
                    st = dirent.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError:
                    self.add(rel, "unreadable", "")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if (rel_dir == "" and dirent.name in _SKIP_TOP) or (
                        self.root + rel in self.skip_mounts
                    ):
                        continue
                    self._path_rules(Entry(rel, dirent.name, Kind.DIR), dirent.path)
                    stack.append(rel)
                elif stat.S_ISLNK(st.st_mode):
                    self._path_rules(Entry(rel, dirent.name, Kind.LINK), dirent.path)
                elif stat.S_ISREG(st.st_mode):
                    self._file(Entry(rel, dirent.name, Kind.FILE, st.st_size), dirent.path, st)

    def _path_rules(self, entry: Entry, path: str) -> None:
        """A directory or symlink: fingerprinted by its listing or its target."""
        rules = [r.id for r in self.path_rules if r.entry is not None and r.entry(entry)]
        if not rules:
            return
        try:
            if entry.kind is Kind.DIR:
                identity = "\n".join(sorted(os.listdir(path)))
            else:
                identity = os.readlink(path)
        except OSError:
            identity = ""
        fp = fingerprint(identity.encode("utf-8", "surrogateescape"))
        for rule in rules:
            self.add(entry.path, rule, fp)

    def _file(self, entry: Entry, path: str, st: os.stat_result) -> None:
        state = [r.id for r in self.path_rules if r.entry is not None and r.entry(entry)]
        readers = (
            []
            if not 0 < entry.size <= MAX_CONTENT_BYTES
            else [r for r in self.content_rules if r.reads is not None and r.reads(entry)]
        )
        if not (state or readers):
            return
        shared = st.st_nlink > 1 and not state
        if shared:
            cached = self._by_inode.get((st.st_dev, st.st_ino))
            if cached is not None:
                self.findings.extend(dataclasses.replace(f, path=entry.path) for f in cached)
                return
        try:
            data, binary, whole_fp = _read(path, want_data=bool(readers), hash_whole=bool(state))
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.ENXIO):  # replaced by a link/special file
                self.add(entry.path, "unreadable", "")
            return
        for rule_id in state:
            self.add(entry.path, rule_id, whole_fp)
        found = [] if data is None or binary else list(self._content(entry, data, readers))
        self.findings.extend(found)
        if shared:
            self._by_inode[(st.st_dev, st.st_ino)] = found

    def _content(self, entry: Entry, data: bytes, readers: Sequence[Rule]) -> Iterator[Finding]:
        packaged: bool | None = None
        for rule in readers:
            assert rule.search is not None
            hits = list(rule.search(data))
            if not hits:
                continue
            if rule.public_if_packaged:
                if packaged is None:
                    packaged = self._is_packaged(entry.path, data)
                if packaged:
                    continue
            for offset, matched in hits:
                line = None if offset is None else data.count(b"\n", 0, offset) + 1
                yield Finding(entry.path, rule.id, fingerprint(matched), line)

    def _is_packaged(self, rel: str, data: bytes) -> bool:
        """`data` at `rel` is byte-identical to what a Debian package shipped (public).

        A compiled `__pycache__/X.cpython-3NN.pyc` counts as packaged when its `X.py` is.
        """
        if self._packaged is None:
            self._packaged = _dpkg_md5sums(Path(self.root or "/"))
        pyc = _PYCACHE.match(rel)
        if pyc is not None:
            rel = f"{pyc.group(1)}/{pyc.group(2)}.py"
            try:
                with open(self.root + rel, "rb") as f:
                    data = f.read(MAX_CONTENT_BYTES + 1)
            except OSError:
                return False
        expected = self._packaged.get(rel)
        return expected is not None and hashlib.md5(data, usedforsecurity=False).hexdigest() == (
            expected
        )


def _dpkg_md5sums(root: Path) -> dict[str, str]:
    """Image path -> md5 of every file dpkg installed (md5sums files and conffiles).

    On a merged-/usr system dpkg may record `/lib/x` for what is reached as `/usr/lib/x`;
    both spellings are entered.
    """
    sums: dict[str, str] = {}

    def enter(path: str, md5: str) -> None:
        path = "/" + path.lstrip("/")
        sums[path] = md5
        if path.split("/", 2)[1] in _MERGED_USR:
            sums["/usr" + path] = md5

    info = root / "var/lib/dpkg/info"
    try:
        names = [n for n in os.listdir(info) if n.endswith(".md5sums")]
    except OSError:
        return sums
    for name in names:
        try:
            text = (info / name).read_bytes().decode("utf-8", "surrogateescape")
        except OSError:
            continue
        for line in text.splitlines():
            md5, _, path = line.partition("  ")
            if len(md5) == 32 and path:
                enter(path, md5)
    try:
        status = (root / "var/lib/dpkg/status").read_bytes().decode("utf-8", "surrogateescape")
    except OSError:
        return sums
    for match in re.finditer(r"^ (/\S.*) ([0-9a-f]{32})(?: obsolete)?$", status, re.M):
        enter(match.group(1), match.group(2))
    return sums


def _read(path: str, *, want_data: bool, hash_whole: bool) -> tuple[bytes | None, bool, str]:
    """Open a regular file once: `(data, binary, fingerprint)`.

    `data` is the content when wanted and at most `MAX_CONTENT_BYTES` (only the first bytes
    of an ELF object or archive are read unless the whole file must be hashed); `binary`
    tells whether its first bytes are a binary format; the fingerprint of the whole file is
    computed only when `hash_whole` ("" otherwise).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENXIO, "not a regular file")
        head = f.read(_HEAD) or b""
        binary = head.startswith(_BINARY_MAGIC)
        digest = hashlib.sha256(head)
        chunks = [head]
        total = len(head)
        if hash_whole or (want_data and not binary):
            while (hash_whole or total <= MAX_CONTENT_BYTES) and (chunk := f.read(1 << 20)):
                total += len(chunk)
                if hash_whole:
                    digest.update(chunk)
                if total <= MAX_CONTENT_BYTES:
                    chunks.append(chunk)
        fp = "sha256:" + digest.hexdigest()[:16] if hash_whole else ""
        keep = want_data and total <= MAX_CONTENT_BYTES and not (binary and not hash_whole)
        data = b"".join(chunks)
        return (data if keep else None), binary, fp
