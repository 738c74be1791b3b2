package cli_test

import (
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// fakeKMS is a KMSAdmin that verifies the bundle against its pinned key,
// records each ApplyBundle, and refuses with refuse if set.
type fakeKMS struct {
	kmsv1.UnimplementedKMSAdminServer
	pinned  ed25519.PublicKey
	refuse  error
	mu      sync.Mutex
	reqs    []*kmsv1.ApplyBundleRequest
	callers []string
	served  *bundlev1.BundleRef
	// signed is the signed bundle served, if known (GetStatus
	// include_bundle returns it).
	signed *bundlev1.SignedBundle
}

func (f *fakeKMS) ApplyBundle(ctx context.Context, req *kmsv1.ApplyBundleRequest) (*kmsv1.ApplyBundleResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	id, _ := identity.FromContext(ctx)
	f.reqs = append(f.reqs, proto.CloneOf(req))
	f.callers = append(f.callers, id.String())
	if f.refuse != nil {
		return nil, f.refuse
	}
	b, err := bundle.Verify(req.GetBundle(), []ed25519.PublicKey{f.pinned})
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	resp := &kmsv1.ApplyBundleResponse{Applied: bundle.Ref(req.GetBundle(), b), Previous: f.served}
	if o := b.GetShrinkOverride(); o != nil {
		resp.Warnings = []string{"the bundle carries a shrink override by " + o.GetForcedBy() + " (reason: " + o.GetReason() + "), audited"}
	}
	if !req.GetDryRun() {
		f.served, f.signed = resp.GetApplied(), req.GetBundle()
	}
	return resp, nil
}

func (f *fakeKMS) GetStatus(ctx context.Context, req *kmsv1.GetStatusRequest) (*kmsv1.GetStatusResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := &kmsv1.GetStatusResponse{Region: "us-east", State: kmsv1.ServingState_SERVING_STATE_SERVING, Bundle: f.served}
	if req.GetIncludeBundle() {
		st.ServedBundle = f.signed
	}
	if f.served == nil {
		st.State = kmsv1.ServingState_SERVING_STATE_NOT_READY
	}
	return st, nil
}

// applied counts the ApplyBundle calls that were not dry runs.
func (f *fakeKMS) applied() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, r := range f.reqs {
		if !r.GetDryRun() {
			n++
		}
	}
	return n
}

func (f *fakeKMS) requests() ([]*kmsv1.ApplyBundleRequest, []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reqs, f.callers
}

// signedBundleFile writes a signed us-east bundle with no keysets.
func signedBundleFile(t *testing.T, priv ed25519.PrivateKey, serial uint64) (string, *bundlev1.SignedBundle) {
	t.Helper()
	sb, err := bundle.Sign(&bundlev1.Bundle{FormatVersion: 1, Region: "us-east", Serial: serial, CreatedBy: regionctlID}, priv)
	if err != nil {
		t.Fatal(err)
	}
	data, err := proto.Marshal(sb)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "us-east.bundle")
	writeFile(t, path, string(data))
	return path, sb
}

func TestBundlePush(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	path, sb := signedBundleFile(t, priv, 9)
	b, err := bundle.Verify(sb, []ed25519.PublicKey{pub})
	if err != nil {
		t.Fatal(err)
	}
	ref := bundle.Ref(sb, b)
	// The fleet-wide Safety check reads the record (empty here, as is the
	// bundle).
	root := &fakeRootKMS{keys: &regionKeys{}}
	idFlags := append([]string{"--rootkms", startFakeRootKMS(t, pki, root)}, identityFlags(pki, regionctlID)...)
	refusal := status.Error(codes.FailedPrecondition, `kms: bundle us-east serial 9 refused: it drops keyset "payments/ledger" (2 of 2 keysets, more than the 10% threshold); use --force with a reason`)

	tests := []struct {
		name        string
		flags       []string
		refuse      []error // per server; nil applies
		wantCode    int
		wantApplied []int  // real ApplyBundle calls each server saw
		wantFloor   uint64 // the serial floor recorded for us-east by it (0: unchanged)
		wantOut     []string
		wantErr     []string
	}{
		{
			name: "dry run everywhere, then applies on every server in order", refuse: []error{nil, nil}, wantApplied: []int{1, 1}, wantFloor: 9,
			wantOut: []string{"recorded serial 9 as delivered to us-east", "pushing bundle us-east serial 9 sha256 ", "to 2 server(s), all or nothing", "shrink guard: the region's servers serve nothing yet: no shrink to check", ": dry run ok: would apply us-east serial 9", ": applied us-east serial 9 sha256 ", "(previous: (none))"},
		},
		{
			name: "dry run only", flags: []string{"--dry-run"}, refuse: []error{nil, nil}, wantApplied: []int{0, 0},
			wantOut: []string{"dry run: every server would apply it; nothing applied"},
		},
		{
			name: "one refusal in the dry run: nothing applied anywhere", refuse: []error{nil, refusal, nil}, wantCode: 1, wantApplied: []int{0, 0, 0},
			wantErr: []string{"REFUSED the bundle (FailedPrecondition): " + status.Convert(refusal).Message(), "1 of 3 server(s) refused or could not be reached in the dry run: nothing was applied anywhere"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var fakes []*fakeKMS
			var addrs []string
			for i, refuse := range tt.refuse {
				f := &fakeKMS{pinned: pub, refuse: refuse}
				srv := newServer(pki, fmt.Sprintf("spiffe://cairn.test/kms/us-east/kms-%d", i+1))
				kmsv1.RegisterKMSAdminServer(srv, f)
				fakes = append(fakes, f)
				addrs = append(addrs, serve(t, srv))
			}
			args := append([]string{"bundle", "push", "--kms", strings.Join(addrs, ","), "--bundle", path}, tt.flags...)
			wantFloor := root.floor("us-east") // unchanged unless the push applied
			if tt.wantFloor != 0 {
				wantFloor = tt.wantFloor
			}
			r := run(t, append(args, idFlags...)...)
			if r.code != tt.wantCode {
				t.Fatalf("regionctl %v = %d, want %d\nstdout:\n%s\nstderr:\n%s", tt.flags, r.code, tt.wantCode, r.stdout, r.stderr)
			}
			contains(t, "bundle push stdout", r.stdout, tt.wantOut...)
			contains(t, "bundle push stderr", r.stderr, tt.wantErr...)
			if got := root.floor("us-east"); got != wantFloor {
				t.Errorf("bundle push %v: recorded floor of us-east = %d, want %d", tt.flags, got, wantFloor)
			}
			for i, f := range fakes {
				if got := f.applied(); got != tt.wantApplied[i] {
					t.Errorf("server %d saw %d real ApplyBundle calls, want %d", i, got, tt.wantApplied[i])
				}
				reqs, callers := f.requests()
				if len(reqs) == 0 || !reqs[0].GetDryRun() {
					t.Errorf("server %d: first ApplyBundle call is not a dry run", i)
				}
				for j, req := range reqs {
					if !proto.Equal(req.GetBundle(), sb) {
						t.Errorf("server %d got a different signed bundle than the file's", i)
					}
					if req.GetForce() || req.GetForceReason() != "" {
						t.Errorf("server %d request = force %t, reason %q; want neither (an override is signed into the bundle)", i, req.GetForce(), req.GetForceReason())
					}
					if callers[j] != regionctlID {
						t.Errorf("server %d saw caller %q, want %q", i, callers[j], regionctlID)
					}
				}
			}
			if tt.wantCode == 0 && !strings.Contains(r.stdout, "sha256 "+hex.EncodeToString(ref.GetSha256())) {
				t.Errorf("bundle push stdout = %q, want the bundle's sha256 %s", r.stdout, hex.EncodeToString(ref.GetSha256()))
			}
		})
	}
}

// TestBundlePushOnlyToTheRegionsKMS checks that a bundle is sent only to a
// KMS server of its own region (the server's SPIFFE ID is checked in the
// TLS handshake, before any bundle byte is sent), and that an unreachable
// server stops the push.
func TestBundlePushOnlyToTheRegionsKMS(t *testing.T) {
	t.Run("no root KMS", func(t *testing.T) {
		pki := identitytest.New(t, identitytest.TrustDomain)
		_, priv, _ := ed25519.GenerateKey(nil)
		path, _ := signedBundleFile(t, priv, 1)
		r := run(t, append([]string{"bundle", "push", "--kms", "127.0.0.1:1", "--bundle", path}, identityFlags(pki, regionctlID)...)...)
		if r.code != 2 || !strings.Contains(r.stderr, "bundle push needs the root KMS") {
			t.Errorf("bundle push without a root KMS = %d, %q; want 2, needs the root KMS", r.code, r.stderr)
		}
	})
	pki := identitytest.New(t, identitytest.TrustDomain)
	pub, priv, _ := ed25519.GenerateKey(nil)
	path, _ := signedBundleFile(t, priv, 1)
	idFlags := append([]string{"--rootkms", startFakeRootKMS(t, pki, &fakeRootKMS{keys: &regionKeys{}})}, identityFlags(pki, regionctlID)...)
	for _, id := range []string{"spiffe://cairn.test/kms/eu-west/kms-1", "spiffe://cairn.test/rootkms/global/rootkms-1"} {
		f := &fakeKMS{pinned: pub}
		srv := newServer(pki, id)
		kmsv1.RegisterKMSAdminServer(srv, f)
		addr := serve(t, srv)
		r := run(t, append([]string{"bundle", "push", "--kms", addr, "--bundle", path}, idFlags...)...)
		if reqs, _ := f.requests(); r.code != 1 || len(reqs) != 0 || !strings.Contains(r.stderr, "not on the allowlist") {
			t.Errorf("bundle push to %s = %d, %q, %d calls; want 1, not on the allowlist, 0 calls", id, r.code, r.stderr, len(reqs))
		}
	}
	// A closed port.
	srv := newServer(pki, "spiffe://cairn.test/kms/us-east/kms-1")
	addr := serve(t, srv)
	srv.Stop()
	r := run(t, append([]string{"bundle", "push", "--kms", addr, "--bundle", path, "--timeout", "2s"}, idFlags...)...)
	if r.code != 1 || !strings.Contains(r.stderr, "unreachable: nothing was applied anywhere") {
		t.Errorf("bundle push to a closed port = %d, %q; want 1, unreachable: nothing was applied anywhere", r.code, r.stderr)
	}
}
