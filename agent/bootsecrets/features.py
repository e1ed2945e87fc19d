"""The optional features of a bootstrap or refresh, loaded only when the config uses them:
encrypted directories (encdirs, fscrypt, keyrecord, transit...), encrypted volumes (volumes,
volopen, luks, blockdev...) and leased secrets (leasing, leasestore, leases, wakeup).

Most configs use none of them, and every bootstrap would otherwise import them all: ≈ 15 ms
of a small bootstrap's ≈ 150 (docs/performance.md). agent.py goes through here; a config
without a feature gets a stand-in that does nothing, which is what the feature's own code
does for such a config.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bootsecrets.context import Run
    from bootsecrets.errors import BootsecretsError
    from bootsecrets.model import Rendered, SecretData
    from bootsecrets.vault import Vault


# --- data at rest ---------------------------------------------------------------------------


class AtRest(Protocol):
    """One kind of data at rest in a run (encdirs.Directories, volumes.Volumes)."""

    def unlocking(self, vault: Vault) -> AbstractContextManager[Callable[[], None]]: ...
    def rewrap(self, vault: Vault) -> None: ...
    def settle(self) -> bool: ...
    def hold_back(self, rendered: Rendered) -> Rendered: ...
    def raise_failures(self) -> None: ...


class DataAtRest:
    """The run's encrypted directories and volumes, each step taken for the directories
    first, then the volumes; nothing at all (and nothing loaded) for a config with neither."""

    def __init__(self, parts: Sequence[AtRest]) -> None:
        self.parts = tuple(parts)

    @classmethod
    def check(cls, run: Run) -> DataAtRest:
        """Every check before Vault (nothing spent, nothing written)."""
        parts: list[AtRest] = []
        if run.config.directories:
            from bootsecrets.encdirs import Directories  # noqa: PLC0415 (lazy: see above)

            parts.append(Directories(run))
        if run.config.volumes:
            from bootsecrets.volumes import Volumes  # noqa: PLC0415 (lazy: see above)

            parts.append(Volumes(run))
        return cls(parts)

    @contextlib.contextmanager
    def unlocking(self, vault: Vault) -> Iterator[None]:
        """Unlock in the background while the block (the secret reads) runs; leaving it
        waits for the work and takes up the outcomes."""
        with contextlib.ExitStack() as stack:
            done = [stack.enter_context(part.unlocking(vault)) for part in self.parts]
            yield
        for take_up in done:
            take_up()

    def rewrap(self, vault: Vault) -> None:
        for part in self.parts:
            part.rewrap(vault)

    def settle(self) -> bool:
        """Alerts, markers and drop-ins; whether a drop-in changed (systemd must reload)."""
        reload = False
        for part in self.parts:
            reload = part.settle() or reload
        return reload

    def hold_back(self, rendered: Rendered) -> Rendered:
        """The render without the units needing data that stays locked."""
        for part in self.parts:
            rendered = part.hold_back(rendered)
        return rendered

    def raise_failures(self) -> None:
        for part in self.parts:
            part.raise_failures()


# --- leased secrets -------------------------------------------------------------------------


class Leases(Protocol):
    """What a run asks of its leased secrets (leasing.Session)."""

    @property
    def active(self) -> bool: ...
    def prepare(self) -> Mapping[str, SecretData | BootsecretsError]: ...
    def together(self) -> tuple[frozenset[str], ...]: ...


class NoLeases:
    """A config without leased secrets, and no lease kept from an earlier one."""

    active = False

    def prepare(self) -> Mapping[str, SecretData | BootsecretsError]:
        return {}

    def together(self) -> tuple[frozenset[str], ...]:
        return ()


def leases(run: Run, vault: Vault, *, at_boot: bool) -> AbstractContextManager[Leases]:
    """The run's leased secrets. Leases kept by an earlier run count too (a secret taken
    out of the config has its old leases revoked once no unit holds them)."""
    if not run.config.has_leased and not os.path.lexists(run.paths.leases):
        return contextlib.nullcontext(NoLeases())
    from bootsecrets.leasing import Session  # noqa: PLC0415 (lazy: see above)

    return Session(run, vault, at_boot=at_boot)


def scheduled(run: Run) -> AbstractContextManager[None]:
    """wakeup.scheduled: the agent's own wake-up, armed after a run with leased secrets."""
    if not run.config.has_leased:
        return contextlib.nullcontext()
    from bootsecrets import wakeup  # noqa: PLC0415 (lazy: see above)

    return wakeup.scheduled(run)
