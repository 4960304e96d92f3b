#!/usr/bin/env bash
# Build the appliance's VM image (issue 15): stage 1 natively (packer/rootfs-disk.sh, cached),
# the venv natively (packer/build-venv.sh), then stage 2 with Packer (packer/appliance.pkr.hcl).
#
#   packer/build.sh OUT_DIR [IMAGE_VERSION]
#
# Writes OUT_DIR/appliance.qcow2 (and OUT_DIR/build-serial.log, the build VM's console). The
# image version (X.Y.Z) defaults to the project's (appliance.__version__); another one is stamped
# into a copy of the sources as their `__version__` (what `appliance upgrade` compares with the
# data disk's). As root it installs what is
# missing (packer, qemu-system-x86, qemu-utils, debootstrap, fdisk) with apt. VM_ACCEL=kvm on a
# host where KVM works; the default is tcg.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

die() { echo "build.sh: $*" >&2; exit 1; }
say() { echo "build.sh: $*" >&2; }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: packer/build.sh OUT_DIR [IMAGE_VERSION]"
out=$(realpath -m "$1")
version=${2:-$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$root/appliance/__init__.py")}
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "$version is not a version (X.Y.Z)"

missing=()
command -v packer >/dev/null || missing+=(packer)
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v qemu-img >/dev/null || missing+=(qemu-utils)
if ((${#missing[@]})); then
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: apt-get install -y ${missing[*]}"
  timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { timeout 300 apt-get update -qq \
         && timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } \
    || die "apt-get install ${missing[*]} failed"
fi

work=$(mktemp -d /tmp/appliance-vm-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
"$here/rootfs-disk.sh" "$work/base.qcow2"
t1=$(date +%s)
mkdir "$work/src"
(cd "$root" && tar -cf - pyproject.toml README.md appliance sandbox policies) | tar -C "$work/src" -xf -
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
sed -i "s/^__version__ = .*/__version__ = \"$version\"/" "$work/src/appliance/__init__.py"
VM_SOURCE=$work/src "$here/build-venv.sh" "$work/venv.tar"
t2=$(date +%s)

vars=(
  -var "base_image=$work/base.qcow2"
  -var "build_key=$work/base.qcow2.build-key"
  -var "venv_tar=$work/venv.tar"
  -var "image_version=$version"
  -var "accelerator=${VM_ACCEL:-tcg}"
  -var "output_directory=$work/out"
  -var "serial_log=$work/build-serial.log"
)
packer validate "${vars[@]}" "$here/appliance.pkr.hcl" >/dev/null
# Packer's checkpoint call home is off: no host outside is reachable, and none is wanted.
if ! CHECKPOINT_DISABLE=1 PACKER_NO_COLOR=1 packer build -color=false "${vars[@]}" \
    "$here/appliance.pkr.hcl" > "$work/packer.log" 2>&1; then
  tail -40 "$work/packer.log" >&2
  echo "--- the build VM's console (last lines) ---" >&2
  tail -30 "$work/build-serial.log" >&2 || true
  die "packer build failed"
fi
t3=$(date +%s)
mkdir -p "$out"
mv "$work/out/appliance.qcow2" "$out/appliance.qcow2.tmp"
mv "$out/appliance.qcow2.tmp" "$out/appliance.qcow2"
cp "$work/build-serial.log" "$out/build-serial.log"
grep -E 'provision: ' "$work/packer.log" | sed 's/^.*provision: /  /' >&2 || true
say "image $version: $out/appliance.qcow2 ($(du -h "$out/appliance.qcow2" | cut -f1)); stage 1 $((t1 - start)) s, venv $((t2 - t1)) s, packer $((t3 - t2)) s"
