#!/usr/bin/env bash
# The VM image's test (issue 15), run by .ci/run after the test suite. Budget: 20 minutes cold on
# 2 cores; the stage-1 disk and the venv's wheels are cached outside the clone
# (${XDG_CACHE_HOME:-~/.cache}/appliance, keyed by what built them).
#
#  1. packer validate; the units' systemd-analyze security gates (packer/check-units.sh).
#  2. Build the image (packer/build.sh: stage 1, venv, Packer) twice: version V and V+1 (patch).
#  3. Boot V under TCG with an empty data disk and a seed (operator.pub, authorized_keys, the
#     site's appliance.env): first boot initialises itself; wait for SELFTEST: OK on the serial
#     console; the unseal shares printed there, encrypted to the operator's key, decrypt to a
#     quorum. Only the API's port and (seeded) SSH listen off loopback.
#  4. From the host, through hostfwd on 127.0.0.1: register a client over SSH, submit a signed
#     add(2, 40) over TLS to the API, read 42. Rotate the transit keys.
#  5. Power off; boot the same disks with the shares on the seed: the unseal unit unseals, the
#     earlier client still works, `audit verify` passes.
#  6. `appliance backup`, a change (one more client), `appliance restore` with the operator's
#     identity and the shares: the change is gone, the earlier client works, `audit verify`.
#  7. Upgrade: V+1 boots against V's data disk: a backup is taken first, clients, keys and
#     the audit log are kept. Then V boots against it again: the downgrade is refused.
#
# Skips (exit 0, saying why) only where the machine cannot: not root, no KVM-less QEMU possible,
# too little disk. Everything it starts is stopped on every exit path.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
T0=$(date +%s)
step() { printf 'tests/vm [%4d s] %s\n' "$(($(date +%s) - T0))" "$*"; }
skip() { echo "tests/vm/run.sh: SKIP: $*"; exit 0; }
die() { echo "tests/vm/run.sh: FAIL: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || skip "needs root (debootstrap, loop devices, chroot)"
[ -x .venv/bin/python ] || die ".venv is missing: run ./dev.sh test first (the README's test command)"
free_mb=$(df -Pm /tmp | awk 'NR==2 {print $4}')
[ "$free_mb" -ge 8000 ] || skip "needs 8 GB free in /tmp, has ${free_mb} MB"

missing=()
for tool in packer:packer qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils \
  debootstrap:debootstrap sfdisk:fdisk mkfs.vfat:dosfstools mcopy:mtools ssh:openssh-client \
  systemd-analyze:systemd; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if ((${#missing[@]})); then
  step "installing ${missing[*]}"
  timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { timeout 300 apt-get update -qq \
         && timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } \
    || skip "cannot install ${missing[*]}"
fi
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || skip "no loop devices"

PY=$root/.venv/bin/python
APPLIANCE=$root/.venv/bin/appliance
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' appliance/__init__.py)
NEXT=$(echo "$VERSION" | awk -F. '{printf "%d.%d.%d", $1, $2, $3 + 1}')
BOOT_TIMEOUT=${VM_BOOT_TIMEOUT:-900}

work=$(mktemp -d /tmp/appliance-vmtest.XXXXXX)
qemu_pid=
builder_pid=
cleanup() {
  local rc=$?
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null
  [ -n "$builder_pid" ] && kill -- "$builder_pid" 2>/dev/null && wait "$builder_pid" 2>/dev/null
  if [ "$rc" -ne 0 ] && [ -z "${VM_KEEP:-}" ]; then
    for log in "$work"/serial-*.log; do
      [ -f "$log" ] || continue
      echo "--- $(basename "$log") (last 40 lines) ---" >&2
      tail -40 "$log" | tr -d '\r' >&2
    done
  fi
  if [ -n "${VM_KEEP:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
SSH_PORT=$(free_port)
API_PORT=$(free_port)
FW_PORT=$(free_port)   # forwarded to the guest's 9999, which the firewall must drop
API_URL="https://127.0.0.1:$API_PORT"

# --- 1. validate and gate -------------------------------------------------------------------
step "packer validate; unit gates"
# Packer checks that the key parses: a throw-away one (the build makes its own).
ssh-keygen -q -t ed25519 -N '' -C validate -f "$work/validate-key"
packer validate -var base_image=/dev/null -var "build_key=$work/validate-key" \
  -var venv_tar=/dev/null -var image_version=0.0.0 packer/appliance.pkr.hcl >/dev/null
packer/check-units.sh

# --- 2. build -------------------------------------------------------------------------------
# VM_IMAGE_V1 / VM_IMAGE_V2: images already built (of versions VERSION and NEXT) to test instead.
if [ -n "${VM_IMAGE_V1:-}" ]; then
  mkdir -p "$work/v1" && ln -s "$(realpath "$VM_IMAGE_V1")" "$work/v1/appliance.qcow2"
else
  step "building image $VERSION"
  packer/build.sh "$work/v1" "$VERSION" 2>&1 | sed 's/^/  /'
fi
if [ -n "${VM_IMAGE_V2:-}" ]; then
  mkdir -p "$work/v2" && ln -s "$(realpath "$VM_IMAGE_V2")" "$work/v2/appliance.qcow2"
else
  # The upgrade's image is built while the first one boots (the build mostly waits on its TCG
  # guest; the two share the cores).
  { exec packer/build.sh "$work/v2" "$NEXT" > "$work/build-v2.log" 2>&1; } &
  builder_pid=$!
fi

# --- keys, seed, data disk ------------------------------------------------------------------
mkdir -p "$work/seed" "$work/host/keys"
"$PY" - "$work" <<'EOF'
import sys, pyrage
work = sys.argv[1]
identity = pyrage.x25519.Identity.generate()
open(f"{work}/operator.key", "w").write(str(identity) + "\n")
open(f"{work}/seed/operator.pub", "w").write(str(identity.to_public()) + "\n")
EOF
chmod 0600 "$work/operator.key"
ssh-keygen -q -t ed25519 -N '' -C appliance-vm-test -f "$work/ssh"
cp "$work/ssh.pub" "$work/seed/authorized_keys"
printf 'APPLIANCE_API_AUTHORITIES=127.0.0.1:%s,localhost:%s\n' "$API_PORT" "$API_PORT" \
  > "$work/seed/appliance.env"
make_seed() { # DIR IMAGE
  rm -f "$2"
  mkfs.vfat -n CIDATA -C "$2" 2048 >/dev/null
  mcopy -i "$2" "$1"/* ::
}
make_seed "$work/seed" "$work/seed-1.img"
qemu-img create -q -f qcow2 "$work/data.qcow2" 4G

SSH=(ssh -q -i "$work/ssh" -p "$SSH_PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
  -o ConnectTimeout=10 -o BatchMode=yes root@127.0.0.1)
vm() { "${SSH[@]}" "$@"; }

boot() { # NAME IMAGE SEED; then wait for `SELFTEST: OK` (or $4 as the line to wait for)
  local name=$1 image=$2 seed=$3 want=${4:-SELFTEST: OK} log=$work/serial-$1.log
  step "boot $name: $(basename "$(dirname "$image")")/$(basename "$image"), seed $(basename "$seed")"
  : > "$log"
  qemu-system-x86_64 -accel "${VM_ACCEL:-tcg}" -cpu max -smp 2 -m 2048 -display none \
    -no-reboot -monitor none -serial "file:$log" \
    -drive "file=$image,if=virtio,format=qcow2,snapshot=on" \
    -drive "file=$work/data.qcow2,if=virtio,format=qcow2" \
    -drive "file=$seed,if=virtio,format=raw,readonly=on" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$SSH_PORT-:22,hostfwd=tcp:127.0.0.1:$API_PORT-:8443,hostfwd=tcp:127.0.0.1:$FW_PORT-:9999" \
    -device virtio-net-pci,netdev=n0 </dev/null &
  qemu_pid=$!
  local deadline=$(($(date +%s) + BOOT_TIMEOUT))
  until grep -q "$want" "$log"; do
    grep -a "SELFTEST: FAIL" "$log" | tr -d '\r' | head -1 | grep . >&2 && die "boot $name: self-test failed"
    kill -0 "$qemu_pid" 2>/dev/null || die "boot $name: QEMU exited"
    [ "$(date +%s)" -lt "$deadline" ] || die "boot $name: no '$want' in ${BOOT_TIMEOUT} s"
    sleep 2
  done
  step "boot $name: $want"
  local ssh_deadline=$(($(date +%s) + 120))
  until vm true 2>/dev/null; do
    [ "$(date +%s)" -lt "$ssh_deadline" ] || die "boot $name: no SSH"
    sleep 2
  done
}

shutdown_vm() {
  vm systemctl poweroff || true
  local deadline=$(($(date +%s) + 120))
  while kill -0 "$qemu_pid" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || { kill "$qemu_pid"; break; }
    sleep 1
  done
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=
}

submit() { # KEYID: a signed add(2, 40) from the host over TLS; prints the value
  "$APPLIANCE" --state "$work/host" submit packer/guest/add.py add --args '[2, 40]' --wait \
    --api-url "$API_URL" --ca "$work/host/ca.crt" --key-id "$1" \
    --private-key "$work/host/keys/$1.key" \
    | "$PY" -c 'import json, sys; r = json.load(sys.stdin); assert r["status"] == "succeeded", r; print(r["result"]["value"])'
}

# --- 3. first boot --------------------------------------------------------------------------
boot first "$work/v1/appliance.qcow2" "$work/seed-1.img"
"$PY" - "$work" <<'EOF'
import json, re, sys, pyrage
work = sys.argv[1]
text = open(f"{work}/serial-first.log", "rb").read().decode("utf-8", "replace").replace("\r", "")
block = re.search(r"-----BEGIN APPLIANCE UNSEAL SHARES-----\n(.*?)-----END APPLIANCE UNSEAL SHARES-----", text, re.S)
assert block, "no unseal shares on the console"
# The console shows the unit's lines behind journald's prefix ("[  380.04] appliance[405]: "),
# and other units may print between them: keep the armor's own lines.
lines = (re.sub(r"^(\[\s*[0-9.]+\]\s+)?[\w.@-]+\[\d+\]:\s", "", l) for l in block.group(1).splitlines())
armor = "\n".join(l.strip() for l in lines
                   if re.fullmatch(r"-----(BEGIN|END) AGE ENCRYPTED FILE-----|[A-Za-z0-9+/=]{1,64}", l.strip()))
identity = pyrage.x25519.Identity.from_str(open(f"{work}/operator.key").read().strip())
shares = json.loads(pyrage.decrypt(armor.encode() + b"\n", [identity]))
assert len(shares["keys"]) >= shares["threshold"] >= 2, shares["threshold"]
open(f"{work}/shares.txt", "w").write("\n".join(shares["keys"][: shares["threshold"]]) + "\n")
print(f"  {len(shares['keys'])} shares, threshold {shares['threshold']}")
EOF
chmod 0600 "$work/shares.txt"
vm appliance shares ack --yes >/dev/null   # saved: the ciphertext kept until now goes
vm "test ! -e /var/lib/appliance/unseal-shares.age" || die "the kept shares survived their ack"

step "network exposure, secrets on disk"
# Off loopback only the API (8443) and SSH (seeded) listen.
vm "ss -ltnH" | awk '{print $4}' | while read -r addr; do
  case "$addr" in 127.0.0.1:* | \[::1\]:* | *:8443 | *:22) ;; *) die "listening off loopback: $addr" ;; esac
done
# The firewall: a listener on every interface of the guest, port 9999, answers on its loopback
# but not from outside (QEMU forwards the host's FW_PORT to the guest's eth0; QEMU accepts on
# the host's side at once, so what tells is whether the listener's byte arrives).
vm "nohup python3 -c 'import socket; s = socket.create_server((\"0.0.0.0\", 9999)); [s.accept()[0].sendall(b\"o\") for _ in range(100)]' >/dev/null 2>&1 &"
vm "python3 -c 'import socket, time; time.sleep(1); assert socket.create_connection((\"127.0.0.1\", 9999), 5).recv(1) == b\"o\"'" \
  || die "the probe listener does not answer on the guest's loopback"
if "$PY" -c 'import socket, sys; s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 5); s.settimeout(10); sys.exit(0 if s.recv(1) == b"o" else 1)' "$FW_PORT" 2>/dev/null; then
  die "port 9999 of the guest answered from outside: the firewall let it through"
fi
vm "pkill -f 'create_server' || true"
# No unseal share or root token on the data disk.
vm "test ! -e /var/lib/appliance/secrets/bao-unseal.json" || die "unseal shares on the data disk"
while read -r share; do
  ! vm "grep -rqsF -- '$share' /var/lib/appliance /etc /root" || die "an unseal share is on a disk"
done < "$work/shares.txt"

step "a client registered over SSH; a signed job from the host over TLS"
vm cat /var/lib/appliance/tls/ca.crt > "$work/host/ca.crt"
"$APPLIANCE" keygen hostclient --out "$work/host/keys" >/dev/null
vm "cat > /root/hostclient.pub" < "$work/host/keys/hostclient.pub"
vm appliance clients add hostclient --public-key /root/hostclient.pub --allow-function add >/dev/null
[ "$(submit hostclient)" = 42 ] || die "add(2, 40) from the host"
step "the worker killed: systemd starts it again (in its delegated cgroup, made anew)"
before=$(vm systemctl show -P MainPID appliance-worker.service)
vm systemctl kill -s KILL appliance-worker.service
deadline=$(($(date +%s) + 300))
until pid=$(vm systemctl show -P MainPID appliance-worker.service) && [ "$pid" != 0 ] \
  && [ "$pid" != "$before" ] && [ "$(submit hostclient 2>/dev/null)" = 42 ]; do
  [ "$(date +%s)" -lt "$deadline" ] || die "the worker did not come back after a kill"
  sleep 3
done
vm appliance keys rotate >/dev/null
[ "$(submit hostclient)" = 42 ] || die "add(2, 40) after the key rotation"
shutdown_vm

# --- 5. reboot, unsealed from the seed -----------------------------------------------------
cp "$work/shares.txt" "$work/seed/unseal-shares"
make_seed "$work/seed" "$work/seed-2.img"
rm -f "$work/seed/unseal-shares"
boot second "$work/v1/appliance.qcow2" "$work/seed-2.img"
[ "$(submit hostclient)" = 42 ] || die "the earlier client after a reboot"
vm appliance audit verify >/dev/null || die "audit verify after a reboot"

# --- 6. backup and restore -----------------------------------------------------------------
step "backup, a change, restore"
vm appliance backup --out /root/backup.age | sed 's/^/  /'
"$APPLIANCE" keygen later --out "$work/host/keys" >/dev/null
vm "cat > /root/later.pub" < "$work/host/keys/later.pub"
vm appliance clients add later --public-key /root/later.pub --allow-function add >/dev/null
[ "$(submit later)" = 42 ] || die "the later client before the restore"
vm "umask 077; cat > /root/operator.key" < "$work/operator.key"
vm "appliance restore /root/backup.age --identity /root/operator.key --shares-file /dev/stdin; rc=\$?; rm -f /root/operator.key; exit \$rc" \
  < "$work/shares.txt" | sed 's/^/  /'
vm appliance clients list --json | "$PY" -c 'import json, sys; ids = {c["key_id"] for c in json.load(sys.stdin)}; assert "hostclient" in ids and "later" not in ids, ids'
deadline=$(($(date +%s) + 300))
until [ "$(submit hostclient 2>/dev/null)" = 42 ]; do
  [ "$(date +%s)" -lt "$deadline" ] || die "the earlier client after the restore"
  sleep 3
done
vm appliance audit verify >/dev/null || die "audit verify after the restore"
shutdown_vm

# --- 7. upgrade, then a refused downgrade --------------------------------------------------
step "waiting for the image $NEXT"
if [ -n "$builder_pid" ]; then
  wait "$builder_pid" || { cat "$work/build-v2.log" >&2; die "building $NEXT"; }
  builder_pid=
fi
boot upgrade "$work/v2/appliance.qcow2" "$work/seed-2.img"
vm "ls /var/lib/appliance/backups/" | grep -q "^pre-upgrade-" || die "no backup before the upgrade"
[ "$(submit hostclient)" = 42 ] || die "the earlier client after the upgrade"
vm appliance audit verify >/dev/null || die "audit verify after the upgrade"
shutdown_vm
boot downgrade "$work/v1/appliance.qcow2" "$work/seed-2.img" "a downgrade is refused"
shutdown_vm

step "passed"
