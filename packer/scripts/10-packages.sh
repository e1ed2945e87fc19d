#!/bin/sh
# Provisioner 10: distribution packages the agent needs. The same file runs in the
# DigitalOcean and the QEMU build (the end-to-end test's `packer build`, tests/e2e/).
#   python3-venv     the agent's virtualenv (/opt/bootsecrets)
#   python3-systemd  systemd-python for the journal and sd_notify, from Debian, so that the
#                    image needs no compiler (the venv is created with --system-site-packages)
#   e2fsprogs        tune2fs/dumpe2fs for 15-root-fs.sh (the ext4 `encrypt` feature)
# apt is only used when something is missing, so a base image that already has them (the
# end-to-end test's) builds offline.
set -eu
export DEBIAN_FRONTEND=noninteractive

# On a fresh droplet cloud-init may still be running apt; wait for it.
if command -v cloud-init >/dev/null 2>&1; then
    cloud-init status --wait >/dev/null 2>&1 || true
fi

missing=""
for pkg in python3 python3-venv python3-systemd ca-certificates systemd e2fsprogs; do
    if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing="$missing $pkg"
    fi
done
if [ -n "$missing" ]; then
    echo "10-packages: installing$missing"
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
else
    echo "10-packages: everything already installed"
fi

python3 - <<'PY'
import sys
assert sys.version_info[:2] == (3, 11), f"the wheelhouse is built for CPython 3.11, image has {sys.version}"
import systemd.journal  # noqa: F401  (python3-systemd)
PY
