#!/usr/bin/env bash
# The CI gate on the appliance's systemd units (packer/units/, issue 15).
#
#   packer/check-units.sh [UNITS_DIR]
#
# 1. `systemd-analyze security --offline=yes` scores every unit against its gate (below; the
#    score is on systemd's 0-10 scale, --threshold on its 0-100 one) and prints the scores.
# 2. `systemd-analyze verify` loads every unit with its dependencies and must print nothing:
#    it exits 0 even on an unknown key or a bad value, so any output is a failure.
#
# Both run against a throw-away root directory (--root): the units in its /etc/systemd/system,
# stub targets, a stub appliance-seed.service (the lead's unit, not gated here), and a stub
# executable at every path an Exec*= line names. So neither this host's drop-ins
# (/etc/systemd/system/UNIT.d), which --offline would otherwise merge in, nor a missing
# /usr/local/bin/appliance (verify checks that commands exist) changes the result. Users need
# not exist: the offline analysis judges User= by name. Exit 0: all pass; 1: a unit is over its
# gate, fails verify, or has no gate; 2: usage or no systemd-analyze.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
units=${1:-$here/units}

# unit -> gate (0-10). API and Flower run unprivileged and talk only over TCP; Redis, its relay
# and OpenBao too, with a looser gate of the issue's; the worker keeps the sandbox's five
# capabilities as root; the oneshots run as root with file capabilities (prepare, init,
# upgrade) or read-only ones (unseal), for a few seconds at boot, never listening.
declare -A gate=(
  [appliance-api.service]=1.5
  [appliance-flower.service]=1.5
  [appliance-redis.service]=2.5
  [appliance-relay.service]=2.5
  [appliance-openbao.service]=2.5
  [appliance-worker.service]=3.5
  [appliance-upgrade.service]=2.5
  [appliance-prepare.service]=2.5
  [appliance-init.service]=2.5
  [appliance-unseal.service]=2.5
  [appliance-seed.service]=5.0
  [appliance-selftest.service]=2.5
)

if ! command -v systemd-analyze >/dev/null; then
  echo "check-units: systemd-analyze is missing (apt-get install systemd)" >&2
  exit 2
fi
if [ ! -d "$units" ]; then
  echo "check-units: no units directory $units" >&2
  exit 2
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
system=$root/etc/systemd/system
mkdir -p "$system" "$root/usr/lib/systemd/system"
cp "$units"/*.service "$units"/*.target "$system"/
# What every service depends on by default, and what the target hangs off.
for target in sysinit.target basic.target shutdown.target multi-user.target local-fs.target; do
  printf '[Unit]\nDescription=stub\n' > "$root/usr/lib/systemd/system/$target"
done
# Debian's own units that ours order against.
printf '[Unit]\nDescription=stub\nDefaultDependencies=no\n[Service]\nType=oneshot\nExecStart=/bin/true\n' \
  > "$root/usr/lib/systemd/system/nftables.service"
# A stub at each command's path: verify refuses a command that is not executable.
sed -n 's/^Exec[A-Za-z]*=[-@:+!|]*\([^ ]*\).*/\1/p' "$system"/*.service | sort -u |
  while read -r command; do
    mkdir -p "$root$(dirname "$command")"
    printf '#!/bin/sh\n' > "$root$command"
    chmod 0755 "$root$command"
  done

failed=0
printf '%-28s %6s %5s  %s\n' unit score gate result
for path in "$units"/*.service; do
  name=$(basename "$path")
  limit=${gate[$name]:-}
  if [ -z "$limit" ]; then
    printf '%-28s %6s %5s  %s\n' "$name" - - "FAIL: no gate for this unit"
    failed=1
    continue
  fi
  threshold=$(awk -v g="$limit" 'BEGIN { printf "%d", g * 10 + 0.5 }')
  set +e
  report=$(cd "$system" && systemd-analyze security --offline=yes --root="$root" \
    --threshold="$threshold" "$name" 2>&1)
  status=$?
  set -e
  score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$report")
  if [ -z "$score" ]; then
    printf '%-28s %6s %5s  %s\n' "$name" - "$limit" "FAIL: no score"
    printf '%s\n' "$report" >&2
    failed=1
  elif [ "$status" -ne 0 ]; then
    printf '%-28s %6s %5s  %s\n' "$name" "$score" "$limit" "FAIL: over its gate"
    failed=1
  else
    printf '%-28s %6s %5s  %s\n' "$name" "$score" "$limit" ok
  fi
done

names=()
for path in "$units"/*.service "$units"/*.target; do
  names+=("$(basename "$path")")
done
set +e
verify=$(cd "$system" && systemd-analyze verify --root="$root" "${names[@]}" 2>&1)
status=$?
set -e
if [ "$status" -ne 0 ] || [ -n "$verify" ]; then
  printf 'systemd-analyze verify: FAIL (exit %s)\n%s\n' "$status" "${verify//$root/}"
  failed=1
else
  echo "systemd-analyze verify: ok (${#names[@]} units, no warning)"
fi
exit "$failed"
