package distributor_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/distributor"
	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/internal/secret"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/officer"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var td = identitytest.TrustDomain

const (
	rootKMSID = "spiffe://cairn.test/rootkms/global/rootkms-1"
	kmsID     = "spiffe://cairn.test/kms/us-east/kms-1"
)

func officerID(i int) string { return fmt.Sprintf("spiffe://cairn.test/officer/global/officer-%d", i) }

// world is one test's PKI, safes and genesis.
type world struct {
	t        testing.TB
	pki      *identitytest.PKI
	dir      string
	safes    []safe.Safe
	manifest *safev1.GenesisManifest
	rmk      secret.Bytes
	// configure, if set, adjusts each distributor's config (by name).
	configure func(name string, c *distributor.Config)
}

func newWorld(t testing.TB, k, n int) *world {
	t.Helper()
	w := &world{t: t, pki: identitytest.New(t, td), dir: t.TempDir()}
	var officers []string
	for i := range n {
		s, err := safe.OpenFileSafe(safe.FileSafeConfig{
			Dir: filepath.Join(w.dir, "safes", fmt.Sprintf("safe-%d", i+1)), Label: fmt.Sprintf("safe-%d", i+1),
			Passphrase: secret.New([]byte("test passphrase")), KDFMemoryKiB: 8 * 1024, AttemptDir: filepath.Join(w.dir, "attempts"),
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		w.safes = append(w.safes, s)
		officers = append(officers, officerID(i+1))
	}
	m, rmk, err := safe.Genesis(context.Background(), safe.SplitConfig{Threshold: k, Safes: w.safes, Officers: officers})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rmk.Wipe)
	w.manifest, w.rmk = m, rmk
	return w
}

type node struct {
	srv      *distributor.Server
	addr     string
	dir      string
	auditLog string
	done     chan struct{}
	onStop   []func()
}

func (n *node) stop() {
	n.srv.Close()
	<-n.done
	for _, f := range n.onStop {
		f()
	}
	n.onStop = nil
}

// start runs a distributor named name; pinned writes the manifest first.
func (w *world) start(name string, pinned bool, peers ...string) *node {
	w.t.Helper()
	dir := filepath.Join(w.dir, name)
	if pinned {
		if err := safe.WriteManifest(filepath.Join(dir, "genesis.json"), w.manifest); err != nil {
			w.t.Fatal(err)
		}
	}
	return w.startIn(dir, name, nil, peers...)
}

func (w *world) startIn(dir, name string, lis net.Listener, peers ...string) *node {
	w.t.Helper()
	log, err := audit.Open(filepath.Join(dir, "audit.log"), audit.Options{})
	if err != nil {
		w.t.Fatal(err)
	}
	n := w.startWith(dir, name, lis, log, peers...)
	n.onStop = append(n.onStop, func() { log.Close() })
	return n
}

// config is the configuration of the distributor named name, with its
// state in dir.
func (w *world) config(dir, name string, log *audit.Log, peers ...string) distributor.Config {
	w.t.Helper()
	allow := func(p ...string) identity.Allowlist {
		a, err := identity.ParseAllowlist(td, p...)
		if err != nil {
			w.t.Fatal(err)
		}
		return a
	}
	cfg := distributor.Config{
		ManifestPath:   filepath.Join(dir, "genesis.json"),
		Source:         w.pki.Source("spiffe://cairn.test/distributor/global/" + name),
		Officers:       allow("officer/global/*"),
		RootKeyReaders: allow("rootkms/*/*"),
		Peers:          allow("distributor/global/*"),
		PeerAddrs:      peers,
		Audit:          log,
		PeerRetryMin:   20 * time.Millisecond, PeerRetryMax: 200 * time.Millisecond, PeerPollInterval: 200 * time.Millisecond,
	}
	if w.configure != nil {
		w.configure(name, &cfg)
	}
	return cfg
}

func (w *world) startWith(dir, name string, lis net.Listener, log *audit.Log, peers ...string) *node {
	w.t.Helper()
	auditPath := filepath.Join(dir, "audit.log")
	srv, err := distributor.New(w.config(dir, name, log, peers...))
	if err != nil {
		w.t.Fatalf("distributor.New = %v", err)
	}
	if lis == nil {
		lis, err = net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			w.t.Fatal(err)
		}
	}
	n := &node{srv: srv, addr: lis.Addr().String(), dir: dir, auditLog: auditPath, done: make(chan struct{})}
	go func() { defer close(n.done); _ = srv.Serve(lis) }()
	w.t.Cleanup(n.stop)
	return n
}

func (w *world) client(addr, id string) distributorv1.DistributorClient {
	w.t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(w.pki.ClientCredentials(id)))
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { conn.Close() })
	return distributorv1.NewDistributorClient(conn)
}

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

// fetch asks for the RMK as id and returns it opened.
func (w *world) fetch(addr, id string) (secret.Bytes, error) {
	r, err := hpkeseal.NewRecipient()
	if err != nil {
		return secret.Bytes{}, err
	}
	defer r.Close()
	resp, err := w.client(addr, id).FetchRootKey(ctx(w.t), &distributorv1.FetchRootKeyRequest{Recipient: r.PublicKey(), GenesisId: w.manifest.GetGenesisId()})
	if err != nil {
		return secret.Bytes{}, err
	}
	info, _ := hpkeseal.Info("cairn/distributor/v1/root-key", w.manifest.GetGenesisId(), id)
	return r.Open(resp.GetSealedRootKey(), info)
}

func (w *world) openUnseal(addr string) *distributorv1.Ceremony {
	w.t.Helper()
	c, err := w.client(addr, officerID(1)).OpenCeremony(ctx(w.t), &distributorv1.OpenCeremonyRequest{Kind: distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL})
	if err != nil {
		w.t.Fatalf("OpenCeremony = %v", err)
	}
	return c
}

func (w *world) release(addr, ceremonyID string, i int) (*distributorv1.Ceremony, error) {
	return officer.Release(ctx(w.t), w.client(addr, officerID(i+1)), ceremonyID, w.manifest, w.safes[i])
}

func TestProvisionAndServe(t *testing.T) {
	w := newWorld(t, 3, 5)
	d := w.start("distributor-1", false)
	st, err := w.client(d.addr, officerID(1)).GetStatus(ctx(t), &distributorv1.GetStatusRequest{})
	if err != nil || st.GetState() != distributorv1.SealState_SEAL_STATE_SEALED || st.GetGenesisId() != "" {
		t.Fatalf("fresh distributor status = %v, %v; want sealed and unprovisioned", st, err)
	}
	if _, err := w.fetch(d.addr, rootKMSID); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("FetchRootKey while sealed = %v, want FailedPrecondition", err)
	}
	if err := officer.Provision(ctx(t), w.client(d.addr, officerID(1)), w.manifest, w.rmk); err != nil {
		t.Fatalf("Provision = %v", err)
	}
	got, err := w.fetch(d.addr, rootKMSID)
	if err != nil || !got.Equal(w.rmk) {
		t.Fatalf("FetchRootKey by a root KMS replica = %v, want the RMK", err)
	}
	// The manifest is pinned on disk, and it is the only thing there
	// besides the audit log.
	pinned, err := safe.ReadManifest(filepath.Join(d.dir, "genesis.json"))
	if err != nil || !proto.Equal(pinned, w.manifest) {
		t.Errorf("pinned manifest = %v, %v", pinned, err)
	}
	st, _ = w.client(d.addr, rootKMSID).GetStatus(ctx(t), &distributorv1.GetStatusRequest{})
	if st.GetState() != distributorv1.SealState_SEAL_STATE_UNSEALED || !bytes.Equal(st.GetKcv(), w.manifest.GetKcv()) || st.GetLastHandout().GetIdentity() != rootKMSID {
		t.Errorf("status = %v, want unsealed, the manifest KCV, last hand-out to %s", st, rootKMSID)
	}
	// A second provisioning of another lineage is refused.
	other := newWorld(t, 2, 2)
	if err := officer.Provision(ctx(t), w.client(d.addr, officerID(1)), other.manifest, other.rmk); status.Code(errors.Unwrap(err)) != codes.FailedPrecondition && !strings.Contains(fmt.Sprint(err), "FailedPrecondition") {
		t.Errorf("Provision of another genesis = %v, want FailedPrecondition", err)
	}
}

func TestFetchRootKeyRefusesOthers(t *testing.T) {
	w := newWorld(t, 2, 3)
	d := w.start("distributor-1", false)
	if err := officer.Provision(ctx(t), w.client(d.addr, officerID(1)), w.manifest, w.rmk); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{kmsID, officerID(1), "spiffe://cairn.test/regionctl/global/regionctl", "spiffe://cairn.test/client/us-east/demo"} {
		if _, err := w.fetch(d.addr, id); status.Code(err) != codes.PermissionDenied {
			t.Errorf("FetchRootKey by %s = %v, want PermissionDenied", id, err)
		}
	}
	// A wrong genesis id or a bad recipient key are refused too.
	c := w.client(d.addr, rootKMSID)
	r, _ := hpkeseal.NewRecipient()
	defer r.Close()
	if _, err := c.FetchRootKey(ctx(t), &distributorv1.FetchRootKeyRequest{Recipient: r.PublicKey(), GenesisId: strings.Repeat("0", 32)}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("FetchRootKey(other genesis) = %v, want InvalidArgument", err)
	}
	if _, err := c.FetchRootKey(ctx(t), &distributorv1.FetchRootKeyRequest{Recipient: &cryptov1.HpkePublicKey{KemId: 0x20, PublicKey: []byte{1, 2}}, GenesisId: w.manifest.GetGenesisId()}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("FetchRootKey(bad recipient) = %v, want InvalidArgument", err)
	}
	// Every refusal is audited with the caller's identity.
	recs, err := audit.ReadFile(d.auditLog)
	if err != nil {
		t.Fatal(err)
	}
	denied := map[string]bool{}
	for _, r := range recs {
		if r.Operation == "/cairn.distributor.v1.Distributor/FetchRootKey" && r.Outcome == audit.OutcomeDenied {
			denied[r.Identity] = true
		}
	}
	if !denied[kmsID] || !denied[officerID(1)] {
		t.Errorf("denied FetchRootKey audit records for %v, want %s and %s among them", denied, kmsID, officerID(1))
	}
}

func TestUnsealCeremony(t *testing.T) {
	w := newWorld(t, 3, 5)
	d := w.start("distributor-1", true)
	c := w.openUnseal(d.addr)
	if c.GetThreshold() != 3 || c.GetCeremonyKey() == nil || c.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_OPEN {
		t.Fatalf("opened ceremony = %v", c)
	}
	for i, want := range []int{1, 2} {
		got, err := w.release(d.addr, c.GetId(), []int{0, 3}[i])
		if err != nil {
			t.Fatalf("release %d = %v", i, err)
		}
		if len(got.GetAcceptedIndices()) != want || got.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_OPEN {
			t.Fatalf("after %d shares ceremony = %v", want, got)
		}
	}
	if !d.srv.Sealed() {
		t.Fatalf("unsealed with 2 of 3 shares")
	}
	got, err := w.release(d.addr, c.GetId(), 4)
	if err != nil {
		t.Fatalf("third release = %v", err)
	}
	if got.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED || fmt.Sprint(got.GetAcceptedIndices()) != "[1 4 5]" ||
		strings.Join(got.GetOfficers(), ",") != officerID(1)+","+officerID(4)+","+officerID(5) {
		t.Errorf("final ceremony = %v, want succeeded with shares 1,4,5 from officers 1,4,5", got)
	}
	if k, err := w.fetch(d.addr, rootKMSID); err != nil || !k.Equal(w.rmk) {
		t.Errorf("FetchRootKey after the ceremony = %v", err)
	}
	assertNoSecrets(t, w, d.dir)
}

// TestCeremonyRefusals: every bad submission gets a clear error and leaves
// the ceremony's state unchanged.
func TestCeremonyRefusals(t *testing.T) {
	w := newWorld(t, 3, 5)
	other := newWorld(t, 3, 5)
	d := w.start("distributor-1", true)
	c := w.openUnseal(d.addr)
	if _, err := w.release(d.addr, c.GetId(), 0); err != nil {
		t.Fatal(err)
	}
	sealTo := func(rel *safev1.ReleasedShare, index uint32, ceremonyID string) *cryptov1.HpkeSealed {
		b, _ := proto.Marshal(rel)
		info, _ := hpkeseal.Info("cairn/distributor/v1/share", ceremonyID, w.manifest.GetGenesisId(), fmt.Sprint(index))
		s, err := hpkeseal.Seal(c.GetCeremonyKey(), info, b)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	share := func(w *world, i int) []byte {
		s, err := w.safes[i].Unseal(context.Background(), safe.ShareRef{GenesisID: w.manifest.GetGenesisId(), Index: uint32(i + 1)})
		if err != nil {
			t.Fatal(err)
		}
		return s.Data()
	}
	gid := w.manifest.GetGenesisId()
	tests := []struct {
		name    string
		caller  string
		req     *distributorv1.SubmitShareRequest
		code    codes.Code
		message string
	}{
		{"unknown officer", "spiffe://cairn.test/kms/us-east/kms-1",
			&distributorv1.SubmitShareRequest{CeremonyId: c.GetId(), ShareIndex: 2, SealedShare: sealTo(&safev1.ReleasedShare{GenesisId: gid, Index: 2, Share: share(w, 1)}, 2, c.GetId())},
			codes.PermissionDenied, ""},
		{"share of another genesis", officerID(2),
			&distributorv1.SubmitShareRequest{CeremonyId: c.GetId(), ShareIndex: 2, SealedShare: sealTo(&safev1.ReleasedShare{GenesisId: gid, Index: 2, Share: share(other, 1)}, 2, c.GetId())},
			codes.InvalidArgument, "commitment"},
		{"released share naming another genesis", officerID(2),
			&distributorv1.SubmitShareRequest{CeremonyId: c.GetId(), ShareIndex: 2, SealedShare: sealTo(&safev1.ReleasedShare{GenesisId: other.manifest.GetGenesisId(), Index: 2, Share: share(w, 1)}, 2, c.GetId())},
			codes.InvalidArgument, "does not name"},
		{"duplicate index", officerID(1),
			&distributorv1.SubmitShareRequest{CeremonyId: c.GetId(), ShareIndex: 1, SealedShare: sealTo(&safev1.ReleasedShare{GenesisId: gid, Index: 1, Share: share(w, 0)}, 1, c.GetId())},
			codes.AlreadyExists, ""},
		{"same officer twice", officerID(1),
			&distributorv1.SubmitShareRequest{CeremonyId: c.GetId(), ShareIndex: 2, SealedShare: sealTo(&safev1.ReleasedShare{GenesisId: gid, Index: 2, Share: share(w, 1)}, 2, c.GetId())},
			codes.PermissionDenied, "another officer"},
		{"share of another officer's slot", officerID(3),
			&distributorv1.SubmitShareRequest{CeremonyId: c.GetId(), ShareIndex: 2, SealedShare: sealTo(&safev1.ReleasedShare{GenesisId: gid, Index: 2, Share: share(w, 1)}, 2, c.GetId())},
			codes.PermissionDenied, "another officer"},
		{"garbage ciphertext", officerID(2),
			&distributorv1.SubmitShareRequest{CeremonyId: c.GetId(), ShareIndex: 2, SealedShare: &cryptov1.HpkeSealed{KemId: 0x20, KdfId: 1, AeadId: 2, Ciphertext: bytes.Repeat([]byte{7}, 90)}},
			codes.InvalidArgument, "cannot open"},
		{"sealed for another index", officerID(2),
			&distributorv1.SubmitShareRequest{CeremonyId: c.GetId(), ShareIndex: 2, SealedShare: sealTo(&safev1.ReleasedShare{GenesisId: gid, Index: 2, Share: share(w, 1)}, 3, c.GetId())},
			codes.InvalidArgument, "cannot open"},
		{"no envelope", officerID(2), &distributorv1.SubmitShareRequest{CeremonyId: c.GetId(), ShareIndex: 2}, codes.InvalidArgument, ""},
		{"index outside the manifest", officerID(2),
			&distributorv1.SubmitShareRequest{CeremonyId: c.GetId(), ShareIndex: 9, SealedShare: sealTo(&safev1.ReleasedShare{GenesisId: gid, Index: 9, Share: share(w, 1)}, 9, c.GetId())},
			codes.InvalidArgument, "not in the manifest"},
		{"unknown ceremony", officerID(2), &distributorv1.SubmitShareRequest{CeremonyId: "nope", ShareIndex: 2}, codes.NotFound, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := w.client(d.addr, tt.caller).SubmitShare(ctx(t), tt.req)
			if status.Code(err) != tt.code || !strings.Contains(fmt.Sprint(err), tt.message) {
				t.Errorf("SubmitShare(%s) = %v, want %v containing %q", tt.name, err, tt.code, tt.message)
			}
			got, err := w.client(d.addr, officerID(1)).GetCeremony(ctx(t), &distributorv1.GetCeremonyRequest{CeremonyId: c.GetId()})
			if err != nil || fmt.Sprint(got.GetAcceptedIndices()) != "[1]" || got.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_OPEN {
				t.Errorf("after %s ceremony = %v, %v; want open with share 1 only", tt.name, got, err)
			}
		})
	}
	// The honest officers can still finish it.
	for _, i := range []int{1, 2} {
		if _, err := w.release(d.addr, c.GetId(), i); err != nil {
			t.Fatalf("release %d = %v", i, err)
		}
	}
	if d.srv.Sealed() {
		t.Errorf("still sealed after 3 good shares")
	}
}

func TestCeremonyExpiresAndCancels(t *testing.T) {
	w := newWorld(t, 2, 3)
	d := w.start("distributor-1", true)
	c, err := w.client(d.addr, officerID(1)).OpenCeremony(ctx(t), &distributorv1.OpenCeremonyRequest{Kind: distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL, TtlSeconds: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.release(d.addr, c.GetId(), 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond) // the ceremony's own 1 s TTL
	if _, err := w.release(d.addr, c.GetId(), 1); err == nil || !strings.Contains(err.Error(), "EXPIRED") {
		t.Errorf("release into an expired ceremony = %v, want an expired error", err)
	}
	if !d.srv.Sealed() {
		t.Errorf("unsealed by an expired ceremony")
	}
	// A new one can be opened, and cancelled only by an officer.
	c2 := w.openUnseal(d.addr)
	if _, err := w.client(d.addr, kmsID).CancelCeremony(ctx(t), &distributorv1.CancelCeremonyRequest{CeremonyId: c2.GetId(), Reason: "x"}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("CancelCeremony by a KMS = %v, want PermissionDenied", err)
	}
	if _, err := w.client(d.addr, kmsID).OpenCeremony(ctx(t), &distributorv1.OpenCeremonyRequest{Kind: distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("OpenCeremony by a KMS = %v, want PermissionDenied", err)
	}
	if _, err := w.client(d.addr, officerID(2)).OpenCeremony(ctx(t), &distributorv1.OpenCeremonyRequest{Kind: distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("second OpenCeremony while one is open = %v, want FailedPrecondition", err)
	}
	got, err := w.client(d.addr, officerID(2)).CancelCeremony(ctx(t), &distributorv1.CancelCeremonyRequest{CeremonyId: c2.GetId(), Reason: "drill over"})
	if err != nil || got.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_CANCELLED {
		t.Errorf("CancelCeremony = %v, %v", got, err)
	}
}

func TestRestartForgetsCeremony(t *testing.T) {
	w := newWorld(t, 3, 5)
	d := w.start("distributor-1", true)
	c := w.openUnseal(d.addr)
	for _, i := range []int{0, 1} {
		if _, err := w.release(d.addr, c.GetId(), i); err != nil {
			t.Fatal(err)
		}
	}
	d.stop()
	d2 := w.startIn(d.dir, "distributor-1", nil)
	st, err := w.client(d2.addr, officerID(1)).GetStatus(ctx(t), &distributorv1.GetStatusRequest{})
	if err != nil || st.GetState() != distributorv1.SealState_SEAL_STATE_SEALED || st.GetCeremony() != nil {
		t.Errorf("after restart status = %v, %v; want sealed with no ceremony", st, err)
	}
	if _, err := w.client(d2.addr, officerID(3)).GetCeremony(ctx(t), &distributorv1.GetCeremonyRequest{CeremonyId: c.GetId()}); status.Code(err) != codes.NotFound {
		t.Errorf("old ceremony after restart = %v, want NotFound", err)
	}
	assertNoSecrets(t, w, d.dir)
}

func TestPeerUnseal(t *testing.T) {
	w := newWorld(t, 2, 3)
	// Reserve d2's address so d1 can name it as a peer before it starts.
	l2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d1 := w.start("distributor-1", false, l2.Addr().String())
	if err := officer.Provision(ctx(t), w.client(d1.addr, officerID(1)), w.manifest, w.rmk); err != nil {
		t.Fatal(err)
	}
	if err := safe.WriteManifest(filepath.Join(w.dir, "distributor-2", "genesis.json"), w.manifest); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	d2 := w.startIn(filepath.Join(w.dir, "distributor-2"), "distributor-2", l2, d1.addr)
	if err := d2.srv.WaitUnsealed(ctx(t)); err != nil {
		t.Fatalf("distributor-2 did not unseal from its peer: %v", err)
	}
	t.Logf("peer unseal took %v", time.Since(start))
	if k, err := w.fetch(d2.addr, rootKMSID); err != nil || !k.Equal(w.rmk) {
		t.Errorf("FetchRootKey from the peer-unsealed distributor = %v", err)
	}
	// Seal d1 (an emergency), then it unseals again from d2.
	if _, err := w.client(d1.addr, rootKMSID).Seal(ctx(t), &distributorv1.SealRequest{Reason: "x"}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("Seal by a root KMS = %v, want PermissionDenied", err)
	}
	if _, err := w.client(d1.addr, officerID(1)).Seal(ctx(t), &distributorv1.SealRequest{Reason: "incident drill"}); err != nil {
		t.Fatalf("Seal = %v", err)
	}
	if err := d1.srv.WaitUnsealed(ctx(t)); err != nil {
		t.Fatalf("distributor-1 did not unseal again from distributor-2: %v", err)
	}
	st, _ := w.client(d1.addr, officerID(1)).GetStatus(ctx(t), &distributorv1.GetStatusRequest{})
	if !strings.HasPrefix(st.GetUnsealedBy(), "peer:") {
		t.Errorf("unsealed by %q, want a peer", st.GetUnsealedBy())
	}
	if len(st.GetPeers()) != 1 || st.GetPeers()[0].GetId() != "spiffe://cairn.test/distributor/global/distributor-2" || st.GetPeers()[0].GetLastSeen() == nil {
		t.Errorf("peers seen = %v, want distributor-2 with its verified ID and a last-seen time", st.GetPeers())
	}
}

// liar is a fake peer that claims to be unsealed and hands out a random key
// of the right genesis id: the KCV check must refuse it.
type liar struct {
	distributorv1.UnimplementedDistributorServer
	genesisID string
	calls     chan struct{}
}

func (l *liar) GetStatus(context.Context, *distributorv1.GetStatusRequest) (*distributorv1.GetStatusResponse, error) {
	return &distributorv1.GetStatusResponse{State: distributorv1.SealState_SEAL_STATE_UNSEALED, GenesisId: l.genesisID}, nil
}

func (l *liar) FetchRootKey(ctx context.Context, req *distributorv1.FetchRootKeyRequest) (*distributorv1.FetchRootKeyResponse, error) {
	caller, _ := identity.FromContext(ctx)
	info, _ := hpkeseal.Info("cairn/distributor/v1/root-key", l.genesisID, caller.String())
	s, err := hpkeseal.Seal(req.GetRecipient(), info, bytes.Repeat([]byte{0x42}, 32))
	select {
	case l.calls <- struct{}{}:
	default:
	}
	return &distributorv1.FetchRootKeyResponse{SealedRootKey: s, GenesisId: l.genesisID}, err
}

func TestLyingPeerRefused(t *testing.T) {
	w := newWorld(t, 2, 3)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(w.pki.ServerCredentials("spiffe://cairn.test/distributor/global/liar")),
		grpc.UnaryInterceptor(identity.UnaryServerInterceptor()))
	l := &liar{genesisID: w.manifest.GetGenesisId(), calls: make(chan struct{}, 1)}
	distributorv1.RegisterDistributorServer(srv, l)
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	defer func() { srv.Stop(); <-done }()

	d := w.start("distributor-1", true, lis.Addr().String())
	select {
	case <-l.calls:
	case <-time.After(10 * time.Second):
		t.Fatal("the distributor never asked the lying peer")
	}
	// Give it a few more rounds: it must stay sealed.
	time.Sleep(300 * time.Millisecond)
	if !d.srv.Sealed() {
		t.Fatal("a lying peer planted a key")
	}
	st, _ := w.client(d.addr, officerID(1)).GetStatus(ctx(t), &distributorv1.GetStatusRequest{})
	if len(st.GetPeers()) != 1 || !strings.Contains(st.GetPeers()[0].GetLastError(), "KCV") {
		t.Errorf("peer status = %v, want the KCV refusal recorded", st.GetPeers())
	}
}

// failingWriter is an audit sink that fails every write (a full disk).
type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("no space left on device") }

// TestAuditFailureRefusesPeerUnseal: a distributor that cannot audit the
// unseal does not unseal, even with a good peer.
func TestAuditFailureRefusesPeerUnseal(t *testing.T) {
	w := newWorld(t, 2, 3)
	d1 := w.start("distributor-1", false)
	if err := officer.Provision(ctx(t), w.client(d1.addr, officerID(1)), w.manifest, w.rmk); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(w.dir, "distributor-2")
	if err := safe.WriteManifest(filepath.Join(dir, "genesis.json"), w.manifest); err != nil {
		t.Fatal(err)
	}
	d2 := w.startWith(dir, "distributor-2", nil, audit.NewWriter(failingWriter{}, audit.Options{}), d1.addr)
	// Wait until d1 has handed the key out to d2 (d1 audits that), then a
	// little longer: d2 must stay sealed.
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := w.client(d1.addr, officerID(1)).GetStatus(ctx(t), &distributorv1.GetStatusRequest{})
		if err == nil && st.GetLastHandout().GetIdentity() == "spiffe://cairn.test/distributor/global/distributor-2" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("distributor-2 never fetched the key from distributor-1")
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	if !d2.srv.Sealed() {
		t.Fatal("distributor-2 unsealed although it could not audit the unseal")
	}
}

// assertNoSecrets scans every file under dir for the RMK and every share.
func assertNoSecrets(t *testing.T, w *world, dir string) {
	t.Helper()
	needles := [][]byte{w.rmk.Data()}
	for i, s := range w.safes {
		b, err := s.Unseal(context.Background(), safe.ShareRef{GenesisID: w.manifest.GetGenesisId(), Index: uint32(i + 1)})
		if err != nil {
			t.Fatal(err)
		}
		needles = append(needles, b.Data())
	}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for _, n := range needles {
			if bytes.Contains(data, n) || bytes.Contains(data, []byte(fmt.Sprintf("%x", n))) {
				t.Errorf("%s contains key or share material", p)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// BenchmarkPeerUnseal times how long a sealed distributor takes to unseal
// from an unsealed peer: fetch over mTLS, HPKE open, KCV check, lock into
// memory. Each iteration seals it (an officer's Seal) and waits for it.
func BenchmarkPeerUnseal(b *testing.B) {
	w := newWorld(b, 2, 3)
	l2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	d1 := w.start("distributor-1", false, l2.Addr().String())
	if err := officer.Provision(context.Background(), w.client(d1.addr, officerID(1)), w.manifest, w.rmk); err != nil {
		b.Fatal(err)
	}
	if err := safe.WriteManifest(filepath.Join(w.dir, "distributor-2", "genesis.json"), w.manifest); err != nil {
		b.Fatal(err)
	}
	d2 := w.startIn(filepath.Join(w.dir, "distributor-2"), "distributor-2", l2, d1.addr)
	officerClient := w.client(d2.addr, officerID(1))
	bctx := context.Background()
	if err := d2.srv.WaitUnsealed(bctx); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for b.Loop() {
		b.StopTimer()
		if _, err := officerClient.Seal(bctx, &distributorv1.SealRequest{Reason: "benchmark"}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := d2.srv.WaitUnsealed(bctx); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/1000, "ms/unseal")
}

// TestCloseWipesRootKey: the root key lives only in the distributor's locked
// buffer, and Close (a shutdown, SIGTERM) zeroes and unmaps it: afterwards
// the server holds no key and the buffer's memory is gone.
func TestCloseWipesRootKey(t *testing.T) {
	w := newWorld(t, 2, 3)
	d := w.start("distributor-1", false)
	if err := officer.Provision(ctx(t), w.client(d.addr, officerID(1)), w.manifest, w.rmk); err != nil {
		t.Fatal(err)
	}
	rmk := w.rmk.Data()
	defer clear(rmk)
	buf := distributor.KeyBuffer(d.srv)
	if held := buf.Bytes(); !bytes.Equal(held, rmk) {
		t.Fatalf("the unsealed distributor's key buffer holds %d bytes, not the RMK", len(held))
	}
	d.stop()
	if distributor.KeyBuffer(d.srv) != nil {
		t.Error("the distributor still holds a root key after Close")
	}
	if b := buf.Bytes(); b != nil {
		t.Errorf("the root key's buffer still maps %d bytes after Close, want it destroyed", len(b))
	}
}
