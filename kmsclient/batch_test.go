package kmsclient_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/insecurecleartextkeyset"
	"github.com/tink-crypto/tink-go/v2/keyset"
	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/kms/kmstest"
	"github.com/cairnkms/cairn/kmsclient"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// The fake KMS's batch and data-key methods: each answers as the fake is
// scripted, then one result per item (item i fails with InvalidArgument if
// its data is "bad").
func (f *fakeKMS) EncryptBatch(ctx context.Context, req *kmsv1.EncryptBatchRequest) (*kmsv1.EncryptBatchResponse, error) {
	f.calls.Add(1)
	if err := (*f.answer.Load())(ctx); err != nil {
		return nil, err
	}
	out := &kmsv1.EncryptBatchResponse{}
	for _, it := range req.GetItems() {
		r := &kmsv1.EncryptResult{Result: &kmsv1.EncryptResult_Ok{Ok: &kmsv1.EncryptResponse{Ciphertext: []byte("fake ciphertext"), KeyId: 1}}}
		if string(it.GetPlaintext()) == "bad" {
			r.Result = &kmsv1.EncryptResult_Error{Error: &kmsv1.ItemError{Code: uint32(codes.InvalidArgument), Message: "fake: bad item"}}
		}
		out.Results = append(out.Results, r)
	}
	return out, nil
}

func (f *fakeKMS) DecryptBatch(ctx context.Context, req *kmsv1.DecryptBatchRequest) (*kmsv1.DecryptBatchResponse, error) {
	f.calls.Add(1)
	if err := (*f.answer.Load())(ctx); err != nil {
		return nil, err
	}
	out := &kmsv1.DecryptBatchResponse{}
	for _, it := range req.GetItems() {
		r := &kmsv1.DecryptResult{Result: &kmsv1.DecryptResult_Ok{Ok: &kmsv1.DecryptResponse{Plaintext: []byte("fake plaintext"), KeyId: 1}}}
		if string(it.GetCiphertext()) == "bad" {
			r.Result = &kmsv1.DecryptResult_Error{Error: &kmsv1.ItemError{Code: uint32(codes.InvalidArgument), Message: "fake: bad item"}}
		}
		out.Results = append(out.Results, r)
	}
	return out, nil
}

func (f *fakeKMS) GenerateDataKey(ctx context.Context, req *kmsv1.GenerateDataKeyRequest) (*kmsv1.GenerateDataKeyResponse, error) {
	f.calls.Add(1)
	if err := (*f.answer.Load())(ctx); err != nil {
		return nil, err
	}
	return &kmsv1.GenerateDataKeyResponse{PlaintextKey: make([]byte, 32), WrappedKey: []byte("fake wrapped"), KeyId: 1}, nil
}

// items makes n batch items with data and associated data naming their
// index.
func items(n int, prefix string) []kmsclient.BatchItem {
	out := make([]kmsclient.BatchItem, n)
	for i := range out {
		out[i] = kmsclient.BatchItem{Data: fmt.Appendf(nil, "%s data %d", prefix, i), AssociatedData: fmt.Appendf(nil, "%s ad %d", prefix, i)}
	}
	return out
}

// TestBatchRoundTrip: EncryptBatch's ciphertexts decrypt with DecryptBatch
// and with Decrypt, Encrypt's with DecryptBatch; each item's failure (wrong
// associated data, tampered, over the server's size limit) is its own, in
// its place, with its code; one attempt each.
func TestBatchRoundTrip(t *testing.T) {
	w := testWorld(t)
	s := w.startKMS(east, "kms-1")
	count := &attemptCounter{}
	c := w.client(appID, kmsclient.WithEndpoints(east, s.addr), count.option())
	a := aeadOf(t, c, east, ledger)
	ctx := ctxFor(t)

	in := items(50, "obj")
	in[7].Data = nil                                        // the empty plaintext
	in[9] = kmsclient.BatchItem{Data: make([]byte, 65<<10)} // over the server's 64 KiB, under the client's 1 MiB
	enc, err := a.EncryptBatch(ctx, in)
	if err != nil || len(enc) != len(in) {
		t.Fatalf("EncryptBatch = %d results, %v, want %d", len(enc), err, len(in))
	}
	for i, r := range enc {
		if i == 9 {
			if status.Code(r.Err) != codes.InvalidArgument || r.Data != nil || !strings.Contains(r.Err.Error(), "item 9 ") {
				t.Errorf("EncryptBatch item 9 (too large) = %x, %v, want InvalidArgument naming item 9", r.Data, r.Err)
			}
			continue
		}
		if r.Err != nil || len(r.Data) == 0 || r.KeyID != w.ledger.Primary() {
			t.Fatalf("EncryptBatch item %d = %x, key %d, %v, want a ciphertext by key %d", i, r.Data, r.KeyID, r.Err, w.ledger.Primary())
		}
	}
	if got, err := a.DecryptWithContext(ctx, enc[3].Data, in[3].AssociatedData); err != nil || !bytes.Equal(got, in[3].Data) {
		t.Errorf("Decrypt(EncryptBatch item 3) = %q, %v, want %q", got, err, in[3].Data)
	}
	single, err := a.EncryptWithContext(ctx, []byte("single"), []byte("single ad"))
	if err != nil {
		t.Fatal(err)
	}

	dec := make([]kmsclient.BatchItem, 0, len(in)+3)
	for i, r := range enc {
		if i != 9 {
			dec = append(dec, kmsclient.BatchItem{Data: r.Data, AssociatedData: in[i].AssociatedData})
		}
	}
	tampered := bytes.Clone(enc[0].Data)
	tampered[len(tampered)-1] ^= 1
	dec = append(dec,
		kmsclient.BatchItem{Data: single, AssociatedData: []byte("single ad")},
		kmsclient.BatchItem{Data: enc[1].Data, AssociatedData: []byte("wrong ad")},
		kmsclient.BatchItem{Data: tampered, AssociatedData: in[0].AssociatedData},
	)
	count.reset()
	got, err := a.DecryptBatch(ctx, dec)
	if err != nil || len(got) != len(dec) {
		t.Fatalf("DecryptBatch = %d results, %v, want %d", len(got), err, len(dec))
	}
	n := len(dec)
	for i, r := range got[:n-3] {
		want := in[i]
		if i >= 9 {
			want = in[i+1]
		}
		if r.Err != nil || r.Data == nil || !bytes.Equal(r.Data, want.Data) || r.KeyID != w.ledger.Primary() {
			t.Errorf("DecryptBatch item %d = %q, key %d, %v, want %q", i, r.Data, r.KeyID, r.Err, want.Data)
		}
	}
	if r := got[n-3]; r.Err != nil || string(r.Data) != "single" {
		t.Errorf("DecryptBatch(Encrypt's ciphertext) = %q, %v", r.Data, r.Err)
	}
	for _, i := range []int{n - 2, n - 1} {
		if r := got[i]; status.Code(r.Err) != codes.InvalidArgument || r.Data != nil || !strings.Contains(r.Err.Error(), fmt.Sprintf("item %d ", i)) {
			t.Errorf("DecryptBatch item %d (does not decrypt) = %q, %v, want InvalidArgument naming the item", i, r.Data, r.Err)
		}
	}
	if m := count.total(); m != 1 {
		t.Errorf("DecryptBatch made %d attempts, want 1", m)
	}

	count.reset()
	if got, err := a.EncryptBatch(ctx, nil); err != nil || got == nil || len(got) != 0 || count.total() != 0 {
		t.Errorf("EncryptBatch(no items) = %v, %v after %d attempts, want no results, no call", got, err, count.total())
	}
	if got, err := a.DecryptBatch(ctx, []kmsclient.BatchItem{}); err != nil || got == nil || len(got) != 0 || count.total() != 0 {
		t.Errorf("DecryptBatch(no items) = %v, %v after %d attempts, want no results, no call", got, err, count.total())
	}
}

// TestBatchRefused: a batch over the server's item limit, an item over the
// client's size limit, an unauthorized identity and an unknown keyset
// refuse the whole batch, with their codes, and are not retried.
func TestBatchRefused(t *testing.T) {
	w := testWorld(t)
	s := w.startKMS(east, "kms-1")
	count := &attemptCounter{}
	c := w.client(appID, kmsclient.WithEndpoints(east, s.addr), kmsclient.WithMaxPayload(1<<10), count.option())
	intruder := w.client(intruderID, kmsclient.WithEndpoints(east, s.addr), count.option())
	a := aeadOf(t, c, east, ledger)
	ctx := ctxFor(t)

	big := items(2, "x")
	big[1].Data = make([]byte, 3<<10) // over the limit, and over the limit plus a ciphertext's overhead
	bigAD := items(2, "x")
	bigAD[1].AssociatedData = make([]byte, 1<<10+1)
	ct, err := a.EncryptWithContext(ctx, []byte("pt"), nil)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		aead     *kmsclient.AEAD
		items    []kmsclient.BatchItem
		wantCode codes.Code
		wantMsg  string
		attempts int
	}{
		{"over the server's limit", a, items(kmsclient.DefaultServerMaxBatch+1, "x"), codes.InvalidArgument, "more than the limit of 1000", 1},
		{"item over WithMaxPayload", a, big, codes.InvalidArgument, "item 1's data is 3072 bytes, more than the client's limit", 0},
		{"item's AD over WithMaxPayload", a, bigAD, codes.InvalidArgument, "associated data is 1025 bytes", 0},
		{"unauthorized identity", aeadOf(t, intruder, east, ledger), items(3, "x"), codes.PermissionDenied, "may not use keyset", 1},
		{"unknown keyset", aeadOf(t, c, east, "payments/nope"), items(3, "x"), codes.PermissionDenied, "may not use keyset", 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, call := range []struct {
				name string
				f    func(context.Context, []kmsclient.BatchItem) ([]kmsclient.BatchResult, error)
			}{{"EncryptBatch", tc.aead.EncryptBatch}, {"DecryptBatch", tc.aead.DecryptBatch}} {
				batch := tc.items
				if call.name == "DecryptBatch" && tc.attempts > 0 {
					batch = make([]kmsclient.BatchItem, len(tc.items))
					for i := range batch {
						batch[i].Data = ct
					}
				}
				count.reset()
				got, err := call.f(ctx, batch)
				if err == nil || got != nil {
					t.Fatalf("%s = %d results, %v, want an error", call.name, len(got), err)
				}
				if code := status.Code(err); code != tc.wantCode || !strings.Contains(err.Error(), tc.wantMsg) {
					t.Errorf("%s = %v, want %v containing %q", call.name, err, tc.wantCode, tc.wantMsg)
				}
				if n := count.total(); n != tc.attempts {
					t.Errorf("%s made %d attempts, want %d", call.name, n, tc.attempts)
				}
			}
		})
	}
}

// TestBatchRetries: a batch that brought no answer is retried as a whole on
// Unavailable and on a ResourceExhausted with the KMS's retry hint, not on
// a ResourceExhausted without one (a message-size limit) nor on a refusal;
// an answered batch is never retried, whatever its items say.
func TestBatchRetries(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	policy := kmsclient.RetryPolicy{MaxAttempts: 3, InitialBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond}
	tests := []struct {
		name     string
		answer   func(context.Context) error
		wantCode codes.Code
		calls    int64
	}{
		{"Unavailable", answerCode(codes.Unavailable), codes.Unavailable, 3},
		{"ResourceExhausted with a hint", answerRetryAfter(time.Millisecond), codes.ResourceExhausted, 3},
		{"ResourceExhausted without a hint", answerCode(codes.ResourceExhausted), codes.ResourceExhausted, 1},
		{"InvalidArgument", answerCode(codes.InvalidArgument), codes.InvalidArgument, 1},
		{"PermissionDenied", answerCode(codes.PermissionDenied), codes.PermissionDenied, 1},
		{"answered with a failed item", answerCode(codes.OK), codes.OK, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := startFake(t, pki, fakeEast1, tc.answer)
			a := aeadOf(t, fakeClient(t, pki, kmsclient.WithEndpoints(east, f.addr), kmsclient.WithRetry(policy)), east, ledger)
			batch := []kmsclient.BatchItem{{Data: []byte("good")}, {Data: []byte("bad")}}
			for _, call := range []struct {
				name string
				f    func(context.Context, []kmsclient.BatchItem) ([]kmsclient.BatchResult, error)
			}{{"EncryptBatch", a.EncryptBatch}, {"DecryptBatch", a.DecryptBatch}} {
				f.calls.Store(0)
				got, err := call.f(t.Context(), batch)
				if n := f.calls.Load(); n != tc.calls {
					t.Errorf("%s: %d calls, want %d", call.name, n, tc.calls)
				}
				if tc.wantCode != codes.OK {
					if status.Code(err) != tc.wantCode || got != nil {
						t.Errorf("%s = %v, %v, want %v", call.name, got, err, tc.wantCode)
					}
					continue
				}
				if err != nil || len(got) != 2 || got[0].Err != nil || status.Code(got[1].Err) != codes.InvalidArgument || got[1].Data != nil {
					t.Errorf("%s = %+v, %v, want item 0 done and item 1 InvalidArgument", call.name, got, err)
				}
			}
		})
	}
}

// TestDecryptBatchFallback: with the region down, a batch decrypt falls
// back like Decrypt; the fallback region's per-item refusals are no verdict
// (Unavailable, naming what the region said); EncryptBatch never falls back.
func TestDecryptBatchFallback(t *testing.T) {
	w := testWorld(t)
	sEast, sWest := w.startKMS(east, "kms-1"), w.startKMS(west, "kms-1")
	fast := kmsclient.WithRetry(kmsclient.RetryPolicy{MaxAttempts: 2, InitialBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond})
	eps := []kmsclient.Option{kmsclient.WithEndpoints(east, sEast.addr), kmsclient.WithEndpoints(west, sWest.addr), fast}
	withFB := aeadOf(t, w.client(appID, append(eps, kmsclient.WithDecryptFallback(east, west))...), east, ledger)
	noFB := aeadOf(t, w.client(appID, eps...), east, ledger)
	ctx := ctxFor(t)

	in := items(5, "obj")
	enc, err := withFB.EncryptBatch(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	dec := make([]kmsclient.BatchItem, len(in))
	for i, r := range enc {
		dec[i] = kmsclient.BatchItem{Data: r.Data, AssociatedData: in[i].AssociatedData}
	}
	dec[2].AssociatedData = []byte("wrong ad")
	// With both regions up, the batch is us-east's: item 2 is InvalidArgument.
	got, err := withFB.DecryptBatch(ctx, dec)
	if err != nil || status.Code(got[2].Err) != codes.InvalidArgument {
		t.Fatalf("DecryptBatch = %v, item 2 %v, want item 2 InvalidArgument", err, got[2].Err)
	}
	westBefore := sWest.dataPlaneCalls(t)["ok"]

	sEast.Close()
	got, err = withFB.DecryptBatch(ctx, dec)
	if err != nil || len(got) != len(dec) {
		t.Fatalf("with fallback: DecryptBatch = %d results, %v", len(got), err)
	}
	for i, r := range got {
		if i == 2 {
			if status.Code(r.Err) != codes.Unavailable || r.Data != nil || !strings.Contains(r.Err.Error(), "fallback region us-west refused the item: InvalidArgument") {
				t.Errorf("with fallback: item 2 (wrong AD) = %q, %v, want Unavailable naming us-west's InvalidArgument", r.Data, r.Err)
			}
			continue
		}
		if r.Err != nil || !bytes.Equal(r.Data, in[i].Data) {
			t.Errorf("with fallback: item %d = %q, %v, want %q", i, r.Data, r.Err, in[i].Data)
		}
	}
	if got := sWest.dataPlaneCalls(t)["ok"] - westBefore; got != 0 {
		// dataPlaneCalls counts Encrypt and Decrypt only; the batch is
		// audited under its own operation.
		t.Errorf("us-west audited %d single calls, want 0", got)
	}
	if got, err := noFB.DecryptBatch(ctx, dec); status.Code(err) != codes.Unavailable || got != nil {
		t.Errorf("without fallback: DecryptBatch = %v, %v, want Unavailable", got, err)
	}
	if got, err := withFB.EncryptBatch(ctx, in); status.Code(err) != codes.Unavailable || got != nil {
		t.Errorf("with fallback: EncryptBatch = %v, %v, want Unavailable (encrypt never falls back)", got, err)
	} else if !strings.Contains(err.Error(), "encrypt batch with keyset \"payments/ledger\" in region us-east:") {
		t.Errorf("EncryptBatch error %q does not name region us-east alone", err)
	}
}

// TestGenerateDataKey: a raw AES-GCM key and a Tink keyset, each usable,
// whose wrapped form Decrypt (with the associated data) turns back into the
// plaintext key; refusals; and a DataKey never prints its plaintext.
func TestGenerateDataKey(t *testing.T) {
	w := testWorld(t)
	noDK := kmstest.NewKeyset(t, "payments/no-dk", kmstest.ACL("client/us-east/app"))
	noDK.ACL.GenerateDataKey = nil
	w.keysets[east] = append(w.keysets[east], noDK)
	s := w.startKMS(east, "kms-1")
	count := &attemptCounter{}
	c := w.client(appID, kmsclient.WithEndpoints(east, s.addr), count.option())
	a := aeadOf(t, c, east, ledger)
	ctx := ctxFor(t)
	ad := []byte("bucket/object")

	for _, tc := range []struct {
		template string
		size     int
	}{{"AES128_GCM", 16}, {"AES256_GCM", 32}, {"", 32}} {
		k, err := a.GenerateDataKey(ctx, tc.template, kmsclient.DataKeyRaw, ad)
		if err != nil || len(k.Plaintext) != tc.size || k.KeyID != w.ledger.Primary() {
			t.Fatalf("GenerateDataKey(%q, raw) = %v, %v, want a %d-byte key", tc.template, k, err, tc.size)
		}
		if got, err := a.DecryptWithContext(ctx, k.Wrapped, ad); err != nil || !bytes.Equal(got, k.Plaintext) {
			t.Errorf("Decrypt(wrapped %q key) = %v, want the plaintext key", tc.template, err)
		}
		if _, err := a.DecryptWithContext(ctx, k.Wrapped, nil); status.Code(err) != codes.InvalidArgument {
			t.Errorf("Decrypt(wrapped key, no AD) = %v, want InvalidArgument", err)
		}
		b, err := aes.NewCipher(k.Plaintext)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := cipher.NewGCM(b); err != nil {
			t.Fatal(err)
		}
		for _, s := range []string{k.String(), fmt.Sprintf("%v %+v %#v", k, *k, k), k.LogValue().String()} {
			if strings.Contains(s, string(k.Plaintext)) || strings.Contains(s, fmt.Sprintf("%x", k.Plaintext)) || strings.Contains(s, fmt.Sprint(k.Plaintext)) {
				t.Errorf("DataKey printed its plaintext: %s", s)
			}
		}
		k.Wipe()
		if k.Plaintext != nil {
			t.Errorf("Wipe left the plaintext")
		}
	}

	k, err := a.GenerateDataKey(ctx, "CHACHA20_POLY1305", kmsclient.DataKeyTinkKeyset, nil)
	if err != nil {
		t.Fatal(err)
	}
	h, err := insecurecleartextkeyset.Read(keyset.NewBinaryReader(bytes.NewReader(k.Plaintext)))
	if err != nil {
		t.Fatalf("the Tink keyset does not parse: %v", err)
	}
	if n := len(h.KeysetInfo().GetKeyInfo()); n != 1 || !strings.HasSuffix(h.KeysetInfo().GetKeyInfo()[0].GetTypeUrl(), "ChaCha20Poly1305Key") {
		t.Errorf("keyset = %v, want one ChaCha20Poly1305 key", h.KeysetInfo())
	}
	prim, err := aead.New(h)
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, prim)
	if got, err := a.DecryptWithContext(ctx, k.Wrapped, nil); err != nil || !bytes.Equal(got, k.Plaintext) {
		t.Errorf("Decrypt(wrapped keyset) = %v, want the keyset", err)
	}

	for _, tc := range []struct {
		name     string
		aead     *kmsclient.AEAD
		template string
		format   kmsclient.DataKeyFormat
		wantCode codes.Code
		attempts int
	}{
		{"unknown template", a, "DES", kmsclient.DataKeyTinkKeyset, codes.InvalidArgument, 1},
		{"raw for a template without raw keys", a, "CHACHA20_POLY1305", kmsclient.DataKeyRaw, codes.InvalidArgument, 1},
		{"unknown format", a, "AES256_GCM", kmsclient.DataKeyFormat(7), codes.InvalidArgument, 0},
		{"no generate_data_key permission", aeadOf(t, c, east, "payments/no-dk"), "", kmsclient.DataKeyRaw, codes.PermissionDenied, 1},
	} {
		count.reset()
		k, err := tc.aead.GenerateDataKey(ctx, tc.template, tc.format, nil)
		if status.Code(err) != tc.wantCode || k != nil || count.total() != tc.attempts {
			t.Errorf("%s: GenerateDataKey = %v, %v after %d attempts, want %v after %d", tc.name, k, err, count.total(), tc.wantCode, tc.attempts)
		}
	}
}

func roundTrip(t *testing.T, a tink.AEAD) {
	t.Helper()
	ct, err := a.Encrypt([]byte("x"), []byte("y"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := a.Decrypt(ct, []byte("y")); err != nil || string(got) != "x" {
		t.Errorf("round trip = %q, %v", got, err)
	}
}

// TestGenerateDataKeyRetries: GenerateDataKey retries as Encrypt does and
// never falls back.
func TestGenerateDataKeyRetries(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	fe := startFake(t, pki, fakeEast1, answerCode(codes.Unavailable))
	fw := startFake(t, pki, "spiffe://cairn.test/kms/us-west/fake-1", answerCode(codes.OK))
	policy := kmsclient.RetryPolicy{MaxAttempts: 3, InitialBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond}
	c := fakeClient(t, pki, kmsclient.WithEndpoints(east, fe.addr), kmsclient.WithEndpoints(west, fw.addr),
		kmsclient.WithDecryptFallback(east, west), kmsclient.WithRetry(policy))
	a := aeadOf(t, c, east, ledger)
	if k, err := a.GenerateDataKey(t.Context(), "", kmsclient.DataKeyRaw, nil); status.Code(err) != codes.Unavailable || k != nil {
		t.Errorf("GenerateDataKey = %v, %v, want Unavailable", k, err)
	}
	if e, w := fe.calls.Load(), fw.calls.Load(); e != 3 || w != 0 {
		t.Errorf("calls us-east %d, us-west %d, want 3 and 0", e, w)
	}
	fe.set(answerCode(codes.OK))
	if k, err := a.GenerateDataKey(t.Context(), "", kmsclient.DataKeyRaw, nil); err != nil || len(k.Plaintext) != 32 {
		t.Errorf("GenerateDataKey = %v, %v, want a key", k, err)
	}
}
