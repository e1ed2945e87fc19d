"""ext4 on a loop device and a fresh tmpfs, for the data-at-rest tests: from the installed dev
package (dev/bootsecrets_dev/loopfs.py, shared with the benchmark), re-exported for the
tests' `from support.loopfs import ...`."""

from bootsecrets_dev.loopfs import (
    IMAGE_DIR,
    LoopFs,
    ext4_loop,
    loop_device,
    require_root,
    sh,
    tmpfs_mount,
)

__all__ = [
    "IMAGE_DIR",
    "LoopFs",
    "ext4_loop",
    "loop_device",
    "require_root",
    "sh",
    "tmpfs_mount",
]
