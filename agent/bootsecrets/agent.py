"""The commands' flow: config -> Vault -> rendered generation -> systemd.

`bootstrap` runs at boot (bootsecrets.service); `refresh` applies rotated secrets on a live
host and restarts only the units whose bytes changed, rolling a unit back if it does not come
up with its new values; `status` reports without a single value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from bootsecrets import logs, userdata
from bootsecrets.config import (
    Bootstrap,
    Config,
    OnChange,
    RebootPolicy,
    Service,
    load_bootstrap,
    load_config,
    parse_bootstrap,
    parse_wrapped_secret_id,
)
from bootsecrets.connect import EarlyConnection
from bootsecrets.errors import (
    BootsecretsError,
    BootstrapError,
    LockBusy,
    LoginDenied,
    NotProvisioned,
    ResponseLost,
    TokenInvalid,
    UnitFailed,
    WrappingPathMismatch,
    WrappingTokenAlreadyUsed,
    WrappingTokenInvalid,
)
from bootsecrets.paths import Paths
from bootsecrets.render import RenderedUnit, SecretData, render_service
from bootsecrets.store import FileSpec, Store, resolve_owner, write_private
from bootsecrets.systemd import Runner, Systemctl, dropin_text, run, write_dropins

if TYPE_CHECKING:
    from bootsecrets.vault import TokenInfo, Vault

log = logging.getLogger(__name__)
STATE_VERSION = 1


def _new_vault(*args: Any, **kwargs: Any) -> Vault:
    # Loaded on first use: hvac, requests and urllib3 take ~90 ms of CPU to import, which a
    # TCP handshake with Vault (connect.EarlyConnection) can overlap; `status` never needs them.
    from bootsecrets.vault import Vault  # noqa: PLC0415

    return Vault(*args, **kwargs)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclasses.dataclass
class Context:
    """What a command needs from outside: where things are and how to reach systemd/Vault."""

    paths: Paths = dataclasses.field(default_factory=Paths)
    runner: Runner = run
    #: The systemctl program; a sandbox can point this at a stand-in.
    systemctl_program: str = "systemctl"
    env: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(os.environ))
    #: How long bootstrap/refresh wait for another run's lock before giving up.
    lock_wait: float = 60.0
    make_vault: Callable[..., Vault] = _new_vault
    #: Called between the wrapping lookup and the unwrap (tests produce a race there).
    after_lookup: Callable[[], None] | None = None
    #: Called between the login and the reads (tests fail a Vault node over there).
    after_login: Callable[[], None] | None = None

    def load(self) -> tuple[Config, Paths, Store]:
        config = load_config(self.paths.config, env=self.env)
        paths = self.paths.with_store(config.store)
        store = Store(paths)
        store.prepare(shared=_shared(config))
        return config, paths, store

    def systemctl(self) -> Systemctl:
        return Systemctl(self.runner, self.systemctl_program)

    def vault(self, config: Config, address: str | None = None) -> Vault:
        """A Vault session. A user-data address goes first; the image config's addresses stay
        as fallbacks (an environment override, applied by the config, replaces them all)."""
        addresses = None
        if address and not _env_address(self.env):
            addresses = (address, *(a for a in config.vault.addresses if a != address))
        first = (addresses or config.vault.addresses or ("",))[0]
        early = EarlyConnection(first, config.vault.request_timeout) if first else None
        try:
            return self.make_vault(config.vault, addresses=addresses,
                                   config_root=self.paths.root, early=early)
        except BaseException:
            if early is not None:
                early.close()
            raise


def _env_address(env: Mapping[str, str]) -> str | None:
    return env.get("VAULT_ADDR") or env.get("BAO_ADDR") or None


def _shared(config: Config) -> bool:
    """Whether some unit's files belong to a non-root user (store directories then 0751)."""
    return any(s.user not in ("root", "0") or s.group not in ("root", "0")
               for s in config.services)


# --- login --------------------------------------------------------------------------------


def login_with_wrapped_secret_id(
    config: Config, vault: Vault, boot: Bootstrap, ctx: Context, consumed: Callable[[], None],
) -> TokenInfo:
    """Validate the wrapping token, unwrap it once, log in. Tamper outcomes alert loudly.

    `consumed` is called once the wrapping token can no longer be used (after the unwrap
    was sent), so the caller can drop its copy.
    """
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
        logs.alert(mismatch, ROLE=config.role, CREATION_PATH=info.creation_path,
                   EXPECTED_CREATION_PATH=expected)
        raise mismatch
    log.info("wrapped secret-id checked: created at %s with a TTL of %ss", info.creation_path,
             info.creation_ttl, extra={"CREATION_PATH": info.creation_path})
    # Only TCP (and TLS) handshakes, nothing sent: they overlap the unwrap and login.
    vault.prepare_reads(len(config.used_secrets()))
    if ctx.after_lookup is not None:
        ctx.after_lookup()
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
    log.info("logged in with AppRole %s (token accessor %s, ttl %ss)", config.role,
             token.accessor, token.ttl, extra={"TOKEN_ACCESSOR": token.accessor})
    return token


def _token_path(config: Config, paths: Paths) -> Any:
    if config.reboot_policy is RebootPolicy.PERSIST_TOKEN:
        return paths.persistent_token
    return paths.runtime_token


def save_token(config: Config, paths: Paths, token: TokenInfo, address: str | None) -> None:
    """Keep the token where the reboot policy says: /var/lib (persist-token) or the store."""
    path = _token_path(config, paths)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    record = {"token": token.token, "accessor": token.accessor, "vault_addr": address}
    write_private(path, json.dumps(record).encode(), 0o600)
    other = paths.runtime_token if path != paths.runtime_token else paths.persistent_token
    other.unlink(missing_ok=True)


def load_token(config: Config, paths: Paths) -> dict[str, Any] | None:
    path = _token_path(config, paths)
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("ignoring an unreadable token file %s", path)
        return None
    return record if isinstance(record, dict) and isinstance(record.get("token"), str) else None


def forget_token(paths: Paths) -> None:
    paths.runtime_token.unlink(missing_ok=True)
    paths.persistent_token.unlink(missing_ok=True)


def save_identity(paths: Paths, role_id: str, address: str | None) -> None:
    paths.identity.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(paths.identity,
                  json.dumps({"role_id": role_id, "vault_addr": address}).encode(), 0o600)


def load_identity(paths: Paths) -> dict[str, Any]:
    try:
        data = json.loads(paths.identity.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --- reading and rendering ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A full render: per unit files, what was read, and the optional units left out."""

    units: dict[str, RenderedUnit]
    secrets: dict[str, SecretData]
    skipped: dict[str, str]


def read_and_render(config: Config, vault: Vault) -> Rendered:
    """Read every used secret once and render every unit; pure after the reads.

    A required unit whose secrets cannot be read or rendered fails the whole run (nothing
    has been written yet). An optional unit is left out with a warning.
    """
    results = vault.read_all(config.used_secrets())
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
            log.warning("optional unit %s left out: %s", service.unit, err,
                        extra={"UNIT": service.unit})
    for data in secrets.values():
        log.info("read %s%s", data.path, f" version {data.version}" if data.version else "",
                 extra={"SECRET_PATH": data.path, "SECRET_VERSION": data.version or ""})
    return Rendered(units, secrets, skipped)


def _specs(config: Config) -> dict[str, FileSpec]:
    return {
        s.unit: FileSpec(*resolve_owner(s.user, s.group), s.mode) for s in config.services
    }


def _dropins(config: Config, paths: Paths, units: Iterable[str]) -> dict[str, str]:
    wanted = set(units)
    return {
        s.unit: dropin_text(s.unit, paths, env_file=s.uses_environment,
                            credentials=[t.name for t in s.credentials])
        for s in config.services if s.unit in wanted
    }


# --- state ----------------------------------------------------------------------------------


def _unit_state(
    service: Service, rendered: Rendered, generation: int, previous: Mapping[str, Any] | None,
    *, changed: bool, restarted: bool,
) -> dict[str, Any]:
    prev = previous or {}
    return {
        "generation": generation,
        "values_generation": generation if changed or not prev
        else prev.get("values_generation", generation),
        "restarted_generation": generation if restarted or not prev
        else prev.get("restarted_generation", generation),
        "delivery": [d for d, on in (("environment", service.uses_environment),
                                     ("credentials", bool(service.credentials))) if on],
        "on_change": service.on_change.value,
        "secrets": [
            {"name": rendered.secrets[name].name, "path": rendered.secrets[name].path,
             "version": rendered.secrets[name].version,
             "lease_duration": rendered.secrets[name].lease_duration, "fetched_at": _now()}
            for name in sorted(service.secrets) if name in rendered.secrets
        ],
    }


def _record(
    store: Store, config: Config, *, command: str, outcome: str, error: BaseException | None,
    exit_code: int, generation: int | None, units: Mapping[str, Any] | None,
    token: TokenInfo | None, vault_addr: str | None, skipped: Mapping[str, str] | None = None,
) -> None:
    state = store.load_state()
    state["version"] = STATE_VERSION
    state["reboot_policy"] = config.reboot_policy.value
    state["last_run"] = {"command": command, "at": _now(), "outcome": outcome,
                         "exit_code": exit_code, "error": str(error) if error else None}
    if outcome == "ok":
        state["last_success"] = state["last_run"]
    if generation is not None:
        state["generation"] = generation
    if units is not None:
        state["units"] = dict(units)
    if skipped is not None:
        state["skipped"] = dict(skipped)
    if token is not None:
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=token.ttl)
        state["token"] = {"accessor": token.accessor, "ttl": token.ttl,
                          "renewable": token.renewable, "checked_at": _now(),
                          "expires_at": expires.isoformat(timespec="seconds") if token.ttl
                          else None}
    if vault_addr is not None:
        state["vault_addr"] = vault_addr
    store.save_state(state)


@contextlib.contextmanager
def _failures_recorded(store: Store, config: Config, command: str) -> Iterator[None]:
    """Note a failed run in the state file, for status. A rollback records its own, fuller
    outcome; a run that never got the lock has nothing of its own to record."""
    try:
        yield
    except (UnitFailed, LockBusy):
        raise
    except BootsecretsError as err:
        with contextlib.suppress(OSError):  # the original error matters more
            _record(store, config, command=command, outcome="error", error=err,
                    exit_code=err.exit_code, generation=None, units=None, token=None,
                    vault_addr=None)
        raise


# --- bootstrap --------------------------------------------------------------------------------


def _authenticate(
    ctx: Context, config: Config, paths: Paths, boot: Bootstrap | None,
    consumed: Callable[[], None],
) -> tuple[Vault, TokenInfo, str | None]:
    """A logged-in Vault session, from a wrapped secret-id if given, else the kept token."""
    if boot is not None:
        identity = load_identity(paths)
        address = boot.vault_addr or identity.get("vault_addr")
        vault = ctx.vault(config, address)
        with _closed_on_error(vault):
            token = login_with_wrapped_secret_id(config, vault, boot, ctx, consumed)
            save_token(config, paths, token, address)
            save_identity(paths, boot.role_id, address)
        return vault, token, address
    record = load_token(config, paths)
    if record is None:
        err = NotProvisioned(
            "no bootstrap and no kept Vault token (reboot policy "
            f"{config.reboot_policy.value}): the units stay down"
        )
        logs.alert(err, ROLE=config.role)
        raise err
    address = record.get("vault_addr") if isinstance(record.get("vault_addr"), str) else None
    vault = ctx.vault(config, address)
    with _closed_on_error(vault):
        vault.prepare_reads(len(config.used_secrets()))  # while the token is checked
        try:
            token = vault.use_token(record["token"])
        except TokenInvalid as err:
            forget_token(paths)
            logs.alert(err, ROLE=config.role, TOKEN_ACCESSOR=str(record.get("accessor", "")))
            raise
    return vault, token, address


@contextlib.contextmanager
def _closed_on_error(vault: Vault) -> Iterator[None]:
    try:
        yield
    except BaseException:
        vault.close()
        raise


def bootstrap(ctx: Context) -> None:
    """First boot (or a reboot under persist-token): log in, render, start the units."""
    config, paths, store = ctx.load()
    with _failures_recorded(store, config, "bootstrap"), store.lock(ctx.lock_wait):
        boot = load_bootstrap(paths.bootstrap) if paths.bootstrap.exists() else None
        spent = False

        def consumed() -> None:
            nonlocal spent
            spent = True
            paths.bootstrap.unlink(missing_ok=True)
            if boot is not None:  # cloud-init's copies of the user-data on disk
                userdata.scrub_and_log(boot.wrapped_secret_id, paths.root, unwrapped=True)

        try:
            vault, token, address = _authenticate(ctx, config, paths, boot, consumed)
        except BaseException:
            if boot is not None and not spent:  # still live: the store's copy stays for a retry
                userdata.scrub_and_log(boot.wrapped_secret_id, paths.root, unwrapped=False)
            raise
        if ctx.after_login is not None:
            ctx.after_login()
        with vault:
            rendered = read_and_render(config, vault)
        _deploy_fresh(ctx, config, paths, store, rendered, token, address, command="bootstrap")


def _deploy_fresh(
    ctx: Context, config: Config, paths: Paths, store: Store, rendered: Rendered,
    token: TokenInfo, address: str | None, *, command: str,
) -> None:
    """Write a generation holding every unit, switch to it, start every unit."""
    previous = store.load_state().get("units") or {}
    number = store.write_generation(rendered.units, _specs(config), shared=_shared(config))
    store.switch(number)
    store.remove_generations(keep=frozenset({number}))
    systemctl = ctx.systemctl()
    write_dropins(paths, _dropins(config, paths, rendered.units))
    systemctl.daemon_reload()
    systemctl.start_no_block(list(rendered.units))
    units = {
        s.unit: _unit_state(s, rendered, number, previous.get(s.unit), changed=True,
                            restarted=True)
        for s in config.services if s.unit in rendered.units
    }
    _record(store, config, command=command, outcome="ok", error=None, exit_code=0,
            generation=number, units=units, token=token, vault_addr=address,
            skipped=rendered.skipped)
    log.info("generation %s live; started %s", number, ", ".join(rendered.units) or "nothing")


# --- refresh ------------------------------------------------------------------------------------


def _wrapped_from_stdin(text: str, paths: Paths) -> Bootstrap:
    """`refresh --wrapped-secret-id -`: a bare wrapped token (role-id and address from the
    last bootstrap) or a whole bootstrap document."""
    stripped = text.strip()
    if stripped.startswith(("role_id", "wrapped_secret_id", "vault_addr", "{", "---")):
        return parse_bootstrap(stripped.encode())
    wrapped = parse_wrapped_secret_id(text)
    identity = load_identity(paths)
    role_id = identity.get("role_id")
    if not isinstance(role_id, str):
        raise BootstrapError(
            "<stdin>", None, "role_id",
            "no role-id is known on this host; pipe a whole bootstrap document "
            "(role_id, wrapped_secret_id, vault_addr) instead of a bare token")
    address = identity.get("vault_addr")
    return Bootstrap(role_id, wrapped, address if isinstance(address, str) else None)


def _renew_if_due(vault: Vault, token: TokenInfo) -> TokenInfo:
    """renew-self once the token is past half its TTL."""
    if token.renewable and token.creation_ttl and token.ttl < token.creation_ttl / 2:
        renewed = vault.renew_self()
        log.info("renewed the Vault token (ttl %ss)", renewed.ttl,
                 extra={"TOKEN_ACCESSOR": renewed.accessor})
        return renewed
    return token


def refresh(ctx: Context, *, wrapped_secret_id: str | None = None) -> None:
    config, paths, store = ctx.load()
    with _failures_recorded(store, config, "refresh"), store.lock(ctx.lock_wait):
        boot = _wrapped_from_stdin(wrapped_secret_id, paths) if wrapped_secret_id else None
        vault, token, address = _authenticate(ctx, config, paths, boot, lambda: None)
        with vault:
            if boot is None:
                token = _renew_if_due(vault, token)
            rendered = read_and_render(config, vault)
        previous = store.current_generation()
        if previous is None:  # after a reboot: nothing is running with secrets yet
            _deploy_fresh(ctx, config, paths, store, rendered, token, address, command="refresh")
            return
        _apply_changes(ctx, config, paths, store, rendered, token, address, previous)


def _apply_changes(
    ctx: Context, config: Config, paths: Paths, store: Store, rendered: Rendered,
    token: TokenInfo, address: str | None, previous: int,
) -> None:
    state_units = store.load_state().get("units") or {}
    # What each unit runs with now, read once; (None, {}) for a unit new to this host.
    live = {u: store.read_unit(previous, u) for u in (*rendered.units, *rendered.skipped)}
    changed = [u for u, out in rendered.units.items()
               if live[u] != (out.env_file, dict(out.credentials))]
    # An optional unit that could not be rendered this time keeps the values it runs with.
    kept = {u: previous for u in rendered.skipped if live[u] != (None, {})}
    kept_state = {u: state_units[u] for u in kept if u in state_units}
    systemctl = ctx.systemctl()
    dropins_changed = write_dropins(paths, _dropins(config, paths, rendered.units))
    if dropins_changed:
        systemctl.daemon_reload()
    if not changed:
        units = {
            s.unit: _unit_state(s, rendered, previous, state_units.get(s.unit), changed=False,
                                restarted=False)
            for s in config.services if s.unit in rendered.units
        }
        _record(store, config, command="refresh", outcome="ok", error=None, exit_code=0,
                generation=previous, units={**kept_state, **units}, token=token,
                vault_addr=address, skipped=rendered.skipped)
        log.info("refresh: nothing changed")
        return
    unchanged = {u: previous for u in rendered.units if u not in changed} | kept
    number = store.write_generation(
        {u: rendered.units[u] for u in changed}, _specs(config), linked=unchanged,
        shared=_shared(config))
    store.switch(number)
    log.info("refresh: generation %s live; changed: %s", number, ", ".join(changed))
    restarted: list[str] = []
    for unit in changed:
        service = config.service(unit)
        if live[unit] == (None, {}):
            systemctl.start_no_block([unit])  # a unit new to this host: start, not restart
        elif service.on_change is OnChange.NONE:
            continue
        else:
            systemctl.try_restart(unit, reload=service.on_change is OnChange.RELOAD)
        restarted.append(unit)
    failed = [u for u in restarted
              if systemctl.wait_active(u, config.restart_timeout) != "active"]
    units = kept_state | {
        s.unit: _unit_state(s, rendered, number, state_units.get(s.unit),
                            changed=s.unit in changed, restarted=s.unit in restarted)
        for s in config.services if s.unit in rendered.units
    }
    if not failed:
        store.remove_generations(keep=frozenset({number}))
        _record(store, config, command="refresh", outcome="ok", error=None, exit_code=0,
                generation=number, units=units, token=token, vault_addr=address,
                skipped=rendered.skipped)
        return
    rollback = store.write_generation(
        {}, {}, linked={u: previous if u in failed else number
                        for u in (*rendered.units, *kept)},
        shared=_shared(config))
    store.switch(rollback)
    for unit in failed:
        systemctl.try_restart(unit)
        units[unit] = dict(state_units.get(unit) or units[unit], generation=rollback)
    for unit, state in units.items():
        if unit not in failed:
            state["generation"] = rollback
    store.remove_generations(keep=frozenset({rollback}))
    paths_changed = sorted({p for u in failed for p in rendered.units[u].secret_paths})
    err = UnitFailed(
        f"{', '.join(failed)} did not become active with new values from "
        f"{', '.join(paths_changed) or 'the config'}; previous values restored"
    )
    logs.alert(err, UNIT=",".join(failed), SECRET_PATH=",".join(paths_changed))
    _record(store, config, command="refresh", outcome="rolled-back", error=err,
            exit_code=err.exit_code, generation=rollback, units=units, token=token,
            vault_addr=address, skipped=rendered.skipped)
    raise err
