package hpkeseal

import (
	"bytes"
	"crypto/hpke"
	"encoding/hex"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

// cfrgVector is the base-mode test vector for exactly Cairn's suite
// (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM) from the CFRG HPKE
// test vectors (test-vectors.json of draft-irtf-cfrg-hpke, which RFC 9180
// publishes only for AES-128-GCM), with its first encryption (sequence
// number 0). info, ikmR, skRm, pkRm and enc also appear in Go's
// crypto/hpke/testdata/rfc9180.json.
var cfrgVector = struct {
	info, ikmR, skRm, pkRm, ikmE, skEm, enc, aad, pt, ct string
}{
	info: "4f6465206f6e2061204772656369616e2055726e", // "Ode on a Grecian Urn"
	ikmR: "dac33b0e9db1b59dbbea58d59a14e7b5896e9bdf98fad6891e99d1686492b9ee",
	skRm: "497b4502664cfea5d5af0b39934dac72242a74f8480451e1aee7d6a53320333d",
	pkRm: "430f4b9859665145a6b1ba274024487bd66f03a2dd577d7753c68d7d7d00c00c",
	ikmE: "2cd7c601cefb3d42a62b04b7a9041494c06c7843818e0ce28a8f704ae7ab20f9",
	skEm: "179d4b53b6365c45b600c4163b61d95cbc2f4d9e36f1695558dce265ab8bab11",
	enc:  "6c93e09869df3402d7bf231bf540fadd35cd56be14f97178f0954db94b7fc256",
	aad:  "436f756e742d30",                                             // "Count-0"
	pt:   "4265617574792069732074727574682c20747275746820626561757479", // "Beauty is truth, truth beauty"
	ct:   "e5d84cd531cfb583096e7cfa9641bd3079cf3a91cda813c52deb5f512be9931980a41de125a925cdad859d5b7a",
}

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("DecodeString(%q) error = %v", s, err)
	}
	return b
}

// vectorRecipient returns a Recipient holding the vector's recipient key.
func vectorRecipient(t testing.TB) *Recipient {
	t.Helper()
	k, err := suiteKEM.NewPrivateKey(unhex(t, cfrgVector.skRm))
	if err != nil {
		t.Fatalf("NewPrivateKey(skRm) error = %v", err)
	}
	r, err := newRecipient(k)
	if err != nil {
		t.Fatalf("newRecipient(skRm) error = %v", err)
	}
	t.Cleanup(r.Close)
	return r
}

// TestKnownAnswer checks that the KEM, KDF and AEAD this package uses are
// the suite that the published vector names 0x0020, 0x0001, 0x0002. The
// vector's message has AAD, which single-shot Open never uses, so it is
// opened through crypto/hpke's context API with the package's suite; and
// crypto/hpke has no public hook to fix the sender's ephemeral key, so Seal
// itself cannot be checked against the vector.
func TestKnownAnswer(t *testing.T) {
	v := cfrgVector
	if got := [3]uint16{suiteKEM.ID(), suiteKDF.ID(), suiteAEAD.ID()}; got != [3]uint16{KEM, KDF, AEAD} {
		t.Errorf("suite ids = %#04x, want %#04x", got, [3]uint16{KEM, KDF, AEAD})
	}

	// DeriveKeyPair(ikm) -> (sk, pk) for both the recipient and the sender.
	for _, kp := range []struct{ name, ikm, sk, pk string }{
		{"recipient", v.ikmR, v.skRm, v.pkRm},
		{"ephemeral", v.ikmE, v.skEm, v.enc},
	} {
		k, err := suiteKEM.DeriveKeyPair(unhex(t, kp.ikm))
		if err != nil {
			t.Fatalf("DeriveKeyPair(ikm %s) error = %v", kp.name, err)
		}
		// Bytes serializes X25519 scalars clamped (RFC 9180, Section
		// 7.1.2), while the vector lists them unclamped, so compare
		// serializations.
		want, err := suiteKEM.NewPrivateKey(unhex(t, kp.sk))
		if err != nil {
			t.Fatalf("NewPrivateKey(sk %s) error = %v", kp.name, err)
		}
		gotSK, err1 := k.Bytes()
		wantSK, err2 := want.Bytes()
		if err1 != nil || err2 != nil {
			t.Fatalf("Bytes() errors = %v, %v", err1, err2)
		}
		if !bytes.Equal(gotSK, wantSK) {
			t.Errorf("DeriveKeyPair(ikm %s) private key = %x, want %x", kp.name, gotSK, wantSK)
		}
		if got := hex.EncodeToString(k.PublicKey().Bytes()); got != kp.pk {
			t.Errorf("DeriveKeyPair(ikm %s) public key = %s, want %s", kp.name, got, kp.pk)
		}
	}

	r := vectorRecipient(t)
	if got := hex.EncodeToString(r.PublicKey().GetPublicKey()); got != v.pkRm {
		t.Errorf("Recipient(skRm).PublicKey() = %s, want %s", got, v.pkRm)
	}

	k, err := suiteKEM.NewPrivateKey(unhex(t, v.skRm))
	if err != nil {
		t.Fatalf("NewPrivateKey(skRm) error = %v", err)
	}
	ctx, err := hpke.NewRecipient(unhex(t, v.enc), k, suiteKDF, suiteAEAD, unhex(t, v.info))
	if err != nil {
		t.Fatalf("hpke.NewRecipient(vector) error = %v", err)
	}
	pt, err := ctx.Open(unhex(t, v.aad), unhex(t, v.ct))
	if err != nil {
		t.Fatalf("Open(vector ct) error = %v", err)
	}
	if got := hex.EncodeToString(pt); got != v.pt {
		t.Errorf("Open(vector ct) = %s, want %s", got, v.pt)
	}

	// The vector's enc || ct is bound to its AAD, so the package's Open,
	// which uses none, must refuse it.
	sealed := &cryptov1.HpkeSealed{
		KemId: uint32(KEM), KdfId: uint32(KDF), AeadId: uint32(AEAD),
		Ciphertext: unhex(t, v.enc+v.ct),
	}
	if _, err := r.Open(sealed, unhex(t, v.info)); err != ErrOpen {
		t.Errorf("Recipient.Open(vector enc||ct with AAD) error = %v, want ErrOpen", err)
	}
}

// TestCloseWipes checks that Close zeroes the private key that the Recipient
// holds, not only makes Open refuse.
func TestCloseWipes(t *testing.T) {
	r, err := NewRecipient()
	if err != nil {
		t.Fatalf("NewRecipient() error = %v", err)
	}
	if got := r.private.Len(); got != 32 {
		t.Fatalf("private key length = %d, want 32", got)
	}
	r.Close()
	if !r.private.IsZero() {
		t.Errorf("private key after Close: IsZero = false, want true")
	}
}

func TestRedacted(t *testing.T) {
	r := vectorRecipient(t)
	sk := unhex(t, cfrgVector.skRm)
	leaks := []string{string(sk), hex.EncodeToString(sk), strings.ToUpper(hex.EncodeToString(sk)), fmt.Sprint(sk)}

	type holder struct {
		Exported   *Recipient
		unexported *Recipient
		Value      Recipient
	}
	h := holder{Exported: r, unexported: r, Value: *r}
	var logged bytes.Buffer
	slog.New(slog.NewTextHandler(&logged, nil)).Info("r", "recipient", r, "value", *r)
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("r", "recipient", r, "value", *r)

	for _, tc := range []struct {
		name, got string
		exact     bool // got must be exactly Redacted
	}{
		{`Sprintf("%v")`, fmt.Sprintf("%v", r), true},
		{`Sprintf("%+v")`, fmt.Sprintf("%+v", r), true},
		{`Sprintf("%#v")`, fmt.Sprintf("%#v", r), true},
		{`Sprintf("%s")`, fmt.Sprintf("%s", r), true},
		{`Sprintf("%x")`, fmt.Sprintf("%x", r), true},
		{`Sprintf("%X")`, fmt.Sprintf("%X", r), true},
		{`Sprintf("%q")`, fmt.Sprintf("%q", r), true},
		{`Sprintf("%d")`, fmt.Sprintf("%d", r), true},
		{`Sprintf("%v", *r)`, fmt.Sprintf("%v", *r), true},
		{"String()", r.String(), true},
		{"LogValue()", r.LogValue().String(), true},
		{`Sprintf("%+v", holder)`, fmt.Sprintf("%+v", h), false},
		{`Sprintf("%#v", holder)`, fmt.Sprintf("%#v", h), false},
		{"slog text and JSON", logged.String(), false},
	} {
		if tc.exact && tc.got != Redacted {
			t.Errorf("%s = %q, want %q", tc.name, tc.got, Redacted)
		}
		for _, leak := range leaks {
			if strings.Contains(tc.got, leak) {
				t.Errorf("%s = %q, want no %q in it", tc.name, tc.got, leak)
			}
		}
	}
}

// FuzzOpen feeds Open arbitrary suite ids and ciphertexts. Open must never
// panic, must fail with exactly ErrOpen and a zero secret, and may succeed
// only for a genuine message, which the fuzzer cannot forge: one sealed to
// the fixed recipient key with Cairn's suite, carrying the known plaintext.
func FuzzOpen(f *testing.F) {
	r := vectorRecipient(f)
	info := []byte("cairn/fuzz/v1")
	plaintext := []byte("KEYMATERIAL-0123456789abcdef-XYZ")
	valid, err := Seal(r.PublicKey(), info, plaintext)
	if err != nil {
		f.Fatalf("Seal() error = %v", err)
	}
	ct := valid.GetCiphertext()
	suite := [3]uint32{uint32(KEM), uint32(KDF), uint32(AEAD)}
	f.Add(suite[0], suite[1], suite[2], ct)
	f.Add(suite[0], suite[1], suite[2], []byte{})
	f.Add(suite[0], suite[1], suite[2], ct[:Overhead])
	f.Add(suite[0], suite[1], suite[2], ct[:len(ct)-1])
	f.Add(suite[0], suite[1], suite[2], make([]byte, len(ct)))
	f.Add(suite[0], suite[1], uint32(3), ct)
	f.Add(uint32(0x0010), suite[1], suite[2], ct)
	f.Add(uint32(0), uint32(0), uint32(0), []byte("garbage"))
	f.Fuzz(func(t *testing.T, kemID, kdfID, aeadID uint32, ciphertext []byte) {
		sealed := &cryptov1.HpkeSealed{KemId: kemID, KdfId: kdfID, AeadId: aeadID, Ciphertext: ciphertext}
		got, err := r.Open(sealed, info)
		if err != nil {
			if err != ErrOpen || !got.IsZero() {
				t.Fatalf("Open(%v) = %v, %v, want zero secret, ErrOpen", sealed, got, err)
			}
			if [3]uint32{kemID, kdfID, aeadID} == suite && bytes.Equal(ciphertext, ct) {
				t.Fatalf("Open(genuine message) error = %v, want nil", err)
			}
			return
		}
		data := got.Data()
		defer clear(data)
		if [3]uint32{kemID, kdfID, aeadID} != suite || !bytes.Equal(data, plaintext) {
			t.Fatalf("Open(%v) succeeded with plaintext %q, want ErrOpen", sealed, data)
		}
	})
}
