// Package safetest is the conformance suite every safe.Safe implementation
// passes, in the manner of testing/fstest: Run(t, newHarness) checks the
// whole contract against a fresh safe per subtest.
package safetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"

	"github.com/cairnkms/cairn/internal/secret"
	"github.com/cairnkms/cairn/safe"
)

// Harness gives the suite a fresh, empty safe and raw access to its storage,
// so it can check what is stored and simulate tampering.
type Harness struct {
	// Safe is a fresh, empty safe.
	Safe safe.Safe
	// Reopen opens a second Safe over the same storage (as a restarted
	// process would) after the suite closed the first.
	Reopen func(t *testing.T) safe.Safe
	// ReadRaw returns the bytes stored for ref (the encoded SealedShare),
	// failing the test if there are none.
	ReadRaw func(t *testing.T, ref safe.ShareRef) []byte
	// WriteRaw stores data as the record for ref, replacing any.
	WriteRaw func(t *testing.T, ref safe.ShareRef, data []byte)
}

const gid = "00112233445566778899aabbccddeeff"

func ref(i uint32) safe.ShareRef { return safe.ShareRef{GenesisID: gid, Epoch: 0, Index: i} }

// shareBytes is a recognisable 33-byte share (the size vault/shamir makes
// for a 32-byte secret).
func shareBytes(i uint32) []byte {
	b := bytes.Repeat([]byte{0xC0 ^ byte(i)}, 33)
	copy(b, fmt.Sprintf("SHARE-%02d-", i))
	return b
}

func share(i uint32) secret.Bytes { return secret.New(shareBytes(i)) }

// Run runs the conformance suite.
func Run(t *testing.T, newHarness func(t *testing.T) Harness) {
	ctx := context.Background()
	open := func(t *testing.T) Harness {
		t.Helper()
		h := newHarness(t)
		t.Cleanup(func() { h.Safe.Close() })
		return h
	}

	t.Run("identity", func(t *testing.T) {
		h := open(t)
		if h.Safe.Label() == "" {
			t.Errorf("Label() = \"\", want a name")
		}
		if k := h.Safe.Kind(); k != safe.KindPKCS11 && k != safe.KindInsecureFile {
			t.Errorf("Kind() = %q, want %q or %q", k, safe.KindPKCS11, safe.KindInsecureFile)
		}
	})

	t.Run("round trip", func(t *testing.T) {
		h := open(t)
		for i := uint32(1); i <= 3; i++ {
			if err := h.Safe.Seal(ctx, ref(i), share(i)); err != nil {
				t.Fatalf("Seal(%v) = %v", ref(i), err)
			}
		}
		for i := uint32(1); i <= 3; i++ {
			got, err := h.Safe.Unseal(ctx, ref(i))
			if err != nil {
				t.Fatalf("Unseal(%v) = %v", ref(i), err)
			}
			if !got.Equal(share(i)) {
				t.Errorf("Unseal(%v) returned another share", ref(i))
			}
		}
	})

	t.Run("no plaintext in storage", func(t *testing.T) {
		h := open(t)
		if err := h.Safe.Seal(ctx, ref(1), share(1)); err != nil {
			t.Fatal(err)
		}
		raw := h.ReadRaw(t, ref(1))
		if bytes.Contains(raw, shareBytes(1)[:12]) || bytes.Contains(raw, shareBytes(1)[12:]) {
			t.Errorf("stored record for %v contains share plaintext", ref(1))
		}
		if _, err := safe.DecodeSealed(raw, ref(1)); err != nil {
			t.Errorf("stored record is not a valid SealedShare: %v", err)
		}
	})

	t.Run("fresh nonce per seal", func(t *testing.T) {
		h := open(t)
		s := share(1)
		if err := h.Safe.Seal(ctx, ref(1), s); err != nil {
			t.Fatal(err)
		}
		if err := h.Safe.Seal(ctx, ref(2), s); err != nil {
			t.Fatal(err)
		}
		a, _ := safe.DecodeSealed(h.ReadRaw(t, ref(1)), ref(1))
		b, _ := safe.DecodeSealed(h.ReadRaw(t, ref(2)), ref(2))
		if a == nil || b == nil || bytes.Equal(a.GetNonce(), b.GetNonce()) {
			t.Errorf("two seals used the same nonce")
		}
	})

	t.Run("never overwrites", func(t *testing.T) {
		h := open(t)
		if err := h.Safe.Seal(ctx, ref(1), share(1)); err != nil {
			t.Fatal(err)
		}
		if err := h.Safe.Seal(ctx, ref(1), share(2)); !errors.Is(err, safe.ErrExists) {
			t.Fatalf("second Seal(%v) = %v, want ErrExists", ref(1), err)
		}
		got, err := h.Safe.Unseal(ctx, ref(1))
		if err != nil || !got.Equal(share(1)) {
			t.Errorf("after a refused overwrite Unseal = %v, want the original share", err)
		}
	})

	t.Run("not found", func(t *testing.T) {
		h := open(t)
		if _, err := h.Safe.Unseal(ctx, ref(9)); !errors.Is(err, safe.ErrNotFound) {
			t.Errorf("Unseal(missing) = %v, want ErrNotFound", err)
		}
		if err := h.Safe.Destroy(ctx, ref(9)); !errors.Is(err, safe.ErrNotFound) {
			t.Errorf("Destroy(missing) = %v, want ErrNotFound", err)
		}
	})

	t.Run("bad input stores nothing", func(t *testing.T) {
		h := open(t)
		bad := []struct {
			name  string
			ref   safe.ShareRef
			share secret.Bytes
		}{
			{"empty genesis id", safe.ShareRef{Index: 1}, share(1)},
			{"uppercase genesis id", safe.ShareRef{GenesisID: "00112233445566778899AABBCCDDEEFF", Index: 1}, share(1)},
			{"index 0", safe.ShareRef{GenesisID: gid}, share(1)},
			{"index 256", safe.ShareRef{GenesisID: gid, Index: 256}, share(1)},
			{"empty share", ref(1), secret.Bytes{}},
		}
		for _, b := range bad {
			if err := h.Safe.Seal(ctx, b.ref, b.share); err == nil {
				t.Errorf("Seal(%s) = nil, want error", b.name)
			}
			if _, err := h.Safe.Unseal(ctx, b.ref); err == nil {
				t.Errorf("Unseal(%s) = nil error, want error", b.name)
			}
		}
		refs, err := h.Safe.List(ctx)
		if err != nil || len(refs) != 0 {
			t.Errorf("List after refused seals = %v, %v, want none", refs, err)
		}
	})

	t.Run("list and destroy", func(t *testing.T) {
		h := open(t)
		other := safe.ShareRef{GenesisID: "ffeeddccbbaa99887766554433221100", Epoch: 2, Index: 5}
		for _, r := range []safe.ShareRef{ref(1), ref(2), other} {
			if err := h.Safe.Seal(ctx, r, share(r.Index)); err != nil {
				t.Fatal(err)
			}
		}
		assertRefs(t, h.Safe, ref(1), ref(2), other)
		if err := h.Safe.Destroy(ctx, ref(1)); err != nil {
			t.Fatalf("Destroy = %v", err)
		}
		assertRefs(t, h.Safe, ref(2), other)
		if _, err := h.Safe.Unseal(ctx, ref(1)); !errors.Is(err, safe.ErrNotFound) {
			t.Errorf("Unseal(destroyed) = %v, want ErrNotFound", err)
		}
		// A destroyed slot can be sealed again (rekey reuses nothing, but
		// nothing forbids it).
		if err := h.Safe.Seal(ctx, ref(1), share(3)); err != nil {
			t.Errorf("Seal after Destroy = %v", err)
		}
	})

	t.Run("tampered record", func(t *testing.T) {
		h := open(t)
		if err := h.Safe.Seal(ctx, ref(1), share(1)); err != nil {
			t.Fatal(err)
		}
		raw := h.ReadRaw(t, ref(1))
		rec, err := safe.DecodeSealed(raw, ref(1))
		if err != nil {
			t.Fatal(err)
		}
		flip := func(b []byte, i int) []byte { b = bytes.Clone(b); b[i] ^= 0x01; return b }
		cases := map[string][]byte{
			"ciphertext bit":  mustEncode(t, ref(1), rec.GetKeyLabel(), rec.GetNonce(), flip(rec.GetCiphertext(), 3)),
			"tag bit":         mustEncode(t, ref(1), rec.GetKeyLabel(), rec.GetNonce(), flip(rec.GetCiphertext(), len(rec.GetCiphertext())-1)),
			"nonce bit":       mustEncode(t, ref(1), rec.GetKeyLabel(), flip(rec.GetNonce(), 0), rec.GetCiphertext()),
			"truncated":       raw[:len(raw)/2],
			"garbage":         bytes.Repeat([]byte{0xff}, 40),
			"empty":           {},
			"other ref label": mustEncode(t, ref(2), rec.GetKeyLabel(), rec.GetNonce(), rec.GetCiphertext()),
		}
		for name, data := range cases {
			h.WriteRaw(t, ref(1), data)
			if _, err := h.Safe.Unseal(ctx, ref(1)); !errors.Is(err, safe.ErrTampered) {
				t.Errorf("Unseal(%s) = %v, want ErrTampered", name, err)
			}
		}
	})

	t.Run("moved to another slot", func(t *testing.T) {
		h := open(t)
		if err := h.Safe.Seal(ctx, ref(1), share(1)); err != nil {
			t.Fatal(err)
		}
		rec, err := safe.DecodeSealed(h.ReadRaw(t, ref(1)), ref(1))
		if err != nil {
			t.Fatal(err)
		}
		// Relabel share 1's ciphertext as share 2 of the same lineage, and as
		// share 1 of another epoch: the associated data must refuse both.
		for _, to := range []safe.ShareRef{ref(2), {GenesisID: gid, Epoch: 1, Index: 1}} {
			h.WriteRaw(t, to, mustEncode(t, to, rec.GetKeyLabel(), rec.GetNonce(), rec.GetCiphertext()))
			if _, err := h.Safe.Unseal(ctx, to); !errors.Is(err, safe.ErrTampered) {
				t.Errorf("Unseal(share moved to %v) = %v, want ErrTampered", to, err)
			}
		}
	})

	t.Run("survives reopen", func(t *testing.T) {
		h := open(t)
		if err := h.Safe.Seal(ctx, ref(4), share(4)); err != nil {
			t.Fatal(err)
		}
		if err := h.Safe.Close(); err != nil {
			t.Fatalf("Close = %v", err)
		}
		if _, err := h.Safe.Unseal(ctx, ref(4)); !errors.Is(err, safe.ErrClosed) {
			t.Errorf("Unseal after Close = %v, want ErrClosed", err)
		}
		s2 := h.Reopen(t)
		defer s2.Close()
		got, err := s2.Unseal(ctx, ref(4))
		if err != nil || !got.Equal(share(4)) {
			t.Errorf("Unseal after reopen = %v, want the sealed share", err)
		}
	})

	t.Run("cancelled context", func(t *testing.T) {
		h := open(t)
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if err := h.Safe.Seal(cctx, ref(1), share(1)); !errors.Is(err, context.Canceled) {
			t.Errorf("Seal(cancelled) = %v, want context.Canceled", err)
		}
		if _, err := h.Safe.Unseal(ctx, ref(1)); !errors.Is(err, safe.ErrNotFound) {
			t.Errorf("after a cancelled Seal, Unseal = %v, want ErrNotFound", err)
		}
	})

	t.Run("concurrent", func(t *testing.T) {
		h := open(t)
		const n = 16
		var wg sync.WaitGroup
		errs := make(chan error, 2*n)
		for i := uint32(1); i <= n; i++ {
			wg.Go(func() {
				if err := h.Safe.Seal(ctx, ref(i), share(i)); err != nil {
					errs <- fmt.Errorf("Seal(%v): %w", ref(i), err)
					return
				}
				for range 4 {
					got, err := h.Safe.Unseal(ctx, ref(i))
					if err != nil {
						errs <- fmt.Errorf("Unseal(%v): %w", ref(i), err)
						return
					}
					if !got.Equal(share(i)) {
						errs <- fmt.Errorf("Unseal(%v) returned another share", ref(i))
					}
					got.Wipe()
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		refs, err := h.Safe.List(ctx)
		if err != nil || len(refs) != n {
			t.Errorf("List after %d concurrent seals = %d refs, %v", n, len(refs), err)
		}
	})
}

func mustEncode(t *testing.T, r safe.ShareRef, label string, nonce, ct []byte) []byte {
	t.Helper()
	b, err := safe.EncodeSealed(r, label, nonce, ct)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func assertRefs(t *testing.T, s safe.Safe, want ...safe.ShareRef) {
	t.Helper()
	got, err := s.List(context.Background())
	if err != nil {
		t.Fatalf("List = %v", err)
	}
	key := func(r safe.ShareRef) string { return r.String() }
	gs, ws := make([]string, 0, len(got)), make([]string, 0, len(want))
	for _, r := range got {
		gs = append(gs, key(r))
	}
	for _, r := range want {
		ws = append(ws, key(r))
	}
	slices.Sort(gs)
	slices.Sort(ws)
	if !slices.Equal(gs, ws) {
		t.Errorf("List() = %v, want %v", gs, ws)
	}
}
