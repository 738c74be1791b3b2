package keystore_test

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/keyset"
	"github.com/tink-crypto/tink-go/v2/tink"
	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/internal/safety"
	"github.com/cairnkms/cairn/kms/keystore"
	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const region = "us-east"

var (
	app      = identity.MustParse("spiffe://cairn.test/client/us-east/app")
	intruder = identity.MustParse("spiffe://cairn.test/client/us-east/intruder")
	t0       = time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)
)

// fixture is a region with one key version and helpers to build stores.
type fixture struct {
	keys *kmstest.RegionKeys
}

func newFixture(t *testing.T) *fixture {
	f := &fixture{keys: kmstest.NewRegionKeys()}
	f.keys.AddVersion(t, region)
	return f
}

func (f *fixture) regionKeys(t *testing.T) map[uint32]tink.AEAD {
	t.Helper()
	m, err := f.keys.Fetch(t.Context(), region)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func (f *fixture) build(t *testing.T, prev *keystore.Store, kss ...*kmstest.Keyset) *keystore.Store {
	t.Helper()
	s, err := keystore.Build(kmstest.Bundle(t, f.keys, region, 1, kss...), f.regionKeys(t), prev, t0)
	if err != nil {
		t.Fatalf("Build = %v", err)
	}
	return s
}

func mustKeyset(t *testing.T, s *keystore.Store, name string) *keystore.Keyset {
	t.Helper()
	k, ok := s.Keyset(name)
	if !ok {
		t.Fatalf("Keyset(%q) missing", name)
	}
	return k
}

func TestBuildFromDecryptedKeyset(t *testing.T) {
	f := newFixture(t)
	ks := kmstest.NewKeyset(t, "payments/ledger", &bundlev1.Acl{Encrypt: []string{"client/us-east/app"}, Decrypt: []string{"spiffe://cairn.test/client/*/*"}})
	old := ks.Primary()
	added := ks.AddVersion(t)
	third := ks.AddVersion(t)
	ks.Disable(t, third)
	other := kmstest.NewKeyset(t, "search/index", nil)
	s := f.build(t, nil, ks, other)

	if got := s.Len(); got != 2 {
		t.Errorf("Len() = %d, want 2", got)
	}
	if got := []string{s.Keysets()[0].Name(), s.Keysets()[1].Name()}; got[0] != "payments/ledger" || got[1] != "search/index" {
		t.Errorf("Keysets() = %v, want sorted names", got)
	}
	k := mustKeyset(t, s, "payments/ledger")
	if got := k.Primary().KeyID(); got != old {
		t.Errorf("Primary() = %d, want %d", got, old)
	}
	if got := k.CiphertextTTL(); got != kmstest.DefaultTTL {
		t.Errorf("CiphertextTTL() = %v, want %v", got, kmstest.DefaultTTL)
	}
	for _, tt := range []struct {
		id   uint32
		want cryptov1.KeyStatus
	}{
		{old, cryptov1.KeyStatus_KEY_STATUS_PRIMARY},
		{added, cryptov1.KeyStatus_KEY_STATUS_ENABLED},
		{third, cryptov1.KeyStatus_KEY_STATUS_DISABLED},
	} {
		v, ok := k.Version(tt.id)
		if !ok || v.Status() != tt.want {
			t.Errorf("Version(%d) = %v, %v; want status %v", tt.id, v, ok, tt.want)
		}
	}
	if _, ok := s.Keyset("payments/other"); ok {
		t.Errorf(`Keyset("payments/other") found, want missing`)
	}

	acl := []struct {
		op   keystore.Op
		id   identity.ID
		want bool
	}{
		{keystore.OpEncrypt, app, true},
		{keystore.OpEncrypt, intruder, false},
		{keystore.OpDecrypt, intruder, true}, // client/*/*
		{keystore.OpGenerateDataKey, app, false},
		{keystore.OpRewrap, app, false},
		{keystore.OpEncrypt, identity.ID{}, false},
		{keystore.Op(99), app, false},
	}
	for _, tt := range acl {
		if got := k.Allows(tt.op, tt.id); got != tt.want {
			t.Errorf("Allows(%v, %v) = %v, want %v", tt.op, tt.id, got, tt.want)
		}
	}
	if got := mustKeyset(t, s, "search/index").Allows(keystore.OpDecrypt, app); got {
		t.Errorf("Allows on an empty ACL = true, want false (default deny)")
	}
}

func TestBuildRefuses(t *testing.T) {
	f := newFixture(t)
	otherKeys := kmstest.NewRegionKeys()
	otherKeys.AddVersion(t, region)
	otherKeys.AddVersion(t, "eu-west")
	tests := []struct {
		name   string
		mutate func(t *testing.T, b *bundlev1.Bundle)
		want   string
	}{
		{"wrong region key", func(t *testing.T, b *bundlev1.Bundle) {
			b.Keysets[0] = ks(t, "a/b").Config(t, otherKeys, region, 1)
		}, `keyset "a/b": region key version 1: keysets: encrypted keyset does not decrypt`},
		{"encrypted for another region", func(t *testing.T, b *bundlev1.Bundle) {
			k := ks(t, "a/b")
			k.Region = "eu-west"
			b.Keysets[0] = k.Config(t, otherKeys, region, 1)
		}, `keyset "a/b": region key version 1`},
		{"claims another region", func(t *testing.T, b *bundlev1.Bundle) {
			b.Keysets[0].Keyset.Region = "eu-west"
		}, `keyset "a/b": encrypted keyset is "a/b" for region "eu-west"`},
		{"renamed", func(t *testing.T, b *bundlev1.Bundle) {
			b.Keysets[0].Name = "a/c"
		}, `keyset "a/c": encrypted keyset is "a/b"`},
		{"region key version not held", func(t *testing.T, b *bundlev1.Bundle) {
			b.Keysets[0].Keyset.RegionKeyVersion = 7
		}, `region key version 7 is not available`},
		{"hint status lies", func(t *testing.T, b *bundlev1.Bundle) {
			b.Keysets[0].Keyset.Versions[1].Status = cryptov1.KeyStatus_KEY_STATUS_PRIMARY
		}, `public metadata says key`},
		{"hint id lies", func(t *testing.T, b *bundlev1.Bundle) {
			b.Keysets[0].Keyset.Versions[1].KeyId++
		}, `public key IDs do not match its contents`},
		{"hint drops a version", func(t *testing.T, b *bundlev1.Bundle) {
			b.Keysets[0].Keyset.Versions = b.Keysets[0].Keyset.Versions[:1]
		}, `public metadata`},
		{"tampered ciphertext", func(t *testing.T, b *bundlev1.Bundle) {
			c := b.Keysets[0].Keyset.Ciphertext
			c[len(c)-1] ^= 1
		}, `keyset "a/b": region key version 1`},
		{"zero TTL", func(t *testing.T, b *bundlev1.Bundle) {
			b.Keysets[0].CiphertextTtl = nil
		}, `ciphertext TTL must be positive`},
		{"bad ACL pattern", func(t *testing.T, b *bundlev1.Bundle) {
			b.Keysets[0].Acl = &bundlev1.Acl{Rewrap: []string{"client/us-*/app"}}
		}, `ACL rewrap`},
		{"no created_by", func(t *testing.T, b *bundlev1.Bundle) {
			b.CreatedBy = ""
		}, `created_by`},
		{"duplicate keyset", func(t *testing.T, b *bundlev1.Bundle) {
			b.Keysets = append(b.Keysets, b.Keysets[0])
		}, `keyset "a/b" appears twice`},
		{"RAW key", func(t *testing.T, b *bundlev1.Bundle) {
			h, err := keyset.NewHandle(aead.AES256GCMNoPrefixKeyTemplate())
			if err != nil {
				t.Fatal(err)
			}
			ek, err := keysets.Encrypt(h, "a/b", region, 1, f.keys.AEAD(t, region, 1))
			if err != nil {
				t.Fatal(err)
			}
			b.Keysets[0].Keyset = ek
		}, `only TINK-prefixed keys are served`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := ks(t, "a/b")
			k.AddVersion(t)
			b := kmstest.Bundle(t, f.keys, region, 1, k)
			tt.mutate(t, b)
			s, err := keystore.Build(b, f.regionKeys(t), nil, t0)
			if !errors.Is(err, keystore.ErrBuild) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Build(%s) = %v, %v; want ErrBuild containing %q", tt.name, s, err, tt.want)
			}
		})
	}
}

func ks(t *testing.T, name string) *kmstest.Keyset {
	return kmstest.NewKeyset(t, name, kmstest.ACL("client/us-east/app"))
}

func TestEncryptDecrypt(t *testing.T) {
	f := newFixture(t)
	k1 := ks(t, "payments/ledger")
	first := k1.Primary()
	second := k1.AddVersion(t)
	s1 := f.build(t, nil, k1)
	k := mustKeyset(t, s1, "payments/ledger")

	ct, v, err := k.Encrypt([]byte("dek"), []byte("ad"), t0)
	if err != nil || v.KeyID() != first {
		t.Fatalf("Encrypt = %v, %v; want primary %d", v, err, first)
	}
	if id, ok := keystore.KeyIDOf(ct); !ok || id != first {
		t.Errorf("KeyIDOf(ciphertext) = %d, %v; want %d", id, ok, first)
	}
	pt, v, err := k.Decrypt(ct, []byte("ad"), t0)
	if err != nil || !bytes.Equal(pt, []byte("dek")) || v.KeyID() != first {
		t.Fatalf("Decrypt = %q, %v, %v; want dek from %d", pt, v, err, first)
	}

	// Promote the second version and disable the first: old ciphertexts no
	// longer decrypt, new ones are made under the second.
	k1.SetPrimary(t, second)
	k1.Disable(t, first)
	s2 := f.build(t, s1, k1)
	k = mustKeyset(t, s2, "payments/ledger")
	ct2, v, err := k.Encrypt([]byte("dek"), nil, t0)
	if err != nil || v.KeyID() != second {
		t.Fatalf("Encrypt after promotion = %v, %v; want %d", v, err, second)
	}

	other := f.build(t, nil, ks(t, "payments/ledger"))
	otherCT, _, err := mustKeyset(t, other, "payments/ledger").Encrypt([]byte("dek"), []byte("ad"), t0)
	if err != nil {
		t.Fatal(err)
	}
	flipped := bytes.Clone(ct2)
	flipped[len(flipped)-1] ^= 1
	garbage := make([]byte, 64)
	rand.Read(garbage)
	garbage[0] = 0xff // no TINK prefix, so no key version named
	// A ciphertext naming a version the keyset does not hold enabled says
	// so (its key ID is in the clear); every other failure is the one
	// opaque ErrDecrypt.
	bad := []struct {
		name   string
		ct, ad []byte
		want   error
	}{
		{"disabled version", ct, []byte("ad"), keystore.ErrVersionGone},
		{"another keyset", otherCT, []byte("ad"), keystore.ErrVersionGone},
		{"wrong ad", ct2, []byte("ad"), keystore.ErrDecrypt},
		{"truncated", ct2[:len(ct2)-1], nil, keystore.ErrDecrypt},
		{"prefix only", ct2[:5], nil, keystore.ErrDecrypt},
		{"empty", nil, nil, keystore.ErrDecrypt},
		{"garbage", garbage, nil, keystore.ErrDecrypt},
		{"flipped", flipped, nil, keystore.ErrDecrypt},
		{"legacy prefix", append([]byte{0}, ct2[1:]...), nil, keystore.ErrDecrypt},
	}
	for _, tt := range bad {
		pt, _, err := k.Decrypt(tt.ct, tt.ad, t0)
		if pt != nil || !errors.Is(err, tt.want) || (tt.want == keystore.ErrDecrypt && err != keystore.ErrDecrypt) {
			t.Errorf("Decrypt(%s) = %q, %v; want %v", tt.name, pt, err, tt.want)
		}
		if tt.want == keystore.ErrVersionGone {
			id, _ := keystore.KeyIDOf(tt.ct)
			if !strings.Contains(err.Error(), fmt.Sprintf("key version %d", id)) {
				t.Errorf("Decrypt(%s) = %v; want the error to name key version %d", tt.name, err, id)
			}
		}
	}
	if pt, v, err := k.Decrypt(ct2, nil, t0); err != nil || v.KeyID() != second || string(pt) != "dek" {
		t.Errorf("Decrypt(new) = %q, %v, %v", pt, v, err)
	}
}

func TestUsageCarriesOverSwaps(t *testing.T) {
	f := newFixture(t)
	k1 := ks(t, "payments/ledger")
	first := k1.Primary()
	s1 := f.build(t, nil, k1)
	k := mustKeyset(t, s1, "payments/ledger")
	ct, _, _ := k.Encrypt([]byte("x"), nil, t0)
	k.Encrypt([]byte("x"), nil, t0.Add(time.Second))
	k.Decrypt(ct, nil, t0.Add(2*time.Second))
	k.ProbeDecrypt(ct, nil) // not a use

	second := k1.AddVersion(t)
	s2 := f.build(t, s1, k1)
	k = mustKeyset(t, s2, "payments/ledger")
	v1, _ := k.Version(first)
	want := keystore.UsageSnapshot{Encrypts: 2, Decrypts: 1, LastUse: t0.Add(2 * time.Second), LastEncrypt: t0.Add(time.Second)}
	if got := v1.Usage(); got != want {
		t.Errorf("Usage(%d) after swap = %+v, want %+v", first, got, want)
	}
	v2, _ := k.Version(second)
	if got := v2.Usage(); got != (keystore.UsageSnapshot{}) {
		t.Errorf("Usage(new version %d) = %+v, want zero", second, got)
	}
	// The counters are shared: a use through the new snapshot shows in the old.
	k.Decrypt(ct, nil, t0.Add(3*time.Second))
	old, _ := mustKeyset(t, s1, "payments/ledger").Version(first)
	if got := old.Usage().Decrypts; got != 2 {
		t.Errorf("Decrypts seen through the old snapshot = %d, want 2", got)
	}
	// A keyset dropped and added again starts afresh.
	s3 := f.build(t, s2)
	s4 := f.build(t, s3, k1)
	if v, _ := mustKeyset(t, s4, "payments/ledger").Version(first); v.Usage().Decrypts != 0 {
		t.Errorf("Usage after drop and re-add = %+v, want zero", v.Usage())
	}
}

func TestLastUseRoundsUp(t *testing.T) {
	f := newFixture(t)
	s := f.build(t, nil, ks(t, "a/b"))
	k := mustKeyset(t, s, "a/b")
	at := t0.Add(1500 * time.Microsecond)
	k.Encrypt(nil, nil, at)
	k.Encrypt(nil, nil, t0) // earlier: never moves last use back
	if got, want := k.Primary().Usage().LastUse, t0.Add(2*time.Millisecond); !got.Equal(want) {
		t.Errorf("LastUse = %v, want %v (rounded up, never back)", got, want)
	}
}

func TestCheck(t *testing.T) {
	const ttl = kmstest.DefaultTTL
	// Every keyset starts with its first version primary and a second one
	// decrypt-only, as a rotation leaves it before the promotion.
	type step func(t *testing.T, k *kmstest.Keyset, first, second uint32) []*kmstest.Keyset
	keep := func(t *testing.T, k *kmstest.Keyset, _, _ uint32) []*kmstest.Keyset { return []*kmstest.Keyset{k} }
	dropKeyset := func(*testing.T, *kmstest.Keyset, uint32, uint32) []*kmstest.Keyset { return nil }
	promoteAndDelete := func(t *testing.T, k *kmstest.Keyset, first, second uint32) []*kmstest.Keyset {
		k.SetPrimary(t, second)
		k.Delete(t, first)
		return []*kmstest.Keyset{k}
	}
	promoteAndDisable := func(t *testing.T, k *kmstest.Keyset, first, second uint32) []*kmstest.Keyset {
		k.SetPrimary(t, second)
		k.Disable(t, first)
		return []*kmstest.Keyset{k}
	}
	addAndPromote := func(t *testing.T, k *kmstest.Keyset, _, _ uint32) []*kmstest.Keyset {
		k.SetPrimary(t, k.AddVersion(t))
		return []*kmstest.Keyset{k}
	}
	tests := []struct {
		name   string
		used   bool
		now    time.Duration // after the use
		change step
		want   string // "" : safe
	}{
		{"unchanged", true, 0, keep, ""},
		{"keyset dropped in TTL", true, time.Hour, dropKeyset, "cannot leave the decrypt set"},
		{"version deleted in TTL", true, ttl - time.Second, promoteAndDelete, "cannot leave the decrypt set"},
		{"version disabled in TTL", true, time.Minute, promoteAndDisable, "cannot leave the decrypt set"},
		{"version deleted after TTL", true, ttl + time.Second, promoteAndDelete, ""},
		{"keyset dropped after TTL", true, ttl + time.Hour, dropKeyset, ""},
		{"never used", false, 0, promoteAndDelete, ""},
		{"added and promoted at once", false, 0, addAndPromote, "ship it decrypt-only first"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			k := ks(t, "payments/ledger")
			first := k.Primary()
			second := k.AddVersion(t)
			cur := f.build(t, nil, k)
			if tt.used {
				mustKeyset(t, cur, "payments/ledger").Encrypt([]byte("x"), nil, t0)
			}
			next := f.build(t, cur, tt.change(t, k, first, second)...)
			err := keystore.Check(region, cur, keystore.History{}, next, t0.Add(tt.now))
			if tt.want == "" {
				if err != nil {
					t.Errorf("Check = %v, want nil", err)
				}
				return
			}
			var r *safety.Refusal
			if !errors.As(err, &r) || !errors.Is(err, keystore.ErrUnsafe) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Check = %v, want a safety.Refusal containing %q", err, tt.want)
			}
			if tt.used {
				if r.Keyset != "payments/ledger" || r.KeyID != first || !r.Earliest.Equal(t0.Add(ttl+time.Nanosecond)) {
					t.Errorf("Check refusal = %+v, want version %d, earliest %v", r, first, t0.Add(ttl+time.Nanosecond))
				}
				for _, part := range []string{`keyset "payments/ledger"`, fmt.Sprintf("version %d", first), "encrypted with it at 2026-11-01T12:00:00Z",
					"effective TTL 24h0m0s", "earliest safe time 2026-11-02T12:00:01Z"} {
					if !strings.Contains(err.Error(), part) {
						t.Errorf("Check error %q does not say %q", err, part)
					}
				}
			}
		})
	}
	if err := keystore.Check(region, nil, keystore.History{}, newFixture(t).build(t, nil, ks(t, "a/b")), t0); err != nil {
		t.Errorf("Check(nothing served, next) = %v, want nil", err)
	}
}

// TestCheckDecryptCountsAgainstTheWindow: the TTL runs from the last
// encryption; a decryption near the end of the TTL makes no ciphertext and
// holds a retirement back only for the window (the simulated year found a
// server refusing every later bundle of its region for a whole TTL when
// decryptions counted as encryptions).
func TestCheckDecryptCountsAgainstTheWindow(t *testing.T) {
	const ttl = kmstest.DefaultTTL
	f := newFixture(t)
	k := ks(t, "payments/ledger")
	first := k.Primary()
	second := k.AddVersion(t)
	cur := f.build(t, nil, k)
	served := mustKeyset(t, cur, "payments/ledger")
	ct, _, err := served.Encrypt([]byte("x"), nil, t0)
	if err != nil {
		t.Fatal(err)
	}
	readAt := t0.Add(ttl - time.Hour)
	if _, _, err := served.Decrypt(ct, nil, readAt); err != nil {
		t.Fatal(err)
	}
	k.SetPrimary(t, second)
	k.Disable(t, first)
	next := f.build(t, cur, k)
	if err := keystore.Check(region, cur, keystore.History{}, next, readAt); err == nil || !strings.Contains(err.Error(), "used it at") {
		t.Errorf("Check at the decryption = %v, want a refusal for the use within the window", err)
	}
	if err := keystore.Check(region, cur, keystore.History{}, next, t0.Add(ttl+time.Second)); err != nil {
		t.Errorf("Check after the encryption's TTL, an hour after a decryption = %v, want nil", err)
	}
}

func TestCheckUsesLongerTTL(t *testing.T) {
	f := newFixture(t)
	k := ks(t, "a/b")
	first := k.Primary()
	second := k.AddVersion(t)
	cur := f.build(t, nil, k)
	mustKeyset(t, cur, "a/b").Decrypt(nil, nil, t0) // a failed decrypt is not a use
	mustKeyset(t, cur, "a/b").Encrypt(nil, nil, t0)
	k.TTL = 48 * time.Hour // the new bundle lengthens the TTL
	k.SetPrimary(t, second)
	k.Delete(t, first)
	next := f.build(t, cur, k)
	if err := keystore.Check(region, cur, keystore.History{}, next, t0.Add(30*time.Hour)); !errors.Is(err, keystore.ErrUnsafe) {
		t.Errorf("Check 30h after use with TTL 24h→48h = %v, want ErrUnsafe", err)
	}
}

// TestCheckTTLCutThenDrop: a TTL cut counts for retirement only once the
// old TTL has passed since the cut (the store carries its own TTL history).
func TestCheckTTLCutThenDrop(t *testing.T) {
	f := newFixture(t)
	k := ks(t, "a/b")
	k.TTL = 90 * 24 * time.Hour
	s1 := f.build(t, nil, k)
	mustKeyset(t, s1, "a/b").Encrypt(nil, nil, t0)
	k.TTL = time.Second
	s2, err := keystore.Build(kmstest.Bundle(t, f.keys, region, 2, k), f.regionKeys(t), s1, t0.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := mustKeyset(t, s2, "a/b").EffectiveTTL(t0.Add(time.Hour+2*time.Second)), 90*24*time.Hour; got != want {
		t.Errorf("EffectiveTTL just after the cut = %v, want %v", got, want)
	}
	if got, want := mustKeyset(t, s2, "a/b").EffectiveTTL(t0.Add(time.Hour+90*24*time.Hour)), time.Second; got != want {
		t.Errorf("EffectiveTTL once the old TTL passed since the cut = %v, want %v", got, want)
	}
	drop := f.build(t, s2)
	if err := keystore.Check(region, s2, keystore.History{}, drop, t0.Add(time.Hour+2*time.Second)); !errors.Is(err, keystore.ErrUnsafe) ||
		!strings.Contains(err.Error(), "effective TTL 2160h0m0s") {
		t.Errorf("Check(drop 2s after a 90d→1s cut) = %v, want a refusal with effective TTL 2160h", err)
	}
}

func TestManyRefusalsAreSummarised(t *testing.T) {
	f := newFixture(t)
	var kss []*kmstest.Keyset
	for _, n := range []string{"a/1", "a/2", "a/3", "a/4", "a/5", "a/6", "a/7"} {
		kss = append(kss, ks(t, n))
	}
	cur := f.build(t, nil, kss...)
	for _, k := range cur.Keysets() {
		k.Encrypt(nil, nil, t0)
	}
	err := keystore.Check(region, cur, keystore.History{}, f.build(t, cur), t0)
	var rs safety.Refusals
	if !errors.As(err, &rs) || len(rs) != 7 || !strings.HasSuffix(err.Error(), " | and 2 more") {
		t.Errorf("Check(dropping 7 used keysets) = %v, want 7 refusals, 5 listed", err)
	}
}

// The request path's keystore part (lookup, ACL, usage) must not allocate.
func TestRequestPathDoesNotAllocate(t *testing.T) {
	f := newFixture(t)
	src := ks(t, "payments/ledger")
	s := f.build(t, nil, src)
	k := mustKeyset(t, s, "payments/ledger")
	bare, err := aead.New(src.Handle())
	if err != nil {
		t.Fatal(err)
	}
	ct, _, err := k.Encrypt([]byte("0123456789abcdef0123456789abcdef"), nil, t0)
	if err != nil {
		t.Fatal(err)
	}
	name := "payments/ledger"
	allocs := testing.AllocsPerRun(100, func() {
		k, ok := s.Keyset(name)
		if !ok || !k.Allows(keystore.OpDecrypt, app) || k.Allows(keystore.OpDecrypt, intruder) {
			t.Fatal("lookup or ACL failed")
		}
		id, _ := keystore.KeyIDOf(ct)
		v, _ := k.Version(id)
		_ = v.Decrypts()
	})
	if allocs != 0 {
		t.Errorf("lookup + ACL + routing allocs = %v, want 0", allocs)
	}
	// Decrypt allocates only what the AEAD does.
	aeadOnly := testing.AllocsPerRun(100, func() { bare.Decrypt(ct, nil) })
	full := testing.AllocsPerRun(100, func() { k.Decrypt(ct, nil, t0) })
	if full > aeadOnly {
		t.Errorf("Keyset.Decrypt allocs = %v, want at most the AEAD's %v", full, aeadOnly)
	}
}

func FuzzDecrypt(f *testing.F) {
	fx := &fixture{keys: kmstest.NewRegionKeys()}
	fx.keys.AddVersion(f, region)
	k1 := kmstest.NewKeyset(f, "fuzz/keyset", nil)
	second := k1.AddVersion(f)
	k1.Disable(f, second)
	m, err := fx.keys.Fetch(f.Context(), region)
	if err != nil {
		f.Fatal(err)
	}
	s, err := keystore.Build(kmstest.Bundle(f, fx.keys, region, 1, k1), m, nil, t0)
	if err != nil {
		f.Fatal(err)
	}
	k, _ := s.Keyset("fuzz/keyset")
	ct, _, err := k.Encrypt([]byte("seed"), []byte("ad"), t0)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(ct, []byte("ad"))
	f.Add(ct[:5], []byte(nil))
	f.Add([]byte{1, 0, 0, 0, 0}, []byte("ad"))
	f.Add([]byte{}, []byte{})
	f.Fuzz(func(t *testing.T, c, ad []byte) {
		pt, v, err := k.Decrypt(c, ad, t0)
		if err != nil {
			if (err != keystore.ErrDecrypt && !errors.Is(err, keystore.ErrVersionGone)) || pt != nil {
				t.Fatalf("Decrypt(%x, %x) = %q, %v; want nil, ErrDecrypt or ErrVersionGone", c, ad, pt, err)
			}
			return
		}
		// Only the seed's ciphertext (or one the fuzzer cannot forge) opens.
		if !bytes.Equal(c, ct) || !bytes.Equal(ad, []byte("ad")) || string(pt) != "seed" || v.KeyID() != k.Primary().KeyID() {
			t.Fatalf("Decrypt(%x, %x) = %q, %v; a forged ciphertext decrypted", c, ad, pt, v)
		}
	})
}

// TestSharedACLsStayPerKeyset builds many keysets whose ACLs repeat, and
// some whose pattern lists would collide if joined with a separator: each
// keyset still answers with its own ACL, and a list holding an invalid
// pattern is refused even after a valid look-alike was parsed.
func TestSharedACLsStayPerKeyset(t *testing.T) {
	f := newFixture(t)
	var kss []*kmstest.Keyset
	for i := range 200 { // enough for Build to use several workers
		acl := &bundlev1.Acl{Encrypt: []string{"client/us-east/app"}}
		if i%2 == 1 {
			acl = &bundlev1.Acl{Encrypt: []string{"client/us-east/intruder"}}
		}
		kss = append(kss, kmstest.NewKeyset(t, fmt.Sprintf("team/k%03d", i), acl))
	}
	s := f.build(t, nil, kss...)
	for i := range 200 {
		k := mustKeyset(t, s, fmt.Sprintf("team/k%03d", i))
		if got, want := k.Allows(keystore.OpEncrypt, app), i%2 == 0; got != want {
			t.Errorf("keyset %d: Allows(encrypt, app) = %v, want %v", i, got, want)
		}
		if got, want := k.Allows(keystore.OpEncrypt, intruder), i%2 == 1; got != want {
			t.Errorf("keyset %d: Allows(encrypt, intruder) = %v, want %v", i, got, want)
		}
	}

	// ["client/us-east/app", "client/us-east/intruder"] is valid; the one
	// pattern "client/us-east/app\nclient/us-east/intruder" is not.
	valid := kmstest.NewKeyset(t, "team/a", &bundlev1.Acl{Decrypt: []string{"client/us-east/app", "client/us-east/intruder"}})
	joined := kmstest.NewKeyset(t, "team/b", &bundlev1.Acl{Decrypt: []string{"client/us-east/app\nclient/us-east/intruder"}})
	b := kmstest.Bundle(t, f.keys, region, 1, valid, joined)
	if _, err := keystore.Build(b, f.regionKeys(t), nil, t0); !errors.Is(err, keystore.ErrBuild) || !strings.Contains(err.Error(), "team/b") {
		t.Errorf("Build(an ACL pattern holding a newline after its look-alike) = %v, want ErrBuild naming team/b", err)
	}
}

// TestUsageRecordsOutliveTheStore: a store's usage, as records, seeds a
// fresh store of the same keysets (a restarted server) and drives the same
// Safety check as the live history does.
func TestUsageRecordsOutliveTheStore(t *testing.T) {
	f := newFixture(t)
	k1 := ks(t, "payments/ledger")
	first := k1.Primary()
	second := k1.AddVersion(t)
	unused := ks(t, "search/index")
	s1 := f.build(t, nil, k1, unused)
	k := mustKeyset(t, s1, "payments/ledger")
	ct, _, _ := k.Encrypt([]byte("x"), nil, t0)
	k.Decrypt(ct, nil, t0.Add(time.Second))

	recs := s1.UsageRecords(t0)
	want := []keystore.UsageRecord{{Keyset: "payments/ledger", KeyID: first, Decrypting: true, TTL: kmstest.DefaultTTL,
		EncryptCount: 1, DecryptCount: 1, LastUse: t0.Add(time.Second), LastEncrypt: t0}}
	if diff := cmp.Diff(want, recs); diff != "" {
		t.Fatalf("UsageRecords() mismatch (-want +got):\n%s", diff)
	}

	// A restart: a fresh store of the same bundle, seeded.
	s2 := f.build(t, nil, k1, unused)
	s2.RestoreUsage(append(recs, keystore.UsageRecord{Keyset: "gone/keyset", KeyID: 7, Decrypting: true, LastUse: t0}))
	v, _ := mustKeyset(t, s2, "payments/ledger").Version(first)
	if got := v.Usage(); got != (keystore.UsageSnapshot{Encrypts: 1, Decrypts: 1, LastUse: t0.Add(time.Second), LastEncrypt: t0}) {
		t.Errorf("restored usage = %+v, want 1 encrypt, 1 decrypt, last use t0+1s, last encrypt t0", got)
	}
	// Restoring never moves the last use back, adds counts, and keeps a
	// lost history lost.
	s2.RestoreUsage([]keystore.UsageRecord{{Keyset: "payments/ledger", KeyID: first, EncryptCount: 2, LastUse: t0, HistoryLost: true}})
	if got := v.Usage(); got.Encrypts != 3 || !got.LastUse.Equal(t0.Add(time.Second)) || !got.HistoryLost {
		t.Errorf("usage after a second restore = %+v, want 3 encrypts, last use t0+1s, history lost", got)
	}

	// The records refuse a bundle dropping the version within its TTL, as
	// the live store does; after the TTL they do not.
	k1.SetPrimary(t, second)
	k1.Delete(t, first)
	next := f.build(t, s1, k1)
	now := t0.Add(time.Hour)
	liveErr, fromRecords := keystore.Check(region, s1, keystore.History{}, next, now), keystore.Check(region, nil, keystore.History{Usage: recs}, next, now)
	if !errors.Is(liveErr, keystore.ErrUnsafe) || !errors.Is(fromRecords, keystore.ErrUnsafe) {
		t.Errorf("Check(served) = %v\nCheck(records) = %v\nwant both refused", liveErr, fromRecords)
	}
	if err := keystore.Check(region, nil, keystore.History{Usage: recs}, next, t0.Add(2*time.Second+kmstest.DefaultTTL)); err != nil {
		t.Errorf("Check(records) after the TTL = %v, want nil", err)
	}
	// A record of a version that did not decrypt is no reason to refuse.
	notDecrypting := []keystore.UsageRecord{{Keyset: "payments/ledger", KeyID: first, Decrypting: false, TTL: kmstest.DefaultTTL, LastUse: t0}}
	if err := keystore.Check(region, nil, keystore.History{Usage: notDecrypting}, next, now); err != nil {
		t.Errorf("Check(a record of a non-decrypting version) = %v, want nil", err)
	}
}

// TestEncryptDoesNotAllocateMore: tracking the last encryption adds no
// allocation to Keyset.Encrypt beyond the AEAD's own.
func TestEncryptDoesNotAllocateMore(t *testing.T) {
	f := newFixture(t)
	src := ks(t, "payments/ledger")
	s := f.build(t, nil, src)
	k := mustKeyset(t, s, "payments/ledger")
	bare, err := aead.New(src.Handle())
	if err != nil {
		t.Fatal(err)
	}
	pt := []byte("0123456789abcdef0123456789abcdef")
	aeadOnly := testing.AllocsPerRun(100, func() { bare.Encrypt(pt, nil) })
	now := t0
	full := testing.AllocsPerRun(100, func() {
		now = now.Add(time.Millisecond) // a new millisecond: the last-encrypt word is written
		k.Encrypt(pt, nil, now)
	})
	if full > aeadOnly {
		t.Errorf("Keyset.Encrypt allocs = %v, want at most the AEAD's %v", full, aeadOnly)
	}
	if got := k.Primary().Usage().LastEncrypt; !got.Equal(now) {
		t.Errorf("LastEncrypt = %v, want %v", got, now)
	}
}
