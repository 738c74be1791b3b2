package cli_test

import (
	"context"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/internal/keysets"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/regionctl/store"
)

// fakeRootKMS implements CreateRegion and GenerateKeyset like the root KMS
// does (real keysets, encrypted under test region keys), and records calls.
type fakeRootKMS struct {
	rootkmsv1.UnimplementedRootKMSServer
	keys *regionKeys
	// reorder makes GenerateKeyset answer with the copies reversed.
	reorder bool

	mu        sync.Mutex
	regions   []string
	generated []*rootkmsv1.GenerateKeysetRequest
	callers   []string
}

func (f *fakeRootKMS) record(ctx context.Context) {
	id, _ := identity.FromContext(ctx)
	f.callers = append(f.callers, id.String())
}

func (f *fakeRootKMS) CreateRegion(ctx context.Context, req *rootkmsv1.CreateRegionRequest) (*rootkmsv1.Region, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record(ctx)
	if slices.Contains(f.regions, req.GetRegion()) {
		return nil, status.Errorf(codes.AlreadyExists, "rootkms: region %q exists", req.GetRegion())
	}
	if _, err := f.keys.create(req.GetRegion(), 1); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	f.regions = append(f.regions, req.GetRegion())
	now := timestamppb.New(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
	return &rootkmsv1.Region{Name: req.GetRegion(), PrimaryVersion: 1, CreatedAt: now, CommitIndex: 17,
		Versions: []*cryptov1.KeyVersionInfo{{KeyId: 1, Status: cryptov1.KeyStatus_KEY_STATUS_PRIMARY, CreatedAt: now}}}, nil
}

func (f *fakeRootKMS) GenerateKeyset(ctx context.Context, req *rootkmsv1.GenerateKeysetRequest) (*rootkmsv1.KeysetResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record(ctx)
	f.generated = append(f.generated, req)
	h, err := keysets.Generate(req.GetTemplate())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	out := &rootkmsv1.KeysetResponse{}
	for _, r := range req.GetRegions() {
		aead, ok := f.keys.get(r, 1)
		if !ok {
			return nil, status.Errorf(codes.NotFound, "rootkms: no region %q", r)
		}
		ek, err := keysets.Encrypt(h, req.GetName(), r, 1, aead)
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		out.Keysets = append(out.Keysets, ek)
	}
	if f.reorder {
		slices.Reverse(out.Keysets)
	}
	return out, nil
}

func (f *fakeRootKMS) calls() ([]string, []*rootkmsv1.GenerateKeysetRequest, []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.regions), slices.Clone(f.generated), slices.Clone(f.callers)
}

func startFakeRootKMS(t *testing.T, pki *identitytest.PKI, f *fakeRootKMS) string {
	srv := newServer(pki, "spiffe://cairn.test/rootkms/global/rootkms-1")
	rootkmsv1.RegisterRootKMSServer(srv, f)
	return serve(t, srv)
}

func TestRegionAndKeysetCreate(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	idFlags := identityFlags(pki, regionctlID)
	keys := &regionKeys{}
	fake := &fakeRootKMS{keys: keys}
	addr := startFakeRootKMS(t, pki, fake)
	rootFlags := append([]string{"--rootkms", addr}, idFlags...)

	for _, region := range []string{"us-east", "eu-west"} {
		r := mustRun(t, append([]string{"region", "create", "--region", region}, rootFlags...)...)
		contains(t, "region create stdout", r.stdout, "region "+region+" created: primary master key version 1, versions 1 (PRIMARY), created at 2026-03-01T12:00:00Z, commit index 17")
	}
	r := run(t, append([]string{"region", "create", "--region", "us-east"}, rootFlags...)...)
	if r.code != 1 || !strings.Contains(r.stderr, `region "us-east" exists`) {
		t.Errorf("region create (existing) = %d, %q; want 1, exists", r.code, r.stderr)
	}

	dir := t.TempDir()
	teams, storeDir := filepath.Join(dir, "teams"), filepath.Join(dir, "store")
	writeFile(t, filepath.Join(teams, "payments.json"), paymentsTeam)
	writeFile(t, filepath.Join(teams, "search.json"), searchTeam)
	writeFile(t, filepath.Join(teams, "ads.json"), brokenTeam)
	ksFlags := append([]string{"--teams", teams, "--store", storeDir}, rootFlags...)

	// --only one keyset.
	r = mustRun(t, append([]string{"keyset", "create", "--only", "search/index"}, ksFlags...)...)
	contains(t, "keyset create --only stdout", r.stdout, "created keyset search/index (team search, CHACHA20_POLY1305, primary key ", "for us-east", "1 created, 0 already in the store, 0 failed")
	// Then all: search/index is left alone.
	r = mustRun(t, append([]string{"keyset", "create"}, ksFlags...)...)
	contains(t, "keyset create stdout", r.stdout,
		"created keyset payments/eu-only (team payments, AES256_GCM, primary key ", "created keyset payments/ledger", "for us-east, eu-west", "created keyset payments/new",
		"3 created, 1 already in the store, 0 failed")
	contains(t, "keyset create stderr", r.stderr, "WARNING: 1 team config file(s) are invalid", "ads.json", "no keyset of theirs is created")
	// And again: nothing to do.
	r = mustRun(t, append([]string{"keyset", "create"}, ksFlags...)...)
	contains(t, "keyset create (again) stdout", r.stdout, "0 created, 4 already in the store, 0 failed")

	_, generated, callers := fake.calls()
	var names []string
	for _, g := range generated {
		names = append(names, g.GetName())
	}
	if want := []string{"search/index", "payments/eu-only", "payments/ledger", "payments/new"}; !cmp.Equal(names, want) {
		t.Errorf("GenerateKeyset calls = %v, want %v", names, want)
	}
	if g := generated[2]; !cmp.Equal(g.GetRegions(), []string{"us-east", "eu-west"}) || g.GetTemplate() != "AES256_GCM" {
		t.Errorf("GenerateKeyset(payments/ledger) regions %v template %q, want [us-east eu-west] AES256_GCM", g.GetRegions(), g.GetTemplate())
	}
	for _, c := range callers {
		if c != regionctlID {
			t.Errorf("root KMS saw caller %q, want %q", c, regionctlID)
		}
	}
	st, err := store.Open(storeDir)
	if err != nil {
		t.Fatal(err)
	}
	stored, err := st.List()
	if want := []string{"payments/eu-only", "payments/ledger", "payments/new", "search/index"}; err != nil || !cmp.Equal(stored, want) {
		t.Errorf("store List() = %v, %v; want %v", stored, err, want)
	}
	// The stored copies open under the region keys.
	copies, err := st.Get("payments/ledger")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range copies {
		aead, _ := keys.get(c.GetRegion(), c.GetRegionKeyVersion())
		if _, err := keysets.Decrypt(c, aead); err != nil {
			t.Errorf("Decrypt(stored payments/ledger for %s) = %v", c.GetRegion(), err)
		}
	}

	// A region added to a stored keyset's config is reported, not acted on.
	writeFile(t, filepath.Join(teams, "search.json"), strings.Replace(searchTeam, `"regions":["us-east"]`, `"regions":["us-east","eu-west"]`, 1))
	r = mustRun(t, append([]string{"keyset", "create"}, ksFlags...)...)
	contains(t, "keyset create (region added) stderr", r.stderr, "warning: keyset search/index is configured for [us-east eu-west] but stored for [us-east]")
	contains(t, "keyset create (region added) stdout", r.stdout, "0 created, 4 already in the store, 0 failed")

	// Errors.
	r = run(t, append([]string{"keyset", "create", "--only", "payments/unknown"}, ksFlags...)...)
	if r.code != 1 || !strings.Contains(r.stderr, `keyset "payments/unknown" is not in any valid team config`) {
		t.Errorf("keyset create --only unknown = %d, %q; want 1, not in any valid team config", r.code, r.stderr)
	}
	writeFile(t, filepath.Join(teams, "maps.json"), `{"team":"maps","keysets":[{"name":"maps/tiles","regions":["ap-south"],"purpose":"envelope","rotation_period":"1h","ciphertext_ttl":"1h"}]}`)
	r = run(t, append([]string{"keyset", "create"}, ksFlags...)...)
	if r.code != 1 || !strings.Contains(r.stderr, `generating maps/tiles: rpc error: code = NotFound desc = rootkms: no region "ap-south"`) || !strings.Contains(r.stdout, "0 created, 4 already in the store, 1 failed") {
		t.Errorf("keyset create (unknown region) = %d, %q, %q; want 1 with the root KMS's NotFound", r.code, r.stdout, r.stderr)
	}
}

// TestKeysetCreateChecksTheAnswer: copies in another order than the request's
// regions are not stored.
func TestKeysetCreateChecksTheAnswer(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	keys := &regionKeys{}
	keys.add(t, "us-east", 1)
	keys.add(t, "eu-west", 1)
	fake := &fakeRootKMS{keys: keys, reorder: true}
	addr := startFakeRootKMS(t, pki, fake)
	dir := t.TempDir()
	teams, storeDir := filepath.Join(dir, "teams"), filepath.Join(dir, "store")
	writeFile(t, filepath.Join(teams, "payments.json"), paymentsTeam)
	r := run(t, append([]string{"keyset", "create", "--only", "payments/ledger", "--teams", teams, "--store", storeDir, "--rootkms", addr}, identityFlags(pki, regionctlID)...)...)
	if r.code != 1 || !strings.Contains(r.stderr, "with copies for [eu-west us-east], want [us-east eu-west]; not stored") {
		t.Errorf("keyset create (reordered answer) = %d, %q; want 1, not stored", r.code, r.stderr)
	}
	st, _ := store.Open(storeDir)
	if names, err := st.List(); err != nil || len(names) != 0 {
		t.Errorf("store List() = %v, %v; want empty", names, err)
	}
}

// TestRootKMSMustBeARootKMS: regionctl talks only to root KMS replicas.
func TestRootKMSMustBeARootKMS(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	fake := &fakeRootKMS{keys: &regionKeys{}}
	srv := newServer(pki, "spiffe://cairn.test/kms/us-east/kms-1")
	rootkmsv1.RegisterRootKMSServer(srv, fake)
	addr := serve(t, srv)
	r := run(t, append([]string{"region", "create", "--region", "us-east", "--rootkms", addr, "--timeout", "2s"}, identityFlags(pki, regionctlID)...)...)
	if regions, _, _ := fake.calls(); r.code != 1 || len(regions) != 0 || !strings.Contains(r.stderr, "not on the allowlist") {
		t.Errorf("region create against a KMS = %d, %q, regions %v; want 1, not on the allowlist, none", r.code, r.stderr, regions)
	}
}
