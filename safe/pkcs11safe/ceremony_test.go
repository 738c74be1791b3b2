package pkcs11safe_test

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"

	"github.com/cairnkms/cairn/distributor"
	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/officer"
	"github.com/cairnkms/cairn/safe/pkcs11safe"
	"github.com/cairnkms/cairn/safe/pkcs11safe/softhsmtest"
)

// tokens makes n SoftHSM2 tokens and opens a safe on each.
func tokens(tb testing.TB, n int) []safe.Safe {
	tb.Helper()
	env := softhsmtest.New(tb)
	dir := tb.TempDir()
	for i := range n {
		env.InitToken(fmt.Sprintf("safe-%d", i+1), "so-pin-1234", fmt.Sprintf("user-pin-%d", i+1))
	}
	var out []safe.Safe
	for i := range n {
		s, err := pkcs11safe.Open(context.Background(), pkcs11safe.Config{
			Module: env.Module(), TokenLabel: fmt.Sprintf("safe-%d", i+1),
			PIN:        pkcs11safe.PINSource{File: softhsmtest.WritePINFile(tb, dir, fmt.Sprintf("pin-%d", i+1), fmt.Sprintf("user-pin-%d", i+1))},
			AttemptDir: filepath.Join(dir, "attempts"),
		})
		if err != nil {
			tb.Fatalf("Open(safe-%d) = %v", i+1, err)
		}
		tb.Cleanup(func() { s.Close() })
		out = append(out, s)
	}
	return out
}

func subsets(n, k int) [][]int {
	var out [][]int
	var rec func(int, []int)
	rec = func(start int, cur []int) {
		if len(cur) == k {
			out = append(out, append([]int(nil), cur...))
			return
		}
		for i := start; i < n; i++ {
			rec(i+1, append(cur, i))
		}
	}
	rec(0, nil)
	return out
}

// TestGenesisThreeOfFive is the acceptance test on real tokens:
// genesis 3-of-5 into five SoftHSM2 tokens; each of the ten 3-token subsets
// restores the key; every 2-token subset fails with "threshold not met (2/3)".
func TestGenesisThreeOfFive(t *testing.T) {
	ctx := context.Background()
	safes := tokens(t, 5)
	m, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 3, Safes: safes})
	if err != nil {
		t.Fatalf("Genesis = %v", err)
	}
	defer rmk.Wipe()
	for _, s := range m.GetSlots() {
		if s.GetSafeKind() != safe.KindPKCS11 {
			t.Errorf("slot %d kind = %q, want pkcs11", s.GetIndex(), s.GetSafeKind())
		}
	}
	three := subsets(5, 3)
	if len(three) != 10 {
		t.Fatalf("%d subsets, want 10", len(three))
	}
	for _, idx := range three {
		var group []safe.Safe
		for _, i := range idx {
			group = append(group, safes[i])
		}
		got, err := safe.Recover(ctx, m, group)
		if err != nil || !got.Equal(rmk) || !safe.CheckKCV(got, m) {
			t.Errorf("Recover(tokens %v) = %v, want the RMK", idx, err)
		}
		got.Wipe()
	}
	for _, idx := range subsets(5, 2) {
		_, err := safe.Recover(ctx, m, []safe.Safe{safes[idx[0]], safes[idx[1]]})
		if err == nil || !strings.Contains(err.Error(), "threshold not met (2/3)") {
			t.Errorf("Recover(tokens %v) = %v, want threshold not met (2/3)", idx, err)
		}
	}
}

// BenchmarkUnsealCeremony times one full 3-of-5 unseal ceremony against a
// distributor on loopback mTLS: open, three officers each unseal their share
// inside a SoftHSM2 token, HPKE-seal it and submit it, the distributor checks
// commitments, combines, checks the KCV and locks the key in memory. Setup
// (tokens, genesis, PKI, server) is outside the timer; each iteration ends by
// sealing the distributor again.
func BenchmarkUnsealCeremony(b *testing.B) {
	ctx := context.Background()
	safes := tokens(b, 5)
	officers := []string{}
	for i := range 5 {
		officers = append(officers, fmt.Sprintf("spiffe://cairn.test/officer/global/officer-%d", i+1))
	}
	m, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 3, Safes: safes, Officers: officers})
	if err != nil {
		b.Fatal(err)
	}
	rmk.Wipe()
	d, client := startDistributor(b, m)
	officerClients := map[int]distributorv1.DistributorClient{}
	for _, i := range []int{1, 3, 4} {
		officerClients[i] = client(officers[i])
	}
	b.ResetTimer()
	for b.Loop() {
		c, err := officerClients[1].OpenCeremony(ctx, &distributorv1.OpenCeremonyRequest{Kind: distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL})
		if err != nil {
			b.Fatal(err)
		}
		for _, i := range []int{1, 3, 4} {
			if _, err := officer.Release(ctx, officerClients[i], c.GetId(), m, safes[i]); err != nil {
				b.Fatal(err)
			}
		}
		if d.Sealed() {
			b.Fatal("still sealed after three shares")
		}
		b.StopTimer()
		if _, err := officerClients[1].Seal(ctx, &distributorv1.SealRequest{Reason: "benchmark"}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(b.N), "ms/ceremony")
}

func startDistributor(b *testing.B, m *safev1.GenesisManifest) (*distributor.Server, func(string) distributorv1.DistributorClient) {
	b.Helper()
	pki := identitytest.New(b, identitytest.TrustDomain)
	dir := b.TempDir()
	if err := safe.WriteManifest(filepath.Join(dir, "genesis.json"), m); err != nil {
		b.Fatal(err)
	}
	log, err := audit.Open(filepath.Join(dir, "audit.log"), audit.Options{})
	if err != nil {
		b.Fatal(err)
	}
	officers, _ := identity.ParseAllowlist(identitytest.TrustDomain, "officer/global/*")
	d, err := distributor.New(distributor.Config{
		ManifestPath: filepath.Join(dir, "genesis.json"), Source: pki.Source("spiffe://cairn.test/distributor/global/distributor-1"),
		Officers: officers, Audit: log,
	})
	if err != nil {
		b.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = d.Serve(lis) }()
	var conns []*grpc.ClientConn
	b.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
		d.Close()
		<-done
		log.Close()
	})
	return d, func(id string) distributorv1.DistributorClient {
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(pki.ClientCredentials(id)))
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, conn)
		return distributorv1.NewDistributorClient(conn)
	}
}
