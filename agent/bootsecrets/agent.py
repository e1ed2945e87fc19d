"""The commands' flow: config -> Vault -> rendered generation -> systemd.

`bootstrap` runs at boot (bootsecrets.service); `refresh` applies rotated secrets on a live
host and restarts only the units whose bytes changed (and any restart an interrupted run left
due), rolling a unit back if it does not come up with its new values; `revoke_leases` revokes
every lease the agent holds. Each step is a module: context (checks, store, lock), login,
features (data at rest and leased secrets, loaded only for a config that uses them), render,
deploy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from bootsecrets import features, identity, userdata
from bootsecrets.bootstrapfile import (
    Bootstrap,
    load_bootstrap,
    parse_bootstrap,
    parse_wrapped_secret_id,
)
from bootsecrets.config import Config
from bootsecrets.context import Context, Run
from bootsecrets.deploy import deploy
from bootsecrets.errors import BootsecretsError, BootstrapError
from bootsecrets.login import authenticate, renew_if_due
from bootsecrets.model import Rendered, RenderedUnit, SecretData
from bootsecrets.render import render_service

if TYPE_CHECKING:
    from bootsecrets.vault import Vault

log = logging.getLogger(__name__)

__all__ = ["Context", "bootstrap", "read_and_render", "refresh", "revoke_leases"]


def bootstrap(ctx: Context) -> None:
    """First boot (or a reboot under persist-token): log in, unlock the encrypted data,
    issue or take up leased secrets, render, start the units."""
    with Run.open(ctx, "bootstrap") as run, features.scheduled(run):
        bootstrap_file = run.paths.bootstrap
        boot = load_bootstrap(bootstrap_file) if os.path.lexists(bootstrap_file) else None
        spent = False

        def consumed() -> None:
            nonlocal spent
            spent = True
            run.store.remove_bootstrap()

        try:
            data = _check_data(run)
            vault, _ = authenticate(run, boot, consumed)
        finally:
            # cloud-init's copies on disk: spent or not (a failure before the unwrap leaves
            # it live, and the copy in the store stays for a retry), it is not left there.
            current = boot.wrapped_secret_id if boot is not None else None
            if current is not None:
                userdata.scrub_and_log(current, run.paths.root, unwrapped=spent)
            # cloud-init writes the user-data again at every later boot, spent token included.
            userdata.scrub_earlier(run.paths.root, current)
        if ctx.after_login is not None:
            ctx.after_login()
        _render_and_deploy(run, vault, data, at_boot=True)


def refresh(ctx: Context, *, wrapped_secret_id: str | None = None) -> None:
    """Re-read the secrets; switch and restart only what changed; renew or re-issue leased
    secrets that are due; rewrap the data keys whose Transit key moved. With a wrapped
    secret-id (read from standard input by the CLI), re-provision first."""
    with Run.open(ctx, "refresh") as run, features.scheduled(run):
        data = _check_data(run)
        boot = _wrapped_from_stdin(wrapped_secret_id, run) if wrapped_secret_id else None
        vault, token = authenticate(run, boot, lambda: None)
        if boot is None:
            renew_if_due(run, vault, token)
        _render_and_deploy(run, vault, data, at_boot=False)


def _check_data(run: Run) -> features.DataAtRest:
    """The encrypted directories and volumes, checked before anything is spent."""
    return features.DataAtRest.check(run)


def _render_and_deploy(run: Run, vault: Vault, data: features.DataAtRest, *, at_boot: bool) -> None:
    """Unlock the data while the secrets are read (leased ones issued or taken up), then
    start (or restart) what can run: the units needing a directory that stays locked, or a
    volume that is not mounted, are held back, and the run ends with that exit code once
    the leases are settled."""
    with features.leases(run, vault, at_boot=at_boot) as leases:
        with data.unlocking(vault):
            rendered = read_and_render(run.config, vault, leases.prepare())
        if not at_boot:
            data.rewrap(vault)
        if not leases.active:
            vault.close()
        reload = data.settle()
        deploy(
            run,
            data.hold_back(rendered),
            at_boot=at_boot,
            reload=reload,
            together=leases.together(),
        )
    data.raise_failures()


def revoke_leases(ctx: Context) -> None:
    """Revoke every lease the agent holds (for decommission; docs/leases.md)."""
    with Run.open(ctx, "revoke-leases") as run:
        vault, _ = authenticate(run, None, lambda: None)
        from bootsecrets import leaserevoke  # noqa: PLC0415 (lease code only when asked for)

        leaserevoke.revoke_all(run, vault)
        run.record(run.load_state())


def read_and_render(
    config: Config,
    vault: Vault,
    leased: Mapping[str, SecretData | BootsecretsError] | None = None,
) -> Rendered:
    """Read every used secret once (leased ones come as `leased`, never read) and render
    every unit; pure after the reads.

    A required unit whose secrets cannot be read or rendered fails the whole run (nothing
    has been written yet). An optional unit is left out with a warning.
    """
    results = {
        **vault.read_all([r for r in config.used_secrets() if not r.leased]),
        **(leased or {}),
    }
    secrets = {name: r for name, r in results.items() if isinstance(r, SecretData)}
    units: dict[str, RenderedUnit] = {}
    skipped: dict[str, str] = {}
    for service in config.services:
        try:
            for name in sorted(service.secrets):
                result = results[name]
                if isinstance(result, BootsecretsError):
                    raise result
            units[service.unit] = render_service(service, secrets)
        except BootsecretsError as err:
            if service.required:
                raise
            skipped[service.unit] = str(err)
            log.warning(
                "optional unit %s left out: %s", service.unit, err, extra={"UNIT": service.unit}
            )
    for data in (d for n, d in secrets.items() if not config.secrets[n].leased):
        log.info(
            "read %s%s",
            data.path,
            f" version {data.version}" if data.version else "",
            extra={"SECRET_PATH": data.path, "SECRET_VERSION": data.version or ""},
        )
    return Rendered(units, secrets, skipped)


def _wrapped_from_stdin(text: str, run: Run) -> Bootstrap:
    """`refresh --wrapped-secret-id -`: a bare wrapped token (role-id and address from the
    last bootstrap) or a whole bootstrap document."""
    stripped = text.strip()
    if stripped.startswith(("role_id", "wrapped_secret_id", "vault_addr", "{", "---")):
        return parse_bootstrap(stripped.encode())
    wrapped = parse_wrapped_secret_id(text)
    known = identity.load_identity(run.paths)
    if known.role_id is None:
        raise BootstrapError(
            "<stdin>",
            None,
            "role_id",
            "no role-id is known on this host; pipe a whole bootstrap document "
            "(role_id, wrapped_secret_id, vault_addr) instead of a bare token",
        )
    return Bootstrap(known.role_id, wrapped, known.vault_addr)
