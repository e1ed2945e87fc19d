"""The one error hierarchy and its exit codes.

Every outcome the agent can end with is a subclass of `BootsecretsError` with its own
`exit_code`; `cli.main` maps them, nothing else does. Messages are built from names (file,
field path, unit, variable, secret path, key) and never from a value, a token or a
secret-id: the constructors take no value argument, so one cannot slip in.

`message_id` is a stable journal MESSAGE_ID for outcomes an operator alerts on. The
classes live in `base` (the core), `atrest` (data at rest) and `leases`; this module
re-exports them all and holds the one exit-code table.
"""

from __future__ import annotations

from bootsecrets.errors.atrest import (
    DataKeyRejected,
    DataLocked,
    DataNotEmpty,
    DecommissionIncomplete,
    EncryptionUnsupported,
    KeyMismatch,
    KeyRecordInvalid,
    TransitKeyMissing,
    VolumeBlank,
    VolumeFailed,
    VolumeMismatch,
    VolumeMissing,
    VolumeNotBlank,
    VolumeTokenInvalid,
)
from bootsecrets.errors.base import (
    BootsecretsError,
    BootstrapError,
    CommandFailed,
    ConfigError,
    EncodeError,
    ImageCheckFindings,
    ImageCheckUnreadable,
    Interrupted,
    LockBusy,
    LoginDenied,
    NotProvisioned,
    PermissionDenied,
    RenderError,
    ResponseLost,
    SecretMissing,
    StoreError,
    TLSVerifyFailed,
    TokenInvalid,
    UnitFailed,
    UsageError,
    VaultError,
    VaultUnreachable,
    WrappingPathMismatch,
    WrappingTokenAlreadyUsed,
    WrappingTokenInvalid,
    printable,
)
from bootsecrets.errors.leases import (
    CertificateRefused,
    LeaseExpired,
    LeaseIssueFailed,
    LeaseRenewalRefused,
    LeaseRevokeFailed,
)

__all__ = [
    "BootsecretsError",
    "BootstrapError",
    "CertificateRefused",
    "CommandFailed",
    "ConfigError",
    "DataKeyRejected",
    "DataLocked",
    "DataNotEmpty",
    "DecommissionIncomplete",
    "EncodeError",
    "EncryptionUnsupported",
    "ImageCheckFindings",
    "ImageCheckUnreadable",
    "Interrupted",
    "KeyMismatch",
    "KeyRecordInvalid",
    "LeaseExpired",
    "LeaseIssueFailed",
    "LeaseRenewalRefused",
    "LeaseRevokeFailed",
    "LockBusy",
    "LoginDenied",
    "NotProvisioned",
    "PermissionDenied",
    "RenderError",
    "ResponseLost",
    "SecretMissing",
    "StoreError",
    "TLSVerifyFailed",
    "TokenInvalid",
    "TransitKeyMissing",
    "UnitFailed",
    "UsageError",
    "VaultError",
    "VaultUnreachable",
    "VolumeBlank",
    "VolumeFailed",
    "VolumeMismatch",
    "VolumeMissing",
    "VolumeNotBlank",
    "VolumeTokenInvalid",
    "WrappingPathMismatch",
    "WrappingTokenAlreadyUsed",
    "WrappingTokenInvalid",
    "exit_codes",
    "outcomes",
    "printable",
]

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
