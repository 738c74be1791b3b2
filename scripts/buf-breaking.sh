#!/usr/bin/env bash
# buf-breaking.sh BUF — check that proto/ keeps wire and JSON compatibility.
# Persisted Raft commands, snapshots, bundles and manifests must stay
# readable, and clients must keep working, so every recent commit that
# changed proto/ is checked against its parent, and uncommitted changes
# against HEAD.
set -euo pipefail
buf=$1
depth=${BUF_BREAKING_DEPTH:-20}
checked=0
if ! git diff --quiet HEAD -- proto 2>/dev/null; then
  "$buf" breaking --against ".git#ref=HEAD"
  checked=$((checked + 1))
fi
for c in $(git log -n "$depth" --format=%H -- proto); do
  parent=$(git rev-parse -q --verify "$c~1" 2>/dev/null) || continue
  git cat-file -e "$parent:proto" 2>/dev/null || continue
  "$buf" breaking ".git#ref=$c" --against ".git#ref=$parent"
  checked=$((checked + 1))
done
echo "buf breaking: ${checked} change(s) to proto/ checked, all compatible"
