package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"google.golang.org/grpc"

	"github.com/cairnkms/cairn/internal/identity"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/officer"
)

// rekey implements "safe rekey": a rekey ceremony on the first distributor.
// K officers release their current shares into it (this process releases
// those of --old-safe; other officers run "safe release"); the distributor
// rebuilds the root key, checks it against the KCV, splits it anew and seals
// each new share to a key this process made for the new safe; this process
// opens them, checks them and seals them into the new safes. The new
// manifest is written, installed on every distributor and read back; only
// then are the old shares of --old-safe destroyed (other officers: "safe
// retire"). Every step on the distributor is audited.
func rekey(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("rekey", stdout, stderr)
	var (
		id                 identity.Flags
		oldSafes, newSafes multi
		officers, dists    string
		threshold          int
		manifest, out      string
		wait               time.Duration
		keepOld            bool
	)
	id.Register(fs.FlagSet)
	fs.StringVar(&dists, "distributor", "", "comma-separated host:port of every distributor; the ceremony runs on the first (required)")
	fs.IntVar(&threshold, "threshold", 0, "new K (required)")
	fs.Var(&oldSafes, "old-safe", "config of a safe holding a current share this officer releases; repeatable (other officers run \"safe release\")")
	fs.Var(&newSafes, "safe", "config of a new safe; repeat N' times")
	fs.StringVar(&officers, "officers", "", "comma-separated full officer SPIFFE IDs (spiffe://<trust-domain>/<tier>/<region>/<name>) for the new safes, one per safe in order (optional)")
	fs.StringVar(&manifest, "manifest", "", "the current manifest (required)")
	fs.StringVar(&out, "out", "", "where to write the new manifest (required)")
	fs.DurationVar(&wait, "wait", 30*time.Minute, "how long the ceremony waits for the officers' shares")
	fs.BoolVar(&keepOld, "keep-old-shares", false, "do not destroy the old shares of --old-safe (they stay valid until destroyed)")
	if err := fs.parse(args); err != nil {
		return err
	}
	addrs := identity.SplitList(dists)
	if threshold == 0 || len(newSafes) == 0 || manifest == "" || out == "" || len(addrs) == 0 {
		return fs.required("--distributor, --threshold, --safe, --manifest and --out are required")
	}
	officerIDs := identity.SplitList(officers)
	if err := checkOfficers(officerIDs, id.TrustDomain); err != nil {
		return err
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
	client, closeConn, err := dial(&id, addrs[0])
	if err != nil {
		return err
	}
	defer closeConn()
	r, err := officer.OpenRekey(ctx, client, threshold, news, officerIDs, wait)
	if err != nil {
		return err
	}
	defer r.Close()
	fmt.Fprintf(stdout, "rekey ceremony %s open on %s (genesis %s epoch %d -> %d-of-%d); officers release their shares:\n  %s release --distributor %s --ceremony %s --safe SAFE --manifest %s\n",
		r.CeremonyID, addrs[0], prev.GetGenesisId(), prev.GetEpoch(), threshold, len(news), progName, addrs[0], r.CeremonyID, manifest)
	for _, s := range olds {
		c, err := officer.Release(ctx, client, r.CeremonyID, prev, s)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "released the share in %s (%d of %d)\n", s.Label(), len(c.GetAcceptedIndices()), c.GetThreshold())
	}
	if err := waitCeremony(ctx, client, r.CeremonyID, wait); err != nil {
		return err
	}
	m, err := r.Finish(ctx, client, prev)
	if err != nil {
		return fmt.Errorf("%w (old shares kept)", err)
	}
	if err := safe.WriteManifest(out, m); err != nil {
		return fmt.Errorf("writing the new manifest (old shares kept): %w", err)
	}
	fmt.Fprintf(stdout, "rekeyed genesis %s to epoch %d: %d-of-%d, every new share verified and sealed into its safe, same KCV %x\nnew manifest: %s\n",
		m.GetGenesisId(), m.GetEpoch(), threshold, len(news), m.GetKcv(), out)
	if err := installAll(ctx, &id, addrs, m, stdout); err != nil {
		return fmt.Errorf("%w; old shares kept: install %s on every distributor (%s manifest install), then destroy them (%s retire)", err, out, progName, progName)
	}
	if keepOld || len(olds) == 0 {
		fmt.Fprintf(stdout, "old shares kept; each officer destroys theirs with: %s retire --safe SAFE --manifest %s --distributor %s\n", progName, manifest, dists)
		return nil
	}
	if err := safe.DestroyEpoch(ctx, prev, olds); err != nil {
		return fmt.Errorf("the new manifest is pinned everywhere, but destroying old shares failed: %w", err)
	}
	fmt.Fprintf(stdout, "destroyed the epoch %d shares in %d safes; other officers destroy theirs with: %s retire --safe SAFE --manifest %s --distributor %s\n",
		prev.GetEpoch(), len(olds), progName, manifest, dists)
	return nil
}

// waitCeremony polls a ceremony until it leaves OPEN or wait passes; it
// returns nil only if it SUCCEEDED.
func waitCeremony(ctx context.Context, client distributorv1.DistributorClient, id string, wait time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		c, err := client.GetCeremony(ctx, &distributorv1.GetCeremonyRequest{CeremonyId: id})
		switch {
		case err != nil && ctx.Err() == nil:
			return fmt.Errorf("ceremony %s: %w", id, err)
		case err == nil && c.GetState() == distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED:
			return nil
		case err == nil && c.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_OPEN:
			return fmt.Errorf("ceremony %s ended %s: %s", id, c.GetState(), c.GetDetail())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("ceremony %s: no threshold of shares within %s", id, wait)
		case <-t.C:
		}
	}
}

// installAll installs m on every distributor and reads it back.
func installAll(ctx context.Context, id *identity.Flags, addrs []string, m *safev1.GenesisManifest, stdout io.Writer) error {
	var errs []error
	for _, addr := range addrs {
		client, closeConn, err := dial(id, addr)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		changed, err := officer.InstallManifest(ctx, client, m)
		closeConn()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", addr, err))
			continue
		}
		what := "pinned"
		if !changed {
			what = "already pinned"
		}
		fmt.Fprintf(stdout, "%s: %s genesis %s epoch %d (read back)\n", addr, what, m.GetGenesisId(), m.GetEpoch())
	}
	return errors.Join(errs...)
}

// manifestCmd implements "safe manifest install".
func manifestCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "install" {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
			fmt.Fprintf(stdout, "safe manifest: install a rekeyed manifest on distributors\n\nUsage: safe manifest install --distributor ADDR[,ADDR...] --manifest FILE [identity flags]\n")
			return flag.ErrHelp
		}
		fmt.Fprintf(stderr, "safe manifest: want \"install\"\nUsage: safe manifest install --distributor ADDR[,ADDR...] --manifest FILE [identity flags]\n")
		return errUsage
	}
	fs := newFlags("manifest install", stdout, stderr)
	var (
		id          identity.Flags
		dists, path string
	)
	id.Register(fs.FlagSet)
	fs.StringVar(&dists, "distributor", "", "comma-separated host:port of the distributors (required)")
	fs.StringVar(&path, "manifest", "", "the rekeyed manifest (required)")
	if err := fs.parse(args[1:]); err != nil {
		return err
	}
	addrs := identity.SplitList(dists)
	if len(addrs) == 0 || path == "" {
		return fs.required("--distributor and --manifest are required")
	}
	m, err := safe.ReadManifest(path)
	if err != nil {
		return err
	}
	return installAll(ctx, &id, addrs, m, stdout)
}

// retire implements "safe retire": it destroys a safe's share of an old
// epoch only once every distributor named pins a later epoch of the same
// genesis.
func retire(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("retire", stdout, stderr)
	var (
		id                   identity.Flags
		safePath, old, dists string
	)
	id.Register(fs.FlagSet)
	fs.StringVar(&safePath, "safe", "", "this officer's safe config file (required)")
	fs.StringVar(&old, "manifest", "", "the old manifest whose share to destroy (required)")
	fs.StringVar(&dists, "distributor", "", "comma-separated host:port of every distributor (required)")
	if err := fs.parse(args); err != nil {
		return err
	}
	addrs := identity.SplitList(dists)
	if safePath == "" || old == "" || len(addrs) == 0 {
		return fs.required("--safe, --manifest and --distributor are required")
	}
	m, err := safe.ReadManifest(old)
	if err != nil {
		return err
	}
	for _, addr := range addrs {
		client, closeConn, err := dial(&id, addr)
		if err != nil {
			return err
		}
		st, err := client.GetStatus(ctx, &distributorv1.GetStatusRequest{})
		closeConn()
		if err != nil {
			return fmt.Errorf("%s: %w (nothing destroyed)", addr, err)
		}
		if st.GetGenesisId() != m.GetGenesisId() || st.GetEpoch() <= m.GetEpoch() {
			return fmt.Errorf("%s pins genesis %s epoch %d, not a later epoch than %d of %s: nothing destroyed", addr, st.GetGenesisId(), st.GetEpoch(), m.GetEpoch(), m.GetGenesisId())
		}
	}
	opened, closeAll, err := openSafes(ctx, []string{safePath})
	if err != nil {
		return err
	}
	defer closeAll()
	if err := safe.DestroyEpoch(ctx, m, opened); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "destroyed the epoch %d share of genesis %s in %s\n", m.GetEpoch(), m.GetGenesisId(), opened[0].Label())
	return nil
}

// seal implements "safe seal".
func seal(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("seal", stdout, stderr)
	var (
		id                   identity.Flags
		dists, roots, reason string
		fleet                bool
	)
	id.Register(fs.FlagSet)
	fs.StringVar(&dists, "distributor", "", "comma-separated host:port of the distributors to seal (with --fleet: every distributor)")
	fs.StringVar(&roots, "rootkms", "", "with --fleet: comma-separated API addresses of root KMS replicas that drop the root key")
	fs.StringVar(&reason, "reason", "", "why (recorded in every audit log; required)")
	fs.BoolVar(&fleet, "fleet", false, "emergency seal: the distributors fetch from no peer until an unseal ceremony, and the root KMS replicas drop the root key")
	if err := fs.parse(args); err != nil {
		return err
	}
	addrs, rootAddrs := identity.SplitList(dists), identity.SplitList(roots)
	if len(addrs) == 0 || reason == "" {
		return fs.required("--distributor and --reason are required")
	}
	if len(rootAddrs) > 0 && !fleet {
		return fs.required("--rootkms needs --fleet")
	}
	var errs []error
	for _, addr := range addrs {
		client, closeConn, err := dial(&id, addr)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		_, err = client.Seal(ctx, &distributorv1.SealRequest{Reason: reason, Emergency: fleet})
		var st *distributorv1.GetStatusResponse
		if err == nil {
			st, err = client.GetStatus(ctx, &distributorv1.GetStatusRequest{})
		}
		closeConn()
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("distributor %s: %w", addr, err))
		case st.GetState() != distributorv1.SealState_SEAL_STATE_SEALED || st.GetEmergencySealed() != fleet:
			errs = append(errs, fmt.Errorf("distributor %s: after Seal it reports %s (emergency %v)", addr, st.GetState(), st.GetEmergencySealed()))
		case fleet:
			fmt.Fprintf(stdout, "distributor %s: emergency-sealed\n", addr)
		default:
			fmt.Fprintf(stdout, "distributor %s: sealed\n", addr)
		}
	}
	for _, addr := range rootAddrs {
		had, err := dropRootKey(ctx, &id, addr, reason)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("root KMS %s: %w", addr, err))
		case had:
			fmt.Fprintf(stdout, "root KMS %s: root key dropped\n", addr)
		default:
			fmt.Fprintf(stdout, "root KMS %s: held no root key\n", addr)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("not everything is sealed:\n%w", err)
	}
	if fleet {
		fmt.Fprintf(stdout, "fleet sealed; only an unseal ceremony brings it back: %s ceremony open --distributor %s\n", progName, addrs[0])
	}
	return nil
}

func dropRootKey(ctx context.Context, id *identity.Flags, addr, reason string) (bool, error) {
	src, err := id.Source(nil)
	if err != nil {
		return false, err
	}
	onlyReplicas, err := identity.ParseAllowlist(src.TrustDomain(), "rootkms/*/*")
	if err != nil {
		return false, err
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(identity.ClientCredentials(src, onlyReplicas.Authorize)))
	if err != nil {
		return false, err
	}
	defer conn.Close()
	resp, err := rootkmsv1.NewRootKMSClient(conn).DropRootKey(ctx, &rootkmsv1.DropRootKeyRequest{Reason: reason})
	if err != nil {
		return false, err
	}
	return resp.GetHadRootKey(), nil
}
