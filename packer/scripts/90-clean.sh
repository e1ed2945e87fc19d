#!/bin/sh
# Provisioner 90: leave nothing instance-specific or secret in the image. DigitalOcean's
# Marketplace `90-cleanup.sh` is the floor (each of its steps is here, marked "DO:");
# 99-image-check.sh then proves the result, and the end-to-end test checks the final
# artifact again from outside, after Packer's shutdown.
set -eu
export DEBIAN_FRONTEND=noninteractive

# DigitalOcean's droplet agent and monitoring agent must not be baked in (Packer 1.6.6 cannot
# ask DigitalOcean not to install the droplet agent: `droplet_agent` is a 1.7+ attribute).
for pkg in droplet-agent do-agent; do
    if dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        apt-get purge -y -q "$pkg"
    fi
done
rm -rf /opt/digitalocean

# cloud-init: instance state (DO: /var/lib/cloud/instances/*), logs, seed; next boot runs
# every module again.
cloud-init clean --logs --seed --machine-id
rm -rf /var/lib/cloud/instances/* /var/lib/cloud/instance /var/lib/cloud/data/* \
       /var/lib/cloud/sem/*

# Identity: empty machine-id (systemd generates one at first boot), dbus's copy follows it.
rm -f /etc/machine-id /var/lib/dbus/machine-id
: > /etc/machine-id
chmod 0444 /etc/machine-id
ln -s /etc/machine-id /var/lib/dbus/machine-id
# systemd-random-seed.service saves a fresh seed when it stops, which would be at Packer's
# shutdown, after this script and after 99-image-check: stop it now (it saves), then remove
# the seed; a stopped unit is not stopped again at shutdown. Every clone would otherwise
# start from the same entropy.
systemctl stop systemd-random-seed.service 2>/dev/null || true
rm -f /var/lib/systemd/random-seed /var/lib/systemd/credential.secret
# DHCP leases of the build VM/droplet.
rm -f /var/lib/dhcp/*.leases /var/lib/dhcp/dhclient*.lease

# SSH: host keys (DO: /etc/ssh/*key*; regenerated per droplet) and every authorized_keys
# (DO: /root/.ssh/authorized_keys). DO also creates an empty revoked_keys file.
rm -f /etc/ssh/ssh_host_*
find /root /home -name 'authorized_keys*' -type f -delete 2>/dev/null || true
touch /etc/ssh/revoked_keys
chmod 600 /etc/ssh/revoked_keys

# Passwords: no account keeps a password hash (DigitalOcean may set root's). Key-based
# access comes per droplet from cloud-init.
awk -F: '$2 != "" && $2 !~ /^[*!]/ {print $1}' /etc/shadow | while read -r user; do
    usermod -p '*' "$user"
done

# Shell and tool history (DO: /root/.bash_history), caches of root and users.
for home in /root /home/*; do
    [ -d "$home" ] || continue
    rm -f "$home/.bash_history" "$home/.python_history" "$home/.lesshst" "$home/.viminfo" \
          "$home/.wget-hsts" "$home/.sudo_as_admin_successful"
    rm -rf "$home/.cache" "$home/.config/pip"
done

# Any bootsecrets runtime state (a build must never have run the agent, but be sure).
rm -rf /var/lib/bootsecrets/* /run/bootsecrets/* 2>/dev/null || true

# Package caches and lists (DO: apt-get autoremove, autoclean). DO's cleanup also upgrades
# every package; do that in your own provisioning if you want it (it needs the network and
# makes the build unrepeatable).
apt-get -y -q autoremove
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# Logs (DO: truncate /var/log files, remove *.gz, *.[0-9], *-????????): the journal, rotated
# logs, every other log emptied (files kept: some daemons expect them to exist). journald
# first moves to /run for the rest of the build: otherwise it keeps writing to the removed
# files (their blocks freed only at shutdown, after the free space below is zeroed) and opens
# new ones in /var/log/journal.
journalctl --relinquish-var
rm -rf /var/log/journal/*
find /var/log -type f \( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \
     -o -name '*-[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]' \) -delete
find /var/log -type f -exec truncate -s 0 {} +

# Temporary files (DO: /tmp/*, /var/tmp/*), including the uploads under /tmp/bootsecrets.
find /tmp /var/tmp -mindepth 1 -delete 2>/dev/null || true

# DO: write zeros over the free space, so that nothing deleted above can be read back from
# the snapshot's blocks. (The local qemu build turns the zeros into holes of its qcow2.)
# sync first: ext4 hands out the blocks of a deleted file only once the journal transaction
# that freed them is committed. And ext4 keeps a few thousand blocks back for its own
# metadata (reserved_clusters) that a file never gets: lend them for the fill.
sync
reserve=/sys/fs/ext4/$(basename "$(findmnt -n -o SOURCE /)")/reserved_clusters
kept=$(cat "$reserve" 2>/dev/null || echo "")
[ -z "$kept" ] || echo 0 > "$reserve"
dd if=/dev/zero of=/zerofile bs=1M 2>/dev/null || true
sync
rm -f /zerofile
sync
[ -z "$kept" ] || echo "$kept" > "$reserve"
echo "90-clean: image cleaned"
