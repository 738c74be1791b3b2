#!/usr/bin/env bash
# deps.sh — make sure the system packages Cairn's tests need are installed.
#
# SoftHSM2 provides the real PKCS#11 tokens the HSM-safe tests run against.
# As root with apt-get it is installed; otherwise this says what to run. In
# CI (CI=true) a missing dependency is a failure, never a skip.
set -euo pipefail

need=()
command -v softhsm2-util >/dev/null 2>&1 || need+=(softhsm2)
command -v git >/dev/null 2>&1 || need+=(git)
command -v jq >/dev/null 2>&1 || need+=(jq) # scripts/govulncheck.sh reads govulncheck's JSON

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "deps: installing ${need[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  command -v softhsm2-util >/dev/null 2>&1 || { echo "deps: softhsm2 did not install" >&2; exit 1; }
  exit 0
fi

echo "deps: missing ${need[*]}." >&2
echo "deps: install with:  sudo apt-get install ${need[*]}" >&2
exit 1
