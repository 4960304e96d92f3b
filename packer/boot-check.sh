#!/usr/bin/env bash
# Boots a VM image under QEMU and waits (bounded) until it is up (issue 15).
#
#   packer/boot-check.sh IMAGE [LOG]
#
# The image is opened with snapshot=on (never written). TCG by default: on this machine /dev/kvm
# exists but guests hang, so KVM is used only when VM_ACCEL=kvm is set. Serial console to LOG
# (default: a temporary file, printed on failure); user-mode networking with SSH forwarded from
# 127.0.0.1:<free port> only. Success = a login prompt or systemd's "Reached target ... Multi-User
# System" on the serial console within VM_BOOT_TIMEOUT seconds (default 300). If IMAGE.build-key
# exists (packer/rootfs-disk.sh writes it; VM_SSH_KEY overrides), the check also logs in as root
# through the forwarded port, prints `systemctl is-system-running` and powers the guest off, then
# waits (bounded) for QEMU to exit. QEMU still running at exit gets SIGTERM (SIGKILL after 5 s):
# nothing stays running on any exit path. Prints the seconds until the marker.
set -euo pipefail

die() { echo "boot-check.sh: $*" >&2; exit 1; }
say() { echo "boot-check.sh: $*" >&2; }

readonly TIMEOUT=${VM_BOOT_TIMEOUT:-300}
readonly ACCEL=${VM_ACCEL:-tcg}
readonly MARKER='login: *$|Reached target .*Multi-User System'

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

QEMU_PID=
WORK=
cleanup() {
  if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
    # QEMU quits on SIGTERM ("terminating on signal 15"); the disk is a snapshot, nothing to flush.
    kill -TERM "$QEMU_PID" 2>/dev/null || true
    local _
    for _ in $(seq 1 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
  fi
  [[ -n $WORK ]] && rm -rf "$WORK"
}

main() {
  (($# >= 1 && $# <= 2)) || die "usage: boot-check.sh IMAGE [LOG]"
  local image=$1 log=${2:-} accel_args port started
  [[ -r $image ]] || die "no image at $image"
  command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing (apt-get install qemu-system-x86)"
  case $ACCEL in
    kvm) [[ -w /dev/kvm ]] || die "VM_ACCEL=kvm but /dev/kvm is not usable"; accel_args=(-accel kvm -cpu host) ;;
    tcg) accel_args=(-accel "tcg,thread=multi" -cpu max) ;;
    *) die "VM_ACCEL must be tcg or kvm" ;;
  esac
  WORK=$(mktemp -d /tmp/boot-check.XXXXXX)
  trap cleanup EXIT
  trap 'exit 130' INT TERM HUP
  [[ -n $log ]] || log=$WORK/serial.log
  : >"$log"
  port=$(free_port)
  started=$SECONDS
  qemu-system-x86_64 "${accel_args[@]}" -smp 2 -m 1024 -nographic -no-reboot \
    -drive "file=$image,if=virtio,format=qcow2,snapshot=on" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=n0 \
    -serial "file:$log" -monitor none \
    </dev/null >"$WORK/qemu.out" 2>&1 &
  QEMU_PID=$!
  say "qemu pid $QEMU_PID ($ACCEL), serial in $log, ssh forwarded from 127.0.0.1:$port"
  while ! grep -Eqa "$MARKER" "$log"; do
    if ! kill -0 "$QEMU_PID" 2>/dev/null; then
      cat "$WORK/qemu.out" >&2; tail -30 "$log" >&2; die "qemu exited before the guest was up"
    fi
    if ((SECONDS - started > TIMEOUT)); then
      tail -30 "$log" >&2; die "no login prompt after ${TIMEOUT} s"
    fi
    sleep 1
  done
  local up=$((SECONDS - started))
  say "up after $up s: $(grep -Ea "$MARKER" "$log" | head -n1 | tr -d '\r')"
  local key=${VM_SSH_KEY:-$image.build-key}
  if [[ -r $key ]]; then ssh_check "$key" "$port"; fi
  echo "$up"
}

# Log in through the forwarded port, report the guest's state, power it off, wait for QEMU.
ssh_check() {
  local key=$1 port=$2 ssh=(ssh -i "$1" -p "$2" -o BatchMode=yes -o StrictHostKeyChecking=no
    -o UserKnownHostsFile=/dev/null -o ConnectTimeout=10 -o LogLevel=ERROR root@127.0.0.1)
  local state t0=$SECONDS
  until state=$("${ssh[@]}" 'systemctl is-system-running --wait' 2>/dev/null); do
    [[ -n $state ]] && break
    ((SECONDS - t0 < 120)) || die "no SSH login on 127.0.0.1:$port after 120 s"
    sleep 2
  done
  say "ssh root@127.0.0.1:$port after $((SECONDS - t0)) s more: system $state"
  [[ $state == running ]] || "${ssh[@]}" 'systemctl --failed --no-legend' >&2 || true
  "${ssh[@]}" 'systemctl poweroff' 2>/dev/null || true
  t0=$SECONDS
  while kill -0 "$QEMU_PID" 2>/dev/null; do
    ((SECONDS - t0 < 120)) || die "guest did not power off within 120 s"
    sleep 1
  done
  wait "$QEMU_PID" 2>/dev/null || true
  QEMU_PID=
  say "powered off in $((SECONDS - t0)) s"
}

main "$@"
