package keystore_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/tink-crypto/tink-go/v2/aead"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/kms/keystore"
	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
)

// budgeted is a keyset with message budget limit whose record counts
// recorded[id] encryptions for version id.
func budgeted(k *kmstest.Keyset, limit uint64, recorded map[uint32]uint64) *kmstest.Keyset {
	k.EncryptLimit = limit
	k.Lifecycle = nil
	for _, ki := range k.Handle().KeysetInfo().GetKeyInfo() {
		k.Lifecycle = append(k.Lifecycle, &bundlev1.VersionLifecycle{KeyId: ki.GetKeyId(), EncryptCount: recorded[ki.GetKeyId()]})
	}
	return k
}

// encryptN encrypts n times with k and returns how many succeeded before
// the first error, and that error.
func encryptN(k *keystore.Keyset, n int) (int, error) {
	for i := range n {
		if _, _, err := k.Encrypt([]byte("dek"), nil, t0); err != nil {
			return i, err
		}
	}
	return n, nil
}

func TestMessageBudget(t *testing.T) {
	tests := []struct {
		name     string
		limit    uint64
		recorded uint64
		ok       int // encryptions that succeed before the first refusal
	}{
		{"limit 5, recorded 2", 5, 2, 3},
		{"limit 1, none recorded", 1, 0, 1},
		{"recorded at the limit", 5, 5, 0},
		{"recorded past the limit", 5, 9, 0},
		{"recorded one short", 5, 4, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			src := ks(t, "payments/ledger")
			s := f.build(t, nil, budgeted(src, tt.limit, map[uint32]uint64{src.Primary(): tt.recorded}))
			k := mustKeyset(t, s, "payments/ledger")
			ok, err := encryptN(k, tt.ok+2)
			if ok != tt.ok || !errors.Is(err, keystore.ErrBudget) {
				t.Fatalf("encryptions with limit %d, recorded %d = %d then %v, want %d then ErrBudget", tt.limit, tt.recorded, ok, err, tt.ok)
			}
			want := fmt.Sprintf(`keyset "payments/ledger" version %d reached its AES-GCM message budget (limit %d encryptions)`, src.Primary(), tt.limit)
			if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "regionctl keyset rotate payments/ledger") {
				t.Errorf("refusal = %q, want it to contain %q and the rotate command", err, want)
			}
			// A refused encryption is no use: the counter stays.
			if got := k.Primary().Usage().Encrypts; got != uint64(tt.ok) {
				t.Errorf("Encrypts after refusals = %d, want %d", got, tt.ok)
			}
			if used, limit := k.Primary().Budget(); used != max(tt.recorded, tt.limit) || limit != tt.limit {
				t.Errorf("Budget() = %d, %d, want %d, %d", used, limit, max(tt.recorded, tt.limit), tt.limit)
			}
		})
	}
}

func TestMessageBudgetDefault(t *testing.T) {
	f := newFixture(t)
	src := ks(t, "payments/ledger")
	s := f.build(t, nil, src) // encrypt_limit 0, no lifecycle: a bundle of before the budget
	k := mustKeyset(t, s, "payments/ledger")
	if _, _, err := k.Encrypt([]byte("dek"), nil, t0); err != nil {
		t.Fatalf("Encrypt = %v", err)
	}
	if used, limit := k.Primary().Budget(); used != 1 || limit != bundle.DefaultEncryptLimit {
		t.Errorf("Budget() = %d, %d, want 1, %d", used, limit, bundle.DefaultEncryptLimit)
	}
}

// An exhausted version still decrypts, and a bundle promoting the next
// version restores encryption.
func TestMessageBudgetRotation(t *testing.T) {
	f := newFixture(t)
	src := ks(t, "payments/ledger")
	first := src.Primary()
	s1 := f.build(t, nil, budgeted(src, 5, map[uint32]uint64{first: 2}))
	k := mustKeyset(t, s1, "payments/ledger")
	var cts [][]byte
	for range 3 {
		ct, _, err := k.Encrypt([]byte("dek"), nil, t0)
		if err != nil {
			t.Fatalf("Encrypt = %v", err)
		}
		cts = append(cts, ct)
	}
	if _, _, err := k.Encrypt([]byte("dek"), nil, t0); !errors.Is(err, keystore.ErrBudget) {
		t.Fatalf("4th Encrypt = %v, want ErrBudget", err)
	}

	// The next version added (decrypt-only): still refused.
	second := src.AddVersion(t)
	s2 := f.build(t, s1, budgeted(src, 5, map[uint32]uint64{first: 2}))
	k = mustKeyset(t, s2, "payments/ledger")
	if _, _, err := k.Encrypt([]byte("dek"), nil, t0); !errors.Is(err, keystore.ErrBudget) {
		t.Errorf("Encrypt with the new version not yet primary = %v, want ErrBudget", err)
	}
	// Promoted: encryption works again, under the new version.
	src.SetPrimary(t, second)
	s3 := f.build(t, s2, budgeted(src, 5, map[uint32]uint64{first: 5}))
	k = mustKeyset(t, s3, "payments/ledger")
	ct, v, err := k.Encrypt([]byte("dek"), nil, t0)
	if err != nil || v.KeyID() != second {
		t.Fatalf("Encrypt after promotion = version %v, %v, want version %d", v, err, second)
	}
	for i, c := range append(cts, ct) {
		if pt, _, err := k.Decrypt(c, nil, t0); err != nil || string(pt) != "dek" {
			t.Errorf("Decrypt(ciphertext %d) = %q, %v, want dek", i, pt, err)
		}
	}
}

// What a snapshot counted is carried to the next: a bundle built from an
// older record (a rollback, a stale observation) does not hand back spent
// budget; a newer record's higher count wins.
func TestMessageBudgetCarried(t *testing.T) {
	tests := []struct {
		name      string
		recorded  uint64 // in the second bundle
		ok        int    // encryptions the second snapshot allows
		wantUsed1 uint64
	}{
		{"stale record", 0, 1, 4},       // carried: 1 recorded + 3 of this server
		{"same record", 1, 1, 4},        // carried
		{"record caught up", 4, 1, 4},   // the record counts this server's 3
		{"record counts more", 5, 0, 5}, // other servers encrypted too
		{"record far past the limit", 9, 0, 9},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			src := ks(t, "payments/ledger")
			id := src.Primary()
			s1 := f.build(t, nil, budgeted(src, 5, map[uint32]uint64{id: 1}))
			if ok, err := encryptN(mustKeyset(t, s1, "payments/ledger"), 3); err != nil {
				t.Fatalf("encryptions = %d, %v, want 3", ok, err)
			}
			s2 := f.build(t, s1, budgeted(src, 5, map[uint32]uint64{id: tt.recorded}))
			k := mustKeyset(t, s2, "payments/ledger")
			if used, _ := k.Primary().Budget(); used != tt.wantUsed1 {
				t.Errorf("Budget() used = %d, want %d", used, tt.wantUsed1)
			}
			if ok, _ := encryptN(k, 3); ok != tt.ok {
				t.Errorf("encryptions allowed after the rebuild = %d, want %d", ok, tt.ok)
			}
		})
	}
}

// Usage restored from an earlier run (the persisted history) is history,
// not encryptions since the bundle was applied: it does not eat the
// budget.
func TestMessageBudgetRestoredUsage(t *testing.T) {
	f := newFixture(t)
	src := ks(t, "payments/ledger")
	id := src.Primary()
	s := f.build(t, nil, budgeted(src, 5, map[uint32]uint64{id: 2}))
	unmatched := s.RestoreUsage([]keystore.UsageRecord{{Keyset: "payments/ledger", KeyID: id, Decrypting: true, TTL: kmstest.DefaultTTL,
		EncryptCount: 1000, LastUse: t0, LastEncrypt: t0}})
	if len(unmatched) != 0 {
		t.Fatalf("RestoreUsage left %v unmatched", unmatched)
	}
	k := mustKeyset(t, s, "payments/ledger")
	if used, _ := k.Primary().Budget(); used != 2 {
		t.Errorf("Budget() used after restoring 1000 encryptions = %d, want the recorded 2", used)
	}
	if ok, err := encryptN(k, 5); ok != 3 || !errors.Is(err, keystore.ErrBudget) {
		t.Errorf("encryptions = %d then %v, want 3 then ErrBudget", ok, err)
	}
	if got := k.Primary().Usage().Encrypts; got != 1003 {
		t.Errorf("Encrypts = %d, want 1003 (restored history + 3)", got)
	}
}

// TestMessageBudgetCheckDoesNotAllocate: the budget check adds no
// allocation to Keyset.Encrypt beyond the AEAD's own.
func TestMessageBudgetCheckDoesNotAllocate(t *testing.T) {
	f := newFixture(t)
	src := ks(t, "payments/ledger")
	s := f.build(t, nil, budgeted(src, 1<<40, map[uint32]uint64{src.Primary(): 7}))
	k := mustKeyset(t, s, "payments/ledger")
	bare, err := aead.New(src.Handle())
	if err != nil {
		t.Fatal(err)
	}
	pt := []byte("0123456789abcdef0123456789abcdef")
	aeadOnly := testing.AllocsPerRun(100, func() { bare.Encrypt(pt, nil) })
	full := testing.AllocsPerRun(100, func() { k.Encrypt(pt, nil, t0) })
	t.Logf("allocs: AEAD %v, Keyset.Encrypt with a budget %v", aeadOnly, full)
	if full > aeadOnly {
		t.Errorf("Keyset.Encrypt allocs = %v, want at most the AEAD's %v", full, aeadOnly)
	}
}

// BenchmarkKeysetEncrypt is Keyset.Encrypt of a 32-byte DEK, budget check
// included, beside the bare AEAD.
func BenchmarkKeysetEncrypt(b *testing.B) {
	f := &fixture{keys: kmstest.NewRegionKeys()}
	f.keys.AddVersion(b, region)
	src := kmstest.NewKeyset(b, "payments/ledger", nil)
	m, err := f.keys.Fetch(b.Context(), region)
	if err != nil {
		b.Fatal(err)
	}
	s, err := keystore.Build(kmstest.Bundle(b, f.keys, region, 1, src), m, nil, t0)
	if err != nil {
		b.Fatal(err)
	}
	k, _ := s.Keyset("payments/ledger")
	bare, err := aead.New(src.Handle())
	if err != nil {
		b.Fatal(err)
	}
	pt := make([]byte, 32)
	b.Run("aead", func(b *testing.B) {
		for b.Loop() {
			bare.Encrypt(pt, nil)
		}
	})
	b.Run("keyset", func(b *testing.B) {
		for b.Loop() {
			k.Encrypt(pt, nil, t0)
		}
	})
	b.Run("keyset-parallel", func(b *testing.B) {
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				k.Encrypt(pt, nil, t0)
			}
		})
	})
}
