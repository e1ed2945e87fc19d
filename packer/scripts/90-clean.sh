#!/bin/sh
# Provisioner 90: leave nothing instance-specific or secret in the image (DigitalOcean's
# Marketplace cleanup is the floor). 99-image-check.sh then proves it.
set -eu
export DEBIAN_FRONTEND=noninteractive

# cloud-init: instance state, logs, seed; next boot runs every module again.
cloud-init clean --logs --seed --machine-id

# Identity: empty machine-id (systemd generates one at first boot), dbus's copy follows it.
rm -f /etc/machine-id /var/lib/dbus/machine-id
: > /etc/machine-id
chmod 0444 /etc/machine-id
ln -s /etc/machine-id /var/lib/dbus/machine-id
rm -f /var/lib/systemd/random-seed /var/lib/systemd/credential.secret

# SSH: host keys (cloud-init regenerates them per droplet) and every authorized_keys.
rm -f /etc/ssh/ssh_host_*
find /root /home -name authorized_keys -type f -delete 2>/dev/null || true

# Passwords: no account keeps a password hash (the local qemu build logs in with a one-off
# password; DigitalOcean may set root's). Key-based access comes per droplet from cloud-init.
awk -F: '$2 != "" && $2 !~ /^[*!]/ {print $1}' /etc/shadow | while read -r user; do
    usermod -p '*' "$user"
done

# Shell and tool history, caches of root and users.
for home in /root /home/*; do
    [ -d "$home" ] || continue
    rm -f "$home/.bash_history" "$home/.python_history" "$home/.lesshst" "$home/.viminfo" \
          "$home/.wget-hsts" "$home/.sudo_as_admin_successful"
    rm -rf "$home/.cache" "$home/.config/pip"
done

# Any bootsecrets runtime state (a build must never have run the agent, but be sure).
rm -rf /var/lib/bootsecrets/* /run/bootsecrets/* 2>/dev/null || true

# Package caches and lists.
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# Logs: the journal, rotated logs, and every other log emptied (files kept: some daemons
# expect them to exist).
rm -rf /var/log/journal/*
find /var/log -type f \( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \) -delete
find /var/log -type f -exec truncate -s 0 {} +

# Temporary files, including the uploaded wheelhouse, units and config under /tmp/bootsecrets.
find /tmp /var/tmp -mindepth 1 -delete 2>/dev/null || true

sync
echo "90-clean: image cleaned"
