#!/bin/sh
# Provisioner 30: the agent's systemd units and the image's (non-secret) config.
#   /tmp/bootsecrets/systemd/    -> /etc/systemd/system/   (bootsecrets*.service|.timer)
#   /tmp/bootsecrets/config.yaml -> /etc/bootsecrets/config.yaml   (Packer var `config_file`)
#   /tmp/bootsecrets/demo/       -> demo units + app, only with BOOTSECRETS_INSTALL_DEMO=1
# Enables the store, the agent and the refresh timer. Application units are NOT enabled:
# the agent starts them once their secrets are rendered.
set -eu
src=/tmp/bootsecrets

install -d -m 0755 /etc/bootsecrets
install -m 0644 "$src/config.yaml" /etc/bootsecrets/config.yaml
for unit in bootsecrets-store.service bootsecrets.service bootsecrets-refresh.service bootsecrets-refresh.timer; do
    install -m 0644 "$src/systemd/$unit" "/etc/systemd/system/$unit"
done
# persist-token policy keeps its token here (root 0700); empty in the image.
install -d -m 0700 /var/lib/bootsecrets

if [ "${BOOTSECRETS_INSTALL_DEMO:-0}" = 1 ]; then
    install -d -m 0755 /usr/local/lib/bootsecrets-demo
    install -m 0755 "$src/demo/demo-app.py" /usr/local/lib/bootsecrets-demo/demo-app.py
    install -m 0644 "$src/demo/demo-a.service" "$src/demo/demo-b.service" /etc/systemd/system/
    echo "30-install-config: demo units installed (not enabled)"
fi

systemctl enable bootsecrets-store.service bootsecrets.service bootsecrets-refresh.timer

# The config must parse with the agent that will read it (errors name the line, never a value).
/opt/bootsecrets/bin/python -c 'import pathlib, sys
from bootsecrets.config import load_config
from bootsecrets.errors import ConfigError
try:
    load_config(pathlib.Path("/etc/bootsecrets/config.yaml"))
except ConfigError as e:
    sys.exit(f"30-install-config: {e}")'

# Every installed unit must pass systemd's own verifier.
units=$(ls /etc/systemd/system/bootsecrets*.service /etc/systemd/system/bootsecrets*.timer)
if [ "${BOOTSECRETS_INSTALL_DEMO:-0}" = 1 ]; then
    units="$units /etc/systemd/system/demo-a.service /etc/systemd/system/demo-b.service"
fi
# shellcheck disable=SC2086
out=$(systemd-analyze verify --man=no $units 2>&1) || { echo "$out" >&2; exit 1; }
if [ -n "$out" ]; then echo "$out" >&2; echo "30-install-config: systemd-analyze verify warnings" >&2; exit 1; fi
echo "30-install-config: units installed and verified"
