"""`bootsecrets decommission`: the host's side of crypto-shredding.

Nine steps, in order, each idempotent; a step that fails does not stop the next, and each
says what it did:

1. `stop-units`: stop every unit that gets secrets (`systemctl stop`), the refresh timer and
   the agent's own wake-up timer, so nothing renews or re-issues behind it;
2. `revoke-leases`: revoke every lease kept in the store (database credentials),
   synchronously — each role is dropped when Vault answers; revoking the token (the last
   step) would revoke them too, but in the background;
3. `unmount-volumes`, `close-volumes`, `erase-volumes`: the encrypted volumes unmounted,
   closed and their LUKS2 keyslots and tokens erased (voldecommission);
4. `lock-keys`: remove each encrypted directory's key from the kernel (all users' claims),
   naming the processes that still hold files open in it (those files stay readable until
   closed: stop them and run it again);
5. `remove-key-records`: delete the stored ciphertexts (/var/lib/bootsecrets/keys);
6. `remove-store`: delete the rendered store (generations, state, unlock markers, leases,
   bootstrap) and the runtime drop-ins;
7. `revoke-token`: `auth/token/revoke-self` with the kept token (its leases and child tokens
   go with it), then delete the token and identity files. A token that is already invalid
   counts as revoked; a revocation that fails keeps the token file, so running decommission
   again retries it, and prints the accessor to revoke it by hand.

After it, the host holds nothing that unlocks its data, and the data itself needs the Transit
key, which the operator deletes in Vault (docs/operations.md: crypto-shred).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from bootsecrets import (
    blockdev,
    fscrypt,
    fscrypt_types,
    fsio,
    identity,
    keyrecord,
    leaserevoke,
    leasestore,
    voldecommission,
)
from bootsecrets.config import Config, RebootPolicy
from bootsecrets.context import Context
from bootsecrets.encdirs import DROPIN_NAME as ENCRYPTED_DROPIN
from bootsecrets.errors import (
    BootsecretsError,
    ConfigError,
    DecommissionIncomplete,
    PermissionDenied,
    TokenInvalid,
)
from bootsecrets.paths import DEFAULT_STORE, DROPIN_NAME, Paths
from bootsecrets.state import State
from bootsecrets.store import Store
from bootsecrets.vaultconfig import VaultSettings, env_address

if TYPE_CHECKING:
    from bootsecrets.vault import Vault

log = logging.getLogger(__name__)

DECOMMISSION_VERSION = 1
#: Seconds to keep trying Vault for the revocation (not the boot deadline: a host being
#: decommissioned should not wait minutes for a Vault that is gone).
REVOKE_DEADLINE = 20.0
#: Stopped with the units: nothing may refresh, renew or re-issue behind decommission.
TIMERS = ("bootsecrets-refresh.timer", "bootsecrets-wakeup.timer")


@dataclasses.dataclass(frozen=True)
class Step:
    step: str
    outcome: str  # done | nothing-to-do | failed
    detail: str


@dataclasses.dataclass(frozen=True)
class _Target:
    """What there is to decommission, from the config (or, without one, the state)."""

    config: Config | None
    paths: Paths
    units: tuple[str, ...]
    directories: tuple[tuple[str, str], ...]  # (name, host path)
    volumes: tuple[voldecommission.Target, ...] = ()


def decommission(ctx: Context, *, wait: float) -> list[Step]:
    target = _target(ctx)
    store = Store(target.paths)
    exists = target.paths.store.is_dir() and not target.paths.store.is_symlink()
    with store.lock(wait) if exists else contextlib.nullcontext():
        kept = _kept_token(target)
        steps: list[Step] = [
            _guarded("stop-units", lambda: _stop_units(target, ctx)),
            _guarded("revoke-leases", lambda: _revoke_leases(target, ctx, kept)),
            *_volume_steps(target, ctx),
            _guarded("lock-keys", lambda: _lock_keys(target)),
            _guarded("remove-key-records", lambda: _remove_records(target)),
            _guarded("remove-store", lambda: _remove_store(target, ctx)),
            _guarded("revoke-token", lambda: _revoke(target, ctx, kept)),
        ]
    for step in steps:
        log.info(
            "decommission: %s: %s: %s",
            step.step,
            step.outcome,
            step.detail,
            extra={"DECOMMISSION_STEP": step.step, "OUTCOME": step.outcome},
        )
    return steps


def check(steps: list[Step]) -> None:
    failed = [s.step for s in steps if s.outcome == "failed"]
    if failed:
        raise DecommissionIncomplete(f"decommission: {', '.join(failed)} failed")


def _guarded(name: str, step: Callable[[], Step]) -> Step:
    """Run one step; whatever it raises is its failure, and the next step runs."""
    try:
        return step()
    except BootsecretsError as err:
        return Step(name, "failed", str(err))
    except OSError as err:
        return Step(name, "failed", f"{err.strerror} ({type(err).__name__})")


def _target(ctx: Context) -> _Target:
    try:
        config: Config | None = ctx.load_config()
    except ConfigError as err:
        log.warning(
            "decommission without the image config (%s): units from the state file, "
            "directories from the key records",
            err,
        )
        config = None
    paths = ctx.paths.with_store(config.store if config else DEFAULT_STORE)
    directories = {d.name: str(d.path) for d in config.directories} if config else {}
    for name in keyrecord.names(paths):
        try:
            record = keyrecord.load(paths, name)
        except BootsecretsError:
            continue
        if record is not None and record.kind == "directory":
            directories.setdefault(name, record.path)
    if config is not None:
        units = tuple(s.unit for s in config.services)
    else:
        state = State.from_json(Store(paths).load_state()) if paths.store.is_dir() else State()
        units = tuple(sorted(state.units))
    return _Target(
        config,
        paths,
        units,
        tuple(sorted(directories.items())),
        voldecommission.targets(config, paths),
    )


def _volume_steps(target: _Target, ctx: Context) -> list[Step]:
    volumes, runner = target.volumes, ctx.block_runner
    steps: dict[str, Callable[[], voldecommission.Result]] = {
        "unmount-volumes": lambda: voldecommission.unmount(
            volumes, target.paths, ctx.systemctl(), runner
        ),
        "close-volumes": lambda: voldecommission.close(volumes, runner),
        "erase-volumes": lambda: voldecommission.erase(volumes, target.paths, runner),
    }
    done = []
    for name, step in steps.items():

        def one(name: str = name, step: Callable[[], voldecommission.Result] = step) -> Step:
            return Step(name, *step())

        done.append(_guarded(name, one))
    return done


def _kept_token(target: _Target) -> identity.KeptToken | None:
    # The config's policy first; the other too (an image changed its policy since).
    first = target.config.reboot_policy if target.config else RebootPolicy.REPROVISION
    for policy in (first, *(p for p in RebootPolicy if p is not first)):
        kept = identity.load_token(policy, target.paths)
        if kept is not None:
            return kept
    return None


# --- the steps -----------------------------------------------------------------------------


def _stop_units(target: _Target, ctx: Context) -> Step:
    if not target.units:
        return Step("stop-units", "nothing-to-do", "no unit gets secrets")
    result = ctx.systemctl()("stop", "--", *TIMERS, *target.units, check=False)
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        return Step(
            "stop-units", "failed", f"`systemctl stop` exited with {result.returncode}: {last}"
        )
    return Step("stop-units", "done", f"stopped {', '.join(target.units)}")


def _lock_keys(target: _Target) -> Step:
    if not target.directories:
        return Step("lock-keys", "nothing-to-do", "no encrypted directory")
    notes, failed = [], False
    for name, host_path in target.directories:
        path = target.paths.under_root(Path(host_path))
        try:
            note, ok = _lock_one(target.paths, name, path)
        except fscrypt_types.FscryptError as err:
            note, ok = f"{err.problem}", False
        notes.append(f"{name} ({host_path}): {note}")
        failed = failed or not ok
    return Step("lock-keys", "failed" if failed else "done", "; ".join(notes))


def _lock_one(paths: Paths, name: str, path: Path) -> tuple[str, bool]:
    identifier = None
    if os.path.isdir(path) and not path.is_symlink():
        try:
            policy = fscrypt.get_policy(path)
        except fscrypt_types.FscryptUnsupported:
            return "not encrypted (its filesystem cannot be), nothing to lock", True
        identifier = policy.key_identifier if policy and policy.version == 2 else None
        where = path
    else:
        record = _record_or_none(paths, name)
        identifier = record.key_identifier if record else None
        where = _existing_ancestor(path)
    if identifier is None:
        return "not encrypted, nothing to lock", True
    removal = fscrypt.remove_key(where, identifier)
    if removal.files_busy:
        holders = ", ".join(f"{pid} ({comm})" for pid, comm in _holders(path)) or "unknown"
        return (
            f"key removed, but files are still open (processes: {holders}); they stay "
            "readable until closed: stop them and run decommission again"
        ), False
    return ("key removed, directory locked" if removal.was_present else "already locked"), True


def _record_or_none(paths: Paths, name: str) -> keyrecord.KeyRecord | None:
    try:
        return keyrecord.load(paths, name)
    except BootsecretsError:
        return None


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _holders(path: Path) -> Iterator[tuple[int, str]]:
    """Processes with a file, or their working directory, inside `path` (names only)."""
    prefix = os.path.realpath(path)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [entry / "cwd", *(entry / "fd").iterdir()]
            inside = any(
                os.readlink(link) == prefix or os.readlink(link).startswith(prefix + "/")
                for link in links
            )
            if inside:
                yield int(entry.name), (entry / "comm").read_text().strip()
        except OSError:
            continue


def _remove_records(target: _Target) -> Step:
    removed = [
        name for name in keyrecord.names(target.paths) if keyrecord.remove(target.paths, name)
    ]
    if not removed:
        return Step("remove-key-records", "nothing-to-do", "no key record")
    return Step(
        "remove-key-records",
        "done",
        f"removed {', '.join(removed)} from {keyrecord.keys_dir(target.paths)}",
    )


def _remove_store(target: _Target, ctx: Context) -> Step:
    """Everything rendered or kept in the store, and the runtime drop-ins, removed without
    following a symlink (a planted one is removed itself, never what it points at)."""
    store, root = target.paths.store, target.paths.root
    removed = []
    if os.path.lexists(store) and not os.path.islink(store):
        with fsio.open_dir(root, store) as directory:
            for name in (
                "current",
                "state.json",
                leasestore.FILE,
                "bootstrap.yaml",
                "generations",
                "unlocked",
            ):
                if directory.lstat(name) is not None:
                    directory.remove_tree(name)
                    removed.append(name)
    dropins = []
    for unit in target.units:
        for file_name in (DROPIN_NAME, ENCRYPTED_DROPIN, blockdev.VOLUME_DROPIN):
            path = target.paths.dropin_root / f"{unit}.d" / file_name
            if os.path.lexists(path):
                fsio.unlink_nofollow(root, path)
                dropins.append(f"{unit}/{file_name}")
    if dropins:
        ctx.systemctl().daemon_reload()
    if not removed and not dropins:
        return Step("remove-store", "nothing-to-do", f"{store} holds nothing rendered")
    return Step(
        "remove-store",
        "done",
        f"removed {', '.join(removed) or 'nothing'} from "
        f"{store} and {len(dropins)} runtime drop-in(s)",
    )


def _revoke_leases(target: _Target, ctx: Context, kept: identity.KeptToken | None) -> Step:
    there = os.path.lexists(target.paths.store / leasestore.FILE)
    held = leasestore.load(target.paths).lease_ids() if there else []
    if not held:
        return Step("revoke-leases", "nothing-to-do", "no lease is kept on this host")
    if kept is None:
        return Step(
            "revoke-leases",
            "failed",
            f"{len(held)} lease(s) kept but no token to "
            "revoke them with; revoke them in Vault (`bao lease revoke -prefix`)",
        )
    try:
        vault = _session(target, ctx, kept)
    except BootsecretsError as err:
        return Step("revoke-leases", "failed", str(err))
    with vault:
        vault.use_token(kept.token)
        revoked, failed = leaserevoke.revoke_kept(target.paths, vault)
    if failed:
        return Step(
            "revoke-leases",
            "failed",
            f"revoked {revoked}; not revoked: " + "; ".join(str(f) for f in failed),
        )
    return Step("revoke-leases", "done", f"revoked {revoked} lease(s)")


def _session(target: _Target, ctx: Context, kept: identity.KeptToken) -> Vault:
    """A Vault session as a run logs in: the address the token came from first, the image
    config's as fallbacks; an environment override (VAULT_ADDR) replaces them all."""
    settings = target.config.vault if target.config else None
    configured = settings.addresses if settings else ()
    addresses: tuple[str, ...] = configured
    if kept.vault_addr and not (settings and settings.address_from_env):
        addresses = (kept.vault_addr, *(a for a in configured if a != kept.vault_addr))
    if settings is None:  # no image config: VAULT_ADDR (or BAO_ADDR), else the token's
        override = _env_address(ctx)
        addresses = (override,) if override else addresses
        settings = VaultSettings(addresses=addresses)
    return ctx.make_vault(
        settings,
        addresses=addresses,
        config_root=target.paths.root,
        deadline=min(settings.boot_deadline, REVOKE_DEADLINE),
    )


def _revoke(target: _Target, ctx: Context, kept: identity.KeptToken | None) -> Step:
    if kept is None:
        _forget(target.paths)
        return Step("revoke-token", "nothing-to-do", "no Vault token is kept on this host")
    by_hand = f"revoke it by hand: `bao token revoke -accessor {kept.accessor}`"
    try:
        vault = _session(target, ctx, kept)
    except BootsecretsError as err:
        return Step("revoke-token", "failed", f"{err}; {by_hand}")
    with vault:
        try:
            vault.use_token(kept.token)
        except TokenInvalid:
            _forget(target.paths)
            return Step(
                "revoke-token",
                "done",
                f"token (accessor {kept.accessor}) was already revoked or expired",
            )
        except BootsecretsError as err:
            return Step("revoke-token", "failed", f"{err}; {by_hand}")
        try:
            vault.write(
                "auth/token/revoke-self", {}, what="auth/token/revoke-self", idempotent=True
            )
        except PermissionDenied:
            pass  # revoked between the lookup and now
        except BootsecretsError as err:
            return Step("revoke-token", "failed", f"{err}; {by_hand}")
    _forget(target.paths)
    return Step(
        "revoke-token",
        "done",
        f"token (accessor {kept.accessor}) revoked, with its leases and child tokens",
    )


def _env_address(ctx: Context) -> str | None:
    try:
        return env_address(ctx.env)
    except ConfigError:
        return None


def _forget(paths: Paths) -> None:
    identity.forget_token(paths)
    paths.identity.unlink(missing_ok=True)


# --- output --------------------------------------------------------------------------------


def format_json(steps: list[Step]) -> str:
    return json.dumps(
        {
            "version": DECOMMISSION_VERSION,
            "ok": all(s.outcome != "failed" for s in steps),
            "steps": [dataclasses.asdict(s) for s in steps],
        },
        indent=2,
        sort_keys=True,
    )


def format_text(steps: list[Step]) -> str:
    return "\n".join(f"{s.step}: {s.outcome}: {s.detail}" for s in steps)
