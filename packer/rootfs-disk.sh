#!/usr/bin/env bash
# Stage 1 of the VM image (issue 15): a bootable Debian bookworm disk, made natively, no installer ISO.
#
#   packer/rootfs-disk.sh OUT.qcow2
#
# 1. debootstrap --variant=minbase bookworm + rootfs-packages.txt, upgraded from the host's
#    bookworm-security source: cached as a tarball.
# 2. A raw disk with one bootable MBR partition at 1 MiB, attached BY OFFSET (`losetup -o`: there
#    is no udev here, so `losetup -P` makes no partition devices), `mkfs.ext4 -O ^64bit`, the
#    rootfs copied in, boot-packages.txt installed in a chroot (kernel, extlinux, systemd, sshd),
#    `extlinux --install` + syslinux's mbr.bin, kernel command line `console=ttyS0`.
# 3. `qemu-img convert -O qcow2`: cached, then copied to OUT.
#
# OUT.build-key is the private half of a build-only SSH key for root, in the disk's
# authorized_keys, for stage 2 (Packer), which removes it from the image.
#
# Cache: ${XDG_CACHE_HOME:-$HOME/.cache}/appliance/: vm-rootfs-<rkey>.tar (debootstrap; <rkey>
# hashes rootfs-packages.txt and the debootstrap code) and vm-disk-<key>.{qcow2,build-key} (<key>
# hashes this script, both lists and the architecture). VM_DISK_REBUILD=1 ignores the cached disk.
# Needs root; installs debootstrap, fdisk (sfdisk), qemu-utils and openssh-client if missing. BASE_MIRROR overrides
# the Debian mirror read from the host's apt sources. Loop devices and mounts are released on every
# exit path.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
readonly ROOTFS_PACKAGES=$here/rootfs-packages.txt
readonly BOOT_PACKAGES=$here/boot-packages.txt
readonly CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/appliance
readonly SUITE=bookworm
readonly DISK_SIZE=${VM_DISK_SIZE:-4G}
readonly PART_OFFSET=1048576

die() { echo "rootfs-disk.sh: $*" >&2; exit 1; }
say() { echo "rootfs-disk.sh: $*" >&2; }

packages() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$1" | grep -v '^$' | sort -u; }

# The disk's key: this script, both lists, the architecture. The rootfs tarball's key covers only
# what builds it (its list and the functions that run debootstrap), so that editing the disk
# stage does not repeat debootstrap.
cache_key() {
  { cat "$0" "$ROOTFS_PACKAGES" "$BOOT_PACKAGES"; dpkg --print-architecture; } | sha256sum | cut -c1-12
}

rootfs_key() {
  { cat "$ROOTFS_PACKAGES"; declare -f build_rootfs_tarball host_mirror; echo "$SUITE"
    dpkg --print-architecture; } | sha256sum | cut -c1-12
}

# URIs of the host's apt entries for SUITE (deb822 .sources and one-line .list), first match.
# Same reading as packaging/base-image.sh.
host_mirror() {
  local suite=$1
  {
    awk -v s="$suite" 'BEGIN{RS=""; FS="\n"} {
        uris=""; ok=0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); split($i, u, " "); uris=u[1] }
          if ($i ~ /^Suites:/) { n=split($i, t, " "); for (j = 2; j <= n; j++) if (t[j] == s) ok=1 }
          if ($i ~ /^Enabled:[ \t]*no/) ok=0
        }
        if (ok && uris != "") print uris
      }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true
    { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } \
      | awk -v s="$suite" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) while ($i !~ /\]$/) i++; if ($2 ~ /^\[/) i++;
                                        if ($(i + 1) == s) print $i }'
  } | head -n1
}

install_tools() {
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v sfdisk >/dev/null || missing+=(fdisk)
  command -v qemu-img >/dev/null || missing+=(qemu-utils)
  command -v ssh-keygen >/dev/null || missing+=(openssh-client)
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || die "missing ${missing[*]} and only root can install them"
  timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { timeout 300 apt-get update -qq && timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    || die "apt-get install ${missing[*]} failed"
}

# Everything this run mounted or attached lives under WORK or in LOOP: released in reverse order.
# Long steps run in the background under `timeout` (CHILD): bash runs a trap only once the
# foreground command has ended, so a TERM during debootstrap would otherwise wait for it.
WORK=
LOOP=
CHILD=
BUILD_KEY=
cleanup() {
  local m
  if [[ -n $CHILD ]] && kill -0 "$CHILD" 2>/dev/null; then
    kill -TERM "$CHILD" 2>/dev/null || true
    wait "$CHILD" 2>/dev/null || true
  fi
  if [[ -n $WORK ]]; then
    kill_chrooted "$WORK/"
    awk -v r="$WORK/" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" || true
    done
  fi
  if [[ -n $LOOP ]]; then losetup -d "$LOOP" 2>/dev/null || true; fi
  if [[ -n $WORK ]]; then rm -rf --one-file-system "$WORK"; fi
}

# run SECONDS CMD...: CMD under timeout, in the background, so that signals reach the trap at once.
run() {
  local limit=$1 status=0
  shift
  timeout "$limit" "$@" &
  CHILD=$!
  wait "$CHILD" || status=$?
  CHILD=
  return "$status"
}

# apt runs dpkg in a process group of its own: TERM to the chroot's shell leaves it running on the
# disk, which then cannot be unmounted nor its loop device detached. Kill every process whose root
# is under $1 (while the mounts are still there: after a lazy umount its root reads as "/").
kill_chrooted() {
  local prefix=$1 p root pids=() _
  for p in /proc/[0-9]*; do
    root=$(readlink "$p/root" 2>/dev/null) || continue
    [[ $root/ == "$prefix"* ]] && pids+=("${p#/proc/}")
  done
  ((${#pids[@]} == 0)) && return 0
  kill -KILL "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 50); do
    any_running "${pids[@]}" || return 0
    sleep 0.1
  done
}

# Whether any of the PIDs is still running (zombies do not count: they hold no files).
any_running() {
  local p state
  for p in "$@"; do
    state=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) || continue
    [[ -n $state && $state != Z ]] && return 0
  done
  return 1
}

in_root() {
  run 1200 chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 sh -c "$2"
}

apt_sources() {
  local rootfs=$1 mirror=$2 security
  security=$(host_mirror "$SUITE-security")
  rm -f "$rootfs/etc/apt/sources.list"
  {
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\n' "$mirror" "$SUITE" "$SUITE"
    printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    if [[ -n $security ]]; then
      printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\n' "$security" "$SUITE"
      printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    fi
  } >"$rootfs/etc/apt/sources.list.d/debian.sources"
}

# Stage 1a: the debootstrap rootfs tarball (cached).
build_rootfs_tarball() {
  local tarball=$1 mirror=$2 include started=$SECONDS
  include=$(packages "$ROOTFS_PACKAGES" | paste -sd, -)
  say "debootstrap --variant=minbase $SUITE with $include"
  run 900 debootstrap --variant=minbase --include="$include" "$SUITE" "$WORK/rootfs" "$mirror" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
  say "debootstrap: $((SECONDS - started)) s"
  # debootstrap may leave proc/sys mounted in the target.
  awk -v r="$WORK/rootfs/" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r \
    | while read -r m; do umount "$m"; done
  tar --numeric-owner --xattrs -C "$WORK/rootfs" -cf "$WORK/rootfs.tar" .
  rm -rf --one-file-system "$WORK/rootfs"
  mv "$WORK/rootfs.tar" "$tarball"
}

# Stage 1b: kernel, boot loader, init and sshd in a chroot on the mounted disk.
configure_root() {
  local mnt=$1 mirror=$2 uuid=$3 boot started=$SECONDS
  boot=$(packages "$BOOT_PACKAGES" | paste -sd' ' -)
  apt_sources "$mnt" "$mirror"
  cp /etc/resolv.conf "$mnt/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$mnt/usr/sbin/policy-rc.d"
  chmod 755 "$mnt/usr/sbin/policy-rc.d"
  mount -t proc proc "$mnt/proc"
  mount -t sysfs sysfs "$mnt/sys"
  mount --bind /dev "$mnt/dev"
  mount -t devpts devpts "$mnt/dev/pts" -o newinstance,ptmxmode=0666 2>/dev/null || true
  in_root "$mnt" "apt-get update -qq && apt-get -y -qq -o Dpkg::Options::=--force-confold upgrade \
      && apt-get -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold install $boot \
      && apt-get clean" >"$WORK/chroot-install.log" 2>&1 \
    || { tail -30 "$WORK/chroot-install.log" >&2; die "apt-get install in the chroot failed"; }
  say "chroot install ($boot): $((SECONDS - started)) s"

  local kernel initrd
  kernel=$(find "$mnt/boot" -maxdepth 1 -name "vmlinuz-*" -printf "%f\n" | sort -V | tail -n1)
  initrd=initrd.img-${kernel#vmlinuz-}
  [[ -s $mnt/boot/$initrd ]] || die "no initramfs for $kernel"
  mkdir -p "$mnt/boot/extlinux"
  cat >"$mnt/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
TIMEOUT 0
PROMPT 0
LABEL debian
  LINUX /boot/$kernel
  INITRD /boot/$initrd
  APPEND root=UUID=$uuid ro console=tty0 console=ttyS0,115200n8 net.ifnames=0
EOF
  in_root "$mnt" 'extlinux --install /boot/extlinux' >>"$WORK/chroot-install.log" 2>&1 \
    || { tail -10 "$WORK/chroot-install.log" >&2; die "extlinux --install failed"; }

  # Stage 2 (Packer) logs in as root with the build key; its last step removes it, the host keys
  # and the machine-id. Only this cached intermediate disk holds it, never the shipped image.
  install -d -m 700 "$mnt/root/.ssh"
  install -m 600 "$BUILD_KEY.pub" "$mnt/root/.ssh/authorized_keys"
  printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$uuid" >"$mnt/etc/fstab"
  echo appliance >"$mnt/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 appliance\n::1 localhost ip6-localhost ip6-loopback\n' >"$mnt/etc/hosts"
  mkdir -p "$mnt/etc/systemd/network"
  printf '[Match]\nName=eth* en*\n\n[Network]\nDHCP=yes\n' >"$mnt/etc/systemd/network/50-dhcp.network"
  in_root "$mnt" 'systemctl enable systemd-networkd.service ssh.service' >>"$WORK/chroot-install.log" 2>&1
  # systemd-resolved is not installed: the guest's resolv.conf points at QEMU's user-mode DNS.
  printf 'nameserver 10.0.2.3\n' >"$mnt/etc/resolv.conf"
  # Regenerated at first boot: every instance of the image gets its own.
  : >"$mnt/etc/machine-id"
  rm -f "$mnt/usr/sbin/policy-rc.d" "$mnt/var/lib/dbus/machine-id"
  rm -rf "$mnt"/var/lib/apt/lists/* "$mnt"/var/cache/apt/*.bin "$mnt"/tmp/* "$mnt"/var/tmp/*
}

build_disk() {
  local qcow=$1 key=$2 mirror tarball raw uuid started=$SECONDS
  mirror=${BASE_MIRROR:-$(host_mirror "$SUITE")}
  [[ -n $mirror ]] || die "no apt source for $SUITE on this host: set BASE_MIRROR"
  WORK=$(mktemp -d "$CACHE/.vm-build.XXXXXX")
  trap cleanup EXIT
  trap 'exit 130' INT TERM HUP
  tarball=$CACHE/vm-rootfs-$(rootfs_key).tar
  rm -f "$BUILD_KEY" "$BUILD_KEY.pub"
  ssh-keygen -q -t ed25519 -N '' -C appliance-build-only -f "$BUILD_KEY"
  if [[ ! -s $tarball ]]; then build_rootfs_tarball "$tarball" "$mirror"; fi

  raw=$WORK/disk.raw
  truncate -s "$DISK_SIZE" "$raw"
  printf 'label: dos\nstart=%s, type=83, bootable\n' $((PART_OFFSET / 512)) | sfdisk -q "$raw"
  local sectors size
  sectors=$(sfdisk -d "$raw" | awk -F'size=' '/start=/ {split($2, a, ","); gsub(/ /, "", a[1]); print a[1]}')
  size=$((sectors * 512))
  LOOP=$(losetup -f --show -o "$PART_OFFSET" --sizelimit "$size" "$raw")
  mkfs.ext4 -q -O ^64bit -L appliance-root "$LOOP"
  uuid=$(blkid -s UUID -o value "$LOOP")
  mkdir "$WORK/mnt"
  mount "$LOOP" "$WORK/mnt"
  tar --numeric-owner --xattrs -C "$WORK/mnt" -xf "$tarball"
  configure_root "$WORK/mnt" "$mirror" "$uuid"
  # syslinux's MBR: 440 bytes, the partition table after them stays.
  dd if="$WORK/mnt/usr/lib/syslinux/mbr/mbr.bin" of="$raw" bs=440 count=1 conv=notrunc status=none
  # Deleted files (apt's .debs, lists) still hold non-zero blocks: discard them (the loop device
  # punches holes in the sparse raw file), or qemu-img copies them into the qcow2.
  fstrim "$WORK/mnt" || say "fstrim failed: the qcow2 will be larger"
  cleanup_mounts_only
  losetup -d "$LOOP"
  LOOP=
  qemu-img convert -O qcow2 "$raw" "$WORK/disk.qcow2"
  mv "$WORK/disk.qcow2" "$qcow"
  say "disk built in $((SECONDS - started)) s"
}

cleanup_mounts_only() {
  awk -v r="$WORK/" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount "$m"
  done
}

main() {
  (($# == 1)) || die "usage: rootfs-disk.sh OUT.qcow2"
  local out=$1 key qcow
  [[ $(id -u) == 0 ]] || die "needs root (debootstrap, losetup, mount, chroot)"
  install_tools
  key=$(cache_key)
  mkdir -p "$CACHE"
  qcow=$CACHE/vm-disk-$key.qcow2
  BUILD_KEY=$CACHE/vm-disk-$key.build-key
  exec 9>"$CACHE/vm-$key.lock"
  flock -w 1200 9 || die "another rootfs-disk.sh holds $CACHE/vm-$key.lock"
  if [[ ! -s $qcow || ! -s $BUILD_KEY || -n ${VM_DISK_REBUILD:-} ]]; then
    build_disk "$qcow" "$key"
    # Older keys' tarballs and disks are dead weight: keep only this key's.
    find "$CACHE" -maxdepth 1 \( -name 'vm-rootfs-*.tar' -o -name 'vm-disk-*' -o -name 'vm-*.lock' \) \
      ! -name "vm-rootfs-$(rootfs_key).tar" ! -name "vm-disk-$key.*" ! -name "vm-$key.lock" -delete
  else
    say "cached: $qcow"
  fi
  cp --reflink=auto "$qcow" "$out.tmp.$$"
  mv "$out.tmp.$$" "$out"
  install -m 600 "$BUILD_KEY" "$out.build-key"
  echo "$out"
}

main "$@"
