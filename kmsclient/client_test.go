package kmsclient_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/core/registry"
	"github.com/tink-crypto/tink-go/v2/insecurecleartextkeyset"
	"github.com/tink-crypto/tink-go/v2/keyset"
	tinkpb "github.com/tink-crypto/tink-go/v2/proto/tink_go_proto"
	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/kms/kmstest"
	"github.com/cairnkms/cairn/kmsclient"
)

// dekTemplates are every DEK key type Tink v2's envelope AEAD accepts.
var dekTemplates = []struct {
	name string
	tmpl func() *tinkpb.KeyTemplate
}{
	{"AES128_GCM", aead.AES128GCMKeyTemplate},
	{"AES256_GCM", aead.AES256GCMKeyTemplate},
	{"AES256_GCM_SIV", aead.AES256GCMSIVKeyTemplate},
	{"CHACHA20_POLY1305", aead.ChaCha20Poly1305KeyTemplate},
	{"XCHACHA20_POLY1305", aead.XChaCha20Poly1305KeyTemplate},
	{"AES128_CTR_HMAC_SHA256", aead.AES128CTRHMACSHA256KeyTemplate},
	{"AES256_CTR_HMAC_SHA256", aead.AES256CTRHMACSHA256KeyTemplate},
}

// envelopeEDEK returns the wrapped DEK of a Tink envelope ciphertext
// (be32 length || EDEK || payload).
func envelopeEDEK(t *testing.T, ct []byte) []byte {
	t.Helper()
	if len(ct) < 4 {
		t.Fatalf("envelope ciphertext of %d bytes", len(ct))
	}
	n := binary.BigEndian.Uint32(ct)
	if int(n) > len(ct)-4 {
		t.Fatalf("envelope EDEK length %d > %d", n, len(ct)-4)
	}
	return ct[4 : 4+n]
}

// TestEnvelopeRoundTrip: for every DEK type, both envelope constructors
// encrypt through one Client and decrypt through another (and across
// constructors); the EDEK is a Cairn ciphertext (TINK prefix of the keyset's
// primary key), the AD protects the payload, and the KMS served every call.
func TestEnvelopeRoundTrip(t *testing.T) {
	w := testWorld(t)
	s := w.startKMS(east, "kms-1")
	c1 := w.client(appID, kmsclient.WithEndpoints(east, s.addr))
	c2 := w.client(appID, kmsclient.WithEndpoints(east, s.addr))
	kek1, kek2 := aeadOf(t, c1, east, ledger), aeadOf(t, c2, east, ledger)
	ctx := ctxFor(t)

	wantPrefix := binary.BigEndian.AppendUint32([]byte{0x01}, w.ledger.Primary())
	calls := 0
	for _, dt := range dekTemplates {
		t.Run(dt.name, func(t *testing.T) {
			withCtx1, err := aead.NewKMSEnvelopeAEADWithContext(dt.tmpl(), kek1)
			if err != nil {
				t.Fatalf("NewKMSEnvelopeAEADWithContext(%s) = %v", dt.name, err)
			}
			withCtx2, err := aead.NewKMSEnvelopeAEADWithContext(dt.tmpl(), kek2)
			if err != nil {
				t.Fatalf("NewKMSEnvelopeAEADWithContext(%s) = %v", dt.name, err)
			}
			plain1 := aead.NewKMSEnvelopeAEAD2(dt.tmpl(), kek1)
			plain2 := aead.NewKMSEnvelopeAEAD2(dt.tmpl(), kek2)

			pt := []byte("object " + dt.name + ": some bytes worth protecting")
			ad := []byte("objects/" + dt.name)

			ctA, err := withCtx1.EncryptWithContext(ctx, pt, ad)
			if err != nil {
				t.Fatalf("EncryptWithContext = %v", err)
			}
			ctB, err := plain1.Encrypt(pt, ad)
			if err != nil {
				t.Fatalf("Encrypt = %v", err)
			}
			calls += 2
			for name, ct := range map[string][]byte{"WithContext": ctA, "AEAD2": ctB} {
				if edek := envelopeEDEK(t, ct); !bytes.HasPrefix(edek, wantPrefix) {
					t.Errorf("%s: EDEK starts %x, want the keyset primary's prefix %x", name, edek[:min(5, len(edek))], wantPrefix)
				}
				if bytes.Contains(ct, pt) {
					t.Errorf("%s: ciphertext contains the plaintext", name)
				}
			}
			// Each ciphertext decrypts through the other client, with
			// either constructor.
			for name, dec := range map[string]func([]byte, []byte) ([]byte, error){
				"WithContext": func(ct, ad []byte) ([]byte, error) { return withCtx2.DecryptWithContext(ctx, ct, ad) },
				"AEAD2":       plain2.Decrypt,
			} {
				for ctName, ct := range map[string][]byte{"WithContext": ctA, "AEAD2": ctB} {
					got, err := dec(ct, ad)
					calls++
					if err != nil || !bytes.Equal(got, pt) {
						t.Errorf("%s.Decrypt(ciphertext of %s) = %q, %v, want %q", name, ctName, got, err, pt)
					}
				}
			}
			// The AD binds the payload (Tink gives the KEK empty AD).
			if got, err := withCtx2.DecryptWithContext(ctx, ctA, []byte("objects/other")); err == nil || got != nil {
				t.Errorf("DecryptWithContext(wrong AD) = %q, %v, want nil and an error", got, err)
			}
			calls++
		})
	}
	if got := s.dataPlaneCalls(t)["ok"]; got != calls {
		t.Errorf("the KMS audited %d successful calls, want %d", got, calls)
	}
}

// TestRegistry: the registry route (RegisterKMSClient,
// CreateKMSEnvelopeAEADKeyTemplate, NewHandle, aead.New) uses the client,
// and its ciphertexts decrypt through a direct envelope AEAD of another
// client.
func TestRegistry(t *testing.T) {
	w := testWorld(t)
	s := w.startKMS(east, "kms-1")
	c := w.client(appID, kmsclient.WithEndpoints(east, s.addr))
	other := w.client(appID, kmsclient.WithEndpoints(east, s.addr))

	registry.RegisterKMSClient(c)
	t.Cleanup(registry.ClearKMSClients)

	uri := kmsclient.KeyURI(east, ledger)
	got, err := registry.GetKMSClient(uri)
	if err != nil || got != c {
		t.Fatalf("registry.GetKMSClient(%s) = %v, %v, want the client", uri, got, err)
	}
	if _, err := registry.GetKMSClient(kmsclient.KeyURI(west, ledger)); err == nil {
		t.Errorf("registry.GetKMSClient(%s) found a client; the client has no endpoints there", kmsclient.KeyURI(west, ledger))
	}
	tmpl, err := aead.CreateKMSEnvelopeAEADKeyTemplate(uri, aead.AES256GCMKeyTemplate())
	if err != nil {
		t.Fatalf("CreateKMSEnvelopeAEADKeyTemplate = %v", err)
	}
	h, err := keyset.NewHandle(tmpl)
	if err != nil {
		t.Fatalf("keyset.NewHandle = %v", err)
	}
	p, err := aead.New(h)
	if err != nil {
		t.Fatalf("aead.New = %v", err)
	}
	pt, ad := []byte("via the registry"), []byte("ad")
	ct, err := p.Encrypt(pt, ad)
	if err != nil {
		t.Fatalf("Encrypt = %v", err)
	}
	if dec, err := p.Decrypt(ct, ad); err != nil || !bytes.Equal(dec, pt) {
		t.Errorf("Decrypt = %q, %v, want %q", dec, err, pt)
	}
	// The key is RAW, so the ciphertext is a plain envelope.
	direct := aead.NewKMSEnvelopeAEAD2(aead.AES256GCMKeyTemplate(), aeadOf(t, other, east, ledger))
	if dec, err := direct.Decrypt(ct, ad); err != nil || !bytes.Equal(dec, pt) {
		t.Errorf("direct envelope Decrypt = %q, %v, want %q", dec, err, pt)
	}
	if got := s.dataPlaneCalls(t)["ok"]; got != 3 {
		t.Errorf("the KMS audited %d successful calls, want 3", got)
	}
}

// TestEncryptedKeyset: a Tink keyset written encrypted under the Cairn AEAD
// (Write, WriteWithAssociatedData, WriteWithContext) holds none of its key
// bytes in the clear, reads back through another client (and only with the
// same AD), and the read-back keyset decrypts what the original encrypted.
func TestEncryptedKeyset(t *testing.T) {
	w := testWorld(t)
	s := w.startKMS(east, "kms-1")
	kekW := aeadOf(t, w.client(appID, kmsclient.WithEndpoints(east, s.addr)), east, ledger)
	kekR := aeadOf(t, w.client(appID, kmsclient.WithEndpoints(east, s.addr)), east, ledger)
	ctx := ctxFor(t)
	tenant := []byte("tenant-7")

	tests := []struct {
		name  string
		write func(*keyset.Handle, keyset.Writer) error
		read  func(keyset.Reader) (*keyset.Handle, error)
		// readWrongAD reads with other AD (nil: Write has no AD to get wrong).
		readWrongAD func(keyset.Reader) (*keyset.Handle, error)
	}{
		{
			name:  "Write",
			write: func(h *keyset.Handle, wr keyset.Writer) error { return h.Write(wr, kekW) },
			read:  func(r keyset.Reader) (*keyset.Handle, error) { return keyset.Read(r, kekR) },
		},
		{
			name:  "WithAssociatedData",
			write: func(h *keyset.Handle, wr keyset.Writer) error { return h.WriteWithAssociatedData(wr, kekW, tenant) },
			read:  func(r keyset.Reader) (*keyset.Handle, error) { return keyset.ReadWithAssociatedData(r, kekR, tenant) },
			readWrongAD: func(r keyset.Reader) (*keyset.Handle, error) {
				return keyset.ReadWithAssociatedData(r, kekR, []byte("tenant-8"))
			},
		},
		{
			name:  "WithContext",
			write: func(h *keyset.Handle, wr keyset.Writer) error { return h.WriteWithContext(ctx, wr, kekW, tenant) },
			read:  func(r keyset.Reader) (*keyset.Handle, error) { return keyset.ReadWithContext(ctx, r, kekR, tenant) },
			readWrongAD: func(r keyset.Reader) (*keyset.Handle, error) {
				return keyset.ReadWithContext(ctx, r, kekR, []byte("tenant-8"))
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h, err := keyset.NewHandle(aead.AES256GCMKeyTemplate())
			if err != nil {
				t.Fatal(err)
			}
			var buf bytes.Buffer
			if err := tc.write(h, keyset.NewBinaryWriter(&buf)); err != nil {
				t.Fatalf("writing the keyset = %v", err)
			}
			// The 32-byte AES key is the tail of the cleartext AesGcmKey;
			// it must not appear in the written keyset.
			if bytes.Contains(buf.Bytes(), keyBytes(t, h)) {
				t.Fatal("the written keyset holds the key bytes in the clear")
			}
			written := bytes.Clone(buf.Bytes())
			if tc.readWrongAD != nil {
				if got, err := tc.readWrongAD(keyset.NewBinaryReader(bytes.NewReader(written))); err == nil {
					t.Errorf("reading with the wrong AD = %v, nil; want an error", got)
				}
			}
			back, err := tc.read(keyset.NewBinaryReader(bytes.NewReader(written)))
			if err != nil {
				t.Fatalf("reading the keyset = %v", err)
			}
			a1, err := aead.New(h)
			if err != nil {
				t.Fatal(err)
			}
			a2, err := aead.New(back)
			if err != nil {
				t.Fatal(err)
			}
			pt, ad := []byte("locally encrypted"), []byte("row 1")
			ct, err := a1.Encrypt(pt, ad)
			if err != nil {
				t.Fatal(err)
			}
			if got, err := a2.Decrypt(ct, ad); err != nil || !bytes.Equal(got, pt) {
				t.Errorf("read-back keyset Decrypt = %q, %v, want %q", got, err, pt)
			}
		})
	}
	if got := s.dataPlaneCalls(t); got["ok"] != 6 || got["error"] != 2 {
		t.Errorf("the KMS audited %v, want 6 ok (3 writes, 3 reads) and 2 errors (wrong AD)", got)
	}
}

// keyBytes returns the raw key of a one-key AES-GCM handle.
func keyBytes(t *testing.T, h *keyset.Handle) []byte {
	t.Helper()
	ks := insecurecleartextkeyset.KeysetMaterial(h)
	v := ks.GetKey()[0].GetKeyData().GetValue() // serialized AesGcmKey: ... || 0x1a 0x20 || key(32)
	if len(v) < 32 {
		t.Fatalf("AesGcmKey of %d bytes", len(v))
	}
	return v[len(v)-32:]
}

// TestFailoverServerKilled: with the endpoint in use closed while callers
// are busy, every call succeeds; the other server takes over, and the
// client logs the failover once per direction at most.
func TestFailoverServerKilled(t *testing.T) {
	w := testWorld(t)
	s1, s2 := w.startKMS(east, "kms-1"), w.startKMS(east, "kms-2")
	logs := &logRecorder{}
	c := w.client(appID, kmsclient.WithEndpoints(east, addrs(s1, s2)...), kmsclient.WithLogger(slogOf(logs)))
	env, err := aead.NewKMSEnvelopeAEADWithContext(aead.AES256GCMKeyTemplate(), aeadOf(t, c, east, ledger))
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxFor(t)

	const workers, perWorker, killAfter = 4, 60, 40
	var (
		done     atomic.Int64
		killOnce sync.Once
		killed   = make(chan struct{})
		wg       sync.WaitGroup
		mu       sync.Mutex
		errs     []error
		before   [][]byte // ciphertexts made before the kill
	)
	for i := range workers {
		wg.Go(func() {
			for j := range perWorker {
				pt := []byte{byte(i), byte(j), 'x'}
				ct, err := env.EncryptWithContext(ctx, pt, nil)
				if err == nil {
					var got []byte
					got, err = env.DecryptWithContext(ctx, ct, nil)
					if err == nil && !bytes.Equal(got, pt) {
						err = errors.New("round trip changed the plaintext")
					}
				}
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
					return
				}
				select {
				case <-killed:
				default:
					mu.Lock()
					before = append(before, ct)
					mu.Unlock()
				}
				if done.Add(1) == killAfter {
					killOnce.Do(func() {
						go func() { s1.Close(); close(killed) }()
					})
				}
			}
		})
	}
	wg.Wait()
	<-killed
	for _, err := range errs {
		t.Errorf("call failed: %v", err)
	}
	// What was made before the kill decrypts after it.
	for _, ct := range before {
		if _, err := env.DecryptWithContext(ctx, ct, nil); err != nil {
			t.Errorf("Decrypt(ciphertext from before the kill) = %v", err)
			break
		}
	}
	n1, n2 := s1.dataPlaneCalls(t)["ok"], s2.dataPlaneCalls(t)["ok"]
	if n1 == 0 || n2 == 0 || n1+n2 != 2*workers*perWorker+len(before) {
		t.Errorf("kms-1 served %d calls and kms-2 %d, want both > 0 and %d in all", n1, n2, 2*workers*perWorker+len(before))
	}
	if got := logs.matching("WARN kmsclient: endpoint failed; failing over", "from="+s1.addr, "to="+s2.addr); len(got) != 1 {
		t.Errorf("failover log records from kms-1 to kms-2: %q, want exactly 1 (all: %q)", got, logs.all())
	}
}

// TestFailoverHungEndpoint: a first endpoint that accepts connections and
// never answers is left after one attempt timeout, once; the calls succeed.
func TestFailoverHungEndpoint(t *testing.T) {
	w := testWorld(t)
	hung := newHungListener(t)
	s := w.startKMS(east, "kms-1")
	logs := &logRecorder{}
	count := &attemptCounter{}
	c := w.client(appID, kmsclient.WithEndpoints(east, hung.addr(), s.addr),
		kmsclient.WithAttemptTimeout(300*time.Millisecond), kmsclient.WithLogger(slogOf(logs)), count.option())
	a := aeadOf(t, c, east, ledger)
	ctx := ctxFor(t)
	const calls = 20
	for i := range calls {
		ct, err := a.EncryptWithContext(ctx, []byte{byte(i)}, nil)
		if err != nil {
			t.Fatalf("call %d: Encrypt = %v", i, err)
		}
		if _, err := a.DecryptWithContext(ctx, ct, nil); err != nil {
			t.Fatalf("call %d: Decrypt = %v", i, err)
		}
	}
	if hung.accepted() == 0 {
		t.Error("the hung endpoint was never connected to")
	}
	if got := count.total(); got != 2*calls+1 {
		t.Errorf("%d attempts, want %d (one timed out on the hung endpoint, then all on the good one)", got, 2*calls+1)
	}
	if got := logs.matching("WARN kmsclient: endpoint failed; failing over", "from="+hung.addr(), "code=DeadlineExceeded"); len(got) != 1 {
		t.Errorf("failover records: %q, want exactly 1", got)
	}
	if got := s.dataPlaneCalls(t)["ok"]; got != 2*calls {
		t.Errorf("the KMS served %d calls, want %d", got, 2*calls)
	}
}

// TestAllEndpointsDown: with every endpoint refusing connections, or hung,
// a call ends within its deadline with an error that names the region, the
// keyset, the endpoints tried and the last cause, and carries a retryable
// code; a caller's cancellation ends it at once.
func TestAllEndpointsDown(t *testing.T) {
	w := testWorld(t)
	policy := kmsclient.RetryPolicy{MaxAttempts: 4, InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}

	t.Run("refused", func(t *testing.T) {
		count := &attemptCounter{}
		c := w.client(appID, kmsclient.WithEndpoints(east, deadAddr(t), deadAddr(t)),
			kmsclient.WithTimeout(5*time.Second), kmsclient.WithRetry(policy), count.option())
		a := aeadOf(t, c, east, ledger)
		start := time.Now()
		ct, err := a.Encrypt([]byte("dek"), nil)
		elapsed := time.Since(start)
		if err == nil || ct != nil {
			t.Fatalf("Encrypt = %x, %v, want nil and an error", ct, err)
		}
		if elapsed > 5*time.Second+2*time.Second {
			t.Errorf("Encrypt took %v, more than its 5s deadline and slack", elapsed)
		}
		if got := status.Code(err); got != codes.Unavailable {
			t.Errorf("status.Code(%v) = %v, want Unavailable", err, got)
		}
		for _, want := range []string{`kmsclient: encrypt with keyset "payments/ledger" in region us-east`, "4 attempts on 2 of 2 endpoints", "last error from 127.0.0.1:", "connect"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not contain %q", err, want)
			}
		}
		if !strings.HasPrefix(err.Error(), "kmsclient: ") {
			t.Errorf("error %q lacks the kmsclient: prefix", err)
		}
		if got := count.total(); got != 4 {
			t.Errorf("%d attempts, want MaxAttempts = 4", got)
		}
	})

	t.Run("logs bounded", func(t *testing.T) {
		logs := &logRecorder{}
		d1, d2 := deadAddr(t), deadAddr(t)
		c := w.client(appID, kmsclient.WithEndpoints(east, d1, d2), kmsclient.WithRetry(kmsclient.RetryPolicy{MaxAttempts: 2, InitialBackoff: time.Millisecond, MaxBackoff: time.Millisecond}),
			kmsclient.WithLogger(slogOf(logs)))
		a := aeadOf(t, c, east, ledger)
		const secret = "PLAINTEXT-MARKER"
		for range 10 {
			if _, err := a.Encrypt([]byte(secret), []byte(secret)); status.Code(err) != codes.Unavailable {
				t.Fatalf("Encrypt = %v, want Unavailable", err)
			}
		}
		if got := logs.matching("WARN kmsclient: endpoint failed; failing over"); len(got) != 2 {
			t.Errorf("failover warnings over 10 calls to a dead region: %q, want 2 (one per endpoint)", got)
		}
		if got := logs.matching("DEBUG kmsclient: attempt failed"); len(got) != 18 {
			t.Errorf("%d debug records of failed attempts, want 18 (20 attempts, 2 warned)", len(got))
		}
		for _, r := range logs.all() {
			if strings.Contains(r, secret) || strings.Contains(r, fmt.Sprintf("%x", secret)) {
				t.Errorf("log record %q holds the plaintext or AD", r)
			}
		}
	})

	t.Run("hung", func(t *testing.T) {
		h1, h2 := newHungListener(t), newHungListener(t)
		c := w.client(appID, kmsclient.WithEndpoints(east, h1.addr(), h2.addr()),
			kmsclient.WithTimeout(time.Second), kmsclient.WithAttemptTimeout(200*time.Millisecond), kmsclient.WithRetry(kmsclient.RetryPolicy{MaxAttempts: 100}))
		a := aeadOf(t, c, east, ledger)
		start := time.Now()
		pt, err := a.Decrypt([]byte("ciphertext"), nil)
		elapsed := time.Since(start)
		if err == nil || pt != nil {
			t.Fatalf("Decrypt = %x, %v, want nil and an error", pt, err)
		}
		if elapsed > time.Second+2*time.Second {
			t.Errorf("Decrypt took %v, more than its 1s deadline and slack", elapsed)
		}
		if got := status.Code(err); got != codes.DeadlineExceeded {
			t.Errorf("status.Code(%v) = %v, want DeadlineExceeded", err, got)
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("errors.Is(%v, context.DeadlineExceeded) = false", err)
		}
		for _, want := range []string{`kmsclient: decrypt with keyset "payments/ledger" in region us-east: context deadline exceeded after`, "of 2 endpoints", "last error from"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not contain %q", err, want)
			}
		}
	})

	t.Run("caller cancels", func(t *testing.T) {
		h := newHungListener(t)
		c := w.client(appID, kmsclient.WithEndpoints(east, h.addr()), kmsclient.WithAttemptTimeout(30*time.Second), kmsclient.WithTimeout(time.Minute))
		a := aeadOf(t, c, east, ledger)
		ctx, cancel := context.WithCancel(t.Context())
		time.AfterFunc(100*time.Millisecond, cancel)
		start := time.Now()
		ct, err := a.EncryptWithContext(ctx, []byte("dek"), nil)
		if elapsed := time.Since(start); elapsed > 5*time.Second {
			t.Errorf("Encrypt returned %v after the cancellation, want at once", elapsed)
		}
		if err == nil || ct != nil {
			t.Fatalf("Encrypt = %x, %v, want nil and an error", ct, err)
		}
		if got := status.Code(err); got != codes.Canceled || !errors.Is(err, context.Canceled) {
			t.Errorf("Encrypt error %v: code %v, errors.Is(Canceled) %v; want Canceled, true", err, got, errors.Is(err, context.Canceled))
		}
	})
}

// TestDecryptFallback: with the primary region down, a decrypt falls back to
// a region holding the same keyset only when enabled; an encrypt never
// does; and a non-retryable answer of the primary is not a reason to fall
// back.
func TestDecryptFallback(t *testing.T) {
	w := testWorld(t)
	westOnly := kmstest.NewKeyset(t, "payments/west-only", kmstest.ACL("client/us-east/app"))
	w.keysets[west] = append(w.keysets[west], westOnly)
	eastOnly := kmstest.NewKeyset(t, "payments/east-only", kmstest.ACL("client/us-east/app"))
	w.keysets[east] = append(w.keysets[east], eastOnly)
	sEast, sWest := w.startKMS(east, "kms-1"), w.startKMS(west, "kms-1")
	fast := kmsclient.WithRetry(kmsclient.RetryPolicy{MaxAttempts: 2, InitialBackoff: 5 * time.Millisecond, MaxBackoff: 10 * time.Millisecond})
	eps := []kmsclient.Option{kmsclient.WithEndpoints(east, sEast.addr), kmsclient.WithEndpoints(west, sWest.addr), fast}
	logs := &logRecorder{}
	withFB := w.client(appID, append(eps, kmsclient.WithDecryptFallback(east, west), kmsclient.WithLogger(slogOf(logs)))...)
	noFB := w.client(appID, eps...)
	ctx := ctxFor(t)

	pt := []byte("a data key")
	ct, err := aeadOf(t, withFB, east, ledger).EncryptWithContext(ctx, pt, []byte("ad"))
	if err != nil {
		t.Fatal(err)
	}
	eastOnlyCT, err := aeadOf(t, noFB, east, "payments/east-only").EncryptWithContext(ctx, pt, nil)
	if err != nil {
		t.Fatal(err)
	}
	env := aead.NewKMSEnvelopeAEAD2(aead.AES256GCMKeyTemplate(), aeadOf(t, noFB, east, ledger))
	envCT, err := env.Encrypt([]byte("object"), []byte("id"))
	if err != nil {
		t.Fatal(err)
	}

	// PermissionDenied in us-east (the keyset is only in us-west, which the
	// KMS tells nobody outside its ACLs) is final.
	westCT, err := aeadOf(t, noFB, west, "payments/west-only").EncryptWithContext(ctx, pt, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := aeadOf(t, withFB, east, "payments/west-only").DecryptWithContext(ctx, westCT, nil); status.Code(err) != codes.PermissionDenied || got != nil {
		t.Errorf("Decrypt(keyset only in the fallback region) = %q, %v, want PermissionDenied", got, err)
	}
	westBefore := sWest.dataPlaneCalls(t)["ok"]

	sEast.Close()

	got, err := aeadOf(t, withFB, east, ledger).DecryptWithContext(ctx, ct, []byte("ad"))
	if err != nil || !bytes.Equal(got, pt) {
		t.Errorf("with fallback: Decrypt = %q, %v, want %q", got, err, pt)
	}
	envFB := aead.NewKMSEnvelopeAEAD2(aead.AES256GCMKeyTemplate(), aeadOf(t, withFB, east, ledger))
	if got, err := envFB.Decrypt(envCT, []byte("id")); err != nil || string(got) != "object" {
		t.Errorf("with fallback: envelope Decrypt = %q, %v, want %q", got, err, "object")
	}
	if got := sWest.dataPlaneCalls(t)["ok"] - westBefore; got != 2 {
		t.Errorf("us-west served %d decrypts, want 2", got)
	}
	// A fallback region's refusal is not an answer about the ciphertext (the
	// keyset, or its newest version, may not be there yet): the call fails
	// with the primary region's outage, and says what the fallback said.
	if got, err := aeadOf(t, withFB, east, ledger).DecryptWithContext(ctx, ct, []byte("other ad")); status.Code(err) != codes.Unavailable || got != nil {
		t.Errorf("with fallback, wrong AD: Decrypt = %q, %v, want Unavailable (us-east's outage)", got, err)
	} else if !strings.Contains(err.Error(), "fallback regions refused: us-west: InvalidArgument") {
		t.Errorf("with fallback, wrong AD: error %q does not say what the fallback region answered", err)
	}

	// A keyset the fallback region does not have: its refusal (the
	// PermissionDenied a KMS gives for a keyset it does not serve) must not
	// read as "no such keyset" (a caller might take the data for lost).
	if got, err := aeadOf(t, withFB, east, "payments/east-only").DecryptWithContext(ctx, eastOnlyCT, nil); status.Code(err) != codes.Unavailable || got != nil {
		t.Errorf("with fallback, keyset missing in the fallback: Decrypt = %q, %v, want Unavailable (us-east's outage)", got, err)
	} else if !strings.Contains(err.Error(), "fallback regions refused: us-west: PermissionDenied") {
		t.Errorf("with fallback, keyset missing in the fallback: error %q does not say what the fallback region answered", err)
	}

	// Four decrypts fell back; one warning says so, the rest are debug.
	if warn, all := logs.matching("WARN kmsclient: decrypting in a fallback region", "fallback=us-west"), logs.matching("decrypting in a fallback region"); len(warn) != 1 || len(all) != 4 {
		t.Errorf("fallback log records: %d warnings, %d in all (%q); want 1 and 4", len(warn), len(all), all)
	}

	got, err = aeadOf(t, noFB, east, ledger).DecryptWithContext(ctx, ct, []byte("ad"))
	if status.Code(err) != codes.Unavailable || got != nil {
		t.Errorf("without fallback: Decrypt = %q, %v, want Unavailable", got, err)
	}
	enc, err := aeadOf(t, withFB, east, ledger).EncryptWithContext(ctx, pt, nil)
	if status.Code(err) != codes.Unavailable || enc != nil {
		t.Errorf("with fallback: Encrypt = %x, %v, want Unavailable (encrypt never falls back)", enc, err)
	} else if !strings.Contains(err.Error(), "in region us-east:") {
		t.Errorf("Encrypt error %q does not name region us-east alone", err)
	}
	if got := sWest.dataPlaneCalls(t)["ok"] - westBefore; got != 2 {
		t.Errorf("us-west served %d calls, want still 2: no encrypt fell back", got)
	}
}

// TestBadCiphertextsAndAccess: ciphertexts that do not decrypt, unknown
// keysets and refused identities give their codes at once (one attempt),
// nil output, and errors that hold neither plaintext nor ciphertext.
func TestBadCiphertextsAndAccess(t *testing.T) {
	w := testWorld(t)
	other := kmstest.NewKeyset(t, "payments/other", kmstest.ACL("client/us-east/app"))
	w.keysets[east] = append(w.keysets[east], other)
	s := w.startKMS(east, "kms-1")
	count := &attemptCounter{}
	c := w.client(appID, kmsclient.WithEndpoints(east, s.addr), count.option())
	intruder := w.client(intruderID, kmsclient.WithEndpoints(east, s.addr), count.option())
	a := aeadOf(t, c, east, ledger)
	ctx := ctxFor(t)

	pt := []byte("secret data key 0123456789abcdef")
	ad := []byte("object-1")
	ct, err := a.EncryptWithContext(ctx, pt, ad)
	if err != nil {
		t.Fatal(err)
	}
	garbage := make([]byte, 64)
	rand.Read(garbage)
	garbage[0] = 0xff // no TINK prefix: a named version the keyset lacks is NotFound, below
	flipped := bytes.Clone(ct)
	flipped[len(flipped)-1] ^= 1

	tests := []struct {
		name     string
		aead     *kmsclient.AEAD
		ct, ad   []byte
		wantCode codes.Code
	}{
		{"wrong AD", a, ct, []byte("object-2"), codes.InvalidArgument},
		{"no AD", a, ct, nil, codes.InvalidArgument},
		{"truncated by one", a, ct[:len(ct)-1], ad, codes.InvalidArgument},
		{"prefix only", a, ct[:5], ad, codes.InvalidArgument},
		{"empty", a, []byte{}, ad, codes.InvalidArgument},
		{"bit flipped", a, flipped, ad, codes.InvalidArgument},
		{"garbage", a, garbage, ad, codes.InvalidArgument},
		{"other keyset", aeadOf(t, c, east, "payments/other"), ct, ad, codes.NotFound}, // its key version is not payments/other's
		{"unknown keyset", aeadOf(t, c, east, "payments/nope"), ct, ad, codes.PermissionDenied},
		{"unauthorized identity", aeadOf(t, intruder, east, ledger), ct, ad, codes.PermissionDenied},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			count.reset()
			got, err := tc.aead.DecryptWithContext(ctx, tc.ct, tc.ad)
			if err == nil || got != nil {
				t.Fatalf("Decrypt = %q, %v, want nil and an error", got, err)
			}
			if code := status.Code(err); code != tc.wantCode {
				t.Errorf("status.Code(%v) = %v, want %v", err, code, tc.wantCode)
			}
			if n := count.total(); n != 1 {
				t.Errorf("%d attempts, want 1 (not retried)", n)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, "kmsclient: decrypt with keyset ") {
				t.Errorf("error %q lacks the kmsclient prefix and the operation", msg)
			}
			if len(tc.ct) >= 8 && strings.Contains(msg, string(tc.ct[5:])) || strings.Contains(msg, string(pt)) {
				t.Errorf("error %q holds ciphertext or plaintext bytes", msg)
			}
		})
	}

	count.reset()
	if got, err := aeadOf(t, intruder, east, ledger).EncryptWithContext(ctx, pt, ad); status.Code(err) != codes.PermissionDenied || got != nil || count.total() != 1 {
		t.Errorf("unauthorized Encrypt = %x, %v after %d attempts, want PermissionDenied after 1", got, err, count.total())
	}

	t.Run("empty plaintext", func(t *testing.T) {
		ct, err := a.EncryptWithContext(ctx, nil, nil)
		if err != nil || len(ct) == 0 {
			t.Fatalf("Encrypt(empty) = %x, %v", ct, err)
		}
		got, err := a.DecryptWithContext(ctx, ct, nil)
		if err != nil || got == nil || len(got) != 0 {
			t.Errorf("Decrypt(Encrypt(empty)) = %#v, %v, want []byte{}, nil", got, err)
		}
	})
}

// TestServerIdentity: a region's endpoint answered by a KMS of another
// region is refused in the handshake (and sent nothing), with every identity
// route: WithSource, WithIdentityFiles and WithTLSConfig (whose own
// authorizer would accept any member of the trust domain).
func TestServerIdentity(t *testing.T) {
	w := testWorld(t)
	sEast, sWest := w.startKMS(east, "kms-1"), w.startKMS(west, "kms-1")
	_, certFile, keyFile := w.pki.Issue(appID, devca.LeafOptions{})
	cert := w.pki.TLSCertificate(appID, devca.LeafOptions{})
	memberTLS := identity.StaticClientTLSConfig(cert, w.pki.Bundle(), identity.MemberOf(identitytest.TrustDomain))

	routes := map[string]kmsclient.Option{
		"WithSource":        kmsclient.WithSource(w.pki.Source(appID)),
		"WithIdentityFiles": kmsclient.WithIdentityFiles(certFile, keyFile, w.pki.BundleFile()),
		"WithTLSConfig":     kmsclient.WithTLSConfig(memberTLS),
		// Standard chain and host name verification (the leaves carry
		// 127.0.0.1), without go-spiffe.
		"WithTLSConfig standard": kmsclient.WithTLSConfig(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: caPool(w.pki)}),
	}
	fast := kmsclient.WithRetry(kmsclient.RetryPolicy{MaxAttempts: 2, InitialBackoff: time.Millisecond, MaxBackoff: time.Millisecond})
	ctx := ctxFor(t)
	for name, route := range routes {
		t.Run(name, func(t *testing.T) {
			// us-east's endpoint is the us-west server.
			c, err := kmsclient.New(route, fast, kmsclient.WithEndpoints(east, sWest.addr))
			if err != nil {
				t.Fatalf("New = %v", err)
			}
			defer c.Close()
			ct, err := aeadOf(t, c, east, ledger).EncryptWithContext(ctx, []byte("dek"), nil)
			if err == nil || ct != nil {
				t.Fatalf("Encrypt via a us-west server as us-east = %x, %v, want an error", ct, err)
			}
			if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "spiffe://cairn.test/kms/us-west/kms-1 is not a KMS of region us-east") {
				t.Errorf("Encrypt error = %v, want Unavailable naming the refused server", err)
			}
			c.Close()
			c, err = kmsclient.New(route, fast, kmsclient.WithEndpoints(west, sEast.addr, sWest.addr))
			if err != nil {
				t.Fatalf("New = %v", err)
			}
			defer c.Close()
			// For us-west, the us-east server is refused and the us-west
			// one used.
			ct, err = aeadOf(t, c, west, ledger).EncryptWithContext(ctx, []byte("dek"), nil)
			if err != nil {
				t.Fatalf("Encrypt in us-west = %v", err)
			}
			if got, err := aeadOf(t, c, west, ledger).DecryptWithContext(ctx, ct, nil); err != nil || string(got) != "dek" {
				t.Errorf("Decrypt in us-west = %q, %v", got, err)
			}
		})
	}
	if got := sEast.dataPlaneCalls(t); len(got) != 0 {
		t.Errorf("the us-east server, listed for us-west, was sent calls: %v", got)
	}
	if got := sWest.dataPlaneCalls(t); got["ok"] != 2*len(routes) || len(got) != 1 {
		t.Errorf("the us-west server audited %v, want only its %d own calls", got, 2*len(routes))
	}
}

// TestUseAfterClose: calls after Close fail with ErrClosed and open no
// connection.
func TestUseAfterClose(t *testing.T) {
	w := testWorld(t)
	s := w.startKMS(east, "kms-1")
	c, err := kmsclient.New(kmsclient.WithSource(w.pki.Source(appID)), kmsclient.WithEndpoints(east, s.addr))
	if err != nil {
		t.Fatal(err)
	}
	a := aeadOf(t, c, east, ledger)
	if _, err := a.Encrypt([]byte("x"), nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close = %v", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close = %v, want nil", err)
	}
	if got, err := a.Encrypt([]byte("x"), nil); !errors.Is(err, kmsclient.ErrClosed) || got != nil {
		t.Errorf("Encrypt after Close = %x, %v, want ErrClosed", got, err)
	}
}

// slogOf returns a logger writing to h.
func slogOf(h *logRecorder) *slog.Logger { return slog.New(h) }

var _ tink.AEADWithContext = (*kmsclient.AEAD)(nil)

// TestShortDeadlineFailsOverHungEndpoint: a caller whose deadline is shorter
// than the attempt timeout still gets off a hung endpoint: with another
// endpoint left, an attempt takes at most half the time left, so the call
// succeeds on the next endpoint and later calls stay there.
func TestShortDeadlineFailsOverHungEndpoint(t *testing.T) {
	w := testWorld(t)
	hung := newHungListener(t)
	s := w.startKMS(east, "kms-1")
	count := &attemptCounter{}
	c := w.client(appID, kmsclient.WithEndpoints(east, hung.addr(), s.addr), count.option()) // default 2s attempt timeout
	a := aeadOf(t, c, east, ledger)
	const calls = 10
	for i := range calls {
		ctx, cancel := context.WithTimeout(t.Context(), 1500*time.Millisecond)
		_, err := a.EncryptWithContext(ctx, []byte{byte(i)}, nil)
		cancel()
		if err != nil {
			t.Fatalf("call %d with a 1.5s deadline: Encrypt = %v", i, err)
		}
	}
	if hung.accepted() == 0 {
		t.Error("the hung endpoint was never connected to")
	}
	if got := count.total(); got != calls+1 {
		t.Errorf("%d attempts, want %d (one cut short on the hung endpoint, then all on the good one)", got, calls+1)
	}
}
