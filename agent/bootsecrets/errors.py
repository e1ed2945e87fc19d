"""The one error hierarchy and its exit codes.

Every outcome the agent can end with is a subclass of `BootsecretsError` with its own
`exit_code`; `cli.main` maps them, nothing else does. Messages are built from names (file,
field path, unit, variable, secret path, key) and never from a value, a token or a
secret-id: the constructors take no value argument, so one cannot slip in.

`message_id` is a stable journal MESSAGE_ID for outcomes an operator alerts on.
"""

from __future__ import annotations

from typing import ClassVar


class BootsecretsError(Exception):
    """Root of every expected failure. `str(err)` is the one line shown to the operator."""

    exit_code: ClassVar[int] = 1
    #: What the operator should do, appended to the message on the CLI.
    hint: ClassVar[str] = ""
    message_id: ClassVar[str | None] = None


# --- input ---------------------------------------------------------------------------


class ConfigError(BootsecretsError):
    """The image config (or another input file) is invalid: names file, line and field."""

    exit_code = 10
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
    hint = (
        "check the droplet's user-data: it must write the bootstrap file with role_id and "
        "wrapped_secret_id (see cloud-init/README.md)"
    )


class UsageError(BootsecretsError):
    exit_code = 2


# --- local state -----------------------------------------------------------------------


class StoreError(BootsecretsError):
    """The memory-only store cannot be used (disk-backed, wrong owner, unwritable)."""

    exit_code = 12
    hint = "mount a tmpfs (or ramfs) at the store path; see systemd/run-bootsecrets.mount"


class _UnitVariableError(BootsecretsError):
    """A problem with one variable (or credential) of one unit."""

    def __init__(self, unit: str, variable: str, problem: str) -> None:
        self.unit = unit
        self.variable = variable
        super().__init__(f"unit {unit}, variable {variable}: {problem}")


class RenderError(_UnitVariableError):
    """A template could not be rendered for a unit."""

    exit_code = 13
    hint = "fix the template in the image config"


class EncodeError(_UnitVariableError):
    """A rendered value cannot be represented in the target file format."""

    exit_code = 14
    hint = "the secret value must be valid UTF-8 without NUL and at most 128 KiB"


class LockBusy(BootsecretsError):
    exit_code = 15
    hint = "another bootsecrets run holds the lock; wait for it or retry later"


# --- Vault -----------------------------------------------------------------------------


class VaultError(BootsecretsError):
    """Vault answered something unexpected (status and Vault's own error text)."""

    exit_code = 20
    hint = "check the Vault server logs"


class VaultUnreachable(VaultError):
    exit_code = 21
    hint = "check the network path and the Vault address; the units stay down until it answers"


class TLSVerifyFailed(VaultError):
    """Vault's TLS certificate does not verify against the configured CA bundle."""

    exit_code = 33
    message_id = "f4bbaf765f4045f0acd56de2cb09f317"
    hint = (
        "the server's certificate is not signed by a CA in vault.ca_cert (or VAULT_CACERT), "
        "or does not name the address: fix the CA bundle in the image, or find out who "
        "answers at that address; the units stay down"
    )


class WrappingTokenInvalid(VaultError):
    """sys/wrapping/lookup does not know the token: unknown, expired or already unwrapped."""

    exit_code = 22
    message_id = "5f0d8e7cd2a54c3a9a6f1b1e2c7a9d01"
    hint = (
        "the wrapped secret-id is unknown, expired or was already used. If the droplet booted "
        "later than wrapping_ttl after it was minted, mint a new one; otherwise treat it as "
        "possible interception: revoke the role's secret-ids and investigate"
    )


class WrappingPathMismatch(VaultError):
    """The wrapping token was not created by auth/approle/role/<role>/secret-id: tampering."""

    exit_code = 23
    message_id = "8c3b1d7a9e2f4b6c8d0e1f2a3b4c5d02"
    hint = (
        "the wrapping token was not minted for this role's secret-id: possible tampering. "
        "Do not reuse it; investigate who produced the user-data"
    )


class WrappingTokenAlreadyUsed(VaultError):
    """Lookup succeeded, then unwrap was refused: someone unwrapped it in between."""

    exit_code = 24
    message_id = "2e9a4c6b8d1f4e3a9b7c5d3e1f0a2b03"
    hint = (
        "the wrapped secret-id was unwrapped by someone else: possible interception. Revoke "
        "the role's secret-ids and tokens, then re-provision with a new wrapped secret-id"
    )


class ResponseLost(VaultError):
    """A request that consumes something (unwrap, single-use login) was sent, and its answer
    was lost. Sending it again could not succeed and would hide what happened."""

    exit_code = 32
    message_id = "6e8a0c2e4a6c4e8a0c2e4a6c8e0a2c08"
    hint = (
        "the wrapped secret-id (or the secret-id) may have been consumed by that request: "
        "re-provision with a new wrapped secret-id"
    )

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        super().__init__(f"{what} was sent but its answer was lost ({reason}); not repeated")


class LoginDenied(VaultError):
    exit_code = 25
    message_id = "7a1c3e5f7b9d4f2e8c6a4b2d0f1e3c04"
    hint = "check the role-id in user-data and the AppRole's bound CIDRs and secret-id limits"


class PermissionDenied(VaultError):
    exit_code = 26
    hint = "grant the role's policy read access to the path"

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"permission denied reading {path}")


class SecretMissing(VaultError):
    exit_code = 27
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
    message_id = "4b6d8f0a2c4e4a6b8d0f2a4c6e8a0b05"
    hint = (
        "re-provision: pipe a new wrapped secret-id into "
        "`bootsecrets refresh --wrapped-secret-id -`"
    )


class NotProvisioned(BootsecretsError):
    """No bootstrap, no usable token: the units stay down until re-provisioned."""

    exit_code = 29
    message_id = "9d1f3b5a7c9e4b1d3f5a7c9e1b3d5f06"
    hint = (
        "re-provision: pipe a new wrapped secret-id into "
        "`bootsecrets refresh --wrapped-secret-id -`"
    )


# --- systemd ---------------------------------------------------------------------------


class CommandFailed(BootsecretsError):
    """A subprocess (systemctl) failed. Its argv never holds a secret, so it is shown."""

    exit_code = 30
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
    message_id = "1c3e5a7b9d2f4c6e8a0b2d4f6a8c0e07"
    hint = "the unit runs with its previous values again; check the new secret values in Vault"


# --- image-check -------------------------------------------------------------------------


class ImageCheckFindings(BootsecretsError):
    exit_code = 40
    hint = "remove what was found from the image before snapshotting it"


class ImageCheckUnreadable(BootsecretsError):
    exit_code = 41
    hint = "run image-check as root on a mounted image tree"
