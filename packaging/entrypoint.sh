#!/bin/sh
# The image's entrypoint (after tini): `appliance-entrypoint COMMAND...` runs COMMAND.
#
# For `appliance serve worker` only, as root, it first makes the container's own memory cgroup
# writable. Docker mounts it read-only, so the sandbox's memory_cgroup layer (a child cgroup per
# run, with its own limit) would be inactive. `remount,bind,rw` (a plain `remount,rw` fails with
# "mount point is busy") needs CAP_SYS_ADMIN, which the worker has; with `cgroup: private` in
# docker-compose.yml the mount shows the container's own subtree only, never the host's root.
# Every other service starts as it is (they have no capability to do it anyway). A worker also
# gets a replica name of its own (below) unless the command names one.
set -eu

is_worker() {
  previous=
  for arg in "$@"; do
    if [ "$previous" = serve ] && [ "$arg" = worker ]; then return 0; fi
    previous=$arg
  done
  return 1
}

writable_memory_cgroup() {
  # cgroup v1 (this host): the memory controller's own mount; cgroup v2: the unified mount.
  for target in /sys/fs/cgroup/memory /sys/fs/cgroup; do
    if mountpoint -q "$target"; then
      if [ "$target" = /sys/fs/cgroup ] && [ "$(stat -f -c %T "$target")" != cgroup2fs ]; then
        continue
      fi
      mount -o remount,bind,rw "$target" \
        || { echo "appliance-entrypoint: cannot remount $target read-write" >&2; exit 1; }
      return 0
    fi
  done
  echo "appliance-entrypoint: no memory cgroup mounted under /sys/fs/cgroup" >&2
  exit 1
}

has_replica() {
  for arg in "$@"; do
    case $arg in --replica|--replica=*) return 0 ;; esac
  done
  return 1
}

if is_worker "$@"; then
  if [ "$(id -u)" = 0 ]; then
    writable_memory_cgroup
  fi
  # Every container of the pod has the pod's host name, so replicas are not told apart by it:
  # each container start is a replica of its own name (its login directory, its secret_id's
  # metadata). Its tmpfs is new at each start too, so it enrols afresh either way.
  if ! has_replica "$@"; then
    set -- "$@" --replica "worker-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
  fi
fi
exec "$@"
