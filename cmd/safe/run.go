package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lockedmem"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/officer"
	"github.com/cairnkms/cairn/safe/safeconfig"
)

// summary is the first line of every help: what the tool is.
const summary = "safe: the security officers' tool: the root master key's genesis into HSM safes, unseal ceremonies, rekey and restore drills"

const usage = summary + `

Usage: safe <command> [flags]

Commands:
  genesis   create the root master key, split it K-of-N into safes, write the manifest,
            hand the key to distributors
  ceremony  open | status | cancel an unseal ceremony on a sealed distributor
  release   release this officer's share into an open ceremony
  rekey     a rekey ceremony on a distributor: K officers release their shares, the root key
            is split anew into new safes (new K/N), the new manifest is installed on every
            distributor, then the old shares are destroyed
  manifest  install a rekeyed manifest on distributors (verified: next epoch of the pinned one)
  retire    destroy a safe's share of an old epoch, once every distributor pins a later one
  seal      seal distributors; --fleet: an emergency seal of every distributor (kept sealed
            until an unseal ceremony) and of the root KMS replicas' root key
  drill     prove that the given safes restore the root key, in a throwaway ceremony
  list      list the shares a safe holds

Secrets (PINs, passphrases) are never flags: they come from the safe's config file
(pin_file / pin_env, passphrase_file / passphrase_env) or a terminal prompt.
Run "safe <command> -h" for a command's flags.
`

// errUsage marks a bad command line (exit 2).
var errUsage = errors.New("usage")

// progName is how the next commands a command prints call this tool:
// "safe", or the path it was run by (main sets it).
var progName = "safe"

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "-help" || args[0] == "--help" {
		if len(args) == 0 {
			fmt.Fprint(stderr, usage)
			return 2
		}
		fmt.Fprint(stdout, usage)
		return 0
	}
	cmds := map[string]func(context.Context, []string, io.Writer, io.Writer) error{
		"genesis": genesis, "ceremony": ceremony, "release": release, "rekey": rekey, "drill": drill, "list": list,
		"manifest": manifestCmd, "retire": retire, "seal": seal,
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "safe: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	// No core dumps and no ptrace while shares and keys are in memory.
	if err := lockedmem.HardenProcess(); err != nil {
		fmt.Fprintf(stderr, "safe: hardening the process: %v\n", err)
		return 1
	}
	if err := cmd(ctx, args[1:], stdout, stderr); err != nil {
		switch {
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			return 2
		}
		fmt.Fprintf(stderr, "safe %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

// multi is a repeatable string flag.
type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

// commandHelp is each command's help: the line that says what it does, and
// its synopsis.
var commandHelp = map[string]struct{ summary, synopsis string }{
	"genesis": {"create the root master key, split it K-of-N into safes, write the public manifest and hand the key to distributors",
		"--threshold K --safe FILE (N times) --manifest FILE [--officers IDS] [--distributor ADDR]... [identity flags]"},
	"ceremony open": {"open an unseal ceremony on a sealed distributor; prints its ID and the release command each officer runs next",
		"--distributor ADDR [--ttl D] [--json] [identity flags]"},
	"ceremony status": {"show a distributor's seal state and its unseal ceremony: shares accepted, shares still needed, the next command",
		"--distributor ADDR [--ceremony ID] [--json] [identity flags]"},
	"ceremony cancel": {"cancel an unseal ceremony; the shares it accepted are wiped",
		"--distributor ADDR --ceremony ID [--reason TEXT] [--json] [identity flags]"},
	"release": {"release this officer's share from their safe into an open unseal ceremony",
		"--distributor ADDR --ceremony ID --safe FILE --manifest FILE [--json] [identity flags]"},
	"rekey": {"re-split the same root key into new safes (new K and N) in a rekey ceremony on a distributor, install the new manifest on every distributor, then destroy the old shares",
		"--distributor ADDR[,ADDR...] --threshold K --safe FILE (N' times) --manifest FILE --out FILE [--old-safe FILE]... [--officers IDS] [--wait D] [--keep-old-shares] [identity flags]"},
	"manifest install": {"install a rekeyed manifest on distributors: each checks it is the next epoch of the manifest it pins, and it is then read back",
		"--distributor ADDR[,ADDR...] --manifest FILE [identity flags]"},
	"retire": {"destroy this safe's share of an old epoch, once every distributor pins a later epoch",
		"--safe FILE --manifest OLD --distributor ADDR[,ADDR...] [identity flags]"},
	"seal": {"seal distributors now; with --fleet an emergency seal: every distributor stays sealed (no peer fetch) until an unseal ceremony, and the root KMS replicas drop the root key",
		"--distributor ADDR[,ADDR...] --reason TEXT [--fleet] [--rootkms ADDR[,ADDR...]] [identity flags]"},
	"drill": {"prove that the given safes restore the root key, in a throwaway ceremony; nothing in production is touched",
		"--manifest FILE --safe FILE (K times)"},
	"list": {"list the shares a safe holds (genesis, epoch, index; never a share)",
		"--safe FILE"},
}

// cmdFlags is a command's flag set, with its help.
type cmdFlags struct {
	*flag.FlagSet
	summary, synopsis string
	stdout, stderr    io.Writer
}

func newFlags(name string, stdout, stderr io.Writer) *cmdFlags {
	h := commandHelp[name]
	fs := flag.NewFlagSet("safe "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // help and errors are printed by parse
	return &cmdFlags{FlagSet: fs, summary: h.summary, synopsis: h.synopsis, stdout: stdout, stderr: stderr}
}

// usage prints the command's help: one line saying what it does, the
// synopsis and the flags.
func (f *cmdFlags) usage(w io.Writer) {
	fmt.Fprintf(w, "%s: %s\n\nUsage: %s %s\n\nFlags:\n", f.Name(), f.summary, f.Name(), f.synopsis)
	f.SetOutput(w)
	f.PrintDefaults()
	f.SetOutput(io.Discard)
}

// parse parses args. -h prints the help on stdout and returns flag.ErrHelp
// (exit 0); a bad command line prints the error and the help on stderr and
// returns errUsage (exit 2).
func (f *cmdFlags) parse(args []string) error {
	if err := f.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			f.usage(f.stdout)
			return flag.ErrHelp
		}
		fmt.Fprintf(f.stderr, "%s: %v\n", f.Name(), err)
		f.usage(f.stderr)
		return errUsage
	}
	if f.NArg() != 0 {
		fmt.Fprintf(f.stderr, "%s: unexpected arguments: %v\n", f.Name(), f.Args())
		return errUsage
	}
	return nil
}

// required prints that flags are required and returns errUsage.
func (f *cmdFlags) required(what string) error {
	fmt.Fprintf(f.stderr, "%s: %s\nRun \"%s -h\" for usage.\n", f.Name(), what, f.Name())
	return errUsage
}

// openSafes opens every safe of paths, or none: the commands that need
// every safe they are given (genesis, rekey, list) fail naming each one
// that does not open.
func openSafes(ctx context.Context, paths []string) ([]safe.Safe, func(), error) {
	opened, failed, closeAll := openAvailable(ctx, paths)
	if len(failed) > 0 {
		closeAll()
		return nil, nil, safe.JoinFailures(failed)
	}
	return opened, closeAll, nil
}

func dial(id *identity.Flags, addr string) (distributorv1.DistributorClient, func(), error) {
	src, err := id.Source(nil)
	if err != nil {
		return nil, nil, err
	}
	onlyDistributors, err := identity.ParseAllowlist(src.TrustDomain(), "distributor/*/*")
	if err != nil {
		return nil, nil, err
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(identity.ClientCredentials(src, onlyDistributors.Authorize)))
	if err != nil {
		return nil, nil, err
	}
	return distributorv1.NewDistributorClient(conn), func() { conn.Close() }, nil
}

// checkOfficers checks --officers before any safe is opened: each a full,
// distinct SPIFFE ID (safe.ValidateOfficers), and of --trust-domain when it
// is given. A distributor compares them with the officers' own IDs, so one
// that is not would lock that share out of every ceremony.
func checkOfficers(officers []string, trustDomain string) error {
	if err := safe.ValidateOfficers(officers); err != nil {
		return fmt.Errorf("--officers: %w", err)
	}
	if trustDomain == "" {
		return nil
	}
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return fmt.Errorf("--trust-domain %q: %w", trustDomain, err)
	}
	for i, o := range officers {
		if id, err := identity.Parse(o); err != nil || id.TrustDomain() != td {
			return fmt.Errorf("--officers: officer %s of share %d is not of --trust-domain %s", o, i+1, td.Name())
		}
	}
	return nil
}

func genesis(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("genesis", stdout, stderr)
	var (
		id                  identity.Flags
		safes, distributors multi
		officers            string
		threshold           int
		manifestPath        string
	)
	id.Register(fs.FlagSet)
	fs.IntVar(&threshold, "threshold", 0, "K: shares needed to restore the key (required)")
	fs.Var(&safes, "safe", "safe config file; repeat once per safe (N times)")
	fs.StringVar(&officers, "officers", "", "comma-separated full officer SPIFFE IDs (spiffe://<trust-domain>/<tier>/<region>/<name>), one per safe in order (optional)")
	fs.StringVar(&manifestPath, "manifest", "", "where to write the public genesis manifest (required)")
	fs.Var(&distributors, "distributor", "host:port of a distributor to hand the key to; repeatable")
	if err := fs.parse(args); err != nil {
		return err
	}
	if threshold == 0 || len(safes) == 0 || manifestPath == "" {
		return fs.required("--threshold, --safe (N times) and --manifest are required")
	}
	officerIDs := identity.SplitList(officers)
	if err := checkOfficers(officerIDs, id.TrustDomain); err != nil {
		return err
	}
	opened, closeAll, err := openSafes(ctx, safes)
	if err != nil {
		return err
	}
	defer closeAll()
	start := time.Now()
	m, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: threshold, Safes: opened, Officers: officerIDs})
	if err != nil {
		return err
	}
	defer rmk.Wipe()
	if err := safe.WriteManifest(manifestPath, m); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "genesis %s: %d-of-%d, every share verified, KCV %x\nmanifest: %s\n", m.GetGenesisId(), threshold, len(opened), m.GetKcv(), manifestPath)
	for _, addr := range distributors {
		client, closeConn, err := dial(&id, addr)
		if err != nil {
			return err
		}
		err = officer.Provision(ctx, client, m, rmk)
		closeConn()
		if err != nil {
			return fmt.Errorf("handing the key to %s: %w", addr, err)
		}
		fmt.Fprintf(stdout, "provisioned distributor %s\n", addr)
	}
	fmt.Fprintf(stdout, "done in %s; the key is wiped from this process\n", time.Since(start).Round(time.Millisecond))
	return nil
}

func release(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("release", stdout, stderr)
	var (
		id                            identity.Flags
		addr, cid, safePath, manifest string
		asJSON                        bool
	)
	id.Register(fs.FlagSet)
	fs.StringVar(&addr, "distributor", "", "host:port of the distributor (required)")
	fs.StringVar(&cid, "ceremony", "", "ceremony id (required)")
	fs.StringVar(&safePath, "safe", "", "this officer's safe config file (required)")
	fs.StringVar(&manifest, "manifest", "", "the genesis manifest (required)")
	fs.BoolVar(&asJSON, "json", false, "print the ceremony and the next step as JSON (see \"safe ceremony -h\")")
	if err := fs.parse(args); err != nil {
		return err
	}
	if addr == "" || cid == "" || safePath == "" || manifest == "" {
		return fs.required("--distributor, --ceremony, --safe and --manifest are required")
	}
	m, err := safe.ReadManifest(manifest)
	if err != nil {
		return err
	}
	opened, closeAll, err := openSafes(ctx, []string{safePath})
	if err != nil {
		return err
	}
	defer closeAll()
	client, closeConn, err := dial(&id, addr)
	if err != nil {
		return err
	}
	defer closeConn()
	c, err := officer.Release(ctx, client, cid, m, opened[0])
	if err != nil {
		return err
	}
	r := ceremonyReport{Distributor: addr, Ceremony: ceremonyOf(c)}
	r.Next = nextStep(addr, c, nil, &id, manifest)
	return r.write(stdout, asJSON)
}

func drill(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("drill", stdout, stderr)
	var (
		safes    multi
		manifest string
	)
	fs.Var(&safes, "safe", "safe config file; repeat for at least K safes")
	fs.StringVar(&manifest, "manifest", "", "the genesis manifest (required)")
	if err := fs.parse(args); err != nil {
		return err
	}
	if manifest == "" || len(safes) == 0 {
		return fs.required("--manifest and --safe are required")
	}
	m, err := safe.ReadManifest(manifest)
	if err != nil {
		return err
	}
	// A safe that does not open (its module missing, its token absent) is
	// what a drill is for finding: skip it like one that cannot release
	// its share, as long as the others reach the threshold.
	opened, unopened, closeAll := openAvailable(ctx, safes)
	defer closeAll()
	if len(opened) < int(m.GetThreshold()) {
		return errors.Join(fmt.Errorf("drill: %d of %d safe(s) opened, the threshold is %d", len(opened), len(safes), m.GetThreshold()), safe.JoinFailures(unopened))
	}
	r, err := officer.Drill(ctx, m, opened, slog.New(slog.NewTextHandler(stderr, nil)))
	if err != nil {
		return errors.Join(err, safe.JoinFailures(unopened))
	}
	fmt.Fprintf(stdout, "drill passed: genesis %s epoch %d restored from shares %v, KCV %x matches the manifest (%s); nothing in production touched\n",
		r.GenesisID, r.Epoch, r.Shares, r.KCV, r.Took.Round(time.Millisecond))
	for _, f := range append(unopened, r.Failed...) {
		fmt.Fprintf(stdout, "  skipped, fix before a real ceremony: %v\n", f)
	}
	return nil
}

// openAvailable opens every safe of paths it can; each one that does not
// open is returned as a failure labelled with its config path.
func openAvailable(ctx context.Context, paths []string) (opened []safe.Safe, failed []*safe.SafeError, closeAll func()) {
	for _, p := range paths {
		s, err := safeconfig.OpenFile(ctx, p)
		if err != nil {
			failed = append(failed, &safe.SafeError{Label: p, Err: err})
			continue
		}
		opened = append(opened, s)
	}
	return opened, failed, func() {
		for _, s := range opened {
			s.Close()
		}
	}
}

func list(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("list", stdout, stderr)
	var safePath string
	fs.StringVar(&safePath, "safe", "", "safe config file (required)")
	if err := fs.parse(args); err != nil {
		return err
	}
	if safePath == "" {
		return fs.required("--safe is required")
	}
	opened, closeAll, err := openSafes(ctx, []string{safePath})
	if err != nil {
		return err
	}
	defer closeAll()
	refs, err := opened[0].List(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "safe %s (%s): %d share(s)\n", opened[0].Label(), opened[0].Kind(), len(refs))
	for _, r := range refs {
		fmt.Fprintf(stdout, "  genesis %s epoch %d share %d\n", r.GenesisID, r.Epoch, r.Index)
	}
	return nil
}
