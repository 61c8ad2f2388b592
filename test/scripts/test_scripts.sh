#!/usr/bin/env bash
# Bad input at the scripts' doors: every script under scripts/ (and scripts/test.d/) answers --help
# with its usage (status 0), and refuses an unknown option, an option without
# its value and a bad value with one line naming it, its usage, and status 2,
# before it installs or builds anything. The options come from each script's
# own --help, so that an option added later is tested too:
#   --NAME N          an integer: 'abc', '-1', '1.5', '' and a missing value are refused
#   --NAME a|b        a word: 'bogus' and a missing value are refused
#   --NAME WORD       any value (FILE, REGEX, ...): a missing value is refused
#
# "Before it installs or builds anything": the scripts run with a PATH whose
# first directory holds stand-ins for every installer and build tool they
# call (apt-get, sudo, cmake, make, compilers, ...); each stand-in records its
# call and fails. A refused command line must leave the record empty.
#
#   test/scripts/test_scripts.sh [ROOT]   (ROOT: the checkout, default: this one)
set -uo pipefail
root=$(cd "${1:-$(dirname "$0")/../..}" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/bin"
for tool in apt-get apt sudo dpkg dpkg-query cmake make ctest ccache g++ gcc c++ clang++ clang++-14 go javac java \
  python3 redis-server llvm-cov-14 llvm-profdata-14; do
  printf '#!/bin/sh\necho "%s $*" >> "%s/calls"\nexit 1\n' "$tool" "$tmp" >"$tmp/bin/$tool"
  chmod +x "$tmp/bin/$tool"
done
export PATH="$tmp/bin:$PATH"

failures=0 checks=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# expect STATUS SCRIPT ARGS...: runs the script from a scratch directory; checks the status,
# that nothing was installed or built, and for status 2 one line naming the problem first
# on stderr followed by the usage.
expect() {
  local want=$1 script=$2
  shift 2
  checks=$((checks + 1))
  rm -f "$tmp/calls"
  local status=0
  (cd "$tmp" && "$root/$script" "$@") >"$tmp/out" 2>"$tmp/err" </dev/null || status=$?
  local what="$script$(printf " '%s'" "$@")"
  [ "$status" -eq "$want" ] || fail "$what: status $status, expected $want; stderr: $(head -c 400 "$tmp/err")"
  [ ! -s "$tmp/calls" ] || fail "$what: ran $(tr '\n' ';' <"$tmp/calls")"
  if [ "$want" -eq 2 ]; then
    head -1 "$tmp/err" | grep -q "^$script: " || fail "$what: first line of stderr: $(head -1 "$tmp/err")"
    grep -q "^usage: $script" "$tmp/err" || fail "$what: no usage on stderr"
    [ ! -s "$tmp/out" ] || fail "$what: wrote to stdout: $(head -c 200 "$tmp/out")"
  fi
}

# mentions TEXT: the last refusal's first line mentions TEXT.
mentions() { head -1 "$tmp/err" | grep -qF -- "$1" || fail "first line '$(head -1 "$tmp/err")' does not mention '$1'"; }

for path in "$root"/scripts/* "$root"/scripts/*/*; do
  script=${path#"$root"/}
  [ -x "$path" ] && [ -f "$path" ] || continue
  expect 0 "$script" --help
  grep -q "^usage: $script" "$tmp/out" || fail "$script --help: no usage line"
  help=$(cat "$tmp/out")
  expect 0 "$script" -h
  expect 2 "$script" --bogus
  mentions "'--bogus'"
  expect 2 "$script" -x
  mentions "'-x'"
  expect 2 "$script" --bogus=1
  if grep -q "^usage: $script *\(\[--\|(\|$\)" <<<"$help" && ! grep -q "FILE" <<<"$help"; then
    expect 2 "$script" stray  # takes no operands
    mentions "'stray'"
  fi

  # Every option of the help, with what follows it on its line.
  while read -r opt arg; do
    case $opt in --help | --) continue ;; esac
    case $arg in
      N)
        expect 2 "$script" "$opt"
        mentions "$opt"
        for v in abc -1 1.5 "" 0x10 99999999999999999999; do
          expect 2 "$script" "$opt" "$v"
          mentions "$opt"
          mentions "'$v'"
        done
        ;;
      *"|"*)
        expect 2 "$script" "$opt"
        mentions "$opt"
        expect 2 "$script" "$opt" bogus
        mentions "'bogus'"
        ;;
      [A-Z]*)
        expect 2 "$script" "$opt"
        mentions "$opt"
        ;;
    esac
    # An unknown option after a known one is still refused.
    if [ -z "$arg" ] || [[ $arg == "..." ]]; then
      expect 2 "$script" "$opt" --bogus
      mentions "'--bogus'"
    fi
  done < <(grep -oE "$script (--[a-z-]+)( (N|[a-z]+(\|[a-z]+)+|[A-Z][A-Z_]*|\.\.\.))?" <<<"$help" |
    sed "s|^$script ||" | sort -u)
done

echo "$checks checks, $failures failures"
[ "$failures" -eq 0 ]
