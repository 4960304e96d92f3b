#!/usr/bin/env bash
# Proof of the container groundwork of issue 14, end to end, leaving nothing behind:
#
#   packaging/probe.sh [DIR]     DIR: the private engine's state (default /tmp/appliance-probe-engine)
#
#  1. packaging/engine.sh start DIR: a private dockerd;
#  2. packaging/base-image.sh: the base image from debootstrap (cached);
#  3. a multi-stage build FROM ${BASE} whose pip install trusts the host's CA bundle passed as a
#     BuildKit secret, and a check that the bundle is in no layer of the image;
#  4. `docker compose up -d --wait` of packaging/probe/compose.yaml: healthchecks, a private network,
#     a port on 127.0.0.1 only, cap_drop ALL, read_only, no-new-privileges; a request through it;
#  5. namespaces and memory cgroups inside a container with the sandbox's capabilities
#     (probe/nscheck.py), with the host's and with a private cgroup namespace;
#  6. `down -v`, engine.sh stop, and a check that no process, mount, interface or cgroup is left.
# Prints the timings; exits non-zero on the first failure (after cleaning up).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
DIR=${1:-/tmp/appliance-probe-engine}
COMPOSE_FILE=$here/probe/compose.yaml
timings=()

die() { echo "probe.sh: FAIL: $*" >&2; exit 1; }
say() { echo "probe.sh: $*" >&2; }

# step NAME COMMAND...: run it, record how long it took.
step() {
  local name=$1 started=${EPOCHREALTIME/./} ms; shift
  say "== $name"
  "$@"
  ms=$(( (${EPOCHREALTIME/./} - started) / 1000 ))
  timings+=("$(printf '%-28s %4d.%01d s' "$name" $((ms / 1000)) $((ms % 1000 / 100)))")
}

compose() { timeout "${COMPOSE_TIMEOUT:-300}" "$DOCKER" compose -f "$COMPOSE_FILE" "$@"; }

cleanup() {
  local rc=$?
  if [[ -n ${DOCKER_HOST:-} && -S ${DOCKER_HOST#unix://} ]]; then
    compose down -v --timeout 5 >/dev/null 2>&1 || true
  fi
  "$here/engine.sh" stop "$DIR" || rc=1
  exit "$rc"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# No regular file in any layer of the image is the host's CA bundle, or sits under /run/secrets.
check_secret_not_in_layers() {
  "$DOCKER" save "$1" | python3 -c '
import hashlib, sys, tarfile
bundle = open("/etc/ssl/certs/ca-certificates.crt", "rb").read()
digest = hashlib.sha256(bundle).hexdigest()
found, layers = [], 0
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as outer:
    for member in outer:
        if not member.name.endswith("layer.tar"):
            continue
        layers += 1
        with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as layer:
            for entry in layer:
                if "secrets/" in entry.name or "pip_ca" in entry.name:
                    found.append(entry.name)
                elif entry.isfile() and entry.size == len(bundle):
                    if hashlib.sha256(layer.extractfile(entry).read()).hexdigest() == digest:
                        found.append(entry.name)
if found or not layers:
    sys.exit(f"host CA bundle or secret path in the image ({layers} layers): {found}")
print(f"{layers} layers checked: the host CA bundle is in none", file=sys.stderr)
'
}

check_published_on_loopback_only() {
  local bindings
  bindings=$("$DOCKER" inspect -f '{{json .NetworkSettings.Ports}}' "$(compose ps -q web)")
  say "web ports: $bindings"
  python3 -c '
import json, sys
ports = json.loads(sys.argv[1])
hosts = {b["HostIp"] for bs in ports.values() if bs for b in bs}
sys.exit(0 if hosts == {"127.0.0.1"} else f"published on {hosts}")' "$bindings"
}

check_hardening() {
  local svc id
  for svc in kv web sandbox sandbox-cgroupns; do
    id=$(compose ps -q "$svc")
    "$DOCKER" inspect -f "$svc"' ro={{.HostConfig.ReadonlyRootfs}} drop={{.HostConfig.CapDrop}} add={{.HostConfig.CapAdd}} sec={{.HostConfig.SecurityOpt}} cgroupns={{.HostConfig.CgroupnsMode}} health={{.State.Health.Status}} user={{.Config.User}}' "$id"
    [[ $("$DOCKER" inspect -f '{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.State.Health.Status}}' "$id") \
       == "true [ALL] healthy" ]] || die "$svc is not read-only, cap_drop ALL and healthy"
  done
}

request_through_published_port() {
  local body
  body=$(curl -sS --max-time 10 "http://127.0.0.1:$PROBE_PORT/")
  say "GET / -> $body"
  [[ $body == *'"kv_ping": true'* ]] || die "web did not reach kv"
}

run_nscheck() {
  local svc=$1
  compose exec -T "$svc" /opt/venv/bin/python /opt/probe/nscheck.py >"$DIR/nscheck-$svc.json"
  python3 - "$DIR/nscheck-$svc.json" "$svc" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
ns = " ".join(f"{k}={'ok' if v.get('ok') else v.get('errno', v)}" for k, v in r["namespaces"].items())
print(f"{sys.argv[2]}: CapEff={r['status']['CapEff']} NoNewPrivs={r['status']['NoNewPrivs']} Seccomp={r['status']['Seccomp']}")
print(f"  namespaces: {ns}")
print(f"  memory cgroup as mounted: {json.dumps(r['memory_cgroup_as_mounted'])}")
print(f"  remounted rw: {json.dumps(r['memory_cgroup_remount_rw'])}")
print(f"  fresh mount: {json.dumps(r['memory_cgroup_fresh_mount'])}")
print(f"  new named hierarchy: {json.dumps(r['new_named_hierarchy'])}")
bad = [k for k in ("user", "pid", "net", "uts", "ipc") if not r["namespaces"][k].get("ok")]
sys.exit(f"namespaces refused: {bad}" if bad else 0)
EOF
}

# After stop: no process of the engine, no mount under DIR, no interface, no cgroup.
check_nothing_left() {
  local tag left
  tag=$(printf '%s' "${DIR%/}" | sha256sum | cut -c1-8)
  # shellcheck disable=SC2009 # pgrep -f would match this script, whose arguments name DIR
  left=$(ps -eo pid=,args= | grep -F -- "$DIR" | grep -v -e grep -e probe.sh || true)
  [[ -z $left ]] || die "processes left: $left"
  ! grep -qF " $DIR/" /proc/self/mountinfo || die "mounts left under $DIR"
  ! ip -br link | grep -qE "^(aeng-$tag|br-|veth)" || die "interfaces left: $(ip -br link | grep -E "^(aeng-$tag|br-|veth)")"
  [[ -z $(find /sys/fs/cgroup -maxdepth 6 -type d -name "aeng-$tag" 2>/dev/null) ]] || die "cgroups left"
  say "nothing left: no process, mount, interface or cgroup of the engine"
}

main() {
  mkdir -p "$DIR"
  step "engine start" "$here/engine.sh" start "$DIR"
  eval "$("$here/engine.sh" env "$DIR")"
  trap cleanup EXIT
  local base
  # shellcheck disable=SC2016 # expanded by eval, inside step
  step "base image" eval 'base=$("$here/base-image.sh")'
  export BASE=$base BASE_KEY=${base##*:} PROBE_PORT
  PROBE_PORT=$(free_port)
  step "compose config" compose config --quiet
  step "build (no cache)" compose build --no-cache --progress plain
  step "secret in no layer" check_secret_not_in_layers "appliance-probe:$BASE_KEY"
  step "up -d --wait" compose up -d --wait --wait-timeout 120
  step "hardening" check_hardening
  step "loopback-only port" check_published_on_loopback_only
  step "request via 127.0.0.1" request_through_published_port
  step "nscheck host cgroupns" run_nscheck sandbox
  step "nscheck private cgroupns" run_nscheck sandbox-cgroupns
  step "down -v" compose down -v --timeout 10
  trap - EXIT
  step "engine stop" "$here/engine.sh" stop "$DIR"
  check_nothing_left
  printf '%s\n' "${timings[@]}"
}

main "$@"
