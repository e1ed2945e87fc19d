#!/bin/sh
# Provisioner 10: distribution packages the agent needs. Same file for the DigitalOcean and
# QEMU builds and for the end-to-end test's chroot build (tests/e2e/e2e_image.py).
#   python3-venv     the agent's virtualenv (/opt/bootsecrets)
#   python3-systemd  systemd-python for the journal and sd_notify, from Debian, so that the
#                    image needs no compiler (the venv is created with --system-site-packages)
# apt is only used when something is missing, so a tree that already has them builds offline.
set -eu
export DEBIAN_FRONTEND=noninteractive

# On a fresh droplet cloud-init may still be running apt; wait for it (not in a chroot).
if [ -z "${BOOTSECRETS_BUILD_CHROOT:-}" ] && command -v cloud-init >/dev/null 2>&1; then
    cloud-init status --wait >/dev/null 2>&1 || true
fi

missing=""
for pkg in python3 python3-venv python3-systemd ca-certificates systemd; do
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
    echo "10-packages: python3-venv, python3-systemd already installed"
fi

python3 - <<'PY'
import sys
assert sys.version_info[:2] == (3, 11), f"the wheelhouse is built for CPython 3.11, image has {sys.version}"
import systemd.journal  # noqa: F401  (python3-systemd)
PY
