package pkcs11safe

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/cairnkms/cairn/distributor"
	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/internal/secret"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/officer"
	"github.com/cairnkms/cairn/safe/pkcs11safe/softhsmtest"
)

const degradedRootKMS = "spiffe://cairn.test/rootkms/global/rootkms-1"

func degradedOfficer(i int) string {
	return fmt.Sprintf("spiffe://cairn.test/officer/global/officer-%d", i)
}

// degradedDistributor serves a distributor pinned to m on loopback mTLS until
// the test ends, and returns a client factory by SPIFFE ID.
func degradedDistributor(t *testing.T, m *safev1.GenesisManifest) (*distributor.Server, func(id string) distributorv1.DistributorClient) {
	t.Helper()
	pki := identitytest.New(t, identitytest.TrustDomain)
	dir := t.TempDir()
	if err := safe.WriteManifest(filepath.Join(dir, "genesis.json"), m); err != nil {
		t.Fatal(err)
	}
	alog, err := audit.Open(filepath.Join(dir, "audit.log"), audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	allow := func(p string) identity.Allowlist {
		a, err := identity.ParseAllowlist(identitytest.TrustDomain, p)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	d, err := distributor.New(distributor.Config{
		ManifestPath: filepath.Join(dir, "genesis.json"), Source: pki.Source("spiffe://cairn.test/distributor/global/distributor-1"),
		Officers: allow("officer/global/*"), RootKeyReaders: allow("rootkms/*/*"), Audit: alog,
	})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = d.Serve(lis) }()
	var conns []*grpc.ClientConn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
		d.Close()
		<-done
		alog.Close()
	})
	return d, func(id string) distributorv1.DistributorClient {
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(pki.ClientCredentials(id)))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, conn)
		return distributorv1.NewDistributorClient(conn)
	}
}

// TestCeremonyWithBrokenSafes (RELIABILITY row 6 c): a 3-of-5 genesis on five
// SoftHSM2 tokens, then, before the unseal ceremony, safe-2's PKCS#11 module
// goes missing, safe-4's sealed share is damaged on its token (one byte of
// the record flipped) and safe-3's token directory becomes read-only. Each
// officer in turn does what `safe release` does: open the safe from its
// config and release the share into the ceremony. Asserted:
//   - safe-2's open fails naming the missing module; safe-4's release fails
//     naming its share and token (ErrTampered) before anything is sent;
//   - neither failure changes the ceremony (still open, same shares), no
//     panic;
//   - the read-only token releases its share (reading needs no write);
//   - the three working officers unseal the distributor, which then hands
//     the root KMS a key matching the manifest KCV;
//   - safe.RecoverReport over the safes that opened recovers the same key,
//     reporting safe-4 (naming it and its share) as skipped, and fails with
//     every error once the working safes are below the quorum.
func TestCeremonyWithBrokenSafes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	env := softhsmtest.New(t)
	var m *safev1.GenesisManifest
	var cfgs []Config
	var officers []string
	for i := range 5 {
		label := fmt.Sprintf("safe-%d", i+1)
		env.InitToken(label, soPIN, userPIN)
		cfgs = append(cfgs, config(t, env, label))
		officers = append(officers, degradedOfficer(i+1))
	}

	ref := func(index uint32) safe.ShareRef {
		return safe.ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: index}
	}

	// Genesis with every safe working; then damage safe-4's record while
	// its token is open.
	func() {
		var safes []safe.Safe
		defer func() {
			for _, s := range safes {
				if err := s.Close(); err != nil {
					t.Errorf("Close(%s) = %v", s.Label(), err)
				}
			}
		}()
		for _, c := range cfgs {
			s, err := Open(ctx, c)
			if err != nil {
				t.Fatalf("Open(%s) = %v", c.TokenLabel, err)
			}
			safes = append(safes, s)
		}
		var (
			rmk secret.Bytes
			err error
		)
		m, rmk, err = safe.Genesis(ctx, safe.SplitConfig{Threshold: 3, Safes: safes, Officers: officers})
		if err != nil {
			t.Fatalf("Genesis = %v", err)
		}
		rmk.Wipe()
		s4 := safes[3].(*Safe)
		record := readRaw(t, s4, ref(4))
		record[len(record)-1] ^= 1
		writeRaw(t, s4, ref(4), record)
	}()
	assertNoModules(t)
	cfgs[1].Module = filepath.Join(env.Dir(), "uninstalled", "libsofthsm2.so")
	env.MakeReadOnly("safe-3")

	d, client := degradedDistributor(t, m)
	c, err := client(degradedOfficer(1)).OpenCeremony(ctx, &distributorv1.OpenCeremonyRequest{Kind: distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL})
	if err != nil {
		t.Fatalf("OpenCeremony = %v", err)
	}
	ceremony := func() *distributorv1.Ceremony {
		t.Helper()
		got, err := client(degradedOfficer(1)).GetCeremony(ctx, &distributorv1.GetCeremonyRequest{CeremonyId: c.GetId()})
		if err != nil {
			t.Fatalf("GetCeremony = %v", err)
		}
		return got
	}

	// Each officer opens their safe and releases, as `safe release` does.
	var opened []safe.Safe
	for i, cfg := range cfgs {
		before := ceremony()
		s, err := Open(ctx, cfg)
		if err == nil {
			t.Cleanup(func() { s.Close() })
			opened = append(opened, s)
			var after *distributorv1.Ceremony
			after, err = officer.Release(ctx, client(degradedOfficer(i+1)), c.GetId(), m, s)
			if err == nil {
				t.Logf("%s released: shares %v, %s", cfg.TokenLabel, after.GetAcceptedIndices(), after.GetState())
				continue
			}
		}
		t.Logf("%s: %v", cfg.TokenLabel, err)
		switch cfg.TokenLabel {
		case "safe-2":
			if !strings.Contains(err.Error(), "PKCS#11 module "+cfgs[1].Module) || !strings.Contains(err.Error(), "no such file or directory") {
				t.Errorf("opening safe-2 (module missing) = %v, want an error naming the missing module", err)
			}
		case "safe-4":
			if !errors.Is(err, safe.ErrTampered) || !strings.Contains(err.Error(), "share "+ref(4).String()+" from safe-4") {
				t.Errorf("releasing from safe-4 (damaged record) = %v, want ErrTampered naming the share and safe-4", err)
			}
		default:
			t.Fatalf("%s: release = %v, want success", cfg.TokenLabel, err)
		}
		after := ceremony()
		if after.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_OPEN || !slices.Equal(after.GetAcceptedIndices(), before.GetAcceptedIndices()) {
			t.Errorf("after %s failed the ceremony is %s with shares %v, want it open with %v as before", cfg.TokenLabel, after.GetState(), after.GetAcceptedIndices(), before.GetAcceptedIndices())
		}
	}
	final := ceremony()
	if final.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED || !slices.Equal(final.GetAcceptedIndices(), []uint32{1, 3, 5}) {
		t.Fatalf("ceremony = %s with shares %v, want succeeded with [1 3 5]", final.GetState(), final.GetAcceptedIndices())
	}
	if d.Sealed() {
		t.Fatalf("distributor still sealed after the three working officers released")
	}
	r, err := hpkeseal.NewRecipient()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	resp, err := client(degradedRootKMS).FetchRootKey(ctx, &distributorv1.FetchRootKeyRequest{Recipient: r.PublicKey(), GenesisId: m.GetGenesisId()})
	if err != nil {
		t.Fatalf("FetchRootKey = %v", err)
	}
	info, err := hpkeseal.Info("cairn/distributor/v1/root-key", m.GetGenesisId(), degradedRootKMS)
	if err != nil {
		t.Fatal(err)
	}
	served, err := r.Open(resp.GetSealedRootKey(), info)
	if err != nil {
		t.Fatalf("opening the served root key = %v", err)
	}
	defer served.Wipe()
	if !safe.CheckKCV(served, m) {
		t.Fatalf("the distributor serves a key that does not match the manifest KCV")
	}

	// The same safes through safe.RecoverReport: safe-4 is skipped and
	// named; the quorum recovers the key.
	if labels := labelsOf(opened); !slices.Equal(labels, []string{"safe-1", "safe-3", "safe-4", "safe-5"}) {
		t.Fatalf("opened safes = %v, want safe-1, safe-3, safe-4, safe-5", labels)
	}
	rmk, rep, err := safe.RecoverReport(ctx, m, opened)
	if err != nil {
		t.Fatalf("RecoverReport(safe-4 damaged, 3 working) = %v, want the key", err)
	}
	defer rmk.Wipe()
	if !rmk.Equal(served) {
		t.Errorf("RecoverReport recovered another key than the distributor serves")
	}
	if !slices.Equal(rep.Used, []uint32{1, 3, 5}) || len(rep.Failed) != 1 || rep.Failed[0].Label != "safe-4" || rep.Failed[0].Index != 4 ||
		!errors.Is(rep.Failed[0], safe.ErrTampered) || !strings.Contains(rep.Failed[0].Error(), "share 4 from safe-4") {
		t.Errorf("RecoverReport used %v, failed %v; want [1 3 5] used and safe-4 (share 4, ErrTampered) failed", rep.Used, rep.Failed)
	}
	// Without safe-5 the quorum is gone: the error names the missing
	// count and safe-4's failure.
	if k, _, err := safe.RecoverReport(ctx, m, opened[:3]); err == nil || !errors.Is(err, safe.ErrThresholdNotMet) || !errors.Is(err, safe.ErrTampered) ||
		!strings.Contains(err.Error(), "(2/3)") || !strings.Contains(err.Error(), "share 4 from safe-4") {
		k.Wipe()
		t.Errorf("RecoverReport(safe-1, safe-3, damaged safe-4) = %v, want threshold not met (2/3) naming safe-4's failure", err)
	}
}

func labelsOf(safes []safe.Safe) []string {
	var out []string
	for _, s := range safes {
		out = append(out, s.Label())
	}
	return out
}
