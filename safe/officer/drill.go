package officer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/distributor"
	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
)

// DrillReport is what a restore drill proved.
type DrillReport struct {
	GenesisID string
	Epoch     uint32
	Shares    []uint32 // the share indices the ceremony accepted
	// Failed names each safe that could not release its share and why,
	// in the order given; the drill passed without them.
	Failed []*safe.SafeError
	KCV    []byte // the KCV of the restored key (equal to the manifest's)
	Took   time.Duration
}

// drillTD is the throwaway trust domain of a drill: it can never be a
// production one (".invalid" is reserved).
var drillTD = spiffeid.RequireTrustDomainFromString("cairn-drill.invalid")

// Drill proves that the given safes restore the RMK of manifest m: it runs a
// real unseal ceremony (HPKE, commitments, combine, KCV) into a throwaway
// distributor on 127.0.0.1, with a throwaway PKI, audit log and state in a
// temporary directory that it removes afterwards. It touches nothing in
// production: no production distributor, identity or file is involved, and
// the restored key is checked and wiped. Each share is released under the
// identity of the officer the manifest binds it to, moved into the
// throwaway trust domain, so the distributor checks that binding as a real
// ceremony does; a manifest naming an officer no real ceremony could accept
// fails the drill. A safe that fails to release its share is skipped and
// reported in DrillReport.Failed (and logged) as long as the others reach
// the threshold; otherwise the error names every failed safe.
func Drill(ctx context.Context, m *safev1.GenesisManifest, safes []safe.Safe, log *slog.Logger) (*DrillReport, error) {
	start := time.Now()
	if err := safe.ValidateManifest(m); err != nil {
		return nil, err
	}
	if err := safe.ValidateOfficers(safe.Officers(m)); err != nil {
		return nil, fmt.Errorf("%w: the manifest binds a share to an officer no ceremony can accept: %w", safe.ErrInvalidManifest, err)
	}
	if len(safes) < int(m.GetThreshold()) {
		return nil, fmt.Errorf("officer: drill with %d safes cannot meet threshold %d", len(safes), m.GetThreshold())
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dir, err := os.MkdirTemp("", "cairn-drill-*")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)

	ca, err := devca.New(drillTD, time.Now())
	if err != nil {
		return nil, err
	}
	if err := ca.Save(dir); err != nil {
		return nil, err
	}
	source := func(tier, region, name string) (*identity.Source, error) {
		id, err := spiffeid.FromSegments(drillTD, tier, region, name)
		if err != nil {
			return nil, err
		}
		leaf, err := ca.Issue(id, devca.LeafOptions{})
		if err != nil {
			return nil, err
		}
		cert, key := devca.LeafPaths(dir, id)
		if err := leaf.Save(cert, key); err != nil {
			return nil, err
		}
		return identity.NewSource(identity.SourceConfig{CertFile: cert, KeyFile: key, BundleFile: filepath.Join(dir, "ca.pem"), TrustDomain: drillTD, CheckInterval: -1})
	}

	// The drill's copy of the manifest binds each share to the officer the
	// manifest names, moved into the drill's trust domain (the same tier,
	// region and name): each share is released under that identity, and
	// the distributor checks it against the manifest as in a real ceremony.
	// ValidateManifest above has refused an officer that is not a full,
	// distinct SPIFFE ID, which no real ceremony could ever accept.
	dm := proto.Clone(m).(*safev1.GenesisManifest)
	officers := []identity.Pattern{identity.MustParsePattern("officer/drill/*", drillTD)}
	officerOf := map[uint32]identity.ID{} // by share index
	for _, s := range dm.GetSlots() {
		if s.GetOfficer() == "" {
			continue
		}
		id, err := identity.Parse(s.GetOfficer())
		if err != nil {
			return nil, err
		}
		did, err := identity.New(drillTD, id.Tier(), id.Region(), id.Name())
		if err != nil {
			return nil, err
		}
		s.Officer = did.String()
		officers = append(officers, identity.Exact(did))
		officerOf[s.GetIndex()] = did
	}
	stateDir := filepath.Join(dir, "distributor")
	if err := safe.WriteManifest(filepath.Join(stateDir, "genesis.json"), dm); err != nil {
		return nil, err
	}
	alog, err := audit.Open(filepath.Join(stateDir, "audit.log"), audit.Options{})
	if err != nil {
		return nil, err
	}
	defer alog.Close()
	dsrc, err := source("distributor", "drill", "distributor")
	if err != nil {
		return nil, err
	}
	allow := func(p string) identity.Allowlist {
		a, _ := identity.ParseAllowlist(drillTD, p)
		return a
	}
	d, err := distributor.New(distributor.Config{
		ManifestPath: filepath.Join(stateDir, "genesis.json"), Source: dsrc,
		Officers: identity.NewAllowlist(officers...), RootKeyReaders: allow("rootkms/drill/*"), Audit: alog, Logger: log,
	})
	if err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	served := make(chan struct{})
	go func() { defer close(served); _ = d.Serve(lis) }()
	defer func() { d.Close(); <-served }()

	dial := func(src *identity.Source) (distributorv1.DistributorClient, func(), error) {
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(identity.ClientCredentials(src, identity.MemberOf(drillTD))))
		if err != nil {
			return nil, nil, err
		}
		return distributorv1.NewDistributorClient(conn), func() { conn.Close() }, nil
	}

	// A safe that cannot release its share (its HSM is gone, its share is
	// damaged) is skipped, as its officer would be in a real ceremony: the
	// drill proves that the safes that work restore the key, and names
	// every one that does not, in the report and the log.
	var (
		c      *distributorv1.Ceremony
		failed []*safe.SafeError
	)
	for i, s := range safes {
		// The officer the manifest binds this safe's share to, or a
		// throwaway one where it names none.
		tier, region, name := "officer", "drill", fmt.Sprintf("officer-%d", i+1)
		if index, err := safe.SlotOf(dm, s); err == nil {
			if id, ok := officerOf[index]; ok {
				tier, region, name = id.Tier(), id.Region(), id.Name()
			}
		}
		osrc, err := source(tier, region, name)
		if err != nil {
			return nil, err
		}
		client, closeConn, err := dial(osrc)
		if err != nil {
			return nil, err
		}
		if c == nil {
			if c, err = client.OpenCeremony(ctx, &distributorv1.OpenCeremonyRequest{Kind: distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL}); err != nil {
				closeConn()
				return nil, fmt.Errorf("officer: drill: opening the ceremony: %w", err)
			}
		}
		next, err := Release(ctx, client, c.GetId(), dm, s)
		closeConn()
		if err != nil {
			if ctx.Err() != nil {
				return nil, errors.Join(fmt.Errorf("officer: drill: stopped at %s: %w", s.Label(), ctx.Err()), safe.JoinFailures(failed))
			}
			index, _ := safe.SlotOf(dm, s)
			failed = append(failed, &safe.SafeError{Label: s.Label(), Index: index, Err: err})
			log.Warn("drill: safe failed to release its share; continuing with the others", "safe", s.Label(), "index", index, "err", err)
			continue
		}
		c = next
		log.Info("drill: share released", "safe", s.Label(), "officer", osrc.ID().String(), "have", len(c.GetAcceptedIndices()), "threshold", dm.GetThreshold())
		if c.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_OPEN {
			break
		}
	}
	if c.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED {
		return nil, errors.Join(fmt.Errorf("officer: drill: ceremony ended %s with shares %v of %d needed: %s", c.GetState(), c.GetAcceptedIndices(), dm.GetThreshold(), c.GetDetail()), safe.JoinFailures(failed))
	}

	// Prove the restored key the way a root KMS replica would see it.
	rsrc, err := source("rootkms", "drill", "rootkms")
	if err != nil {
		return nil, err
	}
	client, closeConn, err := dial(rsrc)
	if err != nil {
		return nil, err
	}
	defer closeConn()
	r, err := hpkeseal.NewRecipient()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	resp, err := client.FetchRootKey(ctx, &distributorv1.FetchRootKeyRequest{Recipient: r.PublicKey(), GenesisId: dm.GetGenesisId()})
	if err != nil {
		return nil, fmt.Errorf("officer: drill: fetching the restored key: %w", err)
	}
	info, err := hpkeseal.Info(infoRootKey, dm.GetGenesisId(), rsrc.ID().String())
	if err != nil {
		return nil, err
	}
	rmk, err := r.Open(resp.GetSealedRootKey(), info)
	if err != nil {
		return nil, err
	}
	defer rmk.Wipe()
	if !safe.CheckKCV(rmk, m) {
		return nil, errors.New("officer: drill: the restored key does not match the manifest KCV")
	}
	return &DrillReport{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Shares: c.GetAcceptedIndices(), Failed: failed, KCV: safe.KCV(rmk, m.GetGenesisId()), Took: time.Since(start)}, nil
}

const infoRootKey = "cairn/distributor/v1/root-key"
