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
	"github.com/tink-crypto/tink-go/v2/keyset"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/internal/keysets"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// fakeRootKMS keeps a keyset record like the root KMS does (real keysets,
// encrypted under test region keys), without Raft or the Safety Condition,
// and records calls. refuse, if set, refuses every UpdateKeyset step it
// names with FAILED_PRECONDITION.
type fakeRootKMS struct {
	rootkmsv1.UnimplementedRootKMSServer
	keys   *regionKeys
	refuse map[statev1.KeysetStep]string

	mu       sync.Mutex
	regions  []string
	records  map[string]*statev1.KeysetRecord
	handles  map[string]*keyset.Handle
	created  []*rootkmsv1.CreateKeysetRequest
	updates  []*rootkmsv1.UpdateKeysetRequest
	recorded []*rootkmsv1.RecordPropagationRequest
	callers  []string
	// floors are the bundle serial floors recorded, by region.
	floors map[string]uint64
}

func (f *fakeRootKMS) RecordBundleSerial(ctx context.Context, req *rootkmsv1.RecordBundleSerialRequest) (*rootkmsv1.Region, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record(ctx)
	if f.floors == nil {
		f.floors = map[string]uint64{}
	}
	f.floors[req.GetRegion()] = max(f.floors[req.GetRegion()], req.GetSerial())
	return &rootkmsv1.Region{Name: req.GetRegion(), BundleSerialFloor: f.floors[req.GetRegion()]}, nil
}

// ListRollouts answers that no rollout is in flight: the fake keeps no
// rollout records (bundle push asks before it changes a region).
func (f *fakeRootKMS) ListRollouts(ctx context.Context, _ *rootkmsv1.ListRolloutsRequest) (*rootkmsv1.ListRolloutsResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record(ctx)
	return &rootkmsv1.ListRolloutsResponse{}, nil
}

// floor returns the bundle serial floor recorded for region.
func (f *fakeRootKMS) floor(region string) uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.floors[region]
}

var fakeNow = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

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
	return f.region(req.GetRegion()), nil
}

func (f *fakeRootKMS) region(name string) *rootkmsv1.Region {
	now := timestamppb.New(fakeNow)
	return &rootkmsv1.Region{Name: name, PrimaryVersion: 1, CreatedAt: now, CommitIndex: 17,
		Versions: []*cryptov1.KeyVersionInfo{{KeyId: 1, Status: cryptov1.KeyStatus_KEY_STATUS_PRIMARY, CreatedAt: now}}}
}

func (f *fakeRootKMS) ListRegions(ctx context.Context, _ *rootkmsv1.ListRegionsRequest) (*rootkmsv1.ListRegionsResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := &rootkmsv1.ListRegionsResponse{}
	for _, r := range f.regions {
		out.Regions = append(out.Regions, f.region(r))
	}
	return out, nil
}

func (f *fakeRootKMS) encrypt(name string, regions []string, h *keyset.Handle) ([]*cryptov1.EncryptedKeyset, error) {
	var out []*cryptov1.EncryptedKeyset
	for _, r := range regions {
		aead, ok := f.keys.get(r, 1)
		if !ok {
			return nil, status.Errorf(codes.NotFound, "rootkms: no region %q", r)
		}
		ek, err := keysets.Encrypt(h, name, r, 1, aead)
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		out = append(out, ek)
	}
	return out, nil
}

func (f *fakeRootKMS) CreateKeyset(ctx context.Context, req *rootkmsv1.CreateKeysetRequest) (*rootkmsv1.Keyset, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record(ctx)
	f.created = append(f.created, req)
	if _, ok := f.records[req.GetName()]; ok {
		return nil, status.Errorf(codes.AlreadyExists, "rootkms: keyset %q exists", req.GetName())
	}
	h, err := keysets.Generate(req.GetTemplate())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	regions := slices.Sorted(slices.Values(req.GetRegions()))
	copies, err := f.encrypt(req.GetName(), regions, h)
	if err != nil {
		return nil, err
	}
	now := timestamppb.New(fakeNow)
	rec := &statev1.KeysetRecord{Name: req.GetName(), Regions: regions, CreatedAt: now, RotationPeriod: req.GetRotationPeriod(),
		TtlHistory: []*statev1.TtlPeriod{{Ttl: req.GetCiphertextTtl(), From: now}},
		Versions: []*statev1.KeysetVersionRecord{{KeyId: h.KeysetInfo().GetPrimaryKeyId(), State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY,
			Template: req.GetTemplate(), CreatedAt: now, PrimarySince: now}},
		Copies: copies, Revision: 1, Purpose: 1}
	if f.records == nil {
		f.records, f.handles = map[string]*statev1.KeysetRecord{}, map[string]*keyset.Handle{}
	}
	f.records[req.GetName()], f.handles[req.GetName()] = rec, h
	return &rootkmsv1.Keyset{Record: proto.CloneOf(rec)}, nil
}

func (f *fakeRootKMS) answer(rec *statev1.KeysetRecord, copies bool) *rootkmsv1.Keyset {
	c := proto.CloneOf(rec)
	if !copies {
		c.Copies = nil
	}
	return &rootkmsv1.Keyset{Record: c}
}

func (f *fakeRootKMS) GetKeyset(ctx context.Context, req *rootkmsv1.GetKeysetRequest) (*rootkmsv1.Keyset, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	rec, ok := f.records[req.GetName()]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: no keyset %q", req.GetName())
	}
	return f.answer(rec, req.GetIncludeCopies()), nil
}

func (f *fakeRootKMS) ListKeysets(ctx context.Context, req *rootkmsv1.ListKeysetsRequest) (*rootkmsv1.ListKeysetsResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if req.GetRegion() != "" && !slices.Contains(f.regions, req.GetRegion()) {
		return nil, status.Errorf(codes.NotFound, "rootkms: no region %q", req.GetRegion())
	}
	out := &rootkmsv1.ListKeysetsResponse{}
	for _, name := range slices.Sorted(func(yield func(string) bool) {
		for k := range f.records {
			if !yield(k) {
				return
			}
		}
	}) {
		rec := f.records[name]
		if req.GetRegion() == "" || slices.Contains(rec.GetRegions(), req.GetRegion()) {
			out.Keysets = append(out.Keysets, f.answer(rec, req.GetIncludeCopies()))
		}
	}
	return out, nil
}

func (f *fakeRootKMS) UpdateKeyset(ctx context.Context, req *rootkmsv1.UpdateKeysetRequest) (*rootkmsv1.Keyset, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record(ctx)
	f.updates = append(f.updates, req)
	if msg, ok := f.refuse[req.GetStep()]; ok {
		return nil, status.Error(codes.FailedPrecondition, msg)
	}
	rec, ok := f.records[req.GetName()]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: no keyset %q", req.GetName())
	}
	m := keyset.NewManagerFromHandle(f.handles[rec.GetName()])
	now := timestamppb.New(fakeNow)
	switch req.GetStep() {
	case statev1.KeysetStep_KEYSET_STEP_ADD_VERSION:
		t, err := keysets.Template(req.GetTemplate())
		if err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		id, err := m.Add(t)
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		rec.Versions = append(rec.Versions, &statev1.KeysetVersionRecord{KeyId: id, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED, CreatedAt: now})
	case statev1.KeysetStep_KEYSET_STEP_PROMOTE:
		if err := m.SetPrimary(req.GetKeyId()); err != nil {
			return nil, status.Error(codes.FailedPrecondition, err.Error())
		}
		for _, v := range rec.Versions {
			switch {
			case v.GetKeyId() == req.GetKeyId():
				v.State, v.PrimarySince = statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY, now
			case v.GetState() == statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY:
				v.State, v.SupersededAt = statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED, now
			}
		}
	default:
		return nil, status.Errorf(codes.Unimplemented, "fake: step %v", req.GetStep())
	}
	h, err := m.Handle()
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	f.handles[rec.GetName()] = h
	if rec.Copies, err = f.encrypt(rec.GetName(), rec.GetRegions(), h); err != nil {
		return nil, err
	}
	rec.Revision++
	return f.answer(rec, false), nil
}

func (f *fakeRootKMS) SetKeysetPolicy(ctx context.Context, req *rootkmsv1.SetKeysetPolicyRequest) (*rootkmsv1.Keyset, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	rec, ok := f.records[req.GetName()]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: no keyset %q", req.GetName())
	}
	if req.GetRotationPeriod() != nil {
		rec.RotationPeriod = req.GetRotationPeriod()
	}
	if req.GetCiphertextTtl() != nil {
		now := timestamppb.New(fakeNow)
		rec.TtlHistory[len(rec.TtlHistory)-1].Until = now
		rec.TtlHistory = append(rec.TtlHistory, &statev1.TtlPeriod{Ttl: req.GetCiphertextTtl(), From: now})
	}
	rec.Revision++
	return f.answer(rec, false), nil
}

func (f *fakeRootKMS) RecordPropagation(ctx context.Context, req *rootkmsv1.RecordPropagationRequest) (*rootkmsv1.RecordPropagationResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.recorded = append(f.recorded, req)
	return &rootkmsv1.RecordPropagationResponse{}, nil
}

func (f *fakeRootKMS) calls() (created []*rootkmsv1.CreateKeysetRequest, updates []*rootkmsv1.UpdateKeysetRequest, recorded []*rootkmsv1.RecordPropagationRequest, callers []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.created), slices.Clone(f.updates), slices.Clone(f.recorded), slices.Clone(f.callers)
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
	r = mustRun(t, append([]string{"region", "list"}, rootFlags...)...)
	contains(t, "region list", r.stdout, "REGION", "us-east", "eu-west")

	dir := t.TempDir()
	teams := filepath.Join(dir, "teams")
	writeFile(t, filepath.Join(teams, "payments.json"), paymentsTeam)
	writeFile(t, filepath.Join(teams, "search.json"), searchTeam)
	writeFile(t, filepath.Join(teams, "ads.json"), brokenTeam)
	ksFlags := append([]string{"--teams", teams}, rootFlags...)

	r = mustRun(t, append([]string{"keyset", "create", "--only", "search/index"}, ksFlags...)...)
	contains(t, "keyset create --only stdout", r.stdout, "created keyset search/index (team search, CHACHA20_POLY1305, primary key ", "for us-east", "1 created, 0 already in the record, 0 failed")
	r = mustRun(t, append([]string{"keyset", "create"}, ksFlags...)...)
	contains(t, "keyset create stdout", r.stdout,
		"created keyset payments/eu-only (team payments, AES256_GCM, primary key ", "created keyset payments/ledger", "for eu-west, us-east", "created keyset payments/new",
		"exists: keyset search/index", "3 created, 1 already in the record, 0 failed")
	contains(t, "keyset create stderr", r.stderr, "WARNING: 1 team config file(s) are invalid", "ads.json", "no keyset of theirs is created")
	r = mustRun(t, append([]string{"keyset", "create"}, ksFlags...)...)
	contains(t, "keyset create (again) stdout", r.stdout, "0 created, 4 already in the record, 0 failed")

	created, _, _, callers := fake.calls()
	var names []string
	for _, g := range created {
		names = append(names, g.GetName())
	}
	if want := []string{"search/index", "payments/eu-only", "payments/ledger", "payments/new"}; !cmp.Equal(names, want) {
		t.Errorf("CreateKeyset calls = %v, want %v (never one for an existing name)", names, want)
	}
	if g := created[2]; !cmp.Equal(g.GetRegions(), []string{"us-east", "eu-west"}) || g.GetTemplate() != "AES256_GCM" ||
		g.GetCiphertextTtl().AsDuration() != 8760*time.Hour || g.GetRotationPeriod().AsDuration() != 2160*time.Hour {
		t.Errorf("CreateKeyset(payments/ledger) = %v, want regions [us-east eu-west], AES256_GCM, TTL 8760h, rotation 2160h", g)
	}
	for _, c := range callers {
		if c != regionctlID {
			t.Errorf("root KMS saw caller %q, want %q", c, regionctlID)
		}
	}

	r = mustRun(t, append([]string{"keyset", "list"}, rootFlags...)...)
	contains(t, "keyset list", r.stdout, "payments/ledger", "eu-west,us-east", "8760h0m0s", "search/index")
	r = mustRun(t, append([]string{"keyset", "show", "payments/ledger"}, rootFlags...)...)
	contains(t, "keyset show", r.stdout, "keyset payments/ledger (revision 1", "ciphertext TTL: 8760h0m0s", "TTL history:", "primary", "AES256_GCM")
	r = mustRun(t, append([]string{"keyset", "show", "payments/ledger", "--json"}, rootFlags...)...)
	contains(t, "keyset show --json", r.stdout, `"name": "payments/ledger"`)

	// Errors.
	r = run(t, append([]string{"keyset", "create", "--only", "payments/unknown"}, ksFlags...)...)
	if r.code != 1 || !strings.Contains(r.stderr, `keyset "payments/unknown" is not in any valid team config`) {
		t.Errorf("keyset create --only unknown = %d, %q; want 1, not in any valid team config", r.code, r.stderr)
	}
	writeFile(t, filepath.Join(teams, "maps.json"), `{"team":"maps","keysets":[{"name":"maps/tiles","regions":["ap-south"],"purpose":"envelope","rotation_period":"1h","ciphertext_ttl":"1h"}]}`)
	r = run(t, append([]string{"keyset", "create"}, ksFlags...)...)
	if r.code != 1 || !strings.Contains(r.stderr, `creating maps/tiles: rpc error: code = NotFound desc = rootkms: no region "ap-south"`) || !strings.Contains(r.stdout, "0 created, 4 already in the record, 1 failed") {
		t.Errorf("keyset create (unknown region) = %d, %q, %q; want 1 with the root KMS's NotFound", r.code, r.stdout, r.stderr)
	}
}

// TestKeysetStepsAndRefusals: lifecycle steps go to UpdateKeyset; a refusal
// from the root KMS is printed as is, exit 1.
func TestKeysetStepsAndRefusals(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	refusal := `rootkms: safety: keyset "payments/new" version 7 cannot leave the decrypt set: region us-east server kms-2 used it at 2026-03-01T10:00:00Z; earliest safe time 2026-03-01T10:10:00Z`
	fake := &fakeRootKMS{keys: &regionKeys{}, refuse: map[statev1.KeysetStep]string{statev1.KeysetStep_KEYSET_STEP_DISABLE: refusal}}
	addr := startFakeRootKMS(t, pki, fake)
	rootFlags := append([]string{"--rootkms", addr}, identityFlags(pki, regionctlID)...)
	mustRun(t, append([]string{"region", "create", "--region", "us-east"}, rootFlags...)...)
	teams := filepath.Join(t.TempDir(), "teams")
	writeFile(t, filepath.Join(teams, "search.json"), searchTeam)
	mustRun(t, append([]string{"keyset", "create", "--teams", teams}, rootFlags...)...)

	r := mustRun(t, append([]string{"keyset", "rotate", "search/index"}, rootFlags...)...)
	contains(t, "keyset rotate", r.stdout, "added version ", "(enabled, decrypt-only)", "revision 2")
	r = run(t, append([]string{"keyset", "disable", "search/index", "--version", "7"}, rootFlags...)...)
	if r.code != 1 || !strings.Contains(r.stderr, "REFUSED by the root KMS: "+refusal) {
		t.Errorf("keyset disable (refused) = %d, %q; want 1 with the refusal as is", r.code, r.stderr)
	}
	r = run(t, append([]string{"keyset", "promote", "search/index"}, rootFlags...)...)
	if r.code != 2 || !strings.Contains(r.stderr, "--version is required") {
		t.Errorf("keyset promote without --version = %d, %q; want 2", r.code, r.stderr)
	}
	mustRun(t, append([]string{"keyset", "set-policy", "search/index", "--ttl", "24h"}, rootFlags...)...)
	_, updates, _, _ := fake.calls()
	if len(updates) != 2 || updates[0].GetStep() != statev1.KeysetStep_KEYSET_STEP_ADD_VERSION || updates[1].GetStep() != statev1.KeysetStep_KEYSET_STEP_DISABLE || updates[1].GetKeyId() != 7 {
		t.Errorf("UpdateKeyset calls = %v, want ADD_VERSION then DISABLE 7", updates)
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
	if _, _, _, callers := fake.calls(); r.code != 1 || len(callers) != 0 || !strings.Contains(r.stderr, "not on the allowlist") {
		t.Errorf("region create against a KMS = %d, %q, callers %v; want 1, not on the allowlist, none", r.code, r.stderr, callers)
	}
}
