// Package live runs a real root KMS in a test's process for the tiers that
// call it (the regional KMS, regionctl): a 2-of-2 genesis into file safes, a
// distributor provisioned with the root key, and one bootstrapped replica
// with fast Raft timeouts, all over mTLS on 127.0.0.1. Everything stops when
// the test ends. Multi-process tests use the real binaries instead (tests/).
package live

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/distributor"
	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/internal/secret"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/rootkms"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/officer"
)

// Chain is a started in-process root KMS and its distributor.
type Chain struct {
	// Addr is the root KMS replica's API address.
	Addr string
	// Manifest is the public genesis manifest.
	Manifest *safev1.GenesisManifest

	stopRootOnce, stopDistOnce sync.Once
	stopRoot, stopDist         func()
}

// Start starts the chain with identities from pki: the distributor is
// distributor/global/distributor-1, the replica rootkms/global/rootkms-1.
// Each opt may change the replica's Config before it starts (e.g. its Now
// and Safety for a simulation on a fake clock).
func Start(t testing.TB, pki *identitytest.PKI, opts ...func(*rootkms.Config)) *Chain {
	t.Helper()
	td := pki.CA.TrustDomain()
	id := func(name string) string { return fmt.Sprintf("spiffe://%s/%s", td.Name(), name) }
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var safes []safe.Safe
	for i := range 2 {
		s, err := safe.OpenFileSafe(safe.FileSafeConfig{Dir: filepath.Join(dir, "safes", fmt.Sprint(i)), Label: fmt.Sprintf("safe-%d", i),
			Passphrase: secret.New([]byte("test passphrase")), KDFMemoryKiB: 8 * 1024, AttemptDir: filepath.Join(dir, "attempts")})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		safes = append(safes, s)
	}
	manifest, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 2, Safes: safes})
	if err != nil {
		t.Fatal(err)
	}
	defer rmk.Wipe()

	distLog, err := audit.Open(filepath.Join(dir, "distributor", "audit.log"), audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	officers, _ := identity.ParseAllowlist(td, "officer/global/*")
	readers, _ := identity.ParseAllowlist(td, "rootkms/*/*")
	d, err := distributor.New(distributor.Config{ManifestPath: filepath.Join(dir, "distributor", "genesis.json"),
		Source: pki.Source(id("distributor/global/distributor-1")), Officers: officers, RootKeyReaders: readers, Audit: distLog})
	if err != nil {
		t.Fatal(err)
	}
	distLis := listen(t)
	distDone := make(chan struct{})
	go func() { defer close(distDone); _ = d.Serve(distLis) }()
	c := &Chain{Manifest: manifest, stopDist: func() { d.Close(); <-distDone }}
	t.Cleanup(func() { c.StopDistributor(); distLog.Close() })

	conn, err := grpc.NewClient(distLis.Addr().String(), grpc.WithTransportCredentials(pki.ClientCredentials(id("officer/global/officer-1"))))
	if err != nil {
		t.Fatal(err)
	}
	err = officer.Provision(ctx, distributorv1.NewDistributorClient(conn), manifest, rmk)
	conn.Close()
	if err != nil {
		t.Fatal(err)
	}

	rootLog, err := audit.Open(filepath.Join(dir, "rootkms", "audit.log"), audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cfg := rootkms.Config{
		ID: "rootkms-1", DataDir: filepath.Join(dir, "rootkms", "raft"), Bootstrap: true,
		Manifest: manifest, Distributors: []string{distLis.Addr().String()},
		Source: pki.Source(id("rootkms/global/rootkms-1")), Audit: rootLog,
		HeartbeatTimeout: 200 * time.Millisecond, ElectionTimeout: 200 * time.Millisecond, LeaderLeaseTimeout: 100 * time.Millisecond,
	}
	for _, o := range opts {
		o(&cfg)
	}
	root, err := rootkms.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	apiLis, raftLis := listen(t), listen(t)
	if err := root.Start(apiLis, raftLis); err != nil {
		t.Fatal(err)
	}
	c.stopRoot = func() { root.Close() }
	t.Cleanup(func() { c.StopRoot(); rootLog.Close() })
	if err := root.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	c.Addr = apiLis.Addr().String()
	return c
}

func listen(t testing.TB) net.Listener {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return lis
}

// StopRoot stops the root KMS replica (once; later calls do nothing).
func (c *Chain) StopRoot() { c.stopRootOnce.Do(c.stopRoot) }

// StopDistributor stops the distributor (once; later calls do nothing).
func (c *Chain) StopDistributor() { c.stopDistOnce.Do(c.stopDist) }

// RegionAEADs fetches a region's master key versions from the replica as a
// KMS of that region (kms/<region>/kms-1) would, and returns their AEADs by
// version.
func (c *Chain) RegionAEADs(t testing.TB, pki *identitytest.PKI, region string) map[uint32]tink.AEAD {
	t.Helper()
	id := fmt.Sprintf("spiffe://%s/kms/%s/kms-1", pki.CA.TrustDomain().Name(), region)
	conn, err := grpc.NewClient(c.Addr, grpc.WithTransportCredentials(pki.ClientCredentials(id)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r, err := hpkeseal.NewRecipient()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := rootkmsv1.NewRootKMSClient(conn).UnwrapRegionKey(ctx, &rootkmsv1.UnwrapRegionKeyRequest{Region: region, Recipient: r.PublicKey()})
	if err != nil {
		t.Fatalf("UnwrapRegionKey(%s) = %v", region, err)
	}
	info, err := hpkeseal.Info("cairn/rootkms/v1/region-key", region, id)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := r.Open(resp.GetSealedKeys(), info)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Wipe()
	b := plain.Data()
	defer clear(b)
	var m rootkmsv1.RegionKeyMaterial
	if err := proto.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return AEADsOf(t, &m)
}

// AEADsOf builds the AEAD of every region key version in m, by version.
func AEADsOf(t testing.TB, m *rootkmsv1.RegionKeyMaterial) map[uint32]tink.AEAD {
	t.Helper()
	out := map[uint32]tink.AEAD{}
	for _, v := range m.GetVersions() {
		a, err := keysets.RegionAEAD(secret.New(v.GetKey()))
		if err != nil {
			t.Fatal(err)
		}
		out[v.GetVersion()] = a
	}
	return out
}
