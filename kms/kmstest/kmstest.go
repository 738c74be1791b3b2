// Package kmstest has test doubles and builders for the regional KMS: an
// in-memory RegionKeys (region key versions made with keysets.NewRegionKey,
// as the root KMS would), customer keysets the test controls, and signed
// bundles, so tests need neither a root KMS nor regionctl. Everything is
// real crypto; nothing here is for production.
package kmstest

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/keyset"
	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/keysets"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
)

// CreatedBy is the regionctl identity test bundles name; relative ACL
// patterns resolve in its trust domain, cairn.test.
const CreatedBy = "spiffe://cairn.test/regionctl/global/regionctl"

// RegionKeys is an in-memory kms.RegionKeys. Safe for concurrent use.
type RegionKeys struct {
	mu    sync.Mutex
	keys  map[string]map[uint32]tink.AEAD
	err   error
	calls int
}

// NewRegionKeys returns a RegionKeys with no regions.
func NewRegionKeys() *RegionKeys {
	return &RegionKeys{keys: map[string]map[uint32]tink.AEAD{}}
}

// AddVersion makes a new region key version of region (1, 2, ...) and
// returns its number.
func (r *RegionKeys) AddVersion(t testing.TB, region string) uint32 {
	t.Helper()
	m, err := keysets.NewRegionKey()
	if err != nil {
		t.Fatalf("keysets.NewRegionKey() = %v", err)
	}
	defer m.Wipe()
	a, err := keysets.RegionAEAD(m)
	if err != nil {
		t.Fatalf("keysets.RegionAEAD() = %v", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.keys[region] == nil {
		r.keys[region] = map[uint32]tink.AEAD{}
	}
	v := uint32(len(r.keys[region]) + 1)
	r.keys[region][v] = a
	return v
}

// Latest returns region's newest version, making version 1 if there is none.
func (r *RegionKeys) Latest(t testing.TB, region string) uint32 {
	t.Helper()
	r.mu.Lock()
	n := uint32(len(r.keys[region]))
	r.mu.Unlock()
	if n == 0 {
		return r.AddVersion(t, region)
	}
	return n
}

// AEAD returns the AEAD of a region key version.
func (r *RegionKeys) AEAD(t testing.TB, region string, version uint32) tink.AEAD {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.keys[region][version]
	if !ok {
		t.Fatalf("kmstest: no region key %s/%d", region, version)
	}
	return a
}

// Fail makes every Fetch fail with err until Fail(nil).
func (r *RegionKeys) Fail(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.err = err
}

// Calls returns how many times Fetch was called.
func (r *RegionKeys) Calls() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.calls
}

// Fetch implements kms.RegionKeys.
func (r *RegionKeys) Fetch(ctx context.Context, region string) (map[uint32]tink.AEAD, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls++
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if r.err != nil {
		return nil, r.err
	}
	m, ok := r.keys[region]
	if !ok {
		return nil, fmt.Errorf("kmstest: no region %q", region)
	}
	return maps.Clone(m), nil
}

// Keyset is a customer keyset whose plaintext the test holds (as the root
// KMS would), with its bundle config. Not safe for concurrent use.
type Keyset struct {
	Name string
	ACL  *bundlev1.Acl
	TTL  time.Duration
	// Template is the key template of new versions ("" : AES256_GCM).
	Template string
	// Region and RegionKeyVersion override what the bundle encrypts the
	// keyset for (zero: the bundle's region and its newest version).
	Region           string
	RegionKeyVersion uint32
	// TTLHistory, Lifecycle and Window are the record's Safety fields the
	// bundle carries (KeysetConfig.ttl_history, lifecycle and
	// propagation_window); nil and zero leave them out, as in a bundle built
	// before they existed.
	TTLHistory []*bundlev1.TtlPeriod
	Lifecycle  []*bundlev1.VersionLifecycle
	Window     *durationpb.Duration
	// EncryptLimit is the keyset's message budget (KeysetConfig.
	// encrypt_limit; 0: the KMS default). The recorded counts it is
	// measured against are Lifecycle's encrypt_count.
	EncryptLimit uint64
	// Destroyed is the bundle's destroyed_key_ids (the record's versions
	// destroyed through the lifecycle).
	Destroyed []uint32

	h *keyset.Handle
}

// DefaultTTL is a new Keyset's ciphertext TTL.
const DefaultTTL = 24 * time.Hour

// NewKeyset makes a keyset of one AES256_GCM key (TINK prefix) with the
// given ACL and DefaultTTL.
func NewKeyset(t testing.TB, name string, acl *bundlev1.Acl) *Keyset {
	t.Helper()
	h, err := keysets.Generate("")
	if err != nil {
		t.Fatalf("keysets.Generate = %v", err)
	}
	return &Keyset{Name: name, ACL: acl, TTL: DefaultTTL, h: h}
}

// ACL returns an ACL that gives every operation to the same patterns.
func ACL(patterns ...string) *bundlev1.Acl {
	return &bundlev1.Acl{Encrypt: patterns, Decrypt: patterns, GenerateDataKey: patterns, Rewrap: patterns}
}

// Handle returns the keyset's current plaintext handle.
func (k *Keyset) Handle() *keyset.Handle { return k.h }

// Primary returns the primary key ID.
func (k *Keyset) Primary() uint32 { return k.h.KeysetInfo().GetPrimaryKeyId() }

// AddVersion adds a new enabled, non-primary key and returns its ID.
func (k *Keyset) AddVersion(t testing.TB) uint32 {
	t.Helper()
	tmpl, err := keysets.Template(k.Template)
	if err != nil {
		t.Fatal(err)
	}
	var id uint32
	k.change(t, func(m *keyset.Manager) (err error) { id, err = m.Add(tmpl); return err })
	return id
}

// SetPrimary promotes key id.
func (k *Keyset) SetPrimary(t testing.TB, id uint32) {
	t.Helper()
	k.change(t, func(m *keyset.Manager) error { return m.SetPrimary(id) })
}

// Disable disables key id.
func (k *Keyset) Disable(t testing.TB, id uint32) {
	t.Helper()
	k.change(t, func(m *keyset.Manager) error { return m.Disable(id) })
}

// Delete removes key id.
func (k *Keyset) Delete(t testing.TB, id uint32) {
	t.Helper()
	k.change(t, func(m *keyset.Manager) error { return m.Delete(id) })
}

func (k *Keyset) change(t testing.TB, f func(*keyset.Manager) error) {
	t.Helper()
	m := keyset.NewManagerFromHandle(k.h)
	if err := f(m); err != nil {
		t.Fatalf("changing keyset %s: %v", k.Name, err)
	}
	h, err := m.Handle()
	if err != nil {
		t.Fatalf("keyset %s: Handle() = %v", k.Name, err)
	}
	k.h = h
}

// Config returns the keyset's bundle config for region, encrypted under
// region key version v of keys.
func (k *Keyset) Config(t testing.TB, keys *RegionKeys, region string, v uint32) *bundlev1.KeysetConfig {
	t.Helper()
	encRegion := region
	if k.Region != "" {
		encRegion = k.Region
	}
	if k.RegionKeyVersion != 0 {
		v = k.RegionKeyVersion
	}
	ek, err := keysets.Encrypt(k.h, k.Name, encRegion, v, keys.AEAD(t, encRegion, v))
	if err != nil {
		t.Fatal(err)
	}
	ek.Region = region // what the bundle claims; differs only when a test lies
	return &bundlev1.KeysetConfig{
		Name: k.Name, OwnerTeam: "team-" + k.Name, Purpose: bundlev1.Purpose_PURPOSE_ENVELOPE, Keyset: ek, Acl: k.ACL,
		RotationPeriod: durationpb.New(30 * 24 * time.Hour), CiphertextTtl: durationpb.New(k.TTL), Regions: []string{region},
		TtlHistory: k.TTLHistory, Lifecycle: k.Lifecycle, PropagationWindow: k.Window, EncryptLimit: k.EncryptLimit,
		DestroyedKeyIds: k.Destroyed,
	}
}

// Bundle compiles a bundle of region with the given serial holding kss, each
// encrypted under region's newest key version (made if there is none).
func Bundle(t testing.TB, keys *RegionKeys, region string, serial uint64, kss ...*Keyset) *bundlev1.Bundle {
	t.Helper()
	latest := keys.Latest(t, region)
	// A fixed created_at (stable bytes), or today once the clock passed it;
	// applicable for bundle.MaxValidity after it, so a test's bundle does
	// not expire under it (expiry tests set their own not_after).
	created := time.Unix(1_800_000_000, 0)
	if now := time.Now(); now.After(created) {
		created = now.Truncate(24 * time.Hour)
	}
	b := &bundlev1.Bundle{FormatVersion: bundle.FormatVersion, Region: region, Serial: serial,
		CreatedAt: timestamppb.New(created), NotAfter: timestamppb.New(created.Add(bundle.MaxValidity)), CreatedBy: CreatedBy}
	versions := map[uint32]bool{}
	for _, k := range kss {
		c := k.Config(t, keys, region, latest)
		versions[c.GetKeyset().GetRegionKeyVersion()] = true
		b.Keysets = append(b.Keysets, c)
	}
	if len(versions) == 0 {
		versions[latest] = true
	}
	b.RegionKeyVersions = slices.Sorted(maps.Keys(versions))
	slices.SortFunc(b.Keysets, func(x, y *bundlev1.KeysetConfig) int {
		switch {
		case x.GetName() < y.GetName():
			return -1
		case x.GetName() > y.GetName():
			return 1
		}
		return 0
	})
	return b
}

// Signer is a bundle-signing key pair.
type Signer struct {
	Public  ed25519.PublicKey
	private ed25519.PrivateKey
}

// NewSigner makes a signing key pair.
func NewSigner(t testing.TB) *Signer {
	t.Helper()
	pub, priv, err := bundle.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return &Signer{Public: pub, private: priv}
}

// Sign validates and signs b.
func (s *Signer) Sign(t testing.TB, b *bundlev1.Bundle) *bundlev1.SignedBundle {
	t.Helper()
	sb, err := bundle.Sign(b, s.private)
	if err != nil {
		t.Fatalf("bundle.Sign = %v", err)
	}
	return sb
}
