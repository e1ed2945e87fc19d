"""`bootsecrets image-check`: find secrets and unclean state in a golden-image tree.

`scan(root)` walks the tree once and returns `Finding`s: the path (as it will be in the
image, `/etc/...`), a stable rule id, a fingerprint and, for content matches, the line. A
finding never carries the secret: the fingerprint is `sha256:` and the first 16 hex digits of
the SHA-256 of the matched bytes (of the file, for a whole-file finding). It lets an operator
tell two findings apart, or confirm which credential leaked by hashing a candidate the same
way, without showing anything. A weak secret (a short password) can be confirmed from its
fingerprint by guessing; that is one more reason it is a finding.

Rules
-----

Content (every regular file up to `MAX_CONTENT_BYTES`, except ELF objects, compressed
archives and image formats recognised by their first bytes; compiled regexes over bytes, each
starting with a literal and run only on files holding its anchor substring):

=========================  ===========================================================
vault-token                Vault/OpenBao token: `hvs.`/`hvb.`/`hvr.` tokens, legacy `s.` +
                           24 characters (mixed case and digits)
vault-token-assignment     `VAULT_TOKEN=`/`BAO_TOKEN=` (or `:`) with a literal value
private-key                a PEM/OpenSSH/PGP private key block with a body (a mere mention of
                           the header line in documentation is not one). The ssl-cert
                           package's `/etc/ssl/private/ssl-cert-snakeoil.key` is a finding:
                           every droplet from the image would share it.
do-token                   DigitalOcean token: `dop_v1_`/`doo_v1_`/`dor_v1_` + 64 hex
aws-key                    AWS access key id `AKIA`/`ASIA` + 16 (AWS's documented
                           `...EXAMPLE` key is not)
aws-secret-key             `aws_secret_access_key = <40 chars>` (credentials files, env files)
gcp-service-account        a JSON key file: `"type": "service_account"` with `"private_key"`
dotenv-secret              in a `.env`, `.env.*` or `*.env` file: an assignment to a
                           PASSWORD/SECRET/TOKEN/KEY/CREDENTIAL-like name with a non-empty
                           literal value (`$VAR` references are not values)
root-password              `/etc/shadow` (and `/etc/shadow-`): root has a password hash, or an
                           empty password field. Locked (`*`, `!`, `!!`) is clean.
user-password              the same for any other account (DigitalOcean checks uid >= 1000;
                           a system account with a hash is no better)
=========================  ===========================================================

State (by path, whatever the content):

=========================  ===========================================================
shell-history              non-empty `.bash_history`, `.zsh_history`, `.python_history`,
                           `.lesshst`, `.viminfo`, `.mysql_history`, `.psql_history`, ... and
                           fish's `fish_history`, anywhere in the tree
credential-file            non-empty `.vault-token`, `.bao-token`, `.netrc`, `.pgpass`,
                           `.git-credentials`, anywhere
cloud-init-state           `/var/lib/cloud/instance`, `/var/lib/cloud/instances/*`,
                           `/var/lib/cloud/data/*`, `/var/lib/cloud/sem/*`
cloud-init-seed            any file under `/var/lib/cloud/seed/`
cloud-init-log             non-empty `/var/log/cloud-init*`
cloud-init-missing         no `/usr/bin/cloud-init` (the droplet could not read its user-data)
machine-id                 `/etc/machine-id` not empty (empty or `uninitialized` is clean);
                           `/var/lib/dbus/machine-id` a non-empty file (a symlink is clean)
ssh-host-key               `/etc/ssh/ssh_host_*_key*` (private and public: regenerated at boot)
authorized-keys            any non-blank `authorized_keys`/`authorized_keys2`
ssh-user-file              any other non-empty file in a `.ssh` directory (`id_*`,
                           `known_hosts`, `config`)
bootsecrets-store          a non-empty file or a symlink under `/run/bootsecrets/`, or a file
                           under `/var/lib/bootsecrets/` other than the token
bootsecrets-token          `/var/lib/bootsecrets/token` (the persist-token policy's token)
log-file                   a non-empty file under `/var/log/` (see the exceptions below)
log-archive                a non-empty rotated log under `/var/log/` (`*.1`, `*.gz`,
                           `*-YYYYMMDD`, ...)
systemd-secret             `/var/lib/systemd/random-seed` (every droplet would start from the
                           same entropy) and `/var/lib/systemd/credential.secret` (the key of
                           `systemd-creds` encrypted credentials)
do-agent                   `/var/opt/digitalocean/do-agent` (DigitalOcean's monitoring agent
                           must not be baked into Marketplace images)
unreadable                 a file or directory the scan could not read: it could hide a
                           secret, so it is a finding rather than a silent skip (run as root)
=========================  ===========================================================

DigitalOcean Marketplace `img_check.sh` (the floor)
----------------------------------------------------

Covered: root password set (root-password), users with a password set (user-password, for
every account), populated `authorized_keys` of root and users (authorized-keys: any
non-blank one, anywhere), private keys and other files in `~/.ssh` (private-key,
ssh-user-file), uncleared bash history (shell-history: any non-empty history, where DO
tolerates under 200 bytes), un-cleared `/var/log/*.log` and log archives `*.[0-9]`,
`*-????????` (log-file, log-archive, recursively), the do-agent directory (do-agent), and
cloud-init being installed (cloud-init-missing).

Left out, because they are not properties of an image tree: the firewall check (whether
ufw/firewalld/iptables is *active* needs the running system), pending security updates (needs
`apt-get update` against the network; upgrade in the Packer provisioning instead), and the
supported-OS-version check (DigitalOcean's list lags the releases; Packer pins the base
image). `checkTMP` is a stub in DO's script; `/tmp` is content-scanned like everything else but
its mere files are not findings, because Packer uploads its provisioning scripts there on a
live build droplet.

Also not findings (documented exceptions): `/var/log/journal/` (journald writes it
continuously on a live build droplet; the cleanup script vacuums it; its files are over the
content limit anyway), and the login records `wtmp`, `btmp`, `lastlog`, `faillog` (binary,
written by the build's own SSH session, no secrets).

Packaged files
--------------

A file byte-identical to what its Debian package shipped (its MD5 in dpkg's `md5sums` or
conffile list matches) is public, the same on every machine with that package: its content
matches are dropped. cloud-init's documentation, for one, ships example private keys (and
its compiled `__pycache__/*.pyc` too: a `.pyc` counts as packaged when its `.py` does). A
package's file that was edited, and any file no package owns (such as the ssl-cert
snakeoil key or SSH host keys, made at install time), is scanned as usual. This trusts the
image's dpkg database; it is a scan for leftovers, not for an adversary who rewrites it.

Walking
-------

The walk never follows a symlink (a link pointing outside the tree is not looked through),
skips `/proc`, `/sys`, `/dev` and, when the tree is a live system, any mount point below the
root of a memory-only or virtual filesystem (tmpfs, proc, sysfs, ...: not part of a
snapshot), opens only regular files (with `O_NOFOLLOW`, never a FIFO or device), reads each
inode once (hard links share the result) and reads at most `MAX_CONTENT_BYTES` of it.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from bootsecrets.errors import ImageCheckFindings, ImageCheckUnreadable

#: Files larger than this are not content-scanned (state rules still apply by path).
MAX_CONTENT_BYTES = 4 * 1024 * 1024
_HEAD = 8192
_SKIP_TOP = frozenset({"proc", "sys", "dev"})
_VIRTUAL_FS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "tmpfs", "ramfs", "cgroup", "cgroup2", "securityfs",
    "debugfs", "tracefs", "mqueue", "hugetlbfs", "pstore", "bpf", "configfs", "fusectl",
    "autofs", "binfmt_misc", "efivarfs", "rpc_pipefs", "nsfs",
})
# First bytes of files whose content a text regex cannot meaningfully search.
_BINARY_MAGIC = (
    b"\x7fELF",  # executables, shared objects
    b"\x1f\x8b",  # gzip
    b"\xfd7zXZ\x00",  # xz
    b"\x28\xb5\x2f\xfd",  # zstd
    b"BZh91AY&SY",  # bzip2
    b"\x5d\x00\x00\x80\x00",  # lzma
    b"PK\x03\x04",  # zip, jar, wheel
    b"!<arch>\n",  # ar: .deb, static libraries
    b"\x89PNG\r\n\x1a\n",
    b"GIF8",
    b"\xff\xd8\xff",  # JPEG
    b"\xde\x12\x04\x95",  # gettext .mo
    b"\x95\x04\x12\xde",
    b"hsqs",  # squashfs
)

# One pattern per kind of secret, each starting with a literal so that the regex engine skips
# to candidates at memchr speed, and each run only on files that hold one of its anchors (a
# substring search): a file without any anchor costs a few `in` tests and is done.
_PATTERNS: tuple[tuple[str, tuple[bytes, ...], re.Pattern[bytes]], ...] = (
    ("vault-token", (b"hv",), re.compile(rb"hv[sbr]\.[A-Za-z0-9_-]{24,}")),
    ("vault-token-assignment", (b"_TOKEN",),
     re.compile(rb"(?:VAULT|BAO)_TOKEN[ \t]*[=:][ \t]*[\"']?[A-Za-z0-9][^\s\"'$`]{7,}")),
    ("private-key", (b"PRIVATE KEY",),
     re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")),
    ("do-token", (b"_v1_",), re.compile(rb"do[opr]_v1_[a-f0-9]{64}(?![A-Za-z0-9_])")),
    ("aws-key", (b"AKIA", b"ASIA"), re.compile(rb"A(?:KIA|SIA)[A-Z0-9]{16}(?![A-Za-z0-9_])")),
    ("aws-secret-key", (b"ecret_access_key", b"ECRET_ACCESS_KEY"),
     re.compile(rb"(?:aws_secret_access_key|AWS_SECRET_ACCESS_KEY)"
                rb"[ \t]*[=:][ \t]*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])")),
    ("gcp-service-account", (b"service_account",),
     re.compile(rb"\"type\"\s*:\s*\"service_account\"")),
)
# Legacy (Vault < 1.10) service tokens: `s.` and 24 base62 characters. Its literal prefix
# makes it fast on every file; the mixed-case check is done on each (rare) match.
_VAULT_LEGACY = re.compile(rb"s\.[A-Za-z0-9]{24}(?![A-Za-z0-9_.-])")
_WORD = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_UPPER = re.compile(rb"[A-Z]")
_LOWER = re.compile(rb"[a-z]")
_DIGIT = re.compile(rb"[0-9]")
_PEM_END = re.compile(rb"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_PEM_LINES = re.compile(rb"\r?\n|(?:\\r)?\\n")  # real line breaks, or JSON's escaped ones
_PEM_BASE64_LINE = re.compile(rb"[A-Za-z0-9+/]{40,}={0,2}")
_PEM_SEARCH = 64 * 1024
_GCP_PRIVATE_KEY = re.compile(rb'"private_key"\s*:\s*"-----BEGIN')

_DOTENV_LINE = re.compile(
    rb"^[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_.]*)[ \t]*=[ \t]*(.*?)[ \t]*$", re.M,
)
_DOTENV_SECRET_NAME = re.compile(
    rb"PASS(?:WORD|WD|PHRASE)?|SECRET|TOKEN|KEY|CREDENTIAL|PRIVATE|AUTH|DSN", re.I,
)

_HISTORY_NAMES = frozenset({
    ".bash_history", ".zsh_history", ".sh_history", ".ash_history", ".history",
    ".python_history", ".lesshst", ".viminfo", ".mysql_history", ".psql_history",
    ".sqlite_history", ".node_repl_history", ".rediscli_history", ".irb_history",
    "fish_history", ".wget-hsts",
})
_CREDENTIAL_NAMES = frozenset({
    ".vault-token", ".bao-token", ".netrc", ".pgpass", ".git-credentials",
})
_AUTHORIZED_KEYS = frozenset({"authorized_keys", "authorized_keys2"})
_SSH_HOST_KEY = re.compile(r"ssh_host_[A-Za-z0-9]+_key(?:\.pub|-cert\.pub)?\Z")
_LOG_ARCHIVE = re.compile(
    r".*(?:\.\d+|-\d{8}|\.old)(?:\.(?:gz|xz|bz2|zst|lz4))?\Z|.*\.(?:gz|xz|bz2|zst|lz4)\Z"
)
_LOG_EXEMPT = frozenset({"wtmp", "btmp", "lastlog", "faillog", "wtmp.db"})
_SYSTEMD_SECRETS = frozenset({"/var/lib/systemd/random-seed", "/var/lib/systemd/credential.secret"})
_SHADOW_FILES = frozenset({"/etc/shadow", "/etc/shadow-"})
_MACHINE_ID_FILES = frozenset({"/etc/machine-id", "/var/lib/dbus/machine-id"})
_CLOUD_STATE_DIRS = ("/var/lib/cloud/instances/", "/var/lib/cloud/data/", "/var/lib/cloud/sem/")
_PYCACHE = re.compile(r"(.*)/__pycache__/([^/.]+)\.[a-z]+-\d+(?:\.opt-\d)?\.pyc\Z")
_MERGED_USR = frozenset({"bin", "sbin", "lib", "lib32", "lib64", "libx32"})
_CLOUD_INIT_BINARIES = ("usr/bin/cloud-init", "bin/cloud-init")

#: What each rule means and what to do; `format_text` shows it.
RULES: dict[str, str] = {
    "vault-token": "a Vault/OpenBao token; revoke it and remove the file",
    "vault-token-assignment": "VAULT_TOKEN/BAO_TOKEN set to a literal; revoke it, remove it",
    "private-key": "a private key; remove it (generate per droplet at first boot)",
    "do-token": "a DigitalOcean API token; revoke it in the control panel and remove it",
    "aws-key": "an AWS access key id; deactivate the key and remove it",
    "aws-secret-key": "an AWS secret access key; deactivate the key and remove it",
    "gcp-service-account": "a GCP service-account key file; delete the key and the file",
    "dotenv-secret": "a secret-looking value in an env file; deliver it with bootsecrets",
    "root-password": "root has a password; lock it (passwd -l root; usermod -p '*' root)",
    "user-password": "an account has a password; lock it (usermod -p '*' USER)",
    "shell-history": "shell/tool history; truncate or remove it",
    "credential-file": "a credential file; remove it",
    "cloud-init-state": "cloud-init instance state; run `cloud-init clean --logs --seed`",
    "cloud-init-seed": "a cloud-init seed; run `cloud-init clean --seed`",
    "cloud-init-log": "a cloud-init log; run `cloud-init clean --logs`",
    "cloud-init-missing": "cloud-init is not installed; droplets could not read user-data",
    "machine-id": "a machine-id; truncate /etc/machine-id, remove /var/lib/dbus/machine-id",
    "ssh-host-key": "an SSH host key; remove /etc/ssh/ssh_host_* (regenerated at boot)",
    "authorized-keys": "an authorized_keys file; remove it (keys come from user-data)",
    "ssh-user-file": "a file in a .ssh directory; remove it",
    "systemd-secret": "systemd's random seed or credential key; remove it (made per boot)",
    "bootsecrets-store": "a leftover bootsecrets store; remove it",
    "bootsecrets-token": "a leftover bootsecrets Vault token; revoke it and remove it",
    "log-file": "a log file that was not cleared; truncate it",
    "log-archive": "a rotated log archive; remove it",
    "do-agent": "the DigitalOcean monitoring agent; purge do-agent",
    "unreadable": "could not be read and may hide a secret; run image-check as root",
}


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


# --- scanning ---------------------------------------------------------------------------


def scan(root: Path) -> list[Finding]:
    """Every finding in the image tree at `root`, sorted by path, line and rule.

    Raises `ImageCheckUnreadable` when `root` is missing, not a directory or unreadable.
    """
    root = _check_root(root)
    scanner = _Scanner(root, _virtual_mounts(root))
    scanner.walk()
    if not any(os.path.lexists(root / rel) for rel in _CLOUD_INIT_BINARIES):
        scanner.add("/usr/bin/cloud-init", "cloud-init-missing", "")
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
    def __init__(self, root: Path, skip_mounts: frozenset[str]) -> None:
        self.root = str(root).rstrip("/")
        self.skip_mounts = skip_mounts
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
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}"
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError:
                    self.add(rel, "unreadable", "")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if rel_dir == "" and entry.name in _SKIP_TOP:
                        continue
                    if self.root + rel in self.skip_mounts:
                        continue
                    self._directory(rel, entry.path)
                    stack.append(rel)
                elif stat.S_ISLNK(st.st_mode):
                    self._symlink(rel, entry.path)
                elif stat.S_ISREG(st.st_mode):
                    self._file(rel, entry.path, st)

    # -- per entry kind ---------------------------------------------------------------

    def _directory(self, rel: str, path: str) -> None:
        rule = None
        if rel == "/var/lib/cloud/instance" or _is_child(rel, _CLOUD_STATE_DIRS):
            rule = "cloud-init-state"
        elif rel == "/var/opt/digitalocean/do-agent":
            rule = "do-agent"
        if rule is not None:
            try:
                names = sorted(os.listdir(path))
            except OSError:
                names = []
            self.add(rel, rule, fingerprint("\n".join(names).encode("utf-8", "surrogateescape")))

    def _symlink(self, rel: str, path: str) -> None:
        rule = None
        if rel == "/var/lib/cloud/instance" or _is_child(rel, _CLOUD_STATE_DIRS):
            rule = "cloud-init-state"
        elif rel.startswith("/run/bootsecrets/"):
            rule = "bootsecrets-store"
        elif rel.startswith("/etc/ssh/") and _SSH_HOST_KEY.match(rel[9:]):
            rule = "ssh-host-key"
        if rule is not None:
            try:
                target = os.readlink(path)
            except OSError:
                target = ""
            self.add(rel, rule, fingerprint(target.encode("utf-8", "surrogateescape")))

    def _file(self, rel: str, path: str, st: os.stat_result) -> None:
        name = rel.rsplit("/", 1)[1]
        state = _state_rules(rel, name, st.st_size)
        special = rel in _SHADOW_FILES or rel in _MACHINE_ID_FILES or name in _AUTHORIZED_KEYS
        content_scan = 0 < st.st_size <= MAX_CONTENT_BYTES
        if not (state or special or content_scan):
            return
        shared = st.st_nlink > 1 and not state and not special
        if shared:
            cached = self._by_inode.get((st.st_dev, st.st_ino))
            if cached is not None:
                self.findings.extend(dataclasses.replace(f, path=rel) for f in cached)
                return
        try:
            data, binary, whole_fp = _read(path, want_data=content_scan or special,
                                           hash_whole=bool(state))
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENXIO):  # replaced by a link/special file
                return
            self.add(rel, "unreadable", "")
            return
        for rule in state:
            self.add(rel, rule, whole_fp)
        if data is None:
            return
        if rel in _SHADOW_FILES:
            self.findings.extend(_shadow(rel, data))
        elif rel in _MACHINE_ID_FILES:
            if data.strip() not in (b"", b"uninitialized"):
                self.add(rel, "machine-id", fingerprint(data))
        elif name in _AUTHORIZED_KEYS and data.strip():
            self.add(rel, "authorized-keys", fingerprint(data))
        found = list(_content(rel, data)) if content_scan and not binary else []
        if found and self._is_packaged(rel, data):
            found = []
        if _is_dotenv(name):
            found.extend(_dotenv(rel, data))
        self.findings.extend(found)
        if shared:
            self._by_inode[(st.st_dev, st.st_ino)] = found


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
        top = path.split("/", 2)[1]
        if top in _MERGED_USR:
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


def _is_child(rel: str, prefixes: Sequence[str]) -> bool:
    """`rel` is directly inside one of the directories `prefixes` (each ending with `/`)."""
    return any(rel.startswith(p) and "/" not in rel[len(p):] for p in prefixes)


def _state_rules(rel: str, name: str, size: int) -> list[str]:
    """Path-based rules for a regular file `name` of `size` bytes at image path `rel`."""
    rules = []
    if name in _HISTORY_NAMES and size > 0:
        rules.append("shell-history")
    if name in _CREDENTIAL_NAMES and size > 0:
        rules.append("credential-file")
    parent = rel[: -len(name) - 1]
    if name not in _AUTHORIZED_KEYS and parent.endswith("/.ssh") and size > 0:
        rules.append("ssh-user-file")
    if parent == "/etc/ssh" and _SSH_HOST_KEY.match(name):
        rules.append("ssh-host-key")
    if rel.startswith("/var/"):
        if rel.startswith("/var/lib/cloud/seed/"):
            rules.append("cloud-init-seed")
        elif rel == "/var/lib/cloud/instance" or _is_child(rel, _CLOUD_STATE_DIRS):
            rules.append("cloud-init-state")
        elif rel in _SYSTEMD_SECRETS:
            rules.append("systemd-secret")
        elif rel == "/var/lib/bootsecrets/token":
            rules.append("bootsecrets-token")
        elif rel.startswith("/var/lib/bootsecrets/"):
            rules.append("bootsecrets-store")
        elif rel.startswith("/var/log/") and not rel.startswith("/var/log/journal/"):
            if name.startswith("cloud-init"):
                if size > 0:
                    rules.append("cloud-init-log")
            elif name in _LOG_EXEMPT or size == 0:
                pass
            elif _LOG_ARCHIVE.match(name):
                rules.append("log-archive")
            else:
                rules.append("log-file")
    elif rel.startswith("/run/bootsecrets/") and size > 0:
        rules.append("bootsecrets-store")
    return rules


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


def _line(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _content(rel: str, data: bytes) -> Iterator[Finding]:
    for match in _VAULT_LEGACY.finditer(data):
        start = match.start()
        if start > 0 and (data[start - 1] in _WORD or data[start - 1] == ord(".")):
            continue  # `this.s.foo...`: part of a longer name
        body = match.group()[2:]
        if not (_UPPER.search(body) and _LOWER.search(body) and _DIGIT.search(body)):
            continue  # real tokens mix upper case, lower case and digits
        yield Finding(rel, "vault-token", fingerprint(match.group()), _line(data, start))
    for rule, anchors, pattern in _PATTERNS:
        if not any(anchor in data for anchor in anchors):
            continue
        for match in pattern.finditer(data):
            yield from _check(rel, rule, data, match)


def _check(rel: str, rule: str, data: bytes, match: re.Match[bytes]) -> Iterator[Finding]:
    """The finding for one pattern match, unless a closer look says it is not a secret."""
    start = match.start()
    secret = match.group()
    if rule != "private-key" and start > 0 and data[start - 1] in _WORD:
        return  # the middle of a longer word
    if rule == "private-key":
        end = _PEM_END.search(data, match.end(), match.end() + _PEM_SEARCH)
        stop = end.start() if end else min(len(data), match.end() + 4096)
        lines = _PEM_LINES.split(data[match.end():stop])
        if not any(_PEM_BASE64_LINE.fullmatch(line.strip(b" \t\"',")) for line in lines):
            return  # the header line mentioned in prose, not a key
        secret = data[start:end.end() if end else stop]
    elif rule in ("aws-key", "aws-secret-key") and b"EXAMPLE" in secret:
        return  # AWS's documented example credentials end in EXAMPLE
    elif rule == "gcp-service-account":
        if not _GCP_PRIVATE_KEY.search(data):
            return  # the words, not a key file
        secret = data
    yield Finding(rel, rule, fingerprint(secret), _line(data, start))


def _is_dotenv(name: str) -> bool:
    return name == ".env" or name.startswith(".env.") or name.endswith(".env")


def _dotenv(rel: str, data: bytes) -> Iterator[Finding]:
    for match in _DOTENV_LINE.finditer(data):
        name, value = match.group(1), match.group(2)
        if not _DOTENV_SECRET_NAME.search(name):
            continue
        if value[:1] in (b'"', b"'") and value[-1:] == value[:1] and len(value) >= 2:
            value = value[1:-1]
        elif b" #" in value:
            value = value.split(b" #", 1)[0].rstrip()
        if not value or value.startswith(b"$"):
            continue
        yield Finding(rel, "dotenv-secret", fingerprint(match.group()), _line(data, match.start()))


def _shadow(rel: str, data: bytes) -> Iterator[Finding]:
    for number, line in enumerate(data.split(b"\n"), start=1):
        fields = line.split(b":")
        if len(fields) < 2 or not fields[0]:
            continue
        password = fields[1]
        if password and password.strip(b"!*") == b"":
            continue  # locked, no hash
        rule = "root-password" if fields[0] == b"root" else "user-password"
        yield Finding(rel, rule, fingerprint(password), number)


# --- output -----------------------------------------------------------------------------


def format_text(findings: Sequence[Finding], root: Path | str | None = None) -> str:
    """One line per finding (`path[:line]: rule: what to do [fingerprint]`) and a summary."""
    lines = []
    for f in findings:
        where = f"{f.path}:{f.line}" if f.line is not None else f.path
        fp = f" [{f.fingerprint}]" if f.fingerprint else ""
        lines.append(f"{where}: {f.rule}: {RULES.get(f.rule, '')}{fp}")
    where = f" in {root}" if root is not None else ""
    if findings:
        lines.append(f"{len(findings)} finding{'s' if len(findings) != 1 else ''}{where}")
    else:
        lines.append(f"no findings{where}")
    return "\n".join(lines) + "\n"


def format_json(findings: Sequence[Finding], root: Path | str | None = None) -> str:
    """The stable JSON document (one line, newline-terminated).

    `{"root": str|null, "findings": [{"path", "rule", "line", "fingerprint"}], "count": N}`;
    `line` is null for whole-file findings, `fingerprint` is "" when nothing could be read.
    """
    doc = {
        "root": str(root) if root is not None else None,
        "findings": [
            {"path": f.path, "rule": f.rule, "line": f.line, "fingerprint": f.fingerprint}
            for f in findings
        ],
        "count": len(findings),
    }
    return json.dumps(doc, ensure_ascii=False, sort_keys=False) + "\n"


def findings_error(findings: Iterable[Finding], root: Path | str) -> ImageCheckFindings:
    """The error the CLI raises after printing the findings (exit code 40)."""
    items = list(findings)
    rules = sorted({f.rule for f in items})
    return ImageCheckFindings(
        f"{root}: {len(items)} finding{'s' if len(items) != 1 else ''} ({', '.join(rules)})"
    )
