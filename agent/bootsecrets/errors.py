"""The one error hierarchy and its exit codes.

Every outcome the agent can end with is a subclass of `BootsecretsError` with its own
`exit_code`; `cli.main` maps them, nothing else does. Messages are built from names (file,
field path, unit, variable, secret path, key) and never from a value, a token or a
secret-id: the constructors take no value argument, so one cannot slip in.

`message_id` is a stable journal MESSAGE_ID for outcomes an operator alerts on.
"""

from __future__ import annotations

import re
from typing import ClassVar

#: C0 and C1 controls, DEL, and the Unicode line/paragraph separators and bidi controls: a
#: name carrying one could start a forged line (or reorder one) on a terminal or in a log.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e"
                          "\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every control character escaped (`\\n`, `\\x1b`, `\\u2028`), so that what a
    message or a journal field carries (a name, a key, a path) stays on its own line."""

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char)
        if named:
            return named
        return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"

    return _UNPRINTABLE.sub(escape, text)


class BootsecretsError(Exception):
    """Root of every expected failure. `str(err)` is the one line shown to the operator.

    Every outcome is a subclass with its own `exit_code` and a `summary` for the exit-code
    table (the CLI's help and the README are checked against `exit_codes()`). A bug is not a
    BootsecretsError: it raises a plain exception and the CLI says "internal error".
    """

    exit_code: ClassVar[int] = 1
    #: One line for the exit-code table.
    summary: ClassVar[str] = "internal error (a bug: rerun with `--debug` and report it)"
    #: What the operator should do, appended to the message on the CLI.
    hint: ClassVar[str] = ""
    message_id: ClassVar[str | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(printable(message))


# --- input ---------------------------------------------------------------------------


class ConfigError(BootsecretsError):
    """The image config (or another input file) is invalid: names file, line and field."""

    exit_code = 10
    summary = "image config invalid"
    hint = "fix the image config (/etc/bootsecrets/config.yaml) and rebuild the image"

    def __init__(self, source: str, line: int | None, field: str, problem: str) -> None:
        self.source = source
        self.line = line
        self.field = field
        self.problem = problem
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {field or '(top level)'}: {problem}")


class BootstrapError(ConfigError):
    """The bootstrap delivered by user-data is missing or invalid."""

    exit_code = 11
    summary = "bootstrap (user-data) missing or invalid"
    hint = (
        "check the droplet's user-data: it must write the bootstrap file with role_id and "
        "wrapped_secret_id (see cloud-init/README.md)"
    )


class UsageError(BootsecretsError):
    exit_code = 2
    summary = "usage error"


# --- local state -----------------------------------------------------------------------


class StoreError(BootsecretsError):
    """The memory-only store cannot be used (disk-backed, wrong owner, unwritable)."""

    exit_code = 12
    summary = (
        "store not usable (disk-backed, unwritable, a symlink in the agent's paths, a path "
        "systemd cannot read back)"
    )
    hint = "mount a tmpfs (or ramfs) at the store path; see systemd/bootsecrets-store.service"


class _UnitVariableError(BootsecretsError):
    """A problem with one variable (or credential) of one unit."""

    def __init__(self, unit: str, variable: str, problem: str) -> None:
        self.unit = unit
        self.variable = variable
        super().__init__(f"unit {unit}, variable {variable}: {problem}")


class RenderError(_UnitVariableError):
    """A template could not be rendered for a unit."""

    exit_code = 13
    summary = "template failed, or went past its bounds on size, steps or time"
    hint = "fix the template in the image config"


class EncodeError(_UnitVariableError):
    """A rendered value cannot be represented in the target file format."""

    exit_code = 14
    summary = (
        "a value cannot be passed on as systemd and the kernel require (NUL, invalid "
        "UTF-8 or a Unicode noncharacter, over 128 KiB, bad variable name, a unit's "
        "variables over 1 MiB, a credential or a unit's credentials over 1 MiB)"
    )
    hint = (
        "a value must be UTF-8 systemd accepts (no NUL, no Unicode noncharacter), at most "
        "128 KiB, and 1 MiB for all of a unit's variables; credentials 1 MiB per unit in all"
    )


class LockBusy(BootsecretsError):
    exit_code = 15
    summary = "another run holds the lock"
    hint = "another bootsecrets run holds the lock; wait for it or retry later"


# --- data at rest: checked before Vault ---------------------------------------------------


class EncryptionUnsupported(BootsecretsError):
    """An encrypted directory cannot be made at its path: tmpfs, ext4 without `encrypt`, a
    kernel without fscrypt, another filesystem, a filesystem's root, or read-only here."""

    exit_code = 16
    summary = ("an encrypted directory cannot be made here (tmpfs, ext4 without `encrypt`, "
               "no fscrypt in the kernel, read-only)")
    hint = ("put the directory on an ext4 filesystem with the encrypt feature (or f2fs), "
            "writable by bootsecrets.service; see docs/operations.md (data at rest)")


class DataNotEmpty(BootsecretsError):
    """First use of an encrypted directory whose path already holds data."""

    exit_code = 17
    summary = ("refusing to encrypt over existing data (a non-empty directory at first use, "
               "or not a directory)")
    hint = ("nothing was changed: move the data away, or point the config at an absent or "
            "empty directory, then run again")


class KeyRecordInvalid(BootsecretsError):
    """The stored (Transit-encrypted) data key of encrypted data is missing or unreadable."""

    exit_code = 18
    summary = "the stored data key of an encrypted directory is missing or unreadable"
    hint = ("restore the key record under /var/lib/bootsecrets/keys from a backup (it is "
            "worthless without Vault); docs/operations.md (data at rest) says what else to do")


class KeyMismatch(BootsecretsError):
    """The directory and its stored key do not go together: it is missing, not encrypted, or
    encrypted with another key than the record names."""

    exit_code = 19
    summary = ("an encrypted directory and its stored data key do not match (directory "
               "missing, not encrypted, or encrypted with another key)")
    hint = ("nothing was changed: find out who replaced the directory or the key record; "
            "docs/operations.md (data at rest) says how to start the directory afresh")


# --- Vault -----------------------------------------------------------------------------


class VaultError(BootsecretsError):
    """Vault answered something unexpected (status and Vault's own error text)."""

    exit_code = 20
    summary = (
        "unexpected Vault error; a redirect to an address not configured; an answer over 4 MiB"
    )
    hint = "check the Vault server logs"


class VaultUnreachable(VaultError):
    exit_code = 21
    summary = "Vault unreachable before the deadline"
    hint = "check the network path and the Vault address; the units stay down until it answers"


class WrappingTokenInvalid(VaultError):
    """sys/wrapping/lookup does not know the token: unknown, expired or already unwrapped."""

    exit_code = 22
    summary = "wrapped secret-id unknown, expired or already used (alert)"
    message_id = "0436c62508774369afe7cde448db9d33"
    hint = (
        "the wrapped secret-id is unknown, expired or was already used. If the droplet booted "
        "later than wrapping_ttl after it was minted, mint a new one; otherwise treat it as "
        "possible interception: revoke the role's secret-ids and investigate"
    )


class WrappingPathMismatch(VaultError):
    """The wrapping token was not created by auth/approle/role/<role>/secret-id: tampering."""

    exit_code = 23
    summary = "wrapping token created at the wrong path: tampering (alert)"
    message_id = "964ca7900f3b464c96bbb0c4879cc54b"
    hint = (
        "the wrapping token was not minted for this role's secret-id: possible tampering. "
        "Do not reuse it; investigate who produced the user-data"
    )


class WrappingTokenAlreadyUsed(VaultError):
    """Lookup succeeded, then unwrap was refused: someone unwrapped it in between."""

    exit_code = 24
    summary = (
        "wrapped secret-id unwrapped by someone else between lookup and unwrap: "
        "interception (alert)"
    )
    message_id = "15d2ba10e84944cfbdd973a036787d09"
    hint = (
        "the wrapped secret-id was unwrapped by someone else: possible interception. Revoke "
        "the role's secret-ids and tokens, then re-provision with a new wrapped secret-id"
    )


class ResponseLost(VaultError):
    """A request that consumes something (unwrap, single-use login) was sent, and its answer
    was lost. Sending it again could not succeed and would hide what happened."""

    exit_code = 32
    summary = "the answer to unwrap or login was lost; not repeated (alert)"
    message_id = "dac3ef81c7b64448ac0e6916a070d364"
    hint = (
        "the wrapped secret-id (or the secret-id) may have been consumed by that request: "
        "re-provision with a new wrapped secret-id"
    )

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        super().__init__(f"{what} was sent but its answer was lost ({reason}); not repeated")


class LoginDenied(VaultError):
    exit_code = 25
    summary = "AppRole login denied (alert)"
    message_id = "5b5404a17d484b5bbea579f7803046eb"
    hint = "check the role-id in user-data and the AppRole's bound CIDRs and secret-id limits"


class PermissionDenied(VaultError):
    exit_code = 26
    summary = "permission denied on a secret path"
    hint = "grant the role's policy read access to the path"

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"permission denied reading {path}")


class SecretMissing(VaultError):
    exit_code = 27
    summary = "secret or key missing"
    hint = "create the secret or key in Vault, or fix the image config"

    def __init__(self, path: str, key: str | None = None, unit: str | None = None) -> None:
        self.path = path
        self.key = key
        what = f"key {key!r} of secret {path}" if key is not None else f"secret {path}"
        where = f" (needed by {unit})" if unit else ""
        super().__init__(f"{what} does not exist{where}")


class TokenInvalid(VaultError):
    """The stored Vault token was revoked, expired or can no longer be renewed."""

    exit_code = 28
    summary = "kept token revoked, expired or no longer renewable (alert)"
    message_id = "85bea96a9c484c4f8d6c8c1bbf85ce35"
    hint = (
        "re-provision: pipe a new wrapped secret-id into "
        "`bootsecrets refresh --wrapped-secret-id -`"
    )


class NotProvisioned(BootsecretsError):
    """No bootstrap, no usable token: the units stay down until re-provisioned."""

    exit_code = 29
    summary = "not provisioned: no bootstrap and no kept token (alert)"
    message_id = "c20869c0895743d8bb8356a2efa6256c"
    hint = (
        "re-provision: pipe a new wrapped secret-id into "
        "`bootsecrets refresh --wrapped-secret-id -`"
    )


class DataLocked(VaultError):
    """Vault refused the data key of encrypted data (permission denied, or its key version
    retired by min_decryption_version before this host rewrapped it), or the kernel refused
    it: that data stays locked, the units needing it stay down, the others run."""

    exit_code = 51
    summary = ("encrypted data stays locked: Vault (or the kernel) refused its key; the units "
               "needing it stay down, the others start (alert)")
    message_id = "1a52b0e751ae42bda35d65f7fd42bce5"
    hint = ("grant the role's policy `update` on the Transit key's datakey, decrypt and rewrap "
            "paths (docs/operations.md); then `bootsecrets refresh` unlocks the data and starts "
            "the units held back")


class TransitKeyMissing(VaultError):
    """The Transit key (or its mount) no longer exists: the data under it is crypto-shredded."""

    exit_code = 52
    summary = ("the Transit key of encrypted data no longer exists (crypto-shredded): it "
               "cannot be unlocked again (alert)")
    message_id = "ae03788be16f4724812dfb05da47b02e"
    hint = ("if the key was deleted on purpose, the data is gone for good: run "
            "`bootsecrets decommission`; otherwise check the transit mount and key names")


class DataKeyRejected(VaultError):
    """Transit rejected the stored ciphertext (altered), or it decrypts to a key that is not
    the directory's (swapped): tampering."""

    exit_code = 53
    summary = ("the stored key of encrypted data was rejected by Transit or is not the "
               "data's key: tampering (alert)")
    message_id = "e0ad47d1f8574517bb24b305fe590e35"
    hint = ("someone altered or swapped the stored key (a key record under "
            "/var/lib/bootsecrets/keys, or the token in a volume's LUKS2 header): restore it "
            "from a backup and find out who wrote it")


# --- data at rest: encrypted volumes (one volume's failure; the others go on) -------------


class VolumeMissing(BootsecretsError):
    """The volume's device did not appear within its attach timeout."""

    exit_code = 54
    summary = ("an encrypted volume's device did not appear in time (not attached, or a wrong "
               "device path); the units needing it stay down, the others start (alert)")
    message_id = "828e10e321f54f25888badc6c71be618"
    hint = ("attach the volume (Terraform: the droplet's volume_ids) or fix `device:` in the "
            "image config; `bootsecrets refresh` then opens it and starts the units held back")


class VolumeNotBlank(BootsecretsError):
    """First use of a volume whose device holds something bootsecrets did not write."""

    exit_code = 55
    summary = ("refusing to format an encrypted volume: its device holds a filesystem, a "
               "partition table, another LUKS header or data; left untouched (alert)")
    message_id = "64bb98387183496d8a0288723f815bdf"
    hint = ("nothing was changed: point `device:` at the right volume, or, if what is on it "
            "is not needed, wipe it (`wipefs -a`, then zero its first MiB); see "
            "docs/operations.md (data at rest)")


class VolumeBlank(BootsecretsError):
    """The device is blank and the config does not allow formatting it."""

    exit_code = 56
    summary = ("an encrypted volume's device is blank and the config says `format: never` "
               "(alert)")
    message_id = "72147c00798746e4834d52a736686aa3"
    hint = ("attach the volume that holds the data, or set `format: if-blank` for a new "
            "volume in the image config")


class VolumeTokenInvalid(BootsecretsError):
    """The LUKS2 header has no bootsecrets token, or one that is not what bootsecrets
    writes."""

    exit_code = 57
    summary = ("an encrypted volume's LUKS2 header has no bootsecrets token, or an altered "
               "one: tampering, or a first use cut short (alert)")
    message_id = "cf97d789113d4e329395dd46c687d9de"
    hint = ("nothing was changed: find out who wrote the header; restore it from a header "
            "backup (`cryptsetup luksHeaderRestore`), or start the volume afresh "
            "(docs/operations.md, data at rest)")


class VolumeMismatch(BootsecretsError):
    """Another volume than the one this host formatted, or one whose token names another
    Transit key than the config."""

    exit_code = 58
    summary = ("another volume is attached than the one this host formatted (another LUKS "
               "UUID, or blank where it was), or its token names another Transit key (alert)")
    message_id = "337ff6cfad4a4a448e41b6bceb24befe"
    hint = ("nothing was changed: attach the volume this host formatted; to adopt another "
            "one on purpose, delete its record under /var/lib/bootsecrets/volumes "
            "(docs/operations.md, data at rest)")


class VolumeFailed(BootsecretsError):
    """cryptsetup, mkfs or the mount failed (or device-mapper is out of reach)."""

    exit_code = 59
    summary = ("an encrypted volume could not be opened, formatted or mounted (cryptsetup, "
               "mkfs or the mount failed, or device-mapper is out of bootsecrets' reach) "
               "(alert)")
    message_id = "56e50effe57b4399affcec349d6ed59a"
    hint = ("the message names the command and its error; an image with volumes needs "
            "systemd/encrypted-volumes.conf as a drop-in of bootsecrets.service and "
            "bootsecrets-refresh.service (docs/operations.md, data at rest)")


# --- systemd ---------------------------------------------------------------------------


class CommandFailed(BootsecretsError):
    """A subprocess (systemctl) failed. Its argv never holds a secret, so it is shown."""

    exit_code = 30
    summary = "a systemctl command failed"
    hint = "see the journal of the named unit"

    def __init__(self, argv: tuple[str, ...], returncode: int, stderr: str = "") -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        detail = f": {stderr.strip().splitlines()[-1]}" if stderr.strip() else ""
        super().__init__(f"`{' '.join(argv)}` exited with {returncode}{detail}")


class UnitFailed(BootsecretsError):
    """A unit did not come back after a restart with new values; it was rolled back."""

    exit_code = 31
    summary = "a unit failed after restart with new values; rolled back (alert)"
    message_id = "33405960944e4eeaaf6d7c8d8350ee25"
    hint = "the unit runs with its previous values again; check the new secret values in Vault"


# --- leased secrets (docs/leases.md) -----------------------------------------------------


class _LeaseError(BootsecretsError):
    """A problem with one leased secret: names it and its path, never a value or a lease ID
    (`reason` is built from statuses and names only)."""

    def __init__(self, name: str, path: str, problem: str) -> None:
        self.name = name
        self.path = path
        self.problem = problem
        super().__init__(f"leased secret {name} ({path}): {problem}")


class LeaseIssueFailed(_LeaseError):
    exit_code = 60
    summary = ("new leased credentials or a certificate could not be issued; the old ones "
               "are kept while valid (alert)")
    message_id = "b147789eecc5405282bef7c53ea689be"
    hint = ("check the database (or CA) behind the path, and the role's policy; the agent "
            "tries again on its own schedule (bootsecrets-wakeup.timer; see docs/leases.md)")


class CertificateRefused(_LeaseError):
    exit_code = 61
    summary = "the PKI role refused the certificate's names or TTL (alert)"
    message_id = "30ea99bd691a406ca01c7a8759581fe0"
    hint = ("make the PKI role allow what the image config asks (allowed_domains, "
            "allow_subdomains, allow_ip_sans, max_ttl), or fix common_name and alt_names")


class LeaseRevokeFailed(_LeaseError):
    exit_code = 62
    summary = "an old lease could not be revoked; tried again at the next run"
    message_id = "4e7390c872644576a6afa062358c8ddc"
    hint = ("the units run on the new credentials; check the database and that the policy "
            "lets the role revoke its own leases (docs/leases.md); an unrevoked lease still "
            "ends at its own expiry")


class LeaseExpired(_LeaseError):
    exit_code = 63
    summary = "leased credentials or a certificate expired before they were replaced (alert)"
    message_id = "48f53efa3253436380069d92eae37fe3"
    hint = ("the agent did not run in time (Vault or the database unreachable, the host "
            "paused, or its timers stopped): check `systemctl list-timers 'bootsecrets*'` "
            "and the journal")


class LeaseRenewalRefused(_LeaseError):
    exit_code = 64
    summary = ("Vault refused to renew a lease (revoked outside the agent, not renewable, or "
               "its database unreachable); re-issued (alert)")
    message_id = "0ffcc765ab8f4ef8b22dea89ed12112c"
    hint = ("if nobody revoked the lease on purpose, check the database and the policy's "
            "renew grant (docs/leases.md); the units run on re-issued credentials")


# --- image-check -------------------------------------------------------------------------


class ImageCheckFindings(BootsecretsError):
    exit_code = 40
    summary = "image-check found something"
    hint = "remove what was found from the image before snapshotting it"


class ImageCheckUnreadable(BootsecretsError):
    exit_code = 41
    summary = "image tree unreadable"
    hint = "run image-check as root on a mounted image tree"


# --- decommission -------------------------------------------------------------------------


class DecommissionIncomplete(BootsecretsError):
    exit_code = 50
    summary = "decommission: a step failed (every step is reported; run it again)"
    hint = "every step is idempotent: fix what the failed step names and run it again"


# --- the process ---------------------------------------------------------------------------


class Interrupted(BootsecretsError):
    """SIGTERM: raised inside whatever runs, so that its cleanup (temporary generation,
    lock) runs before the process ends."""

    exit_code = 143
    summary = "interrupted by SIGTERM; nothing half-written is left"
    hint = "nothing half-written was left behind; run the command again"


#: Outcomes that are not exceptions of their own.
_OTHER_CODES = {
    0: "success",
    BootsecretsError.exit_code: BootsecretsError.summary,
    130: "interrupted by SIGINT (Ctrl-C); nothing half-written is left",
}


def outcomes() -> list[type[BootsecretsError]]:
    """Every concrete outcome class (names starting with `_` are shared bases)."""
    found: list[type[BootsecretsError]] = []
    todo = list(BootsecretsError.__subclasses__())
    while todo:
        cls = todo.pop(0)
        if not cls.__name__.startswith("_"):
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def exit_codes() -> list[tuple[int, str]]:
    """(code, summary) for every exit code the CLI can produce, in order: the one source of
    the exit-code tables in `bootsecrets --help` and the README."""
    table = dict(_OTHER_CODES)
    for cls in outcomes():
        table[cls.exit_code] = cls.summary
    return sorted(table.items())
