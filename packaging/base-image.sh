#!/usr/bin/env bash
# The appliance's base image, made without any image registry (issue 14).
#
#   packaging/base-image.sh [NAME]    prints NAME:<key> (NAME defaults to appliance-base)
#
# NAME:<key> is `debootstrap --variant=minbase bookworm` plus packaging/base-packages.txt, upgraded
# from the host's bookworm-security source, imported with `docker import`. <key> hashes this
# script, the package list and the architecture: change either and the image changes name.
#
# Cache: the root filesystem's tarball lives in ${XDG_CACHE_HOME:-$HOME/.cache}/appliance/, so a
# new engine (or a fresh clone) only imports it; an engine that already has NAME:<key> costs nothing.
#
# Needs root (debootstrap), debootstrap (installed if missing), and DOCKER_HOST pointing at the
# engine (see packaging/engine.sh env). The Debian mirror is the host's own, read from its apt
# sources; BASE_MIRROR overrides it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
readonly PACKAGES_FILE=$here/base-packages.txt
readonly CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/appliance
readonly DOCKER=${DOCKER:-/usr/bin/docker}
readonly SUITE=bookworm

die() { echo "base-image.sh: $*" >&2; exit 1; }
say() { echo "base-image.sh: $*" >&2; }

packages() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$PACKAGES_FILE" | grep -v '^$' | sort -u; }

cache_key() {
  { cat "$0" "$PACKAGES_FILE"; dpkg --print-architecture; } | sha256sum | cut -c1-12
}

# URIs of the host's apt entries for SUITE (deb822 .sources and one-line .list), first match.
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

install_debootstrap() {
  command -v debootstrap >/dev/null && return 0
  [[ $(id -u) == 0 ]] || die "debootstrap is missing and only root can install it"
  timeout 600 apt-get install -y -qq --no-install-recommends debootstrap >/dev/null 2>&1 \
    || { timeout 300 apt-get update -qq && timeout 600 apt-get install -y -qq --no-install-recommends debootstrap; } \
    || die "apt-get install debootstrap failed"
}

# Inside the new root: the host's bookworm and bookworm-security sources, upgrade, then strip
# what an image does not need (apt lists, caches, docs, man pages, the host's resolv.conf).
finish_rootfs() {
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
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  # No service of the new root may start on this host while packages are configured.
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
  chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -qq && apt-get -y -qq -o Dpkg::Options::=--force-confold upgrade \
           && apt-get clean' >"$WORK/upgrade.log" 2>&1 \
    || { tail -20 "$WORK/upgrade.log" >&2; die "apt-get upgrade in the new root failed"; }
  rm -f "$rootfs/usr/sbin/policy-rc.d"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* "$rootfs"/tmp/* "$rootfs"/var/tmp/*
  : >"$rootfs/etc/resolv.conf"
  # Redis's package may have started nothing (no init in a chroot), but leaves a default config
  # that listens on 127.0.0.1:6379: the appliance always passes its own.
}

# Unmount anything debootstrap left mounted in the target (it mounts proc and sys), then remove it.
remove_work() {
  local m
  awk -v r="$WORK/" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" || true
  done
  rm -rf "$WORK"
}

# Build the rootfs tarball into the cache (atomically: a killed run leaves no half tarball).
build_tarball() {
  local tarball=$1 mirror work
  mirror=${BASE_MIRROR:-$(host_mirror "$SUITE")}
  [[ -n $mirror ]] || die "no apt source for $SUITE on this host: set BASE_MIRROR"
  install_debootstrap
  work=$(mktemp -d "$CACHE/.build.XXXXXX")
  WORK=$work
  trap remove_work EXIT
  local include
  include=$(packages | paste -sd, -)
  say "debootstrap --variant=minbase $SUITE with $include"
  local started=$SECONDS
  timeout 900 debootstrap --variant=minbase --include="$include" "$SUITE" "$work/rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  say "debootstrap: $((SECONDS - started)) s"
  started=$SECONDS
  finish_rootfs "$work/rootfs" "$mirror"
  say "upgrade and strip: $((SECONDS - started)) s"
  tar --numeric-owner --xattrs -C "$work/rootfs" -cf "$work/rootfs.tar" .
  mv "$work/rootfs.tar" "$tarball"
}

main() {
  (( $# <= 1 )) || die "usage: base-image.sh [NAME]"
  local name=${1:-appliance-base} key ref tarball
  key=$(cache_key)
  ref=$name:$key
  [[ -n ${DOCKER_HOST:-} ]] || die "DOCKER_HOST is not set: eval \"\$(packaging/engine.sh env DIR)\""
  if "$DOCKER" image inspect "$ref" >/dev/null 2>&1; then echo "$ref"; return 0; fi
  mkdir -p "$CACHE"
  tarball=$CACHE/base-$key.tar
  # One builder at a time per key; a second caller waits (bounded) and then finds the tarball.
  exec 9>"$CACHE/base-$key.lock"
  flock -w 1200 9 || die "another base-image.sh holds $CACHE/base-$key.lock"
  if [[ ! -s $tarball ]]; then
    build_tarball "$tarball"
    # Older keys' tarballs are dead weight (140 MB each): keep only this one.
    find "$CACHE" -maxdepth 1 -name 'base-*.tar' ! -name "base-$key.tar" -delete
    find "$CACHE" -maxdepth 1 -name 'base-*.lock' ! -name "base-$key.lock" -delete
  fi
  local started=$SECONDS
  "$DOCKER" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL org.opencontainers.image.title=appliance-base appliance.base.key=$key" \
    --change 'CMD ["/bin/bash"]' \
    "$tarball" "$ref" >/dev/null
  say "import: $((SECONDS - started)) s"
  echo "$ref"
}

main "$@"
