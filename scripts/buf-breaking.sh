#!/usr/bin/env bash
# buf-breaking.sh BUF — check that proto/ keeps wire and JSON compatibility
# with the last commit that changed it (persisted Raft commands, snapshots,
# bundles and manifests must stay readable). With no earlier version of
# proto/ in the history there is nothing to compare against, and it says so.
set -euo pipefail
buf=$1
base=$(git log -n 1 --format=%H HEAD~1 -- proto 2>/dev/null || true)
if [ -z "$base" ]; then
  echo "buf breaking: no earlier commit of proto/ to compare against"
  exit 0
fi
"$buf" breaking --against ".git#ref=${base}"
echo "buf breaking: proto/ is compatible with ${base:0:12}"
