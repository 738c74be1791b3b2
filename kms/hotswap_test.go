package kms_test

import (
	"bytes"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cairnkms/cairn/kms/kmstest"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// TestHotSwapUnderLoad applies bundles (add a version, promote it, add and
// drop an unused keyset) while clients encrypt and decrypt without pause:
// no request may fail, every key ID a response names must be one the
// keyset had, and every ciphertext made before a swap must decrypt after it.
func TestHotSwapUnderLoad(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	e.apply(s, e.bundle(e.ks))
	c := e.client(appID, s)

	const (
		workers = 8
		swaps   = 8
	)
	type sealed struct{ ct, ad, pt []byte }
	var (
		mu    sync.Mutex
		made  []sealed
		known = map[uint32]bool{e.ks.Primary(): true} // key IDs ever in the keyset
		ops   atomic.Int64
		stop  = make(chan struct{})
		errs  = make(chan error, workers)
		wg    sync.WaitGroup
	)
	var stopOnce sync.Once
	halt := func() { stopOnce.Do(func() { close(stop) }); wg.Wait() }
	defer halt() // also when the test fails early
	isKnown := func(id uint32) bool { mu.Lock(); defer mu.Unlock(); return known[id] }
	for w := range workers {
		wg.Go(func() {
			fail := func(err error) { errs <- fmt.Errorf("worker %d: %w", w, err) }
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				pt, ad := fmt.Appendf(nil, "dek-%d-%d", w, i), fmt.Appendf(nil, "object-%d-%d", w, i)
				enc, err := c.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: ledger, Plaintext: pt, AssociatedData: ad})
				if err != nil {
					fail(fmt.Errorf("Encrypt: %w", err))
					return
				}
				if !isKnown(enc.GetKeyId()) {
					fail(fmt.Errorf("Encrypt used key %d, which the keyset never had", enc.GetKeyId()))
					return
				}
				mu.Lock()
				made = append(made, sealed{enc.GetCiphertext(), ad, pt})
				old := made[(i*7919+w)%len(made)] // some earlier ciphertext, maybe from before a swap
				mu.Unlock()
				for _, x := range []sealed{{enc.GetCiphertext(), ad, pt}, old} {
					dec, err := c.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: x.ct, AssociatedData: x.ad})
					if err != nil || !bytes.Equal(dec.GetPlaintext(), x.pt) {
						fail(fmt.Errorf("Decrypt(%q) = %q, %v", x.pt, dec.GetPlaintext(), err))
						return
					}
				}
				ops.Add(1)
			}
		})
	}

	// Wait for traffic between swaps, so every swap lands under load.
	waitOps := func(n int64) {
		deadline := time.Now().Add(30 * time.Second)
		for target := ops.Load() + n; ops.Load() < target; {
			if time.Now().After(deadline) {
				t.Fatalf("no traffic: %d ops", ops.Load())
			}
			time.Sleep(time.Millisecond)
		}
	}
	extra := kmstest.NewKeyset(t, "payments/extra", nil)
	for i := range swaps {
		waitOps(workers)
		id := e.ks.AddVersion(t)
		mu.Lock()
		known[id] = true
		mu.Unlock()
		kss := []*kmstest.Keyset{e.ks}
		if i%2 == 0 {
			kss = append(kss, extra)
		}
		e.apply(s, e.bundle(kss...))
		waitOps(workers)
		e.ks.SetPrimary(t, id)
		e.apply(s, e.bundle(e.ks))
	}
	waitOps(workers)
	halt()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	// Everything made during the swaps still decrypts.
	mu.Lock()
	defer mu.Unlock()
	for start := 0; start < len(made); start += 500 {
		req := &kmsv1.DecryptBatchRequest{Keyset: ledger}
		for _, m := range made[start:min(start+500, len(made))] {
			req.Items = append(req.Items, &kmsv1.DecryptItem{Ciphertext: m.ct, AssociatedData: m.ad})
		}
		resp, err := c.DecryptBatch(ctx(t), req)
		if err != nil {
			t.Fatalf("DecryptBatch = %v", err)
		}
		for i, r := range resp.GetResults() {
			if want := made[start+i].pt; !bytes.Equal(r.GetOk().GetPlaintext(), want) {
				t.Errorf("DecryptBatch item %d = %v, want %q", start+i, r, want)
			}
		}
	}
	t.Logf("%d encrypt+2×decrypt rounds across %d bundle swaps", ops.Load(), 2*swaps)
}
