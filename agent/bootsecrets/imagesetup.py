"""What the image build derives from the image config: the Debian packages and the sandbox
drop-ins of the agent's units that encrypted directories and volumes need. Run by
packer/scripts/30-install-config.sh, so an operator lists a directory or a volume in the
config and gets a working image, with nothing else to remember:

    python -m bootsecrets.imagesetup packages CONFIG
        prints the packages the config needs (installed or not), one per line
    python -m bootsecrets.imagesetup install CONFIG UNITS_DIR [ROOT]
        writes the drop-ins into ROOT/etc/systemd/system (ROOT default /) and creates the
        parents of the encrypted directories; prints one line per file written

`drop_ins()` and `packages()` are pure: tested without a filesystem (tests/test_imagesetup.py)
and in the end-to-end build.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from bootsecrets import fsio
from bootsecrets.config import Config, load_config
from bootsecrets.errors import ConfigError
from bootsecrets.volconfig import Filesystem

#: The agent's units: both may unlock, first use included (a refresh after a fixed cause).
AGENT_UNITS = ("bootsecrets.service", "bootsecrets-refresh.service")
DIRECTORIES_DROP_IN = "encrypted-directories.conf"
#: Shipped in systemd/ (its comments say what each line is for); installed as is.
VOLUMES_DROP_IN = "encrypted-volumes.conf"


def packages(config: Config) -> list[str]:
    """Debian packages the config needs beyond the agent's own (10-packages.sh)."""
    needed: list[str] = []
    if config.volumes:
        needed.append("cryptsetup-bin")
    if any(v.filesystem is Filesystem.XFS for v in config.volumes):
        needed.append("xfsprogs")
    return needed


def directory_parents(config: Config) -> list[Path]:
    """Where first use creates an encrypted directory: it must be writable in the sandbox."""
    return sorted({d.path.parent for d in config.directories})


def drop_ins(config: Config, volumes_drop_in: str) -> dict[str, str]:
    """Path under /etc/systemd/system -> content, for each agent unit. `volumes_drop_in` is
    the text of systemd/encrypted-volumes.conf."""
    files: dict[str, str] = {}
    parents = directory_parents(config)
    for unit in AGENT_UNITS:
        if parents:
            lines = "".join(f"ReadWritePaths={parent}\n" for parent in parents)
            files[f"{unit}.d/{DIRECTORIES_DROP_IN}"] = (
                "# Written by the image build (bootsecrets.imagesetup) from the config's\n"
                "# encrypted_directories: first use creates each directory in its parent.\n"
                f"[Service]\n{lines}"
            )
        if config.volumes:
            files[f"{unit}.d/{VOLUMES_DROP_IN}"] = volumes_drop_in
    return files


def install(config: Config, units_dir: Path, root: Path) -> list[Path]:
    """Create the directories' parents (0755) and write the drop-ins (0644, replaced
    atomically); nothing below `root` is reached through a symlink (fsio). The paths, in
    order."""
    written: list[Path] = []
    volumes_text = (units_dir / VOLUMES_DROP_IN).read_text() if config.volumes else ""
    for parent in directory_parents(config):
        target = root / parent.relative_to("/")
        with fsio.open_dir(root, target, create=0o755):
            written.append(target)
    units = root / "etc/systemd/system"
    for relative, content in drop_ins(config, volumes_text).items():
        unit_dir, name = relative.split("/")
        with fsio.open_dir(root, units / unit_dir, create=0o755) as directory:
            directory.replace_file(name, content.encode(), mode=0o644)
        written.append(units / relative)
    return written


def main(argv: Sequence[str]) -> int:
    try:
        if len(argv) == 2 and argv[0] == "packages":
            for package in packages(load_config(Path(argv[1]), env={})):
                print(package)
            return 0
        if len(argv) in (3, 4) and argv[0] == "install":
            config = load_config(Path(argv[1]), env={})
            root = Path(argv[3]) if len(argv) == 4 else Path("/")
            for path in install(config, Path(argv[2]), root):
                print(path)
            return 0
    except ConfigError as err:
        print(f"imagesetup: {err}", file=sys.stderr)
        return err.exit_code
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
