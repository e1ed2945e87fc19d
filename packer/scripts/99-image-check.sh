#!/bin/sh
# Provisioner 99 (last): fail the build if anything secret or instance-specific is left.
# `bootsecrets image-check` exits non-zero on any finding and prints path, rule and a
# fingerprint per finding, never the secret itself.
set -eu
echo "99-image-check: scanning the image"
/usr/local/sbin/bootsecrets image-check --root /
echo "99-image-check: no findings"
