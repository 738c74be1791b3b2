package kmsclient_test

// BenchmarkEnvelope measures what a storage system sees: Tink envelope
// encryption and decryption (aead.NewKMSEnvelopeAEADWithContext with
// AES256_GCM DEKs) of 1 KiB objects through the client, against a real KMS
// server (AES256_GCM keyset from a signed bundle, audit log on a temp file)
// in the same process, over mTLS on 127.0.0.1, with exactly 1 or 16
// concurrent callers sharing one client. One op is one object: an envelope
// encrypt (a new DEK and one KMS Encrypt) and its decrypt (one KMS
// Decrypt). It reports objects/s and the p50 and p99 latency of one object's
// encrypt+decrypt; allocs/op counts the client, Tink and, since the server
// runs in-process, the server's allocations too.

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/aead"

	"github.com/cairnkms/cairn/kmsclient"
)

// benchDeadline bounds every call of one sub-benchmark run.
const benchDeadline = 2 * time.Minute

func BenchmarkEnvelope(b *testing.B) {
	w := newWorld(b)
	s := w.startKMS(east, "kms-1")
	c := w.client(appID, kmsclient.WithEndpoints(east, s.addr))
	env, err := aead.NewKMSEnvelopeAEADWithContext(aead.AES256GCMKeyTemplate(), aeadOf(b, c, east, ledger))
	if err != nil {
		b.Fatal(err)
	}
	object := make([]byte, 1024)
	rand.Read(object)
	// Connect before timing.
	if _, err := env.EncryptWithContext(b.Context(), object, nil); err != nil {
		b.Fatal(err)
	}

	for _, callers := range []int{1, 16} {
		b.Run(fmt.Sprintf("callers=%d", callers), func(b *testing.B) {
			ctx, cancel := context.WithTimeout(b.Context(), benchDeadline)
			defer cancel()
			lat := make([]time.Duration, b.N)
			var (
				next     atomic.Int64
				errOnce  sync.Once
				firstErr error
				wg       sync.WaitGroup
			)
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			for range callers {
				wg.Go(func() {
					ad := make([]byte, 8)
					for {
						i := next.Add(1) - 1
						if i >= int64(b.N) {
							return
						}
						ad[0], ad[1], ad[2], ad[3] = byte(i), byte(i>>8), byte(i>>16), byte(i>>24)
						t0 := time.Now()
						ct, err := env.EncryptWithContext(ctx, object, ad)
						if err == nil {
							var pt []byte
							if pt, err = env.DecryptWithContext(ctx, ct, ad); err == nil && !bytes.Equal(pt, object) {
								err = errors.New("round trip changed the object")
							}
						}
						if err != nil {
							errOnce.Do(func() { firstErr = err })
							return
						}
						lat[i] = time.Since(t0)
					}
				})
			}
			wg.Wait()
			elapsed := time.Since(start)
			b.StopTimer()
			if firstErr != nil {
				b.Fatalf("object round trip = %v", firstErr)
			}
			slices.Sort(lat)
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "objects/s")
			b.ReportMetric(micros(percentile(lat, 50)), "p50-µs")
			b.ReportMetric(micros(percentile(lat, 99)), "p99-µs")
		})
	}
}

// percentile returns the p-th percentile (nearest rank) of sorted d.
func percentile(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := (p*len(sorted) + 99) / 100 // ceil(p/100 * n), 1-based
	return sorted[max(rank, 1)-1]
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
