#!/usr/bin/env bash
# The two set-up commands of the README:
#   ./dev.sh up     install what is missing, then start the whole local stack (`appliance up`)
#   ./dev.sh test   install what is missing, then run the whole test suite
# Works on a fresh Debian 12 machine with Python 3.11; as root it installs Debian packages
# itself, otherwise it says exactly which to install.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(redis-server libseccomp2 python3-venv)
# Only for `./dev.sh test`: the Flower browser test drives Debian's chromium with Playwright.
TEST_APT_PACKAGES=(chromium)

need_apt() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ]; then
    echo "dev.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # Debian starts its own redis-server on 6379; the stack runs its own on other ports.
  else
    echo "dev.sh: missing Debian packages: run  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
}

python_bin() {
  # Debian's own interpreter first: the stack's services run as users of their own (SECURITY.md)
  # and must be able to execute it, which a per-user build under a private home (pyenv's
  # /root/.pyenv) does not allow.
  for py in /usr/bin/python3.11 /usr/bin/python3 python3.11 python3; do
    if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$py"; return 0
    fi
  done
  echo "dev.sh: Python 3.11 or newer is required" >&2; exit 1
}

ensure_venv() {
  local stamp=.venv/.installed
  if [ ! -x .venv/bin/python ]; then
    "$(python_bin)" -m venv .venv
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
  fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
  up)
    need_apt "${APT_PACKAGES[@]}"
    ensure_venv
    exec .venv/bin/appliance up "$@"
    ;;
  test)
    need_apt "${APT_PACKAGES[@]}" "${TEST_APT_PACKAGES[@]}"
    ensure_venv
    exec .venv/bin/python -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh up [appliance up options] | ./dev.sh test [pytest options]" >&2
    exit 2
    ;;
esac
