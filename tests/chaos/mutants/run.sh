#!/usr/bin/env bash
# Breaks one safeguard at a time on purpose and checks that the chaos soak's
# short run fails for it (make soak-mutants). Each *.patch here is applied to
# a scratch worktree of the current tree (uncommitted changes included), the
# short run (-race, the make test length) runs there with one seed for all,
# and the script prints, per mutant, whether the soak caught it, how many
# violations it reported and how long after the faults began the earliest
# violating operation started. It exits non-zero if any mutant is not caught
# (or a patch no longer applies: refresh it against the code it breaks).
#
#   tests/chaos/mutants/run.sh                 # every mutant
#   tests/chaos/mutants/run.sh audit-skip      # one, by file name
#   SEED=123 DURATION=70s REV=HEAD tests/chaos/mutants/run.sh
set -euo pipefail

root=$(git rev-parse --show-toplevel)
here=$root/tests/chaos/mutants
seed=${SEED:-$(od -An -N7 -tu8 /dev/urandom | tr -d ' ')}
duration=${DURATION:-70s}
logs=${LOGS:-$(mktemp -d /tmp/cairn-mutants-XXXXXX)}
mkdir -p "$logs"

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
	for p in "$here"/*.patch; do names+=("$(basename "$p" .patch)"); done
fi

# The tree as it is now, uncommitted changes included, as a commit object
# (not on any branch); REV=<commit> tests that commit instead.
rev=${REV:-$(git -C "$root" stash create)}
rev=${rev:-HEAD}

echo "mutants: seed $seed, $duration of faults each, logs in $logs"
status=0
results=()
for name in "${names[@]}"; do
	patch=$here/$name.patch
	[ -f "$patch" ] || { echo "no mutant $name ($patch)"; exit 2; }
	wt=$(mktemp -d /tmp/cairn-mutant-XXXXXX)
	git -C "$root" worktree add --quiet --detach "$wt" "$rev"
	trap 'git -C "$root" worktree remove --force "$wt"' EXIT
	log=$logs/$name.log
	if ! git -C "$wt" apply "$patch"; then
		results+=("$name: the patch no longer applies; refresh it")
		status=1
	else
		echo "mutant $name: running the short soak ($log)"
		start=$(date +%s)
		set +e
		(cd "$wt" && go test -race -count=1 -timeout 20m -run '^TestChaosSoak$' -v ./tests/chaos/ \
			-chaos.seed "$seed" -chaos.duration "$duration") >"$log" 2>&1
		rc=$?
		set -e
		took=$(($(date +%s) - start))
		n=$(sed -n 's/.*invariant violations: \([0-9]*\).*/\1/p' "$log" | tail -1)
		first=$(sed -n 's/.*the earliest operation (or fault step) that broke one started \(.*\) after the faults began.*/\1/p' "$log" | tail -1)
		if [ "$rc" -eq 0 ]; then
			results+=("$name: NOT CAUGHT (the soak passed in ${took}s)")
			status=1
		elif [ -n "$n" ] && [ "$n" -gt 0 ]; then
			results+=("$name: caught, $n invariant violation(s); earliest violating operation or step ${first:-(none timed: found by an end-of-run check)} after the faults began; run ${took}s")
		else
			results+=("$name: the soak failed without reporting a violation (rc $rc, see $log)")
			status=1
		fi
	fi
	git -C "$root" worktree remove --force "$wt"
	trap - EXIT
done
echo
echo "mutants (seed $seed):"
for r in "${results[@]}"; do echo "  $r"; done
exit $status
