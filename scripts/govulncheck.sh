#!/usr/bin/env bash
# govulncheck.sh GOVULNCHECK — run govulncheck ./... and fail on any
# vulnerability the code reaches that scripts/govulncheck.allow does not
# explain.
#
# The database: vuln.go.dev is not reachable from every build machine, but
# the Go module proxy is, and it serves golang.org/x/vulndb, whose data/osv
# holds every Go advisory as OSV JSON. This script downloads that module
# (VULNDB_VERSION, default latest), indexes it into the v1 database layout
# with the module's own cmd/indexdb (at the same version) under
# bin/vulndb/<version>, and points govulncheck at it with -db file://.
# GOVULNDB=https://vuln.go.dev uses the public database instead.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
govulncheck=$1
GO=${GO:-go}
allow=scripts/govulncheck.allow

db=${GOVULNDB:-}
if [ -z "$db" ]; then
  version=${VULNDB_VERSION:-latest}
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # Outside the main module, so that go.mod and go.sum stay untouched.
  if ! info=$(cd "$tmp" && GOFLAGS= $GO mod download -json "golang.org/x/vulndb@$version" 2>&1); then
    echo "govulncheck: cannot download golang.org/x/vulndb@$version through the module proxy ($($GO env GOPROXY)):" >&2
    echo "$info" >&2
    echo "govulncheck: no vulnerability database, so no vulnerability check: failing" >&2
    exit 1
  fi
  dir=$(jq -r .Dir <<<"$info")
  version=$(jq -r .Version <<<"$info")
  out=bin/vulndb/$version
  if [ ! -f "$out/index/modules.json" ]; then
    rm -rf "$out"
    echo "govulncheck: indexing golang.org/x/vulndb@$version ($(ls "$dir/data/osv" | wc -l) advisories) into $out"
    (cd "$tmp" && GOFLAGS= $GO run "golang.org/x/vulndb/cmd/indexdb@$version" -vulns "$dir/data/osv" -out "$root/$out") \
      || { rm -rf "$out"; echo "govulncheck: indexing the database failed" >&2; exit 1; }
  fi
  db=file://$PWD/$out
fi
echo "govulncheck: $("$govulncheck" -version | grep -E '^(Go|Scanner):' | tr '\n' ' ')database $db"

# JSON findings whose first frame names a function are the ones the code
# calls; govulncheck's text report (run below when something is left) shows
# their traces.
json=$("$govulncheck" -db "$db" -format json ./...)
called=$(jq -r 'select(.finding != null and .finding.trace[0].function != null) | .finding.osv' <<<"$json" | sort -u)
allowed=$(grep -oE '^GO-[0-9]+-[0-9]+' "$allow" | sort -u || true)
left=$(comm -23 <(printf '%s\n' $called) <(printf '%s\n' $allowed) | grep . || true)
for id in $called; do
  if grep -qx "$id" <<<"$allowed"; then
    echo "govulncheck: $id reached but explained in $allow: $(grep -E "^$id" "$allow" | cut -d' ' -f2- | sed 's/^ *//')"
  fi
done
if [ -n "$left" ]; then
  "$govulncheck" -db "$db" ./... || true
  echo "govulncheck: FAIL: the code reaches $(wc -w <<<"$left") unexplained vulnerabilit(y/ies): $(echo $left)" >&2
  echo "govulncheck: fix them (upgrade the module or the Go toolchain) or explain each in $allow" >&2
  exit 1
fi
echo "govulncheck: no unexplained vulnerabilities reached ($(wc -w <<<"$called") reached, all explained in $allow)"
