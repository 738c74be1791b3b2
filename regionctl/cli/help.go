package cli

import (
	"flag"
	"fmt"
)

// Summary is the first line of regionctl's help: what the tool is.
const Summary = "regionctl: the SREs' tool for Cairn's regional config: regions, keysets and their lifecycle, signed config bundles, staged rollouts"

// summaries are the first lines of the commands' help ("regionctl NAME
// -h"), by command (and verb).
var summaries = map[string]string{
	"keys generate":     "make a bundle-signing key pair",
	"region list":       "list the regions and their master key versions",
	"region create":     "create a region and its first master key in the root KMS",
	"region rotate-key": "add a region master key version, primary",
	"region retire-key": "disable an old region master key version",
	"keyset list":       "list the keysets in the root KMS record",
	"keyset show":       "show a keyset: policy, TTL history, every version's lifecycle",
	"keyset create":     "create in the root KMS every keyset of the team files that the record lacks",
	"keyset rotate":     "add a keyset version, decrypt-only until promoted",
	"keyset promote":    "make a keyset version primary (checked against the Safety Condition)",
	"keyset disable":    "take a keyset version out of the decrypt set (checked against the Safety Condition)",
	"keyset enable":     "put a disabled keyset version back",
	"keyset destroy":    "schedule a disabled keyset version's destruction",
	"keyset undestroy":  "cancel a scheduled destruction",
	"keyset rewrap":     "re-encrypt a keyset's copies under each region's primary key",
	"keyset set-policy": "change a keyset's ciphertext TTL or rotation period",
	"bundle build":      "compile and sign a region's config bundle from the team files and the root KMS record",
	"bundle inspect":    "verify a bundle and summarize it (never key material)",
	"bundle push":       "push a bundle to every KMS server of its region, all or nothing",
	"status":            "every KMS server's bundle, state and usage, the record's state and the next safe step",
	"observe":           "status, and record what was seen in the root KMS",
	"probe":             "golden probes: every KMS server must decrypt the golden ciphertext of every version it should serve",
	"rotate":            "do every due lifecycle step of every keyset, then roll the bundles that changed out in stages (canary, region, waves)",
	"rollout start":     "stage a change's signed bundles across the fleet: canary, the rest of its region, then the other regions",
	"rollout status":    "show one rollout, or every rollout the record keeps",
	"rollout pause":     "hold a rollout: nothing new starts",
	"rollout resume":    "take a rollout over and go on from the record",
	"rollout abort":     "stop a rollout; nothing is rolled back",
	"rollout rollback":  "roll back every server a rollout applied, last stage first",
	"cluster status":    "each root KMS replica's view of the Raft cluster",
	"cluster add":       "add a replica to the root KMS's Raft cluster",
	"cluster remove":    "remove a replica from the root KMS's Raft cluster",
	"cluster snapshot":  "take a Raft snapshot on each root KMS replica",
	"backup export":     "export the root KMS's committed state to a backup file tagged under the root key",
	"backup restore":    "restore a root KMS backup into a cluster of the same root key",
	"backup inspect":    "summarize a root KMS backup file (unverified)",
}

// commandUsage prints a command's help to fs's output: one line saying what
// it does, then its flags.
func commandUsage(fs *flag.FlagSet, name string) {
	summary := summaries[name]
	if summary == "" {
		summary = "see \"regionctl -h\""
	}
	fmt.Fprintf(fs.Output(), "%s: %s\n\nUsage: %s [flags]\n\nFlags:\n", fs.Name(), summary, fs.Name())
	fs.PrintDefaults()
}
