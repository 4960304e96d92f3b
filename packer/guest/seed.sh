#!/bin/sh
# appliance-seed.service, at every boot (packer/guest/seed.sh): read the operator's seed disk, if
# one is attached, and write this boot's settings.
#
# The seed is a FAT or ISO 9660 file system labelled CIDATA (as cloud-init's NoCloud seed) with
# any of these files at its root:
#   operator.pub     the operator's age recipient (age1...): the first boot encrypts OpenBao's
#                    unseal shares to it, and backups are encrypted to it.
#   unseal-shares    unseal shares, one a line: `appliance-unseal.service` unseals with them.
#   appliance.env    APPLIANCE_* settings of this site (e.g. APPLIANCE_API_AUTHORITIES).
#   authorized_keys  root's SSH keys: SSH is enabled (and port 22 opened) only with this file.
# operator.pub and unseal-shares go to /run/appliance/seed (a tmpfs, root only): never to a disk;
# appliance-unseal.service deletes the shares once it ran. appliance.env and authorized_keys are
# kept on the data disk (/var/lib/appliance/site), so that they outlive the seed and an image
# upgrade. A seed, when attached, is the whole truth for them: a file it lacks is removed from the
# site (so a seed without authorized_keys turns SSH off again).
#
# appliance.env is an EnvironmentFile of every appliance unit, root's included: only lines
# `APPLIANCE_NAME=value` are kept, carriage returns dropped (systemd ends a line at CR too), values
# of letters, digits and `_.,:/@+-` only, and none of the settings that name a path, an address,
# a port, a user, a credential or the TLS switch: a seed tunes the appliance, it does not re-point
# it. A line dropped is named on the console.
set -eu
umask 077
run=/run/appliance
seed=$run/seed
site=/var/lib/appliance/site
lib=/usr/local/lib/appliance
install -d -m 0700 "$seed" "$site"

dev=$(blkid -L CIDATA 2>/dev/null || blkid -L cidata 2>/dev/null || true)
if [ -n "$dev" ]; then
  mnt=$(mktemp -d)
  mount -o ro,nodev,nosuid,noexec "$dev" "$mnt"
  for f in operator.pub unseal-shares; do
    if [ -f "$mnt/$f" ] && [ ! -L "$mnt/$f" ] && [ "$(stat -c %s "$mnt/$f")" -le 65536 ]; then
      install -m 0600 "$mnt/$f" "$seed/$f"
    fi
  done
  for f in appliance.env authorized_keys; do
    # Regular files only (no symlink of an ISO's Rock Ridge), at most 64 KiB.
    if [ -f "$mnt/$f" ] && [ ! -L "$mnt/$f" ] && [ "$(stat -c %s "$mnt/$f")" -le 65536 ]; then
      install -m 0600 "$mnt/$f" "$site/$f"
    else
      rm -f "$site/$f"
    fi
  done
  umount "$mnt"
  rmdir "$mnt"
  echo "appliance-seed: read the seed disk $dev"
else
  echo "appliance-seed: no seed disk (label CIDATA)"
fi

# This boot's settings: the image's defaults, its version, then the site's APPLIANCE_* lines
# (only those: the file is an EnvironmentFile of every unit). The state directory is the units'.
env=$run/appliance.env
denied='^APPLIANCE_(STATE|IMAGE_VERSION|SERVICE_MANAGER|API_TLS|API_HOST|API_PLAINTEXT_IN_POD|VAULT_.*|REDIS_.*|WORKER_USER|.*_(FILE|DIR|PATH|CA|CERT|KEY|LOG|HOST|ADDR|PORT|USER|USERNAME|PASSWORD|TOKEN|SECRET)S?)$'
{
  cat "$lib/defaults.env" /etc/appliance/image.env
  if [ -f "$site/appliance.env" ]; then
    tr -d '\r' < "$site/appliance.env" | while IFS= read -r line; do
      case "$line" in '' | '#'*) continue ;; esac
      name=${line%%=*}
      if printf '%s\n' "$line" | grep -qxE 'APPLIANCE_[A-Z0-9_]+=[A-Za-z0-9_.,:/@+-]*' \
        && ! printf '%s\n' "$name" | grep -qE "$denied"; then
        printf '%s\n' "$line"
      else
        echo "appliance-seed: ignored ${name%%[!A-Za-z0-9_]*} from the seed's appliance.env" >&2
      fi
    done
  fi
} > "$env.tmp"
# Signed requests name the authority they were sent to (docs/CONTRACT.md): this machine's name
# and loopback (the self-test and the operator's shell sign for 127.0.0.1:8443), plus the names a
# site gives in appliance.env for its clients.
local_authorities="$(hostname):8443,localhost:8443,127.0.0.1:8443"
if grep -q '^APPLIANCE_API_AUTHORITIES=' "$env.tmp"; then
  sed -i "s/^APPLIANCE_API_AUTHORITIES=\(.*\)$/APPLIANCE_API_AUTHORITIES=\1,$local_authorities/" "$env.tmp"
else
  echo "APPLIANCE_API_AUTHORITIES=$local_authorities" >> "$env.tmp"
fi
chmod 0600 "$env.tmp"
mv "$env.tmp" "$env"

if [ -s "$site/authorized_keys" ]; then
  install -m 0600 "$site/authorized_keys" /root/.ssh/authorized_keys
  ssh-keygen -A >/dev/null
  nft add element inet appliance tcp_open '{ 22 }'
  systemctl start --no-block ssh.service
  echo "appliance-seed: SSH enabled for root ($(grep -c . "$site/authorized_keys") key(s))"
else
  rm -f /root/.ssh/authorized_keys
fi
