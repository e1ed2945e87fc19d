"""`bootsecrets image-check`: find secrets and unclean state in a golden-image tree.

`scan(root)` walks the tree once and returns `Finding`s: the path (as it will be in the
image, `/etc/...`), a rule id, a fingerprint and, for content matches, the line. A finding
never carries the secret: the fingerprint is `sha256:` and the first 16 hex digits of the
SHA-256 of the matched bytes (of the file, for a whole-file finding). It lets an operator
tell two findings apart, or confirm which credential leaked by hashing a candidate the same
way, without showing anything. A weak secret (a short password) can be confirmed from its
fingerprint by guessing; that is one more reason it is a finding.

The rules are the table `RULES` (the one source: `format_text` shows each rule's `fix`, and
docs/operations.md lists them with the DigitalOcean Marketplace check each covers; a test
keeps that list equal to the table). A rule is one of:

- a path rule (`entry`): the file, directory or symlink itself is the finding, whatever its
  content (shell history, SSH host keys, cloud-init state, logs);
- a content rule (`reads` + `search`): the files it reads and what it searches their bytes
  for (tokens, private keys, password hashes in /etc/shadow, a non-empty machine-id);
- a tree rule (`tree`): something the image lacks (cloud-init);
- `unreadable`, reported by the walk itself.

Content rules read regular files up to `MAX_CONTENT_BYTES`, except ELF objects, compressed
archives and image formats recognised by their first bytes. A file byte-identical to what
its Debian package shipped (its MD5 in dpkg's `md5sums` or conffile list matches) is public,
the same on every machine with that package: the generic secret rules (`public_if_packaged`)
drop their matches in it. cloud-init's documentation, for one, ships example private keys
(and its compiled `__pycache__/*.pyc` too: a `.pyc` counts as packaged when its `.py` does).
This trusts the image's dpkg database; it is a scan for leftovers, not for an adversary.
How the tree is walked: `imagewalk`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from bootsecrets import secretpatterns as sp
from bootsecrets.errors import ImageCheckFindings
from bootsecrets.imagewalk import (
    MAX_CONTENT_BYTES,
    Entry,
    Finding,
    Kind,
    Rule,
    Search,
    fingerprint,
    walk,
)

__all__ = [
    "BY_ID",
    "MAX_CONTENT_BYTES",
    "RULES",
    "Finding",
    "Rule",
    "findings_error",
    "fingerprint",
    "format_json",
    "format_text",
    "scan",
]

# --- the rules ----------------------------------------------------------------------------

_HISTORY = frozenset(
    {
        ".bash_history",
        ".zsh_history",
        ".sh_history",
        ".ash_history",
        ".history",
        ".python_history",
        ".lesshst",
        ".viminfo",
        ".mysql_history",
        ".psql_history",
        ".sqlite_history",
        ".node_repl_history",
        ".rediscli_history",
        ".irb_history",
        "fish_history",
        ".wget-hsts",
    }
)
_CREDENTIAL_FILES = frozenset(
    {".vault-token", ".bao-token", ".netrc", ".pgpass", ".git-credentials"}
)
_AUTHORIZED_KEYS = frozenset({"authorized_keys", "authorized_keys2"})
_SSH_HOST_KEY = re.compile(r"ssh_host_[A-Za-z0-9]+_key(?:\.pub|-cert\.pub)?\Z")
_LOG_ARCHIVE = re.compile(
    r".*(?:\.\d+|-\d{8}|\.old)(?:\.(?:gz|xz|bz2|zst|lz4))?\Z|.*\.(?:gz|xz|bz2|zst|lz4)\Z"
)
# Binary login records, written by the build's own SSH session; no secrets.
_LOGIN_RECORDS = frozenset({"wtmp", "btmp", "lastlog", "faillog", "wtmp.db"})
_SHADOW = frozenset({"/etc/shadow", "/etc/shadow-"})
_MACHINE_ID = frozenset({"/etc/machine-id", "/var/lib/dbus/machine-id"})
_CLOUD_STATE = ("/var/lib/cloud/instances", "/var/lib/cloud/data", "/var/lib/cloud/sem")
_TMP = ("/tmp", "/var/tmp")  # noqa: S108 (paths inside the image, not temp files)


def _file(entry: Entry) -> bool:
    return entry.kind is Kind.FILE


def _nonempty(entry: Entry) -> bool:
    return entry.kind is Kind.FILE and entry.size > 0


def _log(entry: Entry) -> bool:
    return (
        _nonempty(entry)
        and entry.under("/var/log")
        and entry.name not in _LOGIN_RECORDS
        and not entry.name.startswith("cloud-init")
    )


def _passwords(root: bool) -> Search:
    """Accounts in a shadow file with a password hash or an empty password field (locked,
    `*`, `!`, `!!`, is clean); `root` selects root's line or every other account's."""

    def search(data: bytes) -> Iterator[sp.Hit]:
        offset = 0
        for line in data.split(b"\n"):
            fields = line.split(b":")
            locked = len(fields) >= 2 and fields[1] and not fields[1].strip(b"!*")
            if len(fields) >= 2 and fields[0] and not locked and (fields[0] == b"root") == root:
                yield offset, fields[1]
            offset += len(line) + 1

    return search


def _machine_id(data: bytes) -> Iterator[tuple[None, bytes]]:
    if data.strip() not in (b"", b"uninitialized"):
        yield None, data


def _non_blank(data: bytes) -> Iterator[tuple[None, bytes]]:
    if data.strip():
        yield None, data


def _is_dotenv(entry: Entry) -> bool:
    name = entry.name
    return name == ".env" or name.startswith(".env.") or name.endswith(".env")


def _first_directory_without_encryption(root: Path) -> str | None:
    """The first encrypted directory of the image's config whose filesystem cannot encrypt
    (the kernel judges: fscrypt.check_support), or None; None too without a config that
    parses (30-install-config.sh checks that). Loaded here only: most scans have no such
    config, and image-check stays light."""
    config_path = root / "etc/bootsecrets/config.yaml"
    if not config_path.is_file() or b"encrypted_directories" not in config_path.read_bytes():
        return None
    from bootsecrets import fscrypt, fscrypt_types  # noqa: PLC0415 (see the docstring)
    from bootsecrets.config import load_config  # noqa: PLC0415
    from bootsecrets.errors import ConfigError  # noqa: PLC0415

    try:
        config = load_config(config_path, env={})
    except ConfigError:
        return None
    for directory in config.directories:
        try:
            fscrypt.check_support(root / directory.path.relative_to("/"))
        except fscrypt_types.FscryptError:  # unsupported, or no directory to hold it
            return str(directory.path)
    return None


def _any(_entry: Entry) -> bool:
    return True


RULES: tuple[Rule, ...] = (
    # Secrets, wherever they are (content).
    Rule(
        "vault-token",
        "a Vault/OpenBao token; revoke it and remove the file",
        reads=_any,
        search=sp.vault_tokens,
        public_if_packaged=True,
    ),
    Rule(
        "vault-token-assignment",
        "VAULT_TOKEN/BAO_TOKEN set to a literal; revoke it, remove it",
        reads=_any,
        search=sp.vault_token_assignments,
        public_if_packaged=True,
    ),
    Rule(
        "private-key",
        "a private key; remove it (generate per droplet at first boot)",
        "root and users: private key file in ~/.ssh (id_rsa)",
        reads=_any,
        search=sp.private_keys,
        public_if_packaged=True,
    ),
    Rule(
        "do-token",
        "a DigitalOcean API token; revoke it in the control panel and remove it",
        reads=_any,
        search=sp.do_tokens,
        public_if_packaged=True,
    ),
    Rule(
        "aws-key",
        "an AWS access key id; deactivate the key and remove it",
        reads=_any,
        search=sp.aws_keys,
        public_if_packaged=True,
    ),
    Rule(
        "aws-secret-key",
        "an AWS secret access key; deactivate the key and remove it",
        reads=_any,
        search=sp.aws_secret_keys,
        public_if_packaged=True,
    ),
    Rule(
        "gcp-service-account",
        "a GCP service-account key file; delete the key and the file",
        reads=_any,
        search=sp.gcp_service_accounts,
        public_if_packaged=True,
    ),
    Rule(
        "dotenv-secret",
        "a secret-looking value in an env file; deliver it with bootsecrets",
        reads=_is_dotenv,
        search=sp.dotenv_secrets,
    ),
    # Accounts and identity (content of known files).
    Rule(
        "root-password",
        "root has a password; lock it (passwd -l root; usermod -p '*' root)",
        "checkRoot: root password set",
        reads=lambda e: e.path in _SHADOW,
        search=_passwords(root=True),
    ),
    Rule(
        "user-password",
        "an account has a password; lock it (usermod -p '*' USER)",
        "checkUsers: user (uid >= 1000; here: any account) password set",
        reads=lambda e: e.path in _SHADOW,
        search=_passwords(root=False),
    ),
    Rule(
        "machine-id",
        "a machine-id; truncate /etc/machine-id, remove /var/lib/dbus/machine-id",
        reads=lambda e: e.path in _MACHINE_ID,
        search=_machine_id,
    ),
    Rule(
        "authorized-keys",
        "an authorized_keys file; remove it (keys come from user-data)",
        "checkRoot/checkUsers: populated authorized_keys; 90-cleanup: "
        "rm /root/.ssh/authorized_keys",
        reads=lambda e: e.name in _AUTHORIZED_KEYS,
        search=_non_blank,
    ),
    # State, by path.
    Rule(
        "ssh-host-key",
        "an SSH host key; remove /etc/ssh/ssh_host_* (regenerated at boot)",
        "90-cleanup: rm /etc/ssh/*key*",
        entry=lambda e: (
            e.kind is not Kind.DIR and e.child_of("/etc/ssh") and bool(_SSH_HOST_KEY.match(e.name))
        ),
    ),
    Rule(
        "ssh-user-file",
        "a file in a .ssh directory; remove it",
        "checkRoot/checkUsers: other files in ~/.ssh, populated known_hosts",
        entry=lambda e: (
            _nonempty(e) and e.parent.endswith("/.ssh") and e.name not in _AUTHORIZED_KEYS
        ),
    ),
    Rule(
        "shell-history",
        "shell/tool history; truncate or remove it",
        "checkRoot/checkUsers: .bash_history (DO tolerates < 200 bytes); "
        "90-cleanup: /root/.bash_history",
        entry=lambda e: _nonempty(e) and e.name in _HISTORY,
    ),
    Rule(
        "credential-file",
        "a credential file; remove it",
        entry=lambda e: _nonempty(e) and e.name in _CREDENTIAL_FILES,
    ),
    Rule(
        "cloud-init-state",
        "cloud-init instance state; run `cloud-init clean --logs --seed`",
        "90-cleanup: rm -rf /var/lib/cloud/instances/*",
        entry=lambda e: e.path == "/var/lib/cloud/instance" or e.child_of(*_CLOUD_STATE),
    ),
    Rule(
        "cloud-init-seed",
        "a cloud-init seed; run `cloud-init clean --seed`",
        entry=lambda e: _file(e) and e.under("/var/lib/cloud/seed"),
    ),
    Rule(
        "cloud-init-log",
        "a cloud-init log; run `cloud-init clean --logs`",
        "checkLogs: un-cleared /var/log/*.log",
        entry=lambda e: _nonempty(e) and e.under("/var/log") and e.name.startswith("cloud-init"),
    ),
    Rule(
        "log-file",
        "a log file that was not cleared (the journal too); truncate it",
        "checkLogs: un-cleared /var/log/*.log; 90-cleanup: truncate /var/log files",
        entry=lambda e: _log(e) and not _LOG_ARCHIVE.match(e.name),
    ),
    Rule(
        "log-archive",
        "a rotated log archive; remove it",
        "checkLogs: log archives /var/log/*.[0-9], /var/log/*-????????; "
        "90-cleanup: rm /var/log/*.gz",
        entry=lambda e: _log(e) and bool(_LOG_ARCHIVE.match(e.name)),
    ),
    Rule(
        "tmp-file",
        "a leftover temporary file; remove it",
        "90-cleanup: rm -rf /tmp/* /var/tmp/*",
        entry=lambda e: _file(e) and e.under(*_TMP) and "/systemd-private-" not in e.path,
    ),
    Rule(
        "systemd-secret",
        "systemd's random seed or credential key; remove it (every clone would share it)",
        entry=lambda e: (
            _file(e)
            and e.path in ("/var/lib/systemd/random-seed", "/var/lib/systemd/credential.secret")
        ),
    ),
    Rule(
        "bootsecrets-store",
        "a leftover bootsecrets store; remove it",
        entry=lambda e: (
            (e.under("/run/bootsecrets") and (e.kind is Kind.LINK or _nonempty(e)))
            or (
                _file(e)
                and e.under("/var/lib/bootsecrets")
                and e.path != "/var/lib/bootsecrets/token"
            )
        ),
    ),
    Rule(
        "bootsecrets-token",
        "a leftover bootsecrets Vault token; revoke it and remove it",
        entry=lambda e: _file(e) and e.path == "/var/lib/bootsecrets/token",
    ),
    Rule(
        "do-agent",
        "DigitalOcean's droplet or monitoring agent; purge droplet-agent/do-agent",
        "checkAgent: /opt/digitalocean",
        entry=lambda e: (
            e.kind is Kind.DIR and e.path in ("/opt/digitalocean", "/var/opt/digitalocean")
        ),
    ),
    Rule(
        "cloud-init-missing",
        "cloud-init is not installed; droplets could not read their user-data",
        "checkCloudInit: cloud-init installed",
        tree=lambda root: (
            None
            if any(os.path.lexists(root / p) for p in ("usr/bin/cloud-init", "bin/cloud-init"))
            else "/usr/bin/cloud-init"
        ),
    ),
    Rule(
        "encrypt-missing",
        "the image config has encrypted_directories, but the filesystem that would hold one "
        "cannot encrypt (ext4 needs the `encrypt` feature: tune2fs -O encrypt, or mkfs.ext4 "
        "-O encrypt; see packer/scripts/15-root-fs.sh)",
        tree=_first_directory_without_encryption,
    ),
    Rule("unreadable", "could not be read and may hide a secret; run image-check as root"),
)
BY_ID: dict[str, Rule] = {rule.id: rule for rule in RULES}


# --- scanning ---------------------------------------------------------------------------


def scan(root: Path) -> list[Finding]:
    """Every finding of `RULES` in the image tree at `root`, sorted by path, line and rule.

    Raises `ImageCheckUnreadable` when `root` is missing, not a directory or unreadable.
    """
    return walk(root, RULES)


# --- output -----------------------------------------------------------------------------


def format_text(findings: Sequence[Finding], root: Path | str | None = None) -> str:
    """One line per finding (`path[:line]: rule: what to do [fingerprint]`) and a summary."""
    lines = []
    for f in findings:
        where = f"{f.path}:{f.line}" if f.line is not None else f.path
        fp = f" [{f.fingerprint}]" if f.fingerprint else ""
        rule = BY_ID.get(f.rule)
        lines.append(f"{where}: {f.rule}: {rule.fix if rule else ''}{fp}")
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
