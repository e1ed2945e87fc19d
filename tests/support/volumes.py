"""Encrypted volumes in a test's world: volume images (zeroed files under /var/tmp, outside
the sandbox root) linked where DigitalOcean's udev rules put a volume,
`<root>/dev/disk/by-id/scsi-0DO_Volume_<name>`, a sandbox whose block runner is the
device-mapper stand-in and whose systemctl mounts mount units (support.devmapper), and a
simulated reboot."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bootsecrets.context import Context
from support.devmapper import DeviceMapper, Pid1
from support.loopfs import IMAGE_DIR, require_root
from support.openbao import OpenBao
from support.sandbox import Captured, Sandbox
from support.transit import create_key, grant
from support.world import World

BY_ID = "dev/disk/by-id"


class VolumeSandbox(Sandbox):
    def __init__(
        self, root: Path, captured: Captured, openbao: OpenBao | None, dm: DeviceMapper
    ) -> None:
        super().__init__(root, captured, openbao)
        self.dm = dm
        self.pid1 = Pid1(root=root)
        self.runner = self.pid1
        captured.runners.append(self.pid1)

    def context(self) -> Context:
        ctx = super().context()
        ctx.block_runner = self.dm
        return ctx


class Volumes:
    """One test's volumes: images, the config section, reboots."""

    def __init__(self, world: World, sandbox: VolumeSandbox, workdir: Path) -> None:
        self.world = world
        self.sandbox = sandbox
        self.dm = sandbox.dm
        self.workdir = workdir

    def device(self, name: str) -> str:
        return f"/{BY_ID}/scsi-0DO_Volume_{name}"

    def image(self, name: str, size_mib: int = 64) -> Path:
        """A zeroed image attached as DigitalOcean volume `name`."""
        image = self.workdir / f"{name}.img"
        with image.open("wb") as handle:
            handle.truncate(size_mib << 20)
        self.attach(name, image)
        return image

    def attach(self, name: str, image: Path) -> None:
        link = self.sandbox.root / self.device(name).lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(image)

    def detach(self, name: str) -> None:
        (self.sandbox.root / self.device(name).lstrip("/")).unlink()

    def section(self, **volumes: dict[str, Any]) -> dict[str, Any]:
        return {
            name: {
                "device": self.device(name),
                "mount": f"/srv/{name}",
                "units": ["app.service"],
                "format": "if-blank",
                **fields,
            }
            for name, fields in volumes.items()
        }

    def config(self, *, volumes: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
        config = self.world.config(reboot_policy="persist-token", **changes)
        config["encrypted_volumes"] = volumes if volumes is not None else self.section(data={})
        return config

    def provision(self, config: dict[str, Any]) -> None:
        self.sandbox.write_config(config)
        wrapped = self.world.bao.wrapped_secret_id(self.world.role)
        self.sandbox.write_bootstrap(self.world.role_id, wrapped)

    def transit(self, key: str | None = None) -> str:
        """The Transit key (the role's name by default) and the full droplet grant."""
        name = key or self.world.role
        create_key(self.world.bao, name)
        grant(self.world, name)
        return name

    def reboot(self) -> None:
        """Mounts and mappings gone, the store (tmpfs) and runtime units gone."""
        self.sandbox.pid1.reboot()
        self.dm.reboot()
        shutil.rmtree(self.sandbox.store, ignore_errors=True)

    def mount_point(self, name: str) -> Path:
        return self.sandbox.root / "srv" / name

    def record(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            (self.sandbox.root / "var/lib/bootsecrets/volumes" / f"{name}.json").read_text()
        )
        return data


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def volume_world(
    openbao: OpenBao, root: Path, captured: Captured, unique: str
) -> Iterator[Volumes]:
    require_root()
    workdir = Path(tempfile.mkdtemp(prefix="bootsecrets-volumes-", dir=IMAGE_DIR))
    dm = DeviceMapper(root, workdir)
    sandbox = VolumeSandbox(root, captured, openbao, dm)
    try:
        yield Volumes(World(openbao, sandbox, unique), sandbox, workdir)
    finally:
        try:
            sandbox.pid1.reboot()
        finally:
            try:
                dm.cleanup()
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
