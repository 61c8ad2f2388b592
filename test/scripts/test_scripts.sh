#!/usr/bin/env bash
# Bad input at the scripts' doors: every script under scripts/ (and scripts/test.d/) answers --help
# with its usage (status 0), and refuses an unknown option, an option without
# its value and a bad value with one line naming it, its usage, and status 2,
# before it installs or builds anything. The options come from each script's
# own --help, so that an option added later is tested too:
#   --NAME N ... LO..HI   an integer: 'abc', '-1', '1.5', '', LO-1, HI+1 and a missing
#                         value are refused; LO and HI are accepted
#   --NAME a|b            a word: 'bogus' and a missing value are refused; a and b accepted
#   --NAME WORD           any value (FILE, REGEX, ...): a missing value is refused
#   --NAME                a flag: accepted, and a second time refused
# "Accepted" means the script got past its command line: it went on to call a stand-in.
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
  redis-server llvm-cov-14 llvm-profdata-14; do
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

# reaches SCRIPT ARGS...: the command line is accepted: the script goes on to install or build
# (and fails there, at a stand-in).
reaches() {
  local script=$1
  shift
  checks=$((checks + 1))
  rm -f "$tmp/calls"
  local status=0
  (cd "$tmp" && timeout 60 "$root/$script" "$@") >"$tmp/out" 2>"$tmp/err" </dev/null || status=$?
  local what="$script$(printf " '%s'" "$@")"
  [ "$status" -ne 2 ] || fail "$what: refused: $(head -1 "$tmp/err")"
  [ -s "$tmp/calls" ] || fail "$what: did not go on to install or build (status $status; $(head -c 300 "$tmp/err"))"
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
  mentions "'--bogus=1'"
  if grep -q "^usage: $script *\(\[--\|(\|$\)" <<<"$help" && ! grep -q "FILE" <<<"$help"; then
    expect 2 "$script" stray  # takes no operands
    mentions "'stray'"
  fi

  reaches "$script"  # no arguments: the script's default run

  # Every option of the help, with what follows it on its line.
  while read -r opt arg; do
    case $opt in --help | --) continue ;; esac
    line=$(grep -m1 -- "$script $opt" <<<"$help")
    case $arg in
      N)
        expect 2 "$script" "$opt"
        mentions "$opt"
        for v in abc -1 1.5 "" 0x10 99999999999999999999 " 1"; do
          expect 2 "$script" "$opt" "$v"
          mentions "$opt"
          mentions "'$v'"
        done
        range=$(grep -oE '[0-9]+\.\.[0-9]+' <<<"$line" | head -1)
        if [ -z "$range" ]; then
          fail "$script $opt N: its help line names no range LO..HI: $line"
        else
          lo=${range%..*} hi=${range#*..}
          if [ "$lo" -gt 0 ]; then
            expect 2 "$script" "$opt" $((lo - 1))
            mentions "out of range"
          fi
          if [ ${#hi} -lt 18 ]; then above=$((hi + 1)); else above=${hi}0; fi
          expect 2 "$script" "$opt" "$above"
          mentions "out of range"
          reaches "$script" "$opt" "$lo"
          reaches "$script" "$opt" "$hi"
        fi
        ;;
      *"|"*)
        expect 2 "$script" "$opt"
        mentions "$opt"
        expect 2 "$script" "$opt" bogus
        mentions "'bogus'"
        for w in ${arg//|/ }; do reaches "$script" "$opt" "$w"; done
        ;;
      [A-Z]*)
        expect 2 "$script" "$opt"
        mentions "$opt"
        ;;
      "" | "...")
        # A flag: accepted; given twice, refused; an unknown option after it still refused.
        reaches "$script" "$opt"
        expect 2 "$script" "$opt" "$opt"
        mentions "twice"
        expect 2 "$script" "$opt" --bogus
        mentions "'--bogus'"
        ;;
    esac
  done < <(grep -oE "$script (--[a-z-]+)( (N|[a-z]+(\|[a-z]+)+|[A-Z][A-Z_]*|\.\.\.))?" <<<"$help" |
    sed "s|^$script ||" | sort -u)
done

# Refusals of option combinations, which --help states but the loop above cannot derive.
for v in "--port 6000" "--port=6000" "--bind 0.0.0.0" "--bind=::"; do
  # shellcheck disable=SC2086 # the option and its value, split on purpose
  expect 2 scripts/demo --serve -- $v
  mentions "${v%%[ =]*}"
done
reaches scripts/demo --serve -- --msg-rate 3  # other echo_server options pass through
expect 2 scripts/fuzz --time 10 --runs 10
mentions "--time and --runs"
expect 2 scripts/fuzz --runs 10 --time 10
mentions "--time and --runs"
for other in "--seed 3" "--target keyed" "--runs 5" "--fast"; do
  # shellcheck disable=SC2086
  expect 2 scripts/fuzz --ci $other
  mentions "--ci"
done

echo "$checks checks, $failures failures"
[ "$failures" -eq 0 ]
