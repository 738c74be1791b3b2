// Package cli is the regionctl command line: bundle-signing keys, regions and
// keysets through the root KMS, and config bundles built, inspected and
// pushed to regional KMS servers. cmd/regionctl is a few lines around Run.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"
)

// Usage is the top-level help text.
const Usage = Summary + `

usage: regionctl <command> [<verb>] [NAME] [flags]

The root KMS holds the record (keysets, their versions and lifecycle, TTL
history, propagation); team config files (--teams) hold who may use each
keyset. regionctl keeps no state of its own: losing its files loses nothing.

Commands:
  keys generate      --out DIR
                     make a bundle-signing key pair: DIR/bundle-signing.key (0600) and .pub
  region list        [--json]                       regions and their master key versions
  region create      --region NAME                  create a region and its first master key
  region rotate-key  --region NAME                  add a region master key version (primary)
  region retire-key  --region NAME --version N      disable an old region master key version
  keyset list        [--region R] [--json]          keysets in the record
  keyset show        NAME [--json]                  policy, TTL history, every version's lifecycle
                                                    (created, propagated per region, primary since,
                                                    superseded, disabled, destroy after, encrypts)
  keyset create      --teams DIR [--only NAME]      create in the root KMS every keyset of the team
                                                    files the record lacks; existing ones are left alone
  keyset rotate      NAME                           add a version (decrypt-only until promoted)
  keyset promote     NAME --version ID              make a version primary (Safety Condition)
  keyset disable     NAME --version ID              take a version out of the decrypt set (Safety Condition)
  keyset enable      NAME --version ID              put a disabled version back
  keyset destroy     NAME --version ID [--delay 24h]  schedule a disabled version's destruction
  keyset undestroy   NAME --version ID              cancel a scheduled destruction
  keyset rewrap      NAME                           re-encrypt the copies under each region's primary key
  keyset set-policy  NAME [--ttl D] [--rotation-period D]
  bundle build       --region R --out FILE [--serial N] [--teams DIR] [--signing-key FILE]
                     [--allow-partial] [--force-shrink] [--reason TEXT]
                     compile and sign the region's bundle from the team files and the record;
                     refuses (writes nothing) on any invalid team file, keyset missing from the
                     record or from the team files, unknown region, or TTL/rotation mismatch,
                     unless --allow-partial --reason: then it leaves those keysets out and
                     records them, with the reason, in the signed bundle; refuses a bundle that
                     shrinks past the shrink guard against what the region's servers serve
                     (keysets, ACL entries or versions dropped, or much smaller) unless
                     --force-shrink --reason, signed into the bundle; every KMS server checks
                     the guard again and audits either record; --serial defaults to one above
                     the highest serial the region's servers serve
  bundle inspect     --bundle FILE [--signing-pub FILE[,FILE]]
                     verify a bundle and summarize it (never key material)
  bundle push        --bundle FILE [--kms ADDR[,ADDR]] [--dry-run]
                     all or nothing: fleet-wide safety check, the shrink guard's report, dry
                     run on every server of the region, and only if none refuses, apply on
                     each (no --force: a shrink override is signed in by bundle build)
  status             [--region R] [--record] [--json]
                     every KMS server's bundle and state, per-version usage summed per region,
                     the record's state and the next safe step; --record also records it
  observe            [--region R] [--json]         same as status --record
  probe              [--region R] [--json]
                     golden probes: every KMS server of each region must decrypt the golden
                     ciphertext of every version the record says decrypts (enabled or primary)
                     of every keyset it serves; exit 1 on any failure or unreachable server
  rotate             --due [--destroy-delay 24h] [--dry-run] [--no-push R[,R]] [--encrypt-limit N] [--rotate-at F]
                     observe and record every region, do every due lifecycle step of every
                     keyset (rotation period passed, or the primary used --rotate-at of its
                     AES-GCM message budget), then build and push each affected region
  rollout start      --change-dir DIR | --bundles FILE[,FILE] --reason TEXT [--dry-run]
                     [--regions R1,R2] [--canary N] [--wave N] [--bake D] [--id ID]
                     stage the change's signed bundles (one per region, from bundle build):
                     the canary server(s) of the first region, the rest of it, then the
                     other regions in waves, never all at once; each stage is dry-run on
                     all its servers first, then applied, baked and gated (readiness, error
                     rate and p99 against before, golden probes); a failed gate rolls the
                     stage back to its last good content at a new serial. Prints the plan
                     first (--dry-run: only that). The record is kept in the root KMS.
  rollout status     [ID] [--json]                 one rollout, or every rollout the record keeps
  rollout pause      ID --reason TEXT              hold it: nothing new starts; a bake's clock stops
  rollout resume     ID [--bundles FILE[,FILE] | --change-dir DIR]
                     take the rollout over (a new epoch fences its old controller) and go on
                     from the record: after a pause, or a controller that died
  rollout abort      ID --reason TEXT              stop it; nothing is rolled back
  rollout rollback   ID --reason TEXT              take it over and roll back every server it
                     applied, last stage first
  cluster status     [--json]                       each root KMS replica's view of the Raft cluster
  cluster add        --id ID --address HOST:PORT --api-address HOST:PORT [--nonvoter]
  cluster remove     --id ID
  cluster snapshot                                  take a Raft snapshot on each replica
                     add, remove and snapshot need an operator identity (by default
                     operator/*/*, e.g. --name operator/global/operator): regionctl's own
                     identity may manage regions and keysets, not the cluster
  backup export      --out FILE [--json]
                     export the root KMS's committed state (read on the leader after a Raft
                     barrier) to FILE (mode 0600, never overwritten), tagged under the root key;
                     prints its Raft index and term and what it holds; an operator or security
                     officer identity (e.g. --name operator/global/operator)
  backup restore     --in FILE --reason TEXT [--overwrite] [--json]
                     restore a backup into a cluster of the same root key (disaster recovery into
                     a fresh cluster): the root KMS checks the file, its lineage and its tag,
                     refuses a cluster that holds regions or keysets unless --overwrite, and
                     keeps the cluster's own members; a security officer identity
                     (e.g. --name officer/global/officer-1); audited with the reason
  backup inspect     --in FILE [--json]             summarize a backup file (unverified: no root key here)

Common flags: --config FILE (default $REGIONCTL_CONFIG) supplies every flag below that
is not given; --rootkms ADDR[,ADDR] (root KMS replicas), --kms ADDR[,ADDR] (one region's
KMS servers; otherwise the config file's regions), --timeout D (each remote call),
--json (machine-readable reads), --window D (propagation window, default 10m).
Identity flags: --trust-domain TD, and --dev-certs DIR --name regionctl/global/NAME or
--cert FILE --key FILE --ca FILE.
Exit status: 0 done (rotate --due: also when steps are not yet safe), 1 failed, refused
or a server unreachable, 2 bad command line.
Run "regionctl <command> <verb> -h" for a command's flags.
`

// errUsage marks a bad command line (exit 2).
var errUsage = errors.New("usage")

// DefaultTimeout bounds each remote call unless --timeout says otherwise.
const DefaultTimeout = 30 * time.Second

type command func(ctx context.Context, args []string, stdout, stderr io.Writer) error

var commands = map[string]map[string]command{
	"keys":   {"generate": keysGenerate},
	"region": {"list": regionList, "create": regionCreate, "rotate-key": regionRotateKey, "retire-key": regionRetireKey},
	"keyset": {"list": keysetList, "show": keysetShow, "create": keysetCreate, "rotate": keysetStep(stepRotate),
		"promote": keysetStep(stepPromote), "disable": keysetStep(stepDisable), "enable": keysetStep(stepEnable),
		"destroy": keysetStep(stepDestroy), "undestroy": keysetStep(stepUndestroy), "rewrap": keysetStep(stepRewrap),
		"set-policy": keysetSetPolicy},
	"bundle":  {"build": bundleBuild, "inspect": bundleInspect, "push": bundlePush},
	"cluster": {"status": clusterStatus, "add": clusterAdd, "remove": clusterRemove, "snapshot": clusterSnapshot},
	"rollout": rolloutCommands,
	"backup":  backupCommands,
}

// single are the commands without a verb.
var single = map[string]command{
	"status":  statusCmd(false),
	"observe": statusCmd(true),
	"rotate":  rotateCmd,
	"probe":   probeCmd,
}

// Run runs regionctl with args (without the program name) and returns the
// exit status.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return RunWith(ctx, args, stdout, stderr, RunOptions{})
}

// RunOptions are the seams of RunWith.
type RunOptions struct {
	// Now is the clock of every decision regionctl makes: observation times,
	// due checks, the Safety Condition's now and bundles' created_at (nil:
	// time.Now). Simulations run regionctl on a fake clock shared with the
	// servers.
	Now func() time.Time
	// Sleep is how a rollout waits out a stage's bake (nil: a timer, ended
	// early by ctx). A simulation on a fake clock advances it; an error ends
	// the bake, and the rollout's run, with it.
	Sleep func(ctx context.Context, d time.Duration) error
}

// RunWith is Run with opts.
func RunWith(ctx context.Context, args []string, stdout, stderr io.Writer, opts RunOptions) int {
	if opts.Now != nil {
		ctx = context.WithValue(ctx, clockKey{}, opts.Now)
	}
	if opts.Sleep != nil {
		ctx = context.WithValue(ctx, sleepKey{}, opts.Sleep)
	}
	if len(args) == 0 {
		fmt.Fprint(stderr, Usage)
		return 2
	}
	if args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(stdout, Usage)
		return 0
	}
	if cmd, ok := single[args[0]]; ok {
		return finish(cmd(ctx, args[1:], stdout, stderr), stderr, args[0])
	}
	verbs, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "regionctl: unknown command %q\n\n%s", args[0], Usage)
		return 2
	}
	if len(args) < 2 {
		fmt.Fprintf(stderr, "regionctl %s: missing verb (%s)\n", args[0], verbNames(verbs))
		return 2
	}
	if args[1] == "help" || args[1] == "-h" || args[1] == "--help" {
		fmt.Fprint(stdout, Usage)
		return 0
	}
	cmd, ok := verbs[args[1]]
	if !ok {
		fmt.Fprintf(stderr, "regionctl %s: unknown verb %q (%s)\n", args[0], args[1], verbNames(verbs))
		return 2
	}
	return finish(cmd(ctx, args[2:], stdout, stderr), stderr, args[0]+" "+args[1])
}

// errReported is an error whose details were printed already.
var errReported = errors.New("reported")

func finish(err error, stderr io.Writer, name string) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0 // -h: the help is printed
	case errors.Is(err, errUsage):
		return 2
	case errors.Is(err, errReported):
		return 1
	}
	fmt.Fprintf(stderr, "regionctl %s: %v\n", name, err)
	return 1
}

func verbNames(verbs map[string]command) string {
	return strings.Join(slices.Sorted(maps.Keys(verbs)), ", ")
}

func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("regionctl "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { commandUsage(fs, name) }
	return fs
}

func parse(fs *flag.FlagSet, args []string) error {
	_, err := parseNamed(fs, args, false)
	return err
}

// parseNamed parses args, which may hold one NAME argument before or after
// the flags when named is true.
func parseNamed(fs *flag.FlagSet, args []string, named bool) (string, error) {
	var name string
	if named && len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		name, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return "", flag.ErrHelp
		}
		return "", errUsage
	}
	rest := fs.Args()
	if named && name == "" && len(rest) > 0 {
		name, rest = rest[0], rest[1:]
	}
	if len(rest) != 0 {
		fmt.Fprintf(fs.Output(), "%s: unexpected arguments: %v\n", fs.Name(), rest)
		return "", errUsage
	}
	if named && name == "" {
		fmt.Fprintf(fs.Output(), "%s: the keyset NAME is required\n", fs.Name())
		return "", errUsage
	}
	return name, nil
}

// usageError prints msg for the command and returns errUsage.
func usageError(fs *flag.FlagSet, format string, a ...any) error {
	fmt.Fprintf(fs.Output(), "%s: %s\n", fs.Name(), fmt.Sprintf(format, a...))
	return errUsage
}
