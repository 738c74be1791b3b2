package keystore_test

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"testing"

	"github.com/tink-crypto/tink-go/v2/aead"

	"github.com/cairnkms/cairn/kms/keystore"
	"github.com/cairnkms/cairn/kms/kmstest"
)

// rotated is a keyset that went through rotations: an AES256_GCM key
// retired from primary (still enabled), an AES128_GCM key, an
// XCHACHA20_POLY1305 key (served through Tink's AEAD, not crypto/cipher),
// a disabled key, a deleted key, and a fresh AES256_GCM primary. It returns
// the keyset, the enabled key IDs, the disabled one and the deleted one.
func rotated(t *testing.T) (ks *kmstest.Keyset, enabled []uint32, disabled, deleted uint32) {
	t.Helper()
	ks = kmstest.NewKeyset(t, "payments/ledger", kmstest.ACL("client/us-east/app"))
	first := ks.Primary()
	ks.Template = "AES128_GCM"
	small := ks.AddVersion(t)
	ks.Template = "XCHACHA20_POLY1305"
	xchacha := ks.AddVersion(t)
	ks.Template = ""
	disabled = ks.AddVersion(t)
	deleted = ks.AddVersion(t)
	primary := ks.AddVersion(t)
	ks.SetPrimary(t, primary)
	return ks, []uint32{first, small, xchacha, primary}, disabled, deleted
}

// underKey encrypts pt with key id of h alone, as Tink does (TINK prefix).
func underKey(t *testing.T, ks *kmstest.Keyset, id uint32, pt, ad []byte) []byte {
	t.Helper()
	copyKS := *ks
	copyKS.SetPrimary(t, id)
	a, err := aead.New(copyKS.Handle())
	if err != nil {
		t.Fatal(err)
	}
	ct, err := a.Encrypt(pt, ad)
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

// TestBatchInteroperatesWithTink: what a Batch seals, Tink's AEAD opens,
// and what Tink seals under any enabled version, a Batch opens, with the
// same ciphertext format (5-byte TINK prefix, nonce, ciphertext, tag).
func TestBatchInteroperatesWithTink(t *testing.T) {
	f := newFixture(t)
	for _, template := range []string{"AES256_GCM", "AES128_GCM", "AES256_GCM_SIV", "CHACHA20_POLY1305", "XCHACHA20_POLY1305"} {
		t.Run(template, func(t *testing.T) {
			ks := kmstest.NewKeyset(t, "payments/ledger", kmstest.ACL("client/us-east/app"))
			ks.Template = template
			id := ks.AddVersion(t)
			ks.SetPrimary(t, id)
			k := mustKeyset(t, f.build(t, nil, ks), "payments/ledger")
			tinkAEAD, err := aead.New(ks.Handle())
			if err != nil {
				t.Fatal(err)
			}
			pt, ad := make([]byte, 32), []byte("object 7")
			_, _ = rand.Read(pt)

			b := k.NewBatch(2, t0)
			head := []byte("earlier item")
			buf, v, err := b.EncryptAppend(bytes.Clone(head), pt, ad)
			if err != nil || v.KeyID() != id {
				t.Fatalf("EncryptAppend = %v, %v; want key %d", v, err, id)
			}
			if !bytes.Equal(buf[:len(head)], head) {
				t.Fatalf("EncryptAppend overwrote what dst held: %q", buf[:len(head)])
			}
			ct := buf[len(head):]
			if want := append([]byte{1}, binary.BigEndian.AppendUint32(nil, id)...); !bytes.Equal(ct[:5], want) {
				t.Errorf("ciphertext prefix = %x, want %x", ct[:5], want)
			}
			if template == "AES256_GCM" || template == "AES128_GCM" {
				if got, want := len(ct), len(pt)+keystore.AESGCMOverhead; got != want {
					t.Errorf("ciphertext is %d bytes, want %d (prefix, 12-byte nonce, plaintext, 16-byte tag)", got, want)
				}
			}
			if got, err := tinkAEAD.Decrypt(ct, ad); err != nil || !bytes.Equal(got, pt) {
				t.Errorf("Tink Decrypt(batch ciphertext) = %x, %v; want %x", got, err, pt)
			}
			if _, err := tinkAEAD.Decrypt(ct, []byte("object 8")); err == nil {
				t.Errorf("Tink Decrypt(batch ciphertext, other associated data) succeeded")
			}

			fromTink, err := tinkAEAD.Encrypt(pt, ad)
			if err != nil {
				t.Fatal(err)
			}
			out, v, err := b.DecryptAppend(nil, fromTink, ad)
			if err != nil || v.KeyID() != id || !bytes.Equal(out, pt) {
				t.Errorf("DecryptAppend(Tink ciphertext) = %x, %v, %v; want %x under %d", out, v, err, pt, id)
			}
			b.Done()
		})
	}
}

// TestBatchRoutesByKeyID: in one batch, items under every enabled version
// (the retired AES-GCM keys, the XChaCha key, the primary), in an order
// that switches versions, each decrypt under their own; the disabled and
// the deleted versions are refused exactly as Keyset.Decrypt refuses them;
// garbage, tampering and wrong associated data are ErrDecrypt; a failure
// leaves dst as it was; and the uses counted per version are what Decrypt
// would count.
func TestBatchRoutesByKeyID(t *testing.T) {
	f := newFixture(t)
	ks, enabled, disabled, deleted := rotated(t)
	ad := []byte("ad")
	type item struct {
		ct, pt []byte
		want   uint32 // the version that decrypts it; 0: an error
	}
	var items []item
	for round := range 3 {
		for _, id := range enabled {
			pt := []byte(fmt.Sprintf("dek %d of key %d", round, id))
			items = append(items, item{ct: underKey(t, ks, id, pt, ad), pt: pt, want: id})
			items = append(items, item{ct: underKey(t, ks, id, pt, ad), pt: pt, want: id}) // a run of two
		}
	}
	goneCT := underKey(t, ks, deleted, []byte("x"), ad)
	disabledCT := underKey(t, ks, disabled, []byte("x"), ad)
	ks.Disable(t, disabled)
	ks.Delete(t, deleted)
	k := mustKeyset(t, f.build(t, nil, ks), "payments/ledger")
	if got := k.Primary().KeyID(); got != enabled[len(enabled)-1] {
		t.Fatalf("primary = %d, want %d", got, enabled[len(enabled)-1])
	}

	tampered := bytes.Clone(items[0].ct)
	tampered[len(tampered)-1] ^= 1
	bad := []struct {
		name string
		ct   []byte
		ad   []byte
	}{
		{"deleted version", goneCT, ad},
		{"disabled version", disabledCT, ad},
		{"tampered", tampered, ad},
		{"wrong associated data", items[0].ct, []byte("other")},
		{"truncated", items[0].ct[:20], ad},
		{"prefix only", items[0].ct[:5], ad},
		{"empty", nil, ad},
		{"legacy prefix", append([]byte{0}, items[0].ct[1:]...), ad},
	}

	before := map[uint32]uint64{}
	for _, id := range enabled {
		v, _ := k.Version(id)
		before[id] = v.Usage().Decrypts
	}
	b := k.NewBatch(len(items)+len(bad), t0)
	var buf []byte
	counted := map[uint32]uint64{}
	for i, it := range items {
		start := len(buf)
		var v *keystore.Version
		var err error
		buf, v, err = b.DecryptAppend(buf, it.ct, ad)
		if err != nil || v.KeyID() != it.want || !bytes.Equal(buf[start:], it.pt) {
			t.Errorf("item %d: DecryptAppend = %q, %v, %v; want %q under %d", i, buf[start:], v, err, it.pt, it.want)
		}
		counted[it.want]++
		// A bad item between good ones: refused, dst untouched.
		c := bad[i%len(bad)]
		_, wantV, wantErr := k.ProbeDecrypt(c.ct, c.ad)
		out, gotV, err := b.DecryptAppend(buf, c.ct, c.ad)
		if err == nil {
			t.Fatalf("%s: DecryptAppend succeeded", c.name)
		}
		if len(out) != len(buf) {
			t.Errorf("%s: DecryptAppend grew dst from %d to %d bytes on failure", c.name, len(buf), len(out))
		}
		if err.Error() != wantErr.Error() || errors.Is(err, keystore.ErrDecrypt) != errors.Is(wantErr, keystore.ErrDecrypt) ||
			errors.Is(err, keystore.ErrVersionGone) != errors.Is(wantErr, keystore.ErrVersionGone) {
			t.Errorf("%s: DecryptAppend error = %v, want Keyset.Decrypt's %v", c.name, err, wantErr)
		}
		if gotV != wantV {
			t.Errorf("%s: DecryptAppend version = %v, want Keyset.Decrypt's %v", c.name, gotV, wantV)
		}
	}
	b.Done()
	for _, id := range enabled {
		v, _ := k.Version(id)
		if got := v.Usage().Decrypts - before[id]; got != counted[id] {
			t.Errorf("version %d decryptions counted = %d, want %d", id, got, counted[id])
		}
		if got := v.Usage().LastUse; got.Before(t0) {
			t.Errorf("version %d last use = %v, want at least %v", id, got, t0)
		}
	}
}

// TestBatchEncryptsUnderThePrimary: after rotations, a batch seals under
// the new primary only, each item with a fresh nonce, and counts each
// encryption against the primary's message budget.
func TestBatchEncryptsUnderThePrimary(t *testing.T) {
	f := newFixture(t)
	ks, enabled, _, _ := rotated(t)
	k := mustKeyset(t, f.build(t, nil, ks), "payments/ledger")
	primary := enabled[len(enabled)-1]
	tinkAEAD, err := aead.New(ks.Handle())
	if err != nil {
		t.Fatal(err)
	}
	const n = 50 // more than the nonce pool the batch was sized for
	b := k.NewBatch(n/2, t0)
	var buf []byte
	var cts [][]byte
	nonces := map[string]bool{}
	for i := range n {
		pt := []byte(fmt.Sprint("dek ", i))
		start := len(buf)
		var v *keystore.Version
		buf, v, err = b.EncryptAppend(buf, pt, nil)
		if err != nil || v.KeyID() != primary {
			t.Fatalf("EncryptAppend %d = %v, %v; want the primary %d", i, v, err, primary)
		}
		ct := buf[start:]
		nonces[string(ct[5:17])] = true
		cts = append(cts, ct)
	}
	b.Done()
	if len(nonces) != n {
		t.Errorf("%d distinct nonces in %d ciphertexts", len(nonces), n)
	}
	for i, ct := range cts {
		if id, _ := keystore.KeyIDOf(ct); id != primary {
			t.Errorf("ciphertext %d names key %d, want the primary %d", i, id, primary)
		}
		if pt, err := tinkAEAD.Decrypt(ct, nil); err != nil || string(pt) != fmt.Sprint("dek ", i) {
			t.Errorf("Tink Decrypt(ciphertext %d) = %q, %v", i, pt, err)
		}
	}
	if got := k.Primary().Usage().Encrypts; got != n {
		t.Errorf("primary encryptions counted = %d, want %d", got, n)
	}
}

// TestBatchDoesNotAllocate: with room in dst, sealing and opening an
// AES-GCM item allocates nothing (the nonce pool is read once per batch).
func TestBatchDoesNotAllocate(t *testing.T) {
	f := newFixture(t)
	k := mustKeyset(t, f.build(t, nil, ks(t, "payments/ledger")), "payments/ledger")
	pt, ad := make([]byte, 32), make([]byte, 16)
	const runs = 100
	b := k.NewBatch(runs+2, t0)
	ct, _, err := b.EncryptAppend(nil, pt, ad)
	if err != nil {
		t.Fatal(err)
	}
	enc := make([]byte, 0, 256)
	if n := testing.AllocsPerRun(runs, func() {
		if _, _, err := b.EncryptAppend(enc, pt, ad); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("EncryptAppend allocs = %v, want 0", n)
	}
	dec := make([]byte, 0, 256)
	if n := testing.AllocsPerRun(runs, func() {
		if _, _, err := b.DecryptAppend(dec, ct, ad); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("DecryptAppend allocs = %v, want 0", n)
	}
	b.Done()
}

// TestBatchMessageBudget: a batch stops encrypting once the primary's
// message budget is spent, with Keyset.Encrypt's error, and leaves dst as
// it was.
func TestBatchMessageBudget(t *testing.T) {
	f := newFixture(t)
	k := mustKeyset(t, f.build(t, nil, budgeted(ks(t, "payments/ledger"), 3, nil)), "payments/ledger")
	b := k.NewBatch(5, t0)
	var buf []byte
	for i := range 5 {
		out, v, err := b.EncryptAppend(buf, []byte("dek"), nil)
		if i < 3 {
			if err != nil {
				t.Fatalf("EncryptAppend %d = %v, want success within the budget", i, err)
			}
			buf = out
			continue
		}
		if !errors.Is(err, keystore.ErrBudget) || v != k.Primary() || len(out) != len(buf) {
			t.Errorf("EncryptAppend %d = %d bytes, %v, %v; want ErrBudget naming the primary, dst unchanged", i, len(out), v, err)
		}
	}
	b.Done()
}
