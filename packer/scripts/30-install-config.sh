#!/bin/sh
# Provisioner 30: the agent's systemd units and the image's (non-secret) config.
#   /tmp/bootsecrets/systemd/    -> /etc/systemd/system/   (bootsecrets*.service|.timer)
#   /tmp/bootsecrets/config.yaml -> /etc/bootsecrets/config.yaml   (Packer var `config_file`)
#   /tmp/bootsecrets/vault-ca.pem -> /etc/bootsecrets/vault-ca.pem  (Packer var `vault_ca_file`;
#                                    empty upload: not installed)
#   /tmp/bootsecrets/demo/       -> demo units + app, only with BOOTSECRETS_INSTALL_DEMO=1
# Enables the store, the agent, the refresh timer and the free-block trim after the agent.
# From the config (bootsecrets.imagesetup): the packages and the agent's sandbox drop-ins
# that encrypted directories and volumes need (cryptsetup-bin; systemd/encrypted-volumes.conf,
# ReadWritePaths= for each directory's parent), so the config alone decides.
# Application units are NOT enabled: the agent starts them once their secrets are rendered.
set -eu
src=/tmp/bootsecrets

install -d -m 0755 /etc/bootsecrets
install -m 0644 "$src/config.yaml" /etc/bootsecrets/config.yaml
rm -f /etc/bootsecrets/vault-ca.pem
if [ -s "$src/vault-ca.pem" ]; then
    install -m 0644 "$src/vault-ca.pem" /etc/bootsecrets/vault-ca.pem
    # A bundle OpenSSL cannot load would fail every droplet's first boot: fail the build.
    python3 -c 'import ssl, sys; ssl.create_default_context(cafile=sys.argv[1])' \
        /etc/bootsecrets/vault-ca.pem || { echo "30-install-config: vault_ca_file is not a PEM CA bundle" >&2; exit 1; }
    echo "30-install-config: Vault CA bundle installed as /etc/bootsecrets/vault-ca.pem"
fi
for unit in bootsecrets-store.service bootsecrets.service bootsecrets-refresh.service \
            bootsecrets-refresh.timer bootsecrets-trim.service; do
    install -m 0644 "$src/systemd/$unit" "/etc/systemd/system/$unit"
done
# persist-token policy keeps its token here (root 0700); empty in the image.
install -d -m 0700 /var/lib/bootsecrets

demo_units="demo-a.service demo-b.service demo-records.service demo-uploads.service demo-tls.service"
if [ "${BOOTSECRETS_INSTALL_DEMO:-0}" = 1 ]; then
    install -d -m 0755 /usr/local/lib/bootsecrets-demo
    install -m 0755 "$src/demo/demo-app.py" /usr/local/lib/bootsecrets-demo/demo-app.py
    for unit in $demo_units; do
        install -m 0644 "$src/demo/$unit" /etc/systemd/system/
    done
    # The owner of the demo's encrypted directory and volume (demo-records, demo-uploads).
    getent passwd bootsecrets-demo >/dev/null ||
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin bootsecrets-demo
    echo "30-install-config: demo units installed (not enabled)"
fi

systemctl enable bootsecrets-store.service bootsecrets.service bootsecrets-refresh.timer \
    bootsecrets-trim.service

# The config must parse with the agent that will read it (errors name the line, never a
# value), and the CA bundle it names must be in the image.
/opt/bootsecrets/bin/python -c 'import pathlib, sys
from bootsecrets.config import load_config
from bootsecrets.errors import ConfigError
try:
    config = load_config(pathlib.Path("/etc/bootsecrets/config.yaml"), env={})
except ConfigError as e:
    sys.exit(f"30-install-config: {e}")
ca = config.vault.ca_cert
if ca is not None and not ca.is_file():
    sys.exit(f"30-install-config: vault.ca_cert names {ca}, which is not in the image "
             "(Packer variable vault_ca_file)")'

# What the config's encrypted directories and volumes need in the image.
needed=$(/opt/bootsecrets/bin/python -m bootsecrets.imagesetup packages /etc/bootsecrets/config.yaml)
missing=""
for pkg in $needed; do
    if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing="$missing $pkg"
    fi
done
if [ -n "$missing" ]; then
    echo "30-install-config: the config needs$missing"
    apt-get update -q
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
written=$(/opt/bootsecrets/bin/python -m bootsecrets.imagesetup install /etc/bootsecrets/config.yaml "$src/systemd")
for path in $written; do echo "30-install-config: installed $path"; done

# Every installed unit must pass systemd's own verifier.
units=$(ls /etc/systemd/system/bootsecrets*.service /etc/systemd/system/bootsecrets*.timer)
if [ "${BOOTSECRETS_INSTALL_DEMO:-0}" = 1 ]; then
    for unit in $demo_units; do units="$units /etc/systemd/system/$unit"; done
fi
# shellcheck disable=SC2086
out=$(systemd-analyze verify --man=no $units 2>&1) || { echo "$out" >&2; exit 1; }
if [ -n "$out" ]; then echo "$out" >&2; echo "30-install-config: systemd-analyze verify warnings" >&2; exit 1; fi
echo "30-install-config: units installed and verified"
