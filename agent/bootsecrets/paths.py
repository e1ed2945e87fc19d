"""Every host path the agent touches, redirectable under one root for tests and image trees."""

from __future__ import annotations

import dataclasses
from pathlib import Path

DEFAULT_CONFIG = Path("/etc/bootsecrets/config.yaml")
DEFAULT_STORE = Path("/run/bootsecrets")
DEFAULT_BOOTSTRAP = DEFAULT_STORE / "bootstrap.yaml"
DROPIN_DIR = Path("/run/systemd/system")
STATE_DIR = Path("/var/lib/bootsecrets")
DROPIN_NAME = "50-bootsecrets.conf"
#: The leased secrets the agent holds, in the store (leasestore.py).
LEASES_FILE = "leases.json"


@dataclasses.dataclass(frozen=True)
class Paths:
    """Host paths, all under `root` ("/" on a real host).

    The paths written into systemd drop-ins are the *host* paths (without the root prefix),
    because that is where PID 1 will look for them.
    """

    root: Path = Path("/")
    store_host: Path = DEFAULT_STORE

    def under_root(self, host_path: Path) -> Path:
        return self.root / host_path.relative_to("/")

    @property
    def config(self) -> Path:
        return self.under_root(DEFAULT_CONFIG)

    @property
    def store(self) -> Path:
        return self.under_root(self.store_host)

    @property
    def bootstrap(self) -> Path:
        return self.store / "bootstrap.yaml"

    @property
    def lock(self) -> Path:
        return self.store / "lock"

    @property
    def generations(self) -> Path:
        return self.store / "generations"

    @property
    def current(self) -> Path:
        """Symlink to the live generation; units only ever read through it."""
        return self.store / "current"

    @property
    def current_host(self) -> Path:
        return self.store_host / "current"

    @property
    def state_file(self) -> Path:
        return self.store / "state.json"

    @property
    def leases(self) -> Path:
        return self.store / LEASES_FILE

    @property
    def runtime_token(self) -> Path:
        """The Vault token under the `reprovision` policy: memory only, gone at reboot."""
        return self.store / "token"

    @property
    def persistent_token(self) -> Path:
        """The Vault token under the `persist-token` policy: on disk, root 0600."""
        return self.under_root(STATE_DIR) / "token"

    @property
    def identity(self) -> Path:
        """Role-id and Vault address from the last bootstrap (no credential), root 0600."""
        return self.under_root(STATE_DIR) / "identity.json"

    @property
    def dropin_root(self) -> Path:
        return self.under_root(DROPIN_DIR)

    def dropin(self, unit: str) -> Path:
        return self.dropin_root / f"{unit}.d" / DROPIN_NAME

    def with_store(self, store_host: Path) -> Paths:
        return dataclasses.replace(self, store_host=store_host)
