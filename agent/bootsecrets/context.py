"""What a command works with: the outside world (`Context`, given by the CLI or a test) and
one run's bundle (`Run`: config, paths, store, systemctl, the Vault session and token).

`Run.open` does, in order, everything that can fail without spending anything: load and
validate the config (templates compiled, unit names checked), prepare the memory-only store,
resolve every unit's user and group, take the lock. Only then may a run talk to Vault.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import grp
import logging
import os
import pwd
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from bootsecrets.config import Config, load_config
from bootsecrets.connect import EarlyConnection
from bootsecrets.errors import BootsecretsError, ConfigError, LockBusy, UnitFailed
from bootsecrets.paths import Paths
from bootsecrets.serviceconfig import Service
from bootsecrets.state import RunRecord, State, TokenState, now
from bootsecrets.store import FileSpec, Store
from bootsecrets.systemd import Runner, Systemctl, check_dropins, run

if TYPE_CHECKING:
    from bootsecrets import luks
    from bootsecrets.luksformat import Stdin
    from bootsecrets.vault import Vault
    from bootsecrets.vaultanswers import TokenInfo

log = logging.getLogger(__name__)


def _new_vault(*args: Any, **kwargs: Any) -> Vault:
    # Loaded on first use: hvac, requests and urllib3 take ~90 ms of CPU to import, which a
    # TCP handshake with Vault (connect.EarlyConnection) can overlap; `status` never needs them.
    from bootsecrets.vault import Vault  # noqa: PLC0415

    return Vault(*args, **kwargs)


def _run_block(
    argv: Sequence[str], *, stdin: Stdin | None = None, check: bool = True
) -> luks.Completed:
    # luks.run, loaded on first use: only a config with encrypted volumes runs cryptsetup.
    from bootsecrets import luks  # noqa: PLC0415

    return luks.run(argv, stdin=stdin, check=check)


@dataclasses.dataclass
class Context:
    """What a command needs from outside: where things are and how to reach systemd/Vault."""

    paths: Paths = dataclasses.field(default_factory=Paths)
    runner: Runner = run
    #: The systemctl program; a sandbox can point this at a stand-in.
    systemctl_program: str = "systemctl"
    #: systemd-run, which arms the agent's own wake-up timer (leased secrets: wakeup.py).
    systemd_run_program: str = "systemd-run"
    #: The wall clock lease and certificate times are taken from (tests move it).
    clock: Callable[[], float] = time.time
    env: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(os.environ))
    #: How long bootstrap/refresh wait for another run's lock before giving up.
    lock_wait: float = 60.0
    make_vault: Callable[..., Vault] = _new_vault
    #: Called between the wrapping lookup and the unwrap (tests produce a race there).
    after_lookup: Callable[[], None] | None = None
    #: Called between the login and the reads (tests fail a Vault node over there).
    after_login: Callable[[], None] | None = None
    #: Runs cryptsetup, blkid, mkfs and mount for encrypted volumes (stdin for keys); tests
    #: swap in a stand-in where the host has no device-mapper.
    block_runner: luks.Runner = _run_block

    def load_config(self) -> Config:
        return load_config(self.paths.config, env=self.env)

    def systemctl(self) -> Systemctl:
        return Systemctl(self.runner, self.systemctl_program)


@dataclasses.dataclass
class Run:
    """One bootstrap or refresh, from config to systemd."""

    ctx: Context
    command: str
    config: Config
    paths: Paths
    store: Store
    systemctl: Systemctl
    #: Each unit's file owner and mode, resolved before anything is spent.
    specs: Mapping[str, FileSpec]
    vault: Vault | None = None
    token: TokenInfo | None = None
    #: The Vault address the login used (user-data's, or the last bootstrap's), if any.
    address: str | None = None

    @classmethod
    @contextlib.contextmanager
    def open(cls, ctx: Context, command: str) -> Iterator[Run]:
        """Checks, store, lock; a failure after the lock is noted in the state file."""
        config = ctx.load_config()
        paths = ctx.paths.with_store(config.store)
        store = Store(paths)
        store.prepare(shared=shared_store(config))
        check_dropins(paths, [s.unit for s in config.services])
        specs = {s.unit: FileSpec(*_owner(config, s), s.mode) for s in config.services}
        run = cls(ctx, command, config, paths, store, ctx.systemctl(), specs)
        with store.lock(ctx.lock_wait), run._failures_recorded():
            try:
                yield run
            finally:
                if run.vault is not None:
                    run.vault.close()

    @contextlib.contextmanager
    def _failures_recorded(self) -> Iterator[None]:
        """Note a failed run in the state file, for status. A rollback records its own,
        fuller outcome."""
        try:
            yield
        except (UnitFailed, LockBusy):
            raise
        except BootsecretsError as err:
            with contextlib.suppress(OSError):  # the original error matters more
                self.record(self.load_state(), outcome="error", error=err)
            raise

    def connect(self, address: str | None) -> Vault:
        """A Vault session. A user-data address goes first; the image config's addresses
        stay as fallbacks (an environment override, applied by the config, replaces them)."""
        settings = self.config.vault
        addresses = None
        if address and not settings.address_from_env:
            addresses = (address, *(a for a in settings.addresses if a != address))
        first = (addresses or settings.addresses or ("",))[0]
        early = EarlyConnection(first, settings.request_timeout) if first else None
        try:
            self.vault = self.ctx.make_vault(
                settings, addresses=addresses, config_root=self.paths.root, early=early
            )
        except BaseException:
            if early is not None:
                early.close()
            raise
        return self.vault

    # --- the state file --------------------------------------------------------------------

    def load_state(self) -> State:
        return State.from_json(self.store.load_state())

    def record(
        self,
        state: State,
        *,
        outcome: str = "ok",
        error: BootsecretsError | None = None,
        **changes: Any,
    ) -> State:
        """Save `state` with `changes`, this run's outcome and the token's TTL."""
        last = RunRecord(
            self.command,
            now(),
            outcome,
            error.exit_code if error else 0,
            str(error) if error else None,
        )
        changes["last_run"] = last
        if outcome == "ok":
            changes["last_success"] = last
        if self.token is not None:
            changes["token"] = token_state(self.token)
        if self.address is not None:
            changes["vault_addr"] = self.address
        state = dataclasses.replace(state, reboot_policy=self.config.reboot_policy.value, **changes)
        self.store.save_state(state.to_json())
        return state

    def save(self, state: State) -> State:
        """Save `state` as it is (a step within the run, not its outcome)."""
        self.store.save_state(state.to_json())
        return state


def token_state(token: TokenInfo) -> TokenState:
    expires = None
    if token.ttl:
        at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=token.ttl)
        expires = at.isoformat(timespec="seconds")
    return TokenState(token.accessor, token.ttl, token.renewable, now(), expires)


def shared_store(config: Config) -> bool:
    """Whether some unit's files belong to a non-root user (store directories then 0751)."""
    return any(s.user not in ("root", "0") or s.group not in ("root", "0") for s in config.services)


def _owner(config: Config, service: Service) -> tuple[int, int]:
    """The unit's file owner, looked up in this host's (the image's) user database."""
    try:
        uid = int(service.user) if service.user.isdigit() else pwd.getpwnam(service.user).pw_uid
    except KeyError:
        raise ConfigError(
            config.source, None, f"services.{service.unit}.user", "no such user on this host"
        ) from None
    try:
        gid = int(service.group) if service.group.isdigit() else grp.getgrnam(service.group).gr_gid
    except KeyError:
        raise ConfigError(
            config.source, None, f"services.{service.unit}.group", "no such group on this host"
        ) from None
    return uid, gid
