"""The root exception and the outcomes of the core: input, local state, Vault, systemd,
image-check, the process. Messages are built from names (file, field path, unit, variable,
secret path, key) and never from a value, a token or a secret-id: the constructors take no
value argument, so one cannot slip in.
"""

from __future__ import annotations

import re
from typing import ClassVar

#: C0 and C1 controls, DEL, and the Unicode line/paragraph separators and bidi controls: a
#: name carrying one could start a forged line (or reorder one) on a terminal or in a log.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


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


class TLSVerifyFailed(VaultError):
    """Vault's TLS certificate does not verify against the configured CA bundle."""

    exit_code = 33
    summary = "Vault's TLS certificate does not verify against the configured CA bundle (alert)"
    message_id = "f4bbaf765f4045f0acd56de2cb09f317"
    hint = (
        "the server's certificate is not signed by a CA in vault.ca_cert (or VAULT_CACERT), "
        "or does not name the address: fix the CA bundle in the image, or find out who "
        "answers at that address; the units stay down"
    )


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


# --- image-check -------------------------------------------------------------------------


class ImageCheckFindings(BootsecretsError):
    exit_code = 40
    summary = "image-check found something"
    hint = "remove what was found from the image before snapshotting it"


class ImageCheckUnreadable(BootsecretsError):
    exit_code = 41
    summary = "image tree unreadable"
    hint = "run image-check as root on a mounted image tree"


# --- the process ---------------------------------------------------------------------------


class Interrupted(BootsecretsError):
    """SIGTERM: raised inside whatever runs, so that its cleanup (temporary generation,
    lock) runs before the process ends."""

    exit_code = 143
    summary = "interrupted by SIGTERM; nothing half-written is left"
    hint = "nothing half-written was left behind; run the command again"
