"""Getting a Vault token: from the wrapped secret-id (checked, unwrapped once, AppRole
login) or from the token kept by an earlier run. The tamper outcomes alert loudly."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from bootsecrets import identity, logs
from bootsecrets.bootstrapfile import Bootstrap
from bootsecrets.context import Run
from bootsecrets.errors import (
    LoginDenied,
    NotProvisioned,
    ResponseLost,
    TokenInvalid,
    WrappingPathMismatch,
    WrappingTokenAlreadyUsed,
    WrappingTokenInvalid,
)

if TYPE_CHECKING:
    from bootsecrets.vault import Vault
    from bootsecrets.vaultanswers import TokenInfo

log = logging.getLogger(__name__)


def authenticate(
    run: Run, boot: Bootstrap | None, consumed: Callable[[], None]
) -> tuple[Vault, TokenInfo]:
    """Log in: with `boot`'s wrapped secret-id if given, else with the kept token. Sets (and
    returns) run.vault and run.token; sets run.address. `consumed` is called once the
    wrapped secret-id can no longer be used (the unwrap was sent), so the caller can drop
    its copy."""
    if boot is not None:
        vault = run.connect(boot.vault_addr or identity.load_identity(run.paths).vault_addr)
        token = _with_wrapped_secret_id(run, vault, boot, consumed)
        # The address that answered is kept, not the one asked for: after a VAULT_ADDR
        # override (or a failover), the next runs go where Vault was found.
        run.address = vault.answering_address
        identity.save_token(
            run.config.reboot_policy, run.paths, token.token, token.accessor, run.address
        )
        identity.save_identity(run.paths, identity.Identity(boot.role_id, run.address))
        run.token = token
        return vault, token
    kept = identity.load_token(run.config.reboot_policy, run.paths)
    if kept is None:
        err = NotProvisioned(
            "no bootstrap and no kept Vault token (reboot policy "
            f"{run.config.reboot_policy.value}): the units stay down"
        )
        logs.alert(err, ROLE=run.config.role)
        raise err
    run.address = kept.vault_addr
    vault = run.connect(run.address)
    vault.prepare_reads(run.config.requests_at_once())  # while the token is checked
    try:
        run.token = vault.use_token(kept.token)
    except TokenInvalid as err:
        identity.forget_token(run.paths)
        logs.alert(err, ROLE=run.config.role, TOKEN_ACCESSOR=kept.accessor)
        raise
    return vault, run.token


def _with_wrapped_secret_id(
    run: Run, vault: Vault, boot: Bootstrap, consumed: Callable[[], None]
) -> TokenInfo:
    """Validate the wrapping token, unwrap it once, log in."""
    config = run.config
    expected = config.wrapping_creation_path
    try:
        info = vault.lookup_wrapping(boot.wrapped_secret_id)
    except WrappingTokenInvalid as err:
        logs.alert(err, ROLE=config.role, EXPECTED_CREATION_PATH=expected)
        raise
    if info.creation_path != expected:
        mismatch = WrappingPathMismatch(
            f"the wrapped secret-id was created at {info.creation_path or '(none)'}, "
            f"not at {expected}"
        )
        logs.alert(
            mismatch,
            ROLE=config.role,
            CREATION_PATH=info.creation_path,
            EXPECTED_CREATION_PATH=expected,
        )
        raise mismatch
    log.info(
        "wrapped secret-id checked: created at %s with a TTL of %ss",
        info.creation_path,
        info.creation_ttl,
        extra={"CREATION_PATH": info.creation_path},
    )
    # Only TCP (and TLS) handshakes, nothing sent: they overlap the unwrap and login.
    vault.prepare_reads(config.requests_at_once())
    if run.ctx.after_lookup is not None:
        run.ctx.after_lookup()
    try:
        secret_id, accessor = vault.unwrap_secret_id(boot.wrapped_secret_id)
    except (WrappingTokenAlreadyUsed, ResponseLost) as err:
        consumed()
        logs.alert(err, ROLE=config.role, CREATION_PATH=info.creation_path)
        raise
    consumed()
    try:
        token = vault.login_approle(config.approle_mount, boot.role_id, secret_id)
    except LoginDenied as err:
        logs.alert(err, ROLE=config.role, SECRET_ID_ACCESSOR=accessor)
        raise
    finally:
        del secret_id
    log.info(
        "logged in with AppRole %s (token accessor %s, ttl %ss)",
        config.role,
        token.accessor,
        token.ttl,
        extra={"TOKEN_ACCESSOR": token.accessor},
    )
    return token


def renew_if_due(run: Run, vault: Vault, token: TokenInfo) -> None:
    """renew-self once the token is past half its TTL."""
    if token.renewable and token.creation_ttl and token.ttl < token.creation_ttl / 2:
        run.token = vault.renew_self()
        log.info(
            "renewed the Vault token (ttl %ss)",
            run.token.ttl,
            extra={"TOKEN_ACCESSOR": run.token.accessor},
        )
