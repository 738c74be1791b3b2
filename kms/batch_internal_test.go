package kms

import (
	"crypto/rand"
	"fmt"
	"testing"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/kms/kmstest"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// BenchmarkBatchHandler measures the EncryptBatch and DecryptBatch handlers
// alone, called directly (no gRPC, no TLS, no codec): the server's own cost
// per item, in ns/item and allocs/item, for batches of 100 32-byte DEKs with
// 16 bytes of associated data each (what BenchmarkDataPlane's batches send).
func BenchmarkBatchHandler(b *testing.B) {
	const items = 100
	s, signer, keys, ks := newUnstarted(b)
	sb := signer.Sign(b, kmstest.Bundle(b, keys, testRegion, 1, ks))
	if _, err := s.apply(b.Context(), &kmsv1.ApplyBundleRequest{Bundle: sb}); err != nil {
		b.Fatal(err)
	}
	ctx := identity.NewContext(b.Context(), identity.MustParse("spiffe://cairn.test/client/us-east/app"))
	api := &kmsAPI{s: s}
	enc := &kmsv1.EncryptBatchRequest{Keyset: "payments/ledger", Items: make([]*kmsv1.EncryptItem, items)}
	for i := range enc.Items {
		enc.Items[i] = &kmsv1.EncryptItem{Plaintext: make([]byte, 32), AssociatedData: make([]byte, 16)}
		_, _ = rand.Read(enc.Items[i].Plaintext)
		_, _ = rand.Read(enc.Items[i].AssociatedData)
	}
	er, err := api.EncryptBatch(ctx, enc)
	if err != nil {
		b.Fatal(err)
	}
	dec := &kmsv1.DecryptBatchRequest{Keyset: "payments/ledger", Items: make([]*kmsv1.DecryptItem, items)}
	for i, r := range er.GetResults() {
		if r.GetOk() == nil {
			b.Fatalf("EncryptBatch item %d = %v", i, r.GetError())
		}
		dec.Items[i] = &kmsv1.DecryptItem{Ciphertext: r.GetOk().GetCiphertext(), AssociatedData: enc.Items[i].AssociatedData}
	}
	report := func(b *testing.B, allocs float64) {
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*items), "ns/item")
		b.ReportMetric(allocs/items, "allocs/item")
	}
	b.Run(fmt.Sprintf("items=%d/encrypt", items), func(b *testing.B) {
		allocs := testing.AllocsPerRun(10, func() { _, _ = api.EncryptBatch(ctx, enc) })
		b.ReportAllocs()
		for b.Loop() {
			if _, err := api.EncryptBatch(ctx, enc); err != nil {
				b.Fatal(err)
			}
		}
		report(b, allocs)
	})
	b.Run(fmt.Sprintf("items=%d/decrypt", items), func(b *testing.B) {
		allocs := testing.AllocsPerRun(10, func() { _, _ = api.DecryptBatch(ctx, dec) })
		b.ReportAllocs()
		for b.Loop() {
			if _, err := api.DecryptBatch(ctx, dec); err != nil {
				b.Fatal(err)
			}
		}
		report(b, allocs)
	})
}

// TestBatchHandlerAllocations: a batch response takes a fixed number of
// allocations whatever its size (items share one slot slice and one output
// buffer), and each item's output is cut to its own length, so appending
// to one can never overwrite the next.
func TestBatchHandlerAllocations(t *testing.T) {
	s, signer, keys, ks := newUnstarted(t)
	sb := signer.Sign(t, kmstest.Bundle(t, keys, testRegion, 1, ks))
	if _, err := s.apply(t.Context(), &kmsv1.ApplyBundleRequest{Bundle: sb}); err != nil {
		t.Fatal(err)
	}
	ctx := identity.NewContext(t.Context(), identity.MustParse("spiffe://cairn.test/client/us-east/app"))
	api := &kmsAPI{s: s}
	for _, n := range []int{1, 10, 100} {
		enc := &kmsv1.EncryptBatchRequest{Keyset: "payments/ledger", Items: make([]*kmsv1.EncryptItem, n)}
		for i := range enc.Items {
			enc.Items[i] = &kmsv1.EncryptItem{Plaintext: []byte(fmt.Sprint("dek ", i)), AssociatedData: []byte("ad")}
		}
		er, err := api.EncryptBatch(ctx, enc)
		if err != nil {
			t.Fatal(err)
		}
		dec := &kmsv1.DecryptBatchRequest{Keyset: "payments/ledger", Items: make([]*kmsv1.DecryptItem, n)}
		for i, r := range er.GetResults() {
			ct := r.GetOk().GetCiphertext()
			if len(ct) == 0 || cap(ct) != len(ct) {
				t.Fatalf("EncryptBatch item %d = %d bytes, capacity %d; want a ciphertext cut to its length", i, len(ct), cap(ct))
			}
			dec.Items[i] = &kmsv1.DecryptItem{Ciphertext: ct, AssociatedData: []byte("ad")}
		}
		dr, err := api.DecryptBatch(ctx, dec)
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range dr.GetResults() {
			pt := r.GetOk().GetPlaintext()
			if string(pt) != fmt.Sprint("dek ", i) || cap(pt) != len(pt) {
				t.Fatalf("DecryptBatch item %d = %q, capacity %d; want %q cut to its length", i, pt, cap(pt), fmt.Sprint("dek ", i))
			}
		}
		// Response, result pointers, slots, output buffer; the nonce pool.
		if got := testing.AllocsPerRun(20, func() { _, _ = api.EncryptBatch(ctx, enc) }); got > 5 {
			t.Errorf("EncryptBatch of %d items: %v allocations, want at most 5", n, got)
		}
		if got := testing.AllocsPerRun(20, func() { _, _ = api.DecryptBatch(ctx, dec) }); got > 4 {
			t.Errorf("DecryptBatch of %d items: %v allocations, want at most 4", n, got)
		}
	}
}
