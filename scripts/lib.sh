# Shared by the scripts/ commands: package installation and the build trees.
# shellcheck shell=bash

# The Debian packages every build needs.
RATELIMIT_BASE_PACKAGES=(g++ cmake make ccache libboost1.81-dev libboost-test1.81-dev
  libboost-context1.81-dev libboost-program-options1.81-dev)

# ensure_packages PKG...: installs (as root, or through sudo) those not installed yet.
ensure_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo ">>> installing: ${missing[*]}"
  local sudo=()
  [ "$(id -u)" -ne 0 ] && sudo=(sudo)
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# jobs: parallel build jobs for this machine.
jobs() { nproc 2>/dev/null || echo 2; }

# configure_tree DIR [cmake args...]: configures a build tree once (re-runs are cheap).
configure_tree() {
  local dir=$1
  shift
  cmake -S "$RATELIMIT_ROOT" -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >"$dir.configure.log" 2>&1 ||
    { cat "$dir.configure.log"; return 1; }
}

RATELIMIT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export RATELIMIT_ROOT

# ccache (the compiler launcher when installed): paths relative to the checkout,
# so that two clones of the repository share one cache.
export CCACHE_BASEDIR="$RATELIMIT_ROOT"
export CCACHE_NOHASHDIR=1
