#!/usr/bin/env bash
# The appliance's virtual environment for the VM image (issue 15), built natively, as a tarball:
#
#   packer/build-venv.sh OUT.tar
#
# VM_SOURCE=DIR builds the project from DIR (a copy whose version packer/build.sh stamped)
# instead of this checkout.
#
# The guest runs Debian bookworm's Python (3.11.2). Building the venv inside the TCG guest took
# 197 s against about 18 s natively, so it is built here, at the path it has in the guest
# (/opt/appliance/venv: a venv's scripts name their interpreter by absolute path), with the
# host's Debian interpreter, /usr/bin/python3.11 -- the guest's own version, so that
# marker-conditional dependencies resolve as they would in the guest. A pyenv or other build
# would not do, and is refused.
#
# /opt/appliance is a tmpfs in a private mount namespace (`unshare -m`): nothing is written under
# the host's /opt. The dependencies' wheels are cached in
# ${XDG_CACHE_HOME:-$HOME/.cache}/appliance/vm-wheels-<key> (<key>: pyproject.toml, this script,
# the interpreter's version); the project's own wheel is built fresh each time. pip itself is not
# left in the venv: the image installs nothing at run time.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "${VM_SOURCE:-$here/..}" && pwd)
readonly PY=${VM_PYTHON:-/usr/bin/python3.11}
readonly CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/appliance
readonly GUEST_PYTHON=3.11.2

die() { echo "build-venv.sh: $*" >&2; exit 1; }
say() { echo "build-venv.sh: $*" >&2; }

[ $# -eq 1 ] || die "usage: packer/build-venv.sh OUT.tar"
out=$(realpath -m "$1")
[ "$(id -u)" -eq 0 ] || die "needs root (a private mount namespace for /opt/appliance)"
[ -x "$PY" ] || die "$PY is missing: apt-get install -y python3.11-venv"
version=$("$PY" -c 'import platform; print(platform.python_version())')
[ "$version" = "$GUEST_PYTHON" ] || [ -n "${VM_PYTHON_ANY:-}" ] \
  || die "$PY is Python $version, the guest's is $GUEST_PYTHON (Debian bookworm's): build with that one (VM_PYTHON_ANY=1 overrides)"
"$PY" -c 'import ensurepip, venv' 2>/dev/null || die "$PY has no venv module: apt-get install -y python3-venv"

key=$({ cat "$root/pyproject.toml" "$0"; echo "$version"; uname -m; } | sha256sum | cut -c1-12)
wheels=$CACHE/vm-wheels-$key
mkdir -p "$CACHE"

work=$(mktemp -d /tmp/appliance-venv.XXXXXX)
trap 'rm -rf "$work"' EXIT

start=$(date +%s)
# This machine's pip configuration names local wheel directories that need not exist: pip's
# warning for each of them, for each package, says nothing about this build.
exec 2> >(grep -v '^WARNING: Location .* is ignored' >&2)
# The project's wheel (policies/ are force-included as appliance_policies).
"$PY" -m venv "$work/builder"
"$work/builder/bin/pip" install -q --upgrade pip wheel
"$work/builder/bin/pip" wheel -q --no-deps --wheel-dir "$work/project" "$root"
if [ ! -f "$wheels/.complete" ]; then
  say "caching the dependencies' wheels in $wheels"
  rm -rf "$wheels.tmp"
  "$work/builder/bin/pip" wheel -q --wheel-dir "$wheels.tmp" "$work"/project/*.whl
  rm -f "$wheels.tmp"/sandbox_appliance-*.whl
  touch "$wheels.tmp/.complete"
  rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
  find "$CACHE" -maxdepth 1 -name 'vm-wheels-*' ! -name "vm-wheels-$key" -exec rm -rf {} +
fi

# Installed from those wheels only (no index), at the guest's path, in a private namespace.
env -u PIP_FIND_LINKS unshare --mount --propagation private -- "$PY" - "$work" "$wheels" "$out" <<'EOF'
import os, subprocess, sys

work, wheels, out = sys.argv[1:4]
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/opt"], check=True)
os.makedirs("/opt/appliance")
venv = "/opt/appliance/venv"
subprocess.run([sys.executable, "-m", "venv", venv], check=True)
project = [os.path.join(work, "project", n) for n in os.listdir(os.path.join(work, "project"))]
pip = [f"{venv}/bin/python", "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels]
subprocess.run([*pip, *project], check=True)
subprocess.run([f"{venv}/bin/appliance", "--help"], check=True, stdout=subprocess.DEVNULL)
subprocess.run([f"{venv}/bin/bao", "version"], check=True, stdout=subprocess.DEVNULL)
subprocess.run([f"{venv}/bin/python", "-m", "pip", "uninstall", "-q", "-y", "pip"], check=True)
subprocess.run(
    ["tar", "--numeric-owner", "--owner=0", "--group=0", "-C", "/opt/appliance", "-cf",
     out + ".tmp", "venv"],
    check=True,
)
os.replace(out + ".tmp", out)
EOF
say "$(du -h "$out" | cut -f1) in $(( $(date +%s) - start )) s: $out"
