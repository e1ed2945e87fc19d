#!/bin/sh
# Provisioner 15: the root filesystem supports fscrypt (ext4 `encrypt` feature), so that the
# agent can keep encrypted data directories on it (docs/operations.md, data at rest).
#
# The local image's disk is made with `mkfs.ext4 -O encrypt` (tests/e2e/e2e_image.py); a
# DigitalOcean droplet's root filesystem is not, and is mounted while Packer provisions it.
# `tune2fs -O encrypt` on the mounted root is safe and takes effect at once: the feature is an
# incompat flag in the superblock that nothing on disk has to be converted for, and the kernel
# reads it from its cached superblock on every fscrypt ioctl (checked below; measured on
# Debian 12's kernel 6.1, see packer/README.md). GRUB >= 2.04 (Debian 12: 2.06) boots from it.
set -eu

source=$(findmnt -n -o SOURCE /)
fstype=$(findmnt -n -o FSTYPE /)
if [ "$fstype" != ext4 ]; then
    echo "15-root-fs: the root filesystem is $fstype, not ext4: no fscrypt through the ext4 encrypt feature" >&2
    exit 1
fi
if dumpe2fs -h "$source" 2>/dev/null | grep -q '^Filesystem features:.* encrypt'; then
    echo "15-root-fs: $source already has the ext4 encrypt feature"
else
    tune2fs -O encrypt "$source"
    echo "15-root-fs: enabled the ext4 encrypt feature on $source (mounted)"
fi

# The kernel must see it now: FS_IOC_GET_ENCRYPTION_POLICY_EX on a plain directory answers
# ENODATA ("no policy") with the feature, EOPNOTSUPP without it.
python3 - <<'PY'
import errno, fcntl, os, struct, sys
FS_IOC_GET_ENCRYPTION_POLICY_EX = 0xC0096616
fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
arg = bytearray(struct.pack("<Q", 24) + bytes(24))
try:
    fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_POLICY_EX, arg)
except OSError as err:
    if err.errno != errno.ENODATA:
        sys.exit(f"15-root-fs: the kernel does not see fscrypt on / ({errno.errorcode.get(err.errno, err.errno)})")
print("15-root-fs: fscrypt available on / (kernel)")
PY
