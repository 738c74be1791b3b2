package cli_test

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"

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
	"github.com/cairnkms/cairn/regionctl/bundle"
	"github.com/cairnkms/cairn/rootkms"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/officer"
)

// startRootKMS starts the real chain in process: a 2-of-2 genesis into file
// safes, a provisioned distributor, and one bootstrapped root KMS replica.
// It returns the replica's API address.
func startRootKMS(t *testing.T, pki *identitytest.PKI) string {
	t.Helper()
	td := pki.CA.TrustDomain()
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
		Source: pki.Source("spiffe://cairn.test/distributor/global/distributor-1"), Officers: officers, RootKeyReaders: readers, Audit: distLog})
	if err != nil {
		t.Fatal(err)
	}
	distLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	distDone := make(chan struct{})
	go func() { defer close(distDone); _ = d.Serve(distLis) }()
	t.Cleanup(func() { d.Close(); <-distDone; distLog.Close() })
	conn, err := grpc.NewClient(distLis.Addr().String(), grpc.WithTransportCredentials(pki.ClientCredentials("spiffe://cairn.test/officer/global/officer-1")))
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
	srv, err := rootkms.New(rootkms.Config{
		ID: "rootkms-1", DataDir: filepath.Join(dir, "rootkms", "raft"), Bootstrap: true,
		Manifest: manifest, Distributors: []string{distLis.Addr().String()},
		Source: pki.Source("spiffe://cairn.test/rootkms/global/rootkms-1"), Audit: rootLog,
		HeartbeatTimeout: 200 * time.Millisecond, ElectionTimeout: 200 * time.Millisecond, LeaderLeaseTimeout: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	apiLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	raftLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(apiLis, raftLis); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close(); rootLog.Close() })
	if err := srv.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	return apiLis.Addr().String()
}

// unwrapRegion fetches a region's master key versions as a KMS of that
// region would, and returns their AEADs by version.
func unwrapRegion(t *testing.T, pki *identitytest.PKI, addr, region string) map[uint32]interface {
	Decrypt([]byte, []byte) ([]byte, error)
	Encrypt([]byte, []byte) ([]byte, error)
} {
	t.Helper()
	id := "spiffe://cairn.test/kms/" + region + "/kms-1"
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(pki.ClientCredentials(id)))
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
	out := map[uint32]interface {
		Decrypt([]byte, []byte) ([]byte, error)
		Encrypt([]byte, []byte) ([]byte, error)
	}{}
	for _, v := range m.GetVersions() {
		a, err := keysets.RegionAEAD(secret.New(v.GetKey()))
		if err != nil {
			t.Fatal(err)
		}
		out[v.GetVersion()] = a
	}
	return out
}

// TestAgainstARealRootKMS drives region create, keyset create and bundle
// build against a real in-process root KMS, and checks that every keyset of
// the us-east bundle opens under the region key a us-east KMS unwraps.
func TestAgainstARealRootKMS(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	addr := startRootKMS(t, pki)
	idFlags := identityFlags(pki, regionctlID)
	rootFlags := append([]string{"--rootkms", addr}, idFlags...)
	for _, region := range []string{"us-east", "eu-west"} {
		mustRun(t, append([]string{"region", "create", "--region", region}, rootFlags...)...)
	}
	dir := t.TempDir()
	teams, storeDir, keysDir := filepath.Join(dir, "teams"), filepath.Join(dir, "store"), filepath.Join(dir, "keys")
	writeFile(t, filepath.Join(teams, "payments.json"), paymentsTeam)
	writeFile(t, filepath.Join(teams, "search.json"), searchTeam)
	r := mustRun(t, append([]string{"keyset", "create", "--teams", teams, "--store", storeDir}, rootFlags...)...)
	contains(t, "keyset create stdout", r.stdout, "4 created, 0 already in the store, 0 failed")

	mustRun(t, "keys", "generate", "--out", keysDir)
	out := filepath.Join(dir, "us-east.bundle")
	mustRun(t, append([]string{"bundle", "build", "--region", "us-east", "--serial", "1", "--teams", teams, "--store", storeDir,
		"--signing-key", filepath.Join(keysDir, "bundle-signing.key"), "--out", out}, idFlags...)...)
	pub, err := bundle.ReadPublicKey(filepath.Join(keysDir, "bundle-signing.pub"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := bundle.Verify(readBundle(t, out), []ed25519.PublicKey{pub})
	if err != nil {
		t.Fatalf("Verify(bundle built from the real root KMS's keysets) = %v", err)
	}
	if got := len(b.GetKeysets()); got != 3 {
		t.Errorf("us-east bundle holds %d keysets, want 3 (payments/ledger, payments/new, search/index)", got)
	}
	aeads := unwrapRegion(t, pki, addr, "us-east")
	for _, k := range b.GetKeysets() {
		ek := k.GetKeyset()
		aead, ok := aeads[ek.GetRegionKeyVersion()]
		if !ok {
			t.Errorf("keyset %s is under region key version %d, which us-east does not have", k.GetName(), ek.GetRegionKeyVersion())
			continue
		}
		if _, err := keysets.Decrypt(ek, aead); err != nil {
			t.Errorf("Decrypt(%s from the bundle, us-east key) = %v", k.GetName(), err)
		}
	}
}
