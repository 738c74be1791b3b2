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
	"github.com/tink-crypto/tink-go/v2/keyset"
	"github.com/tink-crypto/tink-go/v2/tink"

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
	benchEnvelope(b, env)
}

// BenchmarkEnvelopeAEAD is BenchmarkEnvelope with kmsclient.EnvelopeAEAD
// (same DEK template, same ciphertexts) in place of Tink's envelope AEAD.
func BenchmarkEnvelopeAEAD(b *testing.B) {
	w := newWorld(b)
	s := w.startKMS(east, "kms-1")
	c := w.client(appID, kmsclient.WithEndpoints(east, s.addr))
	env, err := kmsclient.NewEnvelopeAEAD(aead.AES256GCMKeyTemplate(), aeadOf(b, c, east, ledger))
	if err != nil {
		b.Fatal(err)
	}
	benchEnvelope(b, env)
}

func benchEnvelope(b *testing.B, env tink.AEADWithContext) {
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

// BenchmarkEnvelopeLocalKEK measures the envelope layer alone: one op is a
// 1 KiB object's encrypt and decrypt with AES256_GCM DEKs whose KEK is a
// local Tink AES-GCM AEAD (no KMS call), through Tink's envelope AEAD and
// through kmsclient.EnvelopeAEAD. Its allocs/op is what each envelope
// implementation adds per object on top of the KEK's two calls.
func BenchmarkEnvelopeLocalKEK(b *testing.B) {
	h, err := keyset.NewHandle(aead.AES256GCMKeyTemplate())
	if err != nil {
		b.Fatal(err)
	}
	kek, err := aead.New(h)
	if err != nil {
		b.Fatal(err)
	}
	ours, err := kmsclient.NewEnvelopeAEAD(aead.AES256GCMKeyTemplate(), kek)
	if err != nil {
		b.Fatal(err)
	}
	for _, impl := range []struct {
		name string
		env  tink.AEAD
	}{{"tink", aead.NewKMSEnvelopeAEAD2(aead.AES256GCMKeyTemplate(), kek)}, {"kmsclient", ours}} {
		b.Run(impl.name, func(b *testing.B) {
			object := make([]byte, 1024)
			rand.Read(object)
			ad := []byte("object-1")
			b.ReportAllocs()
			for b.Loop() {
				ct, err := impl.env.Encrypt(object, ad)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := impl.env.Decrypt(ct, ad); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkBatch measures EncryptBatch and DecryptBatch of 32-byte items
// (DEK-sized) in batches of 1, 100 and 1000, against the in-process KMS of
// BenchmarkEnvelope with one caller. One op is one item's encrypt and
// decrypt, so ns/op, B/op and allocs/op are per item (client and server).
func BenchmarkBatch(b *testing.B) {
	w := newWorld(b)
	s := w.startKMS(east, "kms-1")
	c := w.client(appID, kmsclient.WithEndpoints(east, s.addr))
	a := aeadOf(b, c, east, ledger)
	ctx, cancel := context.WithTimeout(b.Context(), benchDeadline)
	defer cancel()
	if _, err := a.EncryptWithContext(ctx, []byte("connect"), nil); err != nil {
		b.Fatal(err)
	}
	for _, size := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("items=%d", size), func(b *testing.B) {
			in := make([]kmsclient.BatchItem, size)
			for i := range in {
				in[i] = kmsclient.BatchItem{Data: make([]byte, 32), AssociatedData: binary.BigEndian.AppendUint64(nil, uint64(i))}
				rand.Read(in[i].Data)
			}
			dec := make([]kmsclient.BatchItem, size)
			b.ReportAllocs()
			b.ResetTimer()
			for done := 0; done < b.N; done += size {
				n := min(size, b.N-done)
				enc, err := a.EncryptBatch(ctx, in[:n])
				if err != nil {
					b.Fatal(err)
				}
				for i, r := range enc {
					if r.Err != nil {
						b.Fatal(r.Err)
					}
					dec[i] = kmsclient.BatchItem{Data: r.Data, AssociatedData: in[i].AssociatedData}
				}
				got, err := a.DecryptBatch(ctx, dec[:n])
				if err != nil {
					b.Fatal(err)
				}
				for i, r := range got {
					if r.Err != nil || !bytes.Equal(r.Data, in[i].Data) {
						b.Fatalf("item %d = %v, want its plaintext", i, r.Err)
					}
				}
			}
		})
	}
}
