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
	"encoding/binary"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/aead"

	"github.com/cairnkms/cairn/internal/loadgen"
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
			calls := make([]loadgen.Call, callers)
			for c := range calls {
				ad := make([]byte, 8)
				var n uint64
				calls[c] = func(ctx context.Context) error {
					n++
					binary.BigEndian.PutUint64(ad, n)
					ct, err := env.EncryptWithContext(ctx, object, ad)
					if err != nil {
						return err
					}
					pt, err := env.DecryptWithContext(ctx, ct, ad)
					if err == nil && !bytes.Equal(pt, object) {
						err = errors.New("round trip changed the object")
					}
					return err
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			r, err := loadgen.Run(ctx, b.N, calls, true)
			b.StopTimer()
			if err != nil {
				b.Fatalf("object round trip = %v", err)
			}
			r.Report(b, "objects/s")
		})
	}
}
