package kms_test

import (
	"bytes"
	"crypto/rand"
	"strings"
	"testing"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/insecurecleartextkeyset"
	"github.com/tink-crypto/tink-go/v2/keyset"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

func TestRoundTripAcrossServers(t *testing.T) {
	e := newEnv(t)
	a, b := e.start(kms1ID, ""), e.start(kms2ID, "")
	sb := e.bundle(e.ks)
	e.apply(a, sb)
	e.apply(b, sb)
	ca, cb := e.client(appID, a), e.client(appID, b)
	tests := []struct {
		name   string
		pt, ad []byte
	}{
		{"dek with ad", bytes.Repeat([]byte{7}, 32), []byte("bucket/object-1")},
		{"no ad", []byte("dek"), nil},
		{"empty plaintext", nil, []byte("ad")},
		{"max payload", bytes.Repeat([]byte{1}, kms.DefaultMaxPayload), bytes.Repeat([]byte{2}, kms.DefaultMaxPayload)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enc := encrypt(t, ca, ledger, tt.pt, tt.ad)
			if enc.GetKeyId() != e.ks.Primary() {
				t.Errorf("Encrypt key_id = %d, want primary %d", enc.GetKeyId(), e.ks.Primary())
			}
			for name, c := range map[string]kmsv1.KMSClient{"same server": ca, "other server": cb} {
				dec := decrypt(t, c, ledger, enc.GetCiphertext(), tt.ad)
				if !bytes.Equal(dec.GetPlaintext(), tt.pt) || dec.GetKeyId() != e.ks.Primary() {
					t.Errorf("Decrypt on %s = %d bytes, key %d; want the %d-byte plaintext, key %d", name, len(dec.GetPlaintext()), dec.GetKeyId(), len(tt.pt), e.ks.Primary())
				}
			}
		})
	}
}

func TestBatches(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	e.apply(s, e.bundle(e.ks))
	c := e.client(appID, s)
	big := make([]byte, kms.DefaultMaxPayload+1)
	enc, err := c.EncryptBatch(ctx(t), &kmsv1.EncryptBatchRequest{Keyset: ledger, Items: []*kmsv1.EncryptItem{
		{Plaintext: []byte("dek-0"), AssociatedData: []byte("ad-0")},
		{Plaintext: big},
		{Plaintext: []byte("dek-2")},
		{Plaintext: []byte("dek-3"), AssociatedData: big},
	}})
	if err != nil {
		t.Fatalf("EncryptBatch = %v", err)
	}
	wantEnc := []codes.Code{codes.OK, codes.InvalidArgument, codes.OK, codes.InvalidArgument}
	if len(enc.GetResults()) != len(wantEnc) {
		t.Fatalf("EncryptBatch results = %d, want %d", len(enc.GetResults()), len(wantEnc))
	}
	for i, r := range enc.GetResults() {
		if got := codes.Code(r.GetError().GetCode()); got != wantEnc[i] || (got == codes.OK) != (r.GetOk() != nil) {
			t.Errorf("EncryptBatch item %d = %v, want %v", i, r, wantEnc[i])
		}
	}
	if msg := enc.GetResults()[1].GetError().GetMessage(); !strings.Contains(msg, "plaintext is 65537 bytes") {
		t.Errorf("EncryptBatch oversized item message = %q, want it to say the size", msg)
	}
	ct0, ct2 := enc.GetResults()[0].GetOk().GetCiphertext(), enc.GetResults()[2].GetOk().GetCiphertext()
	dec, err := c.DecryptBatch(ctx(t), &kmsv1.DecryptBatchRequest{Keyset: ledger, Items: []*kmsv1.DecryptItem{
		{Ciphertext: ct0, AssociatedData: []byte("ad-0")},
		{Ciphertext: ct0, AssociatedData: []byte("wrong")},
		{Ciphertext: ct2},
		{Ciphertext: []byte("garbage")},
		{Ciphertext: ct2[:len(ct2)-3]},
	}})
	if err != nil {
		t.Fatalf("DecryptBatch = %v", err)
	}
	want := []string{"dek-0", "", "dek-2", "", ""}
	for i, r := range dec.GetResults() {
		if want[i] != "" {
			if string(r.GetOk().GetPlaintext()) != want[i] || r.GetOk().GetKeyId() != e.ks.Primary() {
				t.Errorf("DecryptBatch item %d = %v, want %q", i, r, want[i])
			}
			continue
		}
		if r.GetError().GetCode() != uint32(codes.InvalidArgument) || r.GetError().GetMessage() != decryptM {
			t.Errorf("DecryptBatch item %d = %v, want InvalidArgument %q", i, r, decryptM)
		}
	}
}

func TestGenerateDataKey(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	e.apply(s, e.bundle(e.ks))
	c := e.client(appID, s)
	tests := []struct {
		template string
		format   kmsv1.DataKeyFormat
		code     codes.Code
		rawLen   int // RAW only
	}{
		{"AES256_GCM", kmsv1.DataKeyFormat_DATA_KEY_FORMAT_TINK_KEYSET, codes.OK, 0},
		{"", kmsv1.DataKeyFormat_DATA_KEY_FORMAT_UNSPECIFIED, codes.OK, 0},
		{"XCHACHA20_POLY1305", kmsv1.DataKeyFormat_DATA_KEY_FORMAT_TINK_KEYSET, codes.OK, 0},
		{"AES128_GCM", kmsv1.DataKeyFormat_DATA_KEY_FORMAT_RAW, codes.OK, 16},
		{"AES256_GCM", kmsv1.DataKeyFormat_DATA_KEY_FORMAT_RAW, codes.OK, 32},
		{"", kmsv1.DataKeyFormat_DATA_KEY_FORMAT_RAW, codes.OK, 32},
		{"CHACHA20_POLY1305", kmsv1.DataKeyFormat_DATA_KEY_FORMAT_RAW, codes.InvalidArgument, 0},
		{"AES256_GCM_SIV", kmsv1.DataKeyFormat_DATA_KEY_FORMAT_RAW, codes.InvalidArgument, 0},
		{"NOPE", kmsv1.DataKeyFormat_DATA_KEY_FORMAT_TINK_KEYSET, codes.InvalidArgument, 0},
		{"AES256_GCM", kmsv1.DataKeyFormat(9), codes.InvalidArgument, 0},
	}
	for _, tt := range tests {
		t.Run(tt.template+"/"+tt.format.String(), func(t *testing.T) {
			ad := []byte("object-7")
			r, err := c.GenerateDataKey(ctx(t), &kmsv1.GenerateDataKeyRequest{Keyset: ledger, Template: tt.template, Format: tt.format, AssociatedData: ad})
			if status.Code(err) != tt.code {
				t.Fatalf("GenerateDataKey(%q, %v) = %v, want %v", tt.template, tt.format, err, tt.code)
			}
			if tt.code != codes.OK {
				return
			}
			if r.GetKeyId() != e.ks.Primary() {
				t.Errorf("key_id = %d, want %d", r.GetKeyId(), e.ks.Primary())
			}
			// wrapped_key decrypts, with the associated data, to plaintext_key.
			if got := decrypt(t, c, ledger, r.GetWrappedKey(), ad).GetPlaintext(); !bytes.Equal(got, r.GetPlaintextKey()) {
				t.Errorf("Decrypt(wrapped_key) differs from plaintext_key")
			}
			if tt.rawLen != 0 {
				if len(r.GetPlaintextKey()) != tt.rawLen || bytes.Equal(r.GetPlaintextKey(), make([]byte, tt.rawLen)) {
					t.Errorf("RAW key = %d bytes (all zero: %v), want %d random bytes", len(r.GetPlaintextKey()), bytes.Equal(r.GetPlaintextKey(), make([]byte, tt.rawLen)), tt.rawLen)
				}
				return
			}
			h, err := insecurecleartextkeyset.Read(keyset.NewBinaryReader(bytes.NewReader(r.GetPlaintextKey())))
			if err != nil || h.Len() != 1 {
				t.Fatalf("the TINK_KEYSET key does not parse as a one-key keyset: %v", err)
			}
			a, err := aead.New(h)
			if err != nil {
				t.Fatal(err)
			}
			ct, err := a.Encrypt([]byte("data"), []byte("x"))
			if err != nil {
				t.Fatal(err)
			}
			if pt, err := a.Decrypt(ct, []byte("x")); err != nil || string(pt) != "data" {
				t.Errorf("the DEK's AEAD round trip = %q, %v", pt, err)
			}
		})
	}
	// Two data keys are never the same.
	r1, _ := c.GenerateDataKey(ctx(t), &kmsv1.GenerateDataKeyRequest{Keyset: ledger, Format: kmsv1.DataKeyFormat_DATA_KEY_FORMAT_RAW})
	r2, _ := c.GenerateDataKey(ctx(t), &kmsv1.GenerateDataKeyRequest{Keyset: ledger, Format: kmsv1.DataKeyFormat_DATA_KEY_FORMAT_RAW})
	if bytes.Equal(r1.GetPlaintextKey(), r2.GetPlaintextKey()) {
		t.Errorf("two GenerateDataKey calls returned the same key")
	}
}

// TestGenerateDataKeyUnknownTemplateBounded: an unknown Tink template is
// refused with INVALID_ARGUMENT naming it truncated, as every other field
// the caller sends, not whole: a 1 MiB name gives a short message, which
// still lists the templates there are.
func TestGenerateDataKeyUnknownTemplateBounded(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	e.apply(s, e.bundle(e.ks))
	c := e.client(appID, s)
	for _, format := range []kmsv1.DataKeyFormat{kmsv1.DataKeyFormat_DATA_KEY_FORMAT_TINK_KEYSET, kmsv1.DataKeyFormat_DATA_KEY_FORMAT_RAW} {
		_, err := c.GenerateDataKey(ctx(t), &kmsv1.GenerateDataKeyRequest{Keyset: ledger, Template: strings.Repeat("A", 1<<20), Format: format})
		st := status.Convert(err)
		if st.Code() != codes.InvalidArgument || len(st.Message()) > 300 || !strings.Contains(st.Message(), strings.Repeat("A", 128)+`..."`) {
			t.Errorf("GenerateDataKey(%v) of a 1 MiB template name = %v, message of %d bytes %.300q; want InvalidArgument, at most 300 bytes quoting the name truncated",
				format, st.Code(), len(st.Message()), st.Message())
		}
		if format == kmsv1.DataKeyFormat_DATA_KEY_FORMAT_TINK_KEYSET && !strings.Contains(st.Message(), "AES256_GCM") {
			t.Errorf("GenerateDataKey of an unknown template = %q, want the templates there are listed", st.Message())
		}
	}
}

func TestRewrapAfterPromotion(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	e.apply(s, e.bundle(e.ks))
	c := e.client(appID, s)
	old := e.ks.Primary()
	ad := []byte("object")
	ct := encrypt(t, c, ledger, []byte("dek"), ad).GetCiphertext()

	// Add a version everywhere first, then promote it (the rotation order).
	next := e.ks.AddVersion(t)
	e.apply(s, e.bundle(e.ks))
	if got := encrypt(t, c, ledger, []byte("x"), nil).GetKeyId(); got != old {
		t.Errorf("Encrypt after adding a version used %d, want the unchanged primary %d", got, old)
	}
	e.ks.SetPrimary(t, next)
	e.apply(s, e.bundle(e.ks))

	r, err := c.Rewrap(ctx(t), &kmsv1.RewrapRequest{Keyset: ledger, Ciphertext: ct, AssociatedData: ad})
	if err != nil {
		t.Fatalf("Rewrap = %v", err)
	}
	if r.GetSourceKeyId() != old || r.GetKeyId() != next {
		t.Errorf("Rewrap = source %d, key %d; want %d, %d", r.GetSourceKeyId(), r.GetKeyId(), old, next)
	}
	if dec := decrypt(t, c, ledger, r.GetCiphertext(), ad); string(dec.GetPlaintext()) != "dek" || dec.GetKeyId() != next {
		t.Errorf("Decrypt(rewrapped) = %q from %d, want dek from %d", dec.GetPlaintext(), dec.GetKeyId(), next)
	}
	if dec := decrypt(t, c, ledger, ct, ad); string(dec.GetPlaintext()) != "dek" || dec.GetKeyId() != old {
		t.Errorf("Decrypt(original) = %q from %d, want dek from %d", dec.GetPlaintext(), dec.GetKeyId(), old)
	}
	_, err = c.Rewrap(ctx(t), &kmsv1.RewrapRequest{Keyset: ledger, Ciphertext: ct, AssociatedData: []byte("wrong")})
	if status.Code(err) != codes.InvalidArgument || status.Convert(err).Message() != decryptM {
		t.Errorf("Rewrap(wrong ad) = %v, want InvalidArgument %q", err, decryptM)
	}
}

func TestBadInput(t *testing.T) {
	e := newEnv(t)
	const maxRecv = 1 << 20
	s := e.start(kms1ID, "", func(c *kms.Config) { c.MaxRecvMsgSize = maxRecv; c.MaxBatch = 10 })
	other := kmstest.NewKeyset(t, "payments/other", kmstest.ACL("client/us-east/app"))
	e.apply(s, e.bundle(e.ks, other))
	c := e.client(appID, s)
	ad := []byte("ad")
	ct := encrypt(t, c, ledger, []byte("dek"), ad).GetCiphertext()
	otherCT := encrypt(t, c, "payments/other", []byte("dek"), ad).GetCiphertext()
	garbage := make([]byte, len(ct))
	rand.Read(garbage)
	flipped := bytes.Clone(ct)
	flipped[7] ^= 0x80
	big := make([]byte, kms.DefaultMaxPayload+1)
	manyItems := make([]*kmsv1.EncryptItem, 11)
	for i := range manyItems {
		manyItems[i] = &kmsv1.EncryptItem{Plaintext: []byte("x")}
	}
	hugeBatch := make([]*kmsv1.EncryptItem, 20)
	for i := range hugeBatch {
		hugeBatch[i] = &kmsv1.EncryptItem{Plaintext: make([]byte, kms.DefaultMaxPayload)}
	}
	dec := func(keyset string, ct, ad []byte) func() error {
		return func() error {
			_, err := c.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: keyset, Ciphertext: ct, AssociatedData: ad})
			return err
		}
	}
	tests := []struct {
		name string
		call func() error
		code codes.Code
		msg  string // exact message, if set
	}{
		{"unknown keyset encrypt", func() error {
			_, err := c.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: "payments/nope", Plaintext: []byte("x")})
			return err
		}, codes.PermissionDenied, `kms: permission denied: spiffe://cairn.test/client/us-east/app may not use keyset "payments/nope" in region us-east, or it does not exist`},
		{"unknown keyset decrypt", dec("payments/nope", ct, ad), codes.PermissionDenied, ""},
		{"wrong ad", dec(ledger, ct, []byte("other")), codes.InvalidArgument, decryptM},
		{"missing ad", dec(ledger, ct, nil), codes.InvalidArgument, decryptM},
		{"truncated", dec(ledger, ct[:len(ct)-1], ad), codes.InvalidArgument, decryptM},
		{"prefix only", dec(ledger, ct[:5], ad), codes.InvalidArgument, decryptM},
		{"garbage", dec(ledger, garbage, ad), codes.InvalidArgument, decryptM},
		{"flipped bit", dec(ledger, flipped, ad), codes.InvalidArgument, decryptM},
		{"empty", dec(ledger, nil, ad), codes.InvalidArgument, decryptM},
		// Its key ID is one the keyset does not hold: said, to a caller on
		// the ACL (the ID is in the clear).
		{"other keyset's ciphertext", dec(ledger, otherCT, ad), codes.NotFound, ""},
		{"oversized plaintext", func() error {
			_, err := c.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: ledger, Plaintext: big})
			return err
		}, codes.InvalidArgument, "kms: invalid request: plaintext is 65537 bytes, more than the limit of 65536"},
		{"oversized ad", func() error {
			_, err := c.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: ledger, Plaintext: []byte("x"), AssociatedData: big})
			return err
		}, codes.InvalidArgument, ""},
		{"oversized ciphertext", dec(ledger, make([]byte, 2*kms.DefaultMaxPayload), ad), codes.InvalidArgument, ""},
		{"oversized request", func() error {
			_, err := c.EncryptBatch(ctx(t), &kmsv1.EncryptBatchRequest{Keyset: ledger, Items: hugeBatch})
			return err
		}, codes.ResourceExhausted, ""},
		{"too many items", func() error {
			_, err := c.EncryptBatch(ctx(t), &kmsv1.EncryptBatchRequest{Keyset: ledger, Items: manyItems})
			return err
		}, codes.InvalidArgument, "kms: invalid request: 11 items, more than the limit of 10"},
		{"too many decrypt items", func() error {
			items := make([]*kmsv1.DecryptItem, 11)
			_, err := c.DecryptBatch(ctx(t), &kmsv1.DecryptBatchRequest{Keyset: ledger, Items: items})
			return err
		}, codes.InvalidArgument, ""},
		{"client calls admin", func() error {
			_, err := kmsv1.NewKMSAdminClient(e.conn(appID, s.addr)).GetStatus(ctx(t), &kmsv1.GetStatusRequest{})
			return err
		}, codes.PermissionDenied, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if status.Code(err) != tt.code {
				t.Fatalf("%s = %v, want %v", tt.name, err, tt.code)
			}
			if tt.msg != "" && status.Convert(err).Message() != tt.msg {
				t.Errorf("%s message = %q, want %q", tt.name, status.Convert(err).Message(), tt.msg)
			}
		})
	}
	// The server still serves after all that.
	decrypt(t, c, ledger, ct, ad)
}

func TestPermissionDeniedIsAudited(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	readOnly := kmstest.NewKeyset(t, "payments/readonly", &bundlev1.Acl{Decrypt: []string{"client/us-east/app"}})
	e.apply(s, e.bundle(e.ks, readOnly))
	app, intruder := e.client(appID, s), e.client(otherID, s)
	ct := encrypt(t, app, ledger, []byte("dek"), nil).GetCiphertext()

	calls := []struct {
		name, keyset string
		call         func() error
	}{
		{"intruder encrypt", ledger, func() error {
			_, err := intruder.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: ledger, Plaintext: []byte("x")})
			return err
		}},
		{"intruder decrypt", ledger, func() error {
			_, err := intruder.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: ct})
			return err
		}},
		{"intruder batch", ledger, func() error {
			_, err := intruder.DecryptBatch(ctx(t), &kmsv1.DecryptBatchRequest{Keyset: ledger, Items: []*kmsv1.DecryptItem{{Ciphertext: ct}}})
			return err
		}},
		{"intruder generate", ledger, func() error {
			_, err := intruder.GenerateDataKey(ctx(t), &kmsv1.GenerateDataKeyRequest{Keyset: ledger})
			return err
		}},
		{"intruder rewrap", ledger, func() error {
			_, err := intruder.Rewrap(ctx(t), &kmsv1.RewrapRequest{Keyset: ledger, Ciphertext: ct})
			return err
		}},
		{"app encrypts with a decrypt-only keyset", "payments/readonly", func() error {
			_, err := app.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: "payments/readonly", Plaintext: []byte("x")})
			return err
		}},
		{"app generates with a decrypt-only keyset", "payments/readonly", func() error {
			_, err := app.GenerateDataKey(ctx(t), &kmsv1.GenerateDataKeyRequest{Keyset: "payments/readonly"})
			return err
		}},
	}
	for _, c := range calls {
		if err := c.call(); status.Code(err) != codes.PermissionDenied {
			t.Errorf("%s = %v, want PermissionDenied", c.name, err)
		}
	}
	recs, err := audit.ReadFile(s.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	denied := 0
	for _, r := range recs {
		if r.Outcome != audit.OutcomeDenied {
			continue
		}
		denied++
		if r.Code != "PermissionDenied" || r.Target.Region != region || (r.Target.Keyset != ledger && r.Target.Keyset != "payments/readonly") {
			t.Errorf("denied record = %+v, want PermissionDenied naming region and keyset", r)
		}
	}
	if denied != len(calls) {
		t.Errorf("denied audit records = %d, want %d", denied, len(calls))
	}
	// The successful encrypt is on record with its key version, and no
	// record holds the plaintext.
	found := false
	for _, r := range recs {
		if r.Outcome == audit.OutcomeOK && r.Operation == "/cairn.kms.v1.KMS/Encrypt" {
			found = r.Identity == appID && r.Target.Keyset == ledger && r.Target.KeyVersion == e.ks.Primary()
		}
	}
	if !found {
		t.Errorf("no OK Encrypt record naming %s, %s and key version %d in %+v", appID, ledger, e.ks.Primary(), recs)
	}
}

func TestNotReady(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	st := s.status(t)
	if st.GetState() != kmsv1.ServingState_SERVING_STATE_NOT_READY || !strings.Contains(st.GetNotReadyReason(), "no bundle applied yet") {
		t.Errorf("GetStatus = %v, want NOT_READY: no bundle applied yet", st)
	}
	if st.GetPendingBundle() != nil {
		t.Errorf("GetStatus of a server with no bundle: pending_bundle = %v, want none", st.GetPendingBundle())
	}
	if s.Ready() {
		t.Errorf("Ready() = true without a bundle")
	}
	c := e.client(appID, s)
	for name, call := range map[string]func() error{
		"encrypt": func() error {
			_, err := c.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: ledger})
			return err
		},
		"decrypt batch": func() error {
			_, err := c.DecryptBatch(ctx(t), &kmsv1.DecryptBatchRequest{Keyset: ledger})
			return err
		},
		"probe": func() error {
			_, err := s.admin.Probe(ctx(t), &kmsv1.ProbeRequest{})
			return err
		},
	} {
		err := call()
		if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "no bundle applied yet") {
			t.Errorf("%s while not ready = %v, want Unavailable saying why", name, err)
		}
	}
}
