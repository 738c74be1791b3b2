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

	"google.golang.org/grpc"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lockedmem"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/officer"
	"github.com/cairnkms/cairn/safe/safeconfig"
)

const usage = `usage: safe <command> [flags]

Commands:
  genesis   create the root master key, split it K-of-N into safes, write the manifest,
            hand the key to distributors
  ceremony  open | status | cancel an unseal ceremony on a sealed distributor
  release   release this officer's share into an open ceremony
  rekey     re-split the same root key into new safes (new K/N), then destroy the old shares
  drill     prove that the given safes restore the root key, in a throwaway ceremony
  list      list the shares a safe holds

Secrets (PINs, passphrases) are never flags: they come from the safe's config file
(pin_file / pin_env, passphrase_file / passphrase_env) or a terminal prompt.
Run "safe <command> -h" for a command's flags.
`

// errUsage marks a bad command line (exit 2).
var errUsage = errors.New("usage")

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		w := stdout
		if len(args) == 0 {
			w = stderr
		}
		fmt.Fprint(w, usage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmds := map[string]func(context.Context, []string, io.Writer, io.Writer) error{
		"genesis": genesis, "ceremony": ceremony, "release": release, "rekey": rekey, "drill": drill, "list": list,
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
		if errors.Is(err, errUsage) || errors.Is(err, flag.ErrHelp) {
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

func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("safe "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() != 0 {
		fmt.Fprintf(fs.Output(), "unexpected arguments: %v\n", fs.Args())
		return errUsage
	}
	return nil
}

func openSafes(ctx context.Context, paths []string) ([]safe.Safe, func(), error) {
	var out []safe.Safe
	closeAll := func() {
		for _, s := range out {
			s.Close()
		}
	}
	for _, p := range paths {
		s, err := safeconfig.OpenFile(ctx, p)
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		out = append(out, s)
	}
	return out, closeAll, nil
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

func genesis(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("genesis", stderr)
	var (
		id                  identity.Flags
		safes, distributors multi
		officers            string
		threshold           int
		manifestPath        string
	)
	id.Register(fs)
	fs.IntVar(&threshold, "threshold", 0, "K: shares needed to restore the key (required)")
	fs.Var(&safes, "safe", "safe config file; repeat once per safe (N times)")
	fs.StringVar(&officers, "officers", "", "comma-separated officer SPIFFE IDs, one per safe in order (optional)")
	fs.StringVar(&manifestPath, "manifest", "", "where to write the public genesis manifest (required)")
	fs.Var(&distributors, "distributor", "host:port of a distributor to hand the key to; repeatable")
	if err := parse(fs, args); err != nil {
		return err
	}
	if threshold == 0 || len(safes) == 0 || manifestPath == "" {
		fmt.Fprintln(stderr, "safe genesis: --threshold, --safe (N times) and --manifest are required")
		return errUsage
	}
	opened, closeAll, err := openSafes(ctx, safes)
	if err != nil {
		return err
	}
	defer closeAll()
	start := time.Now()
	m, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: threshold, Safes: opened, Officers: identity.SplitList(officers)})
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

func ceremony(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: safe ceremony open|status|cancel --distributor ADDR [--ceremony ID] [identity flags]")
		return errUsage
	}
	verb := args[0]
	fs := newFlags("ceremony "+verb, stderr)
	var (
		id        identity.Flags
		addr, cid string
		reason    string
		ttl       time.Duration
	)
	id.Register(fs)
	fs.StringVar(&addr, "distributor", "", "host:port of the distributor (required)")
	fs.StringVar(&cid, "ceremony", "", "ceremony id (status, cancel)")
	fs.StringVar(&reason, "reason", "", "why (cancel; audited)")
	fs.DurationVar(&ttl, "ttl", 0, "ceremony lifetime (open; default the distributor's)")
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	if addr == "" {
		fmt.Fprintln(stderr, "safe ceremony: --distributor is required")
		return errUsage
	}
	client, closeConn, err := dial(&id, addr)
	if err != nil {
		return err
	}
	defer closeConn()
	var c *distributorv1.Ceremony
	switch verb {
	case "open":
		c, err = client.OpenCeremony(ctx, &distributorv1.OpenCeremonyRequest{Kind: distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL, TtlSeconds: uint32(ttl / time.Second)})
	case "status":
		if cid == "" {
			var st *distributorv1.GetStatusResponse
			if st, err = client.GetStatus(ctx, &distributorv1.GetStatusRequest{}); err == nil {
				fmt.Fprintf(stdout, "distributor %s: %s, genesis %s, KCV %x, unsealed by %q\n", addr, st.GetState(), st.GetGenesisId(), st.GetKcv(), st.GetUnsealedBy())
				c = st.GetCeremony()
				if c == nil {
					return nil
				}
			}
		} else {
			c, err = client.GetCeremony(ctx, &distributorv1.GetCeremonyRequest{CeremonyId: cid})
		}
	case "cancel":
		c, err = client.CancelCeremony(ctx, &distributorv1.CancelCeremonyRequest{CeremonyId: cid, Reason: reason})
	default:
		fmt.Fprintf(stderr, "safe ceremony: unknown verb %q (open, status, cancel)\n", verb)
		return errUsage
	}
	if err != nil {
		return err
	}
	printCeremony(stdout, c)
	return nil
}

func printCeremony(w io.Writer, c *distributorv1.Ceremony) {
	fmt.Fprintf(w, "ceremony %s (%s): %s, %d of %d shares %v from %v, expires %s",
		c.GetId(), strings.TrimPrefix(c.GetKind().String(), "CEREMONY_KIND_"), strings.TrimPrefix(c.GetState().String(), "CEREMONY_STATE_"),
		len(c.GetAcceptedIndices()), c.GetThreshold(), c.GetAcceptedIndices(), c.GetOfficers(), c.GetExpiresAt().AsTime().UTC().Format(time.RFC3339))
	if c.GetDetail() != "" {
		fmt.Fprintf(w, " (%s)", c.GetDetail())
	}
	fmt.Fprintln(w)
}

func release(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("release", stderr)
	var (
		id                            identity.Flags
		addr, cid, safePath, manifest string
	)
	id.Register(fs)
	fs.StringVar(&addr, "distributor", "", "host:port of the distributor (required)")
	fs.StringVar(&cid, "ceremony", "", "ceremony id (required)")
	fs.StringVar(&safePath, "safe", "", "this officer's safe config file (required)")
	fs.StringVar(&manifest, "manifest", "", "the genesis manifest (required)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if addr == "" || cid == "" || safePath == "" || manifest == "" {
		fmt.Fprintln(stderr, "safe release: --distributor, --ceremony, --safe and --manifest are required")
		return errUsage
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
	printCeremony(stdout, c)
	return nil
}

func rekey(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("rekey", stderr)
	var (
		oldSafes, newSafes multi
		officers           string
		threshold          int
		manifest, out      string
		keepOld            bool
	)
	fs.IntVar(&threshold, "threshold", 0, "new K (required)")
	fs.Var(&oldSafes, "old-safe", "config of a safe holding a current share; at least K of them")
	fs.Var(&newSafes, "safe", "config of a new safe; repeat N' times")
	fs.StringVar(&officers, "officers", "", "comma-separated officer SPIFFE IDs for the new safes (optional)")
	fs.StringVar(&manifest, "manifest", "", "the current manifest (required)")
	fs.StringVar(&out, "out", "", "where to write the new manifest (required; then install it on every distributor)")
	fs.BoolVar(&keepOld, "keep-old-shares", false, "do not destroy the old shares (they stay valid until destroyed)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if threshold == 0 || len(oldSafes) == 0 || len(newSafes) == 0 || manifest == "" || out == "" {
		fmt.Fprintln(stderr, "safe rekey: --threshold, --old-safe, --safe, --manifest and --out are required")
		return errUsage
	}
	prev, err := safe.ReadManifest(manifest)
	if err != nil {
		return err
	}
	olds, closeOld, err := openSafes(ctx, oldSafes)
	if err != nil {
		return err
	}
	defer closeOld()
	news, closeNew, err := openSafes(ctx, newSafes)
	if err != nil {
		return err
	}
	defer closeNew()
	rmk, err := safe.Recover(ctx, prev, olds)
	if err != nil {
		return fmt.Errorf("recovering the key from the old safes: %w", err)
	}
	defer rmk.Wipe()
	m, err := safe.Rekey(ctx, safe.RekeyConfig{SplitConfig: safe.SplitConfig{Threshold: threshold, Safes: news, Officers: identity.SplitList(officers)}, Previous: prev, RMK: rmk})
	if err != nil {
		return err
	}
	if err := safe.WriteManifest(out, m); err != nil {
		return fmt.Errorf("writing the new manifest (old shares kept): %w", err)
	}
	fmt.Fprintf(stdout, "rekeyed genesis %s to epoch %d: %d-of-%d, every new share verified, same KCV %x\nnew manifest: %s\n", m.GetGenesisId(), m.GetEpoch(), threshold, len(news), m.GetKcv(), out)
	if keepOld {
		fmt.Fprintln(stdout, "old shares kept (--keep-old-shares)")
		return nil
	}
	if err := safe.DestroyEpoch(ctx, prev, olds); err != nil {
		return fmt.Errorf("the new manifest is written, but destroying old shares failed: %w", err)
	}
	fmt.Fprintf(stdout, "destroyed the epoch %d shares in %d safes\n", prev.GetEpoch(), len(olds))
	return nil
}

func drill(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("drill", stderr)
	var (
		safes    multi
		manifest string
	)
	fs.Var(&safes, "safe", "safe config file; repeat for at least K safes")
	fs.StringVar(&manifest, "manifest", "", "the genesis manifest (required)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if manifest == "" || len(safes) == 0 {
		fmt.Fprintln(stderr, "safe drill: --manifest and --safe are required")
		return errUsage
	}
	m, err := safe.ReadManifest(manifest)
	if err != nil {
		return err
	}
	opened, closeAll, err := openSafes(ctx, safes)
	if err != nil {
		return err
	}
	defer closeAll()
	r, err := officer.Drill(ctx, m, opened, slog.New(slog.NewTextHandler(stderr, nil)))
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "drill passed: genesis %s epoch %d restored from shares %v, KCV %x matches the manifest (%s); nothing in production touched\n",
		r.GenesisID, r.Epoch, r.Shares, r.KCV, r.Took.Round(time.Millisecond))
	return nil
}

func list(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("list", stderr)
	var safePath string
	fs.StringVar(&safePath, "safe", "", "safe config file (required)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if safePath == "" {
		fmt.Fprintln(stderr, "safe list: --safe is required")
		return errUsage
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

var _ = (*safev1.GenesisManifest)(nil)
