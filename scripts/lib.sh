# Shared by the scripts/ commands: package installation and the build trees.
# shellcheck shell=bash

# The Debian packages every build needs.
RATELIMIT_BASE_PACKAGES=(g++ cmake make ccache libboost1.81-dev libboost-test1.81-dev
  libboost-context1.81-dev)

# Command lines. Each script defines usage() (its help, on stdout) and parses
# its whole command line before it installs or builds anything.

# script_name: this script's path in the checkout (scripts/test, scripts/test.d/50-demo).
script_name() {
  local me root
  me=$(realpath "$0")
  root=$(realpath "$RATELIMIT_ROOT")
  echo "${me#"$root"/}"
}

# usage_error MESSAGE: "SCRIPT: MESSAGE" and the usage on stderr, exit status 2.
usage_error() {
  echo "$(script_name): $1" >&2
  usage >&2
  exit 2
}

# no_arguments "$@": for the scripts that take none but --help.
no_arguments() {
  while [ $# -gt 0 ]; do
    case $1 in
      -h | --help) usage; exit 0 ;;
      -*) usage_error "unknown option '$1'" ;;
      *) usage_error "unexpected argument '$1'" ;;
    esac
  done
}

# need_value OPTION ARGC: refuses OPTION given last, without its value
# (call with "$#" of the parsing loop, counting OPTION itself).
need_value() { [ "$2" -ge 2 ] || usage_error "$1 needs a value"; }

# check_int OPTION VALUE MIN MAX: refuses VALUE unless it is a decimal integer in MIN..MAX.
check_int() {
  local opt=$1 v=$2 min=$3 max=$4
  if [[ $v =~ ^-?[0-9]+$ ]]; then
    if [[ $v == -* ]] || [ ${#v} -gt 18 ] || ((10#$v < min || 10#$v > max)); then
      usage_error "$opt: '$v' is out of range ($min..$max)"
    fi
  else
    usage_error "$opt: '$v' is not an integer ($min..$max)"
  fi
}

# once OPTION: refuses OPTION given a second time (each script keeps the set in $seen_options).
seen_options=" "
once() {
  [[ $seen_options != *" $1 "* ]] || usage_error "$1 given twice"
  seen_options+="$1 "
}

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
# Line tables only (-g1) instead of RelWithDebInfo's -g: a failing test's backtrace keeps its
# file:line frames, and the plain tree builds in about three quarters of the time (CI's budget).
configure_tree() {
  local dir=$1
  shift
  cmake -S "$RATELIMIT_ROOT" -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" "$@" >"$dir.configure.log" 2>&1 ||
    { cat "$dir.configure.log"; return 1; }
}

RATELIMIT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export RATELIMIT_ROOT

# ccache (the compiler launcher when installed): paths relative to the checkout,
# so that two clones of the repository share one cache.
export CCACHE_BASEDIR="$RATELIMIT_ROOT"
export CCACHE_NOHASHDIR=1
