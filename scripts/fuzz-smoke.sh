#!/usr/bin/env bash
# Runs every fuzz target in the module (every `func FuzzXxx` in a _test.go
# file, found with `go test -list`) for FUZZTIME each, one at a time, so new
# targets are included without editing anything. Prints each target and how
# long it took; the first failing target fails the script (its crasher is in
# the package's testdata/fuzz/ for `go test -run` to replay).
#
# Usage: scripts/fuzz-smoke.sh [FUZZTIME] (default 3s; any -fuzztime value)
#
# FUZZLONG lists targets (DIR:Name, e.g. ./kms/keystore:FuzzDecrypt) that
# run FUZZLONGTIME (default 60s) instead: the parsers of attacker-supplied
# ciphertexts, which reliability row 37 asks to fuzz at least 60 s per CI
# run.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
fuzztime=${1:-3s}
long=" ${FUZZLONG:-} "
longtime=${FUZZLONGTIME:-60s}

# Packages whose test files declare a fuzz target: grep first, so that
# `go test -list` (which compiles the tests) only runs where it can find one.
mapfile -t dirs < <(grep -rlE --include='*_test.go' '^func Fuzz[A-Z0-9_]' . \
  | grep -v -e '^./bin/' -e '/testdata/' | xargs -r -n1 dirname | sort -u)
if [ "${#dirs[@]}" -eq 0 ]; then
  echo "fuzz-smoke: no fuzz targets found" >&2
  exit 1
fi

targets=()
for d in "${dirs[@]}"; do
  # -list prints the matching names, then "ok <pkg>"; build errors fail here.
  if ! names=$($GO test -run '^$' -list '^Fuzz' "$d" 2>&1); then
    echo "fuzz-smoke: listing the fuzz targets of $d failed:" >&2
    echo "$names" >&2
    exit 1
  fi
  while read -r name; do
    [[ $name == Fuzz* ]] && targets+=("$d $name")
  done <<<"$names"
done

# A FUZZLONG entry that names no target is a typo, not a target to skip.
for want in ${FUZZLONG:-}; do
  found=0
  for t in "${targets[@]}"; do
    read -r d name <<<"$t"
    [ "$d:$name" = "$want" ] && found=1
  done
  if [ "$found" -eq 0 ]; then
    echo "fuzz-smoke: FUZZLONG names $want, which is not a fuzz target (DIR:Name, as ./kms/keystore:FuzzDecrypt)" >&2
    exit 1
  fi
done

# files DIR prints how many files DIR holds (0 if it does not exist).
files() { if [ -d "$1" ]; then find "$1" -type f | wc -l; else echo 0; fi; }

echo "fuzz-smoke: ${#targets[@]} fuzz targets, $fuzztime each (${FUZZLONG:+$longtime: $FUZZLONG})"
start=$SECONDS
n=0
for t in "${targets[@]}"; do
  read -r d name <<<"$t"
  n=$((n + 1))
  t0=$SECONDS
  corpus=$d/testdata/fuzz/$name
  ft=$fuzztime
  [[ $long == *" $d:$name "* ]] && ft=$longtime
  for try in 1 2 3; do
    before=$(files "$corpus")
    # -parallel 2: the CI machines have 2 cores.
    if out=$($GO test -run '^$' -fuzz "^${name}\$" -fuzztime "$ft" -parallel 2 "$d" 2>&1); then
      break
    fi
    # Go 1.26's fuzz coordinator can fail a target with a bare "context
    # deadline exceeded" when -fuzztime ends while a worker is mid-call
    # (go.dev/issue/75804, fixed in Go 1.27). That writes no crasher; a real
    # failure does, or says something else. Only the race is retried.
    after=$(files "$corpus")
    if [ "$try" -lt 3 ] && [ "$after" -eq "$before" ] && grep -q '^    context deadline exceeded$' <<<"$out" \
      && [ "$(grep -c -e '^--- FAIL' -e 'panic:' -e 'Failing input written' <<<"$out")" -eq 1 ]; then
      echo "fuzz-smoke: $name: fuzz coordinator deadline race (go.dev/issue/75804), no crasher written; running it again"
      continue
    fi
    echo "$out"
    echo "fuzz-smoke: FAIL $d $name (a crasher, if one was found, is under $corpus/)" >&2
    exit 1
  done
  printf 'fuzz-smoke: [%2d/%d] ok %-28s %s (%s, %ds)\n' "$n" "${#targets[@]}" "$name" "$d" "$ft" $((SECONDS - t0))
done
echo "fuzz-smoke: all ${#targets[@]} fuzz targets passed in $((SECONDS - start))s"
