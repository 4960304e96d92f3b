#!/usr/bin/env bash
# Stage 2 of the VM image, run by Packer inside the build VM as root (packer/appliance.pkr.hcl).
# It installs what Packer uploaded to /tmp, checks the sandbox under the worker's own systemd
# hardening, and leaves no build credential, host key or machine identity behind.
set -euo pipefail
: "${IMAGE_VERSION:?}"
say() { echo "provision: $*"; }

# The services' users, with the Dockerfile's fixed ids (the data disk's files keep working
# across image versions only if the ids stay the same).
groupadd --system --gid 910 appliance
for entry in redis:901 bao:902 api:903 worker:904 flower:905; do
  name=appliance-${entry%%:*}
  id=${entry##*:}
  groupadd --system --gid "$id" "$name"
  useradd --system --uid "$id" --gid "$id" --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin "$name"
done
usermod --append --groups appliance appliance-api
usermod --append --groups appliance appliance-worker

# The venv, built natively with the guest's Python (packer/build-venv.sh).
install -d -m 0755 /opt/appliance
tar --no-same-owner -C /opt/appliance -xf /tmp/appliance-venv.tar
ln -sfn /opt/appliance/venv/bin/appliance /usr/local/bin/appliance
ln -sfn /opt/appliance/venv/bin/sandbox /usr/local/bin/sandbox
/usr/local/bin/appliance --help >/dev/null

# Settings: the image's version, the image's defaults, and the site's (from the seed disk)
# joined at every boot into /run/appliance/appliance.env by appliance-seed.service.
install -d -m 0755 /etc/appliance /usr/local/lib/appliance
printf 'APPLIANCE_IMAGE_VERSION=%s\n' "$IMAGE_VERSION" > /etc/appliance/image.env
ln -sfn /run/appliance/appliance.env /etc/appliance/appliance.env
g=/tmp/appliance-guest
install -m 0644 "$g/defaults.env" /usr/local/lib/appliance/defaults.env
install -m 0755 "$g/seed.sh" /usr/local/lib/appliance/seed.sh
install -m 0755 "$g/selftest.py" /usr/local/lib/appliance/selftest.py
install -m 0644 "$g/add.py" /usr/local/lib/appliance/add.py
install -m 0644 "$g/nftables.conf" /etc/nftables.conf
install -m 0644 /tmp/appliance-units/*.service /tmp/appliance-units/*.target /etc/systemd/system/

# The data disk: the second virtio disk, formatted at its first boot (x-systemd.makefs formats
# only a device with no file system). nofail: without it the appliance's units fail (they all
# need /var/lib/appliance mounted) and the console says so, instead of an emergency shell.
install -d -m 0711 /var/lib/appliance
install -d -m 0700 /root/.ssh   # appliance-seed.service may write authorized_keys there
echo '/dev/vdb /var/lib/appliance ext4 defaults,nofail,nodev,nosuid,x-systemd.makefs,x-systemd.device-timeout=10min 0 2' >> /etc/fstab

# Debian's own redis-server (installed for its binary) never runs: the appliance runs its own.
systemctl disable redis-server.service >/dev/null 2>&1 || true
systemctl mask redis-server.service >/dev/null
# The firewall's rules must load on this kernel (a check: loading them here would cut Packer off).
nft -c -f /etc/nftables.conf
systemctl daemon-reload
systemctl enable appliance.target appliance-seed.service appliance-selftest.service nftables.service
systemctl set-default multi-user.target

# The sandbox under the worker's own hardening: the worker unit with `sandbox doctor` for its
# command (every layer must be active) and one real run.
# Two units, each one command: a unit whose delegated cgroup already passes the memory controller
# down (the first run made its children) takes no second process of its own (cgroup v2's rule).
check=/run/systemd/system/appliance-sandbox-check
python3 - /etc/systemd/system/appliance-worker.service "$check" <<'PY'
import sys

worker, check = sys.argv[1:3]
serve = "/usr/local/bin/appliance --state /var/lib/appliance serve worker"
commands = {
    "doctor": "/opt/appliance/venv/bin/sandbox doctor --json",
    "run": "/opt/appliance/venv/bin/sandbox run --source /usr/local/lib/appliance/add.py"
    " --entry add --args [2,40]",
}
dropped = ("Restart=", "RestartSec=", "Type=", "RequiresMountsFor=", "After=", "Wants=",
           "Requires=", "PartOf=", "WantedBy=", "EnvironmentFile=", "StandardOutput=")
for name, command in commands.items():
    out = []
    for line in open(worker).read().splitlines():
        if line.startswith(dropped) or (line.startswith("ReadWritePaths=") and "/var/lib" in line):
            continue
        if line.startswith("ExecStart="):
            assert line.endswith(serve), line
            line = line.replace(serve, command)
        out.append(line)
        if line == "[Service]":
            out += ["Type=oneshot", f"StandardOutput=file:/run/appliance-sandbox-check-{name}.json"]
    open(f"{check}-{name}.service", "w").write("\n".join(out) + "\n")
PY
systemctl daemon-reload
for name in doctor run; do
  if ! systemctl start "appliance-sandbox-check-$name.service"; then
    journalctl -u "appliance-sandbox-check-$name.service" --no-pager | tail -20
    cat "/run/appliance-sandbox-check-$name.json" || true
    exit 1
  fi
  say "sandbox $name under the worker's hardening: $(cat "/run/appliance-sandbox-check-$name.json")"
done
python3 - <<'PY'
import json

doctor = json.load(open("/run/appliance-sandbox-check-doctor.json"))
run = json.load(open("/run/appliance-sandbox-check-run.json"))
assert doctor["ok"], doctor
assert all(layer["active"] for layer in doctor["layers"].values()), doctor
assert run.get("status") == "ok" and run.get("value") == 42, run
PY
rm -f "$check"-*.service /run/appliance-sandbox-check-*.json
systemctl daemon-reload

# Nothing of the build stays: SSH is off until a seed enables it (with host keys made on the
# machine), the build key and the host keys made in the chroot go, and the machine-id is empty
# (systemd makes one at first boot).
systemctl disable ssh.service >/dev/null 2>&1 || true
rm -f /etc/ssh/ssh_host_*
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
apt-get clean
rm -rf /var/lib/apt/lists/* /tmp/appliance-venv.tar /tmp/appliance-units /tmp/appliance-guest
journalctl --rotate >/dev/null 2>&1 || true
journalctl --vacuum-time=1s >/dev/null 2>&1 || true
rm -f /root/.ssh/authorized_keys
fstrim -v / || true
say "image $IMAGE_VERSION provisioned"
