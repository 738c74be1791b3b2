package kmsclient_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"testing"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/mac"
	gcmpb "github.com/tink-crypto/tink-go/v2/proto/aes_gcm_go_proto"
	tinkpb "github.com/tink-crypto/tink-go/v2/proto/tink_go_proto"
	"github.com/tink-crypto/tink-go/v2/testing/fakekms"
	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/kmsclient"
)

// tinkVectorKEK and tinkVector are tink-go's known-answer envelope vector
// (aead/kms_envelope_aead_test.go: TestKMSEnvelopeDecryptTestVector): an
// AES256_GCM envelope of "plaintext" with associated data "associatedData".
const (
	tinkVectorKEK = "fake-kms://CM2b3_MDElQKSAowdHlwZS5nb29nbGVhcGlzLmNvbS9nb29nbGUuY3J5cHRvLnRpbmsuQWVzR2NtS2V5EhIaEIK75t5L-adlUwVhWvRuWUwYARABGM2b3_MDIAE"
	tinkVector    = "00000043013e77cdcd3ac4f38c7312f97a9b8c6e2b7b481ce3540006d24abb658938b52d6474c5fa569212c023e06229c0335f414244a32748778baed5e24a55b12b82920d1f06f17ef8a86eee808d2c9d2026fb45371cf60696eb77790524642c5f067a529793c251b068f8"
)

func TestEnvelopeTinkVector(t *testing.T) {
	kek, err := fakekms.NewAEAD(tinkVectorKEK)
	if err != nil {
		t.Fatal(err)
	}
	ct, _ := hex.DecodeString(tinkVector)
	for _, tmpl := range []*tinkpb.KeyTemplate{aead.AES256GCMKeyTemplate(), aead.AES128GCMKeyTemplate()} {
		env, err := kmsclient.NewEnvelopeAEAD(tmpl, kek)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := env.Decrypt(ct, []byte("associatedData")); err != nil || string(got) != "plaintext" {
			t.Errorf("Decrypt(Tink's vector) = %q, %v, want %q", got, err, "plaintext")
		}
		if got, err := env.Decrypt(ct, []byte("associatedDatA")); err == nil || got != nil {
			t.Errorf("Decrypt(Tink's vector, other AD) = %q, %v, want an error", got, err)
		}
	}
}

// tinkEnvelopes returns Tink's two envelope AEADs over kek.
func tinkEnvelopes(t *testing.T, tmpl *tinkpb.KeyTemplate, kek tink.AEAD) map[string]tink.AEAD {
	t.Helper()
	withCtx, err := aead.NewKMSEnvelopeAEADWithContext(tmpl, kek.(tink.AEADWithContext))
	if err != nil {
		t.Fatal(err)
	}
	return map[string]tink.AEAD{
		"NewKMSEnvelopeAEAD2":           aead.NewKMSEnvelopeAEAD2(tmpl, kek),
		"NewKMSEnvelopeAEADWithContext": ctxAEAD{withCtx},
	}
}

// ctxAEAD is a tink.AEADWithContext used as a tink.AEAD.
type ctxAEAD struct{ a tink.AEADWithContext }

func (c ctxAEAD) Encrypt(pt, ad []byte) ([]byte, error) {
	return c.a.EncryptWithContext(context.Background(), pt, ad)
}

func (c ctxAEAD) Decrypt(ct, ad []byte) ([]byte, error) {
	return c.a.DecryptWithContext(context.Background(), ct, ad)
}

// TestEnvelopeTinkCompatible: for every DEK template Tink's envelope takes
// (AES-GCM on the direct path, the others through Tink), objects written by
// EnvelopeAEAD decrypt with Tink's envelope AEADs and the other way round,
// through the real KMS, with associated data binding the payload only, and
// empty objects and associated data round-trip.
func TestEnvelopeTinkCompatible(t *testing.T) {
	w := testWorld(t)
	s := w.startKMS(east, "kms-1")
	c := w.client(appID, kmsclient.WithEndpoints(east, s.addr))
	kek := aeadOf(t, c, east, ledger)
	ctx := ctxFor(t)
	templates := map[string]*tinkpb.KeyTemplate{
		"AES128_GCM":             aead.AES128GCMKeyTemplate(),
		"AES256_GCM":             aead.AES256GCMKeyTemplate(),
		"AES256_GCM_NoPrefix":    aead.AES256GCMNoPrefixKeyTemplate(),
		"AES128_CTR_HMAC_SHA256": aead.AES128CTRHMACSHA256KeyTemplate(),
		"CHACHA20_POLY1305":      aead.ChaCha20Poly1305KeyTemplate(),
		"XCHACHA20_POLY1305":     aead.XChaCha20Poly1305KeyTemplate(),
		"AES256_GCM_SIV":         aead.AES256GCMSIVKeyTemplate(),
	}
	objects := map[string]struct{ pt, ad []byte }{
		"1KiB":     {bytes.Repeat([]byte{7}, 1024), []byte("object-1")},
		"empty":    {[]byte{}, []byte("object-2")},
		"empty AD": {[]byte("an object"), nil},
	}
	for name, tmpl := range templates {
		t.Run(name, func(t *testing.T) {
			ours, err := kmsclient.NewEnvelopeAEAD(tmpl, kek)
			if err != nil {
				t.Fatalf("NewEnvelopeAEAD = %v", err)
			}
			for tname, theirs := range tinkEnvelopes(t, tmpl, kek) {
				for oname, o := range objects {
					for _, dir := range []struct {
						name     string
						enc, dec tink.AEAD
					}{{"ours to " + tname, ctxAEAD{ours}, theirs}, {tname + " to ours", theirs, ctxAEAD{ours}}, {"ours without context to " + tname, ours, theirs}} {
						ct, err := dir.enc.Encrypt(o.pt, o.ad)
						if err != nil {
							t.Fatalf("%s, %s: Encrypt = %v", dir.name, oname, err)
						}
						got, err := dir.dec.Decrypt(ct, o.ad)
						if err != nil || !bytes.Equal(got, o.pt) {
							t.Errorf("%s, %s: Decrypt = %x, %v, want the object", dir.name, oname, got, err)
						}
						if got, err := dir.dec.Decrypt(ct, append([]byte("x"), o.ad...)); err == nil || got != nil {
							t.Errorf("%s, %s: Decrypt with other AD = %x, %v, want an error", dir.name, oname, got, err)
						}
					}
				}
			}
			ct, err := ours.EncryptWithContext(ctx, []byte("pt"), []byte("ad"))
			if err != nil {
				t.Fatal(err)
			}
			// The EDEK is the KMS's ciphertext of the serialized DEK, with
			// empty associated data.
			edek := envelopeEDEK(t, ct)
			dek, err := kek.DecryptWithContext(ctx, edek, nil)
			if err != nil {
				t.Fatalf("the KMS does not decrypt the EDEK with empty AD: %v", err)
			}
			if name == "AES256_GCM" || name == "AES128_GCM" {
				size := map[string]int{"AES128_GCM": 16, "AES256_GCM": 32}[name]
				var key gcmpb.AesGcmKey
				if err := proto.Unmarshal(dek, &key); err != nil || len(key.GetKeyValue()) != size || key.GetVersion() != 0 {
					t.Fatalf("DEK = %d bytes (%v), want an AesGcmKey of a %d-byte key", len(dek), err, size)
				}
				if want, _ := proto.Marshal(&key); !bytes.Equal(dek, want) {
					t.Errorf("DEK serialization differs from proto.Marshal's")
				}
				if got, want := len(ct), 4+len(edek)+12+2+16; got != want {
					t.Errorf("envelope of 2 bytes is %d bytes, want %d", got, want)
				}
			}
		})
	}
}

// TestEnvelopeFreshDEK: every object has its own DEK (a new EDEK, a new
// key) and IV.
func TestEnvelopeFreshDEK(t *testing.T) {
	kek, err := fakekms.NewAEAD(tinkVectorKEK)
	if err != nil {
		t.Fatal(err)
	}
	env, err := kmsclient.NewEnvelopeAEAD(aead.AES256GCMKeyTemplate(), kek)
	if err != nil {
		t.Fatal(err)
	}
	seenDEK, seenIV := map[string]bool{}, map[string]bool{}
	for range 50 {
		ct, err := env.Encrypt([]byte("same object"), []byte("same ad"))
		if err != nil {
			t.Fatal(err)
		}
		edek := envelopeEDEK(t, ct)
		dek, err := kek.Decrypt(edek, []byte{})
		if err != nil {
			t.Fatal(err)
		}
		iv := ct[4+len(edek) : 4+len(edek)+12]
		if seenDEK[string(dek)] || seenIV[string(iv)] {
			t.Fatalf("a DEK or an IV was used twice")
		}
		seenDEK[string(dek)], seenIV[string(iv)] = true, true
	}
}

// TestEnvelopeRefusals: what Tink's envelope refuses, EnvelopeAEAD refuses.
func TestEnvelopeRefusals(t *testing.T) {
	kek, err := fakekms.NewAEAD(tinkVectorKEK)
	if err != nil {
		t.Fatal(err)
	}
	for name, tmpl := range map[string]*tinkpb.KeyTemplate{
		"HMAC":    mac.HMACSHA256Tag256KeyTemplate(),
		"XAESGCM": aead.XAES256GCM192BitNonceKeyTemplate(),
		"nil":     nil,
	} {
		if env, err := kmsclient.NewEnvelopeAEAD(tmpl, kek); err == nil || env != nil {
			t.Errorf("NewEnvelopeAEAD(%s) = %v, %v, want an error", name, env, err)
		}
	}
	if env, err := kmsclient.NewEnvelopeAEAD(aead.AES256GCMKeyTemplate(), nil); err == nil || env != nil {
		t.Errorf("NewEnvelopeAEAD(nil KEK) = %v, %v, want an error", env, err)
	}
	// An AES-GCM template of a size Tink refuses: Tink's envelope decides,
	// and fails on use exactly as Tink's own.
	bad := aead.AES256GCMKeyTemplate()
	bad.Value, _ = proto.Marshal(&gcmpb.AesGcmKeyFormat{KeySize: 24})
	env, err := kmsclient.NewEnvelopeAEAD(bad, kek)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := env.Encrypt([]byte("pt"), nil); err == nil {
		t.Errorf("Encrypt with a 24-byte AES-GCM DEK template succeeded; Tink refuses it")
	}
	if _, err := aead.NewKMSEnvelopeAEAD2(bad, kek).Encrypt([]byte("pt"), nil); err == nil {
		t.Errorf("Tink's Encrypt with a 24-byte AES-GCM DEK template succeeded")
	}
}

// TestEnvelopeMalformed: malformed envelopes fail as Tink's do, with an
// error and a nil plaintext; DEKs in a form Tink's encoder does not write
// are left to Tink's key manager.
func TestEnvelopeMalformed(t *testing.T) {
	kek, err := fakekms.NewAEAD(tinkVectorKEK)
	if err != nil {
		t.Fatal(err)
	}
	ours, err := kmsclient.NewEnvelopeAEAD(aead.AES256GCMKeyTemplate(), kek)
	if err != nil {
		t.Fatal(err)
	}
	theirs := aead.NewKMSEnvelopeAEAD2(aead.AES256GCMKeyTemplate(), kek)
	good, err := ours.Encrypt([]byte("object"), []byte("ad"))
	if err != nil {
		t.Fatal(err)
	}
	edekLen := int(binary.BigEndian.Uint32(good))
	withLen := func(n uint32) []byte {
		b := bytes.Clone(good)
		binary.BigEndian.PutUint32(b, n)
		return b
	}
	flip := func(i int) []byte {
		b := bytes.Clone(good)
		b[i] ^= 1
		return b
	}
	// envelopeOf wraps dek with the KEK and seals "object" under key.
	envelopeOf := func(dek, key []byte) []byte {
		edek, err := kek.Encrypt(dek, []byte{})
		if err != nil {
			t.Fatal(err)
		}
		raw := aeadRawGCM(t, key)
		payload, err := raw.Encrypt([]byte("object"), []byte("ad"))
		if err != nil {
			t.Fatal(err)
		}
		return append(append(binary.BigEndian.AppendUint32(nil, uint32(len(edek))), edek...), payload...)
	}
	key := bytes.Repeat([]byte{0x42}, 32)
	explicitVersion := append([]byte{0x08, 0x00, 0x1a, 32}, key...) // version 0 written out
	version1 := append([]byte{0x08, 0x01, 0x1a, 32}, key...)        // a version Tink refuses
	key24 := append([]byte{0x1a, 24}, key[:24]...)                  // a size Tink refuses
	tests := []struct {
		name   string
		ct     []byte
		wantOK bool
	}{
		{"good", good, true},
		{"empty", nil, false},
		{"length only", good[:4], false},
		{"zero EDEK length", withLen(0), false},
		{"EDEK length over 4096", withLen(4097), false},
		{"huge EDEK length", withLen(0x88888888), false},
		{"EDEK length past the end", withLen(uint32(len(good) - 3)), false},
		{"EDEK only", good[:4+edekLen], false},
		{"payload shorter than IV and tag", good[:4+edekLen+27], false},
		{"EDEK tampered", flip(4 + 6), false},
		{"IV tampered", flip(4 + edekLen), false},
		{"payload tampered", flip(len(good) - 20), false},
		{"tag tampered", flip(len(good) - 1), false},
		{"DEK with version written out", envelopeOf(explicitVersion, key), true},
		{"DEK of version 1", envelopeOf(version1, key), false},
		{"DEK of 24 bytes", envelopeOf(key24, key[:24]), false},
	}
	for _, tc := range tests {
		gotOurs, errOurs := ours.Decrypt(tc.ct, []byte("ad"))
		gotTink, errTink := theirs.Decrypt(tc.ct, []byte("ad"))
		if (errTink == nil) != tc.wantOK {
			t.Fatalf("%s: Tink's Decrypt = %v; the test's expectation is wrong", tc.name, errTink)
		}
		if tc.wantOK {
			if errOurs != nil || string(gotOurs) != "object" || string(gotTink) != "object" {
				t.Errorf("%s: Decrypt = %q, %v, want %q", tc.name, gotOurs, errOurs, "object")
			}
			continue
		}
		if errOurs == nil || gotOurs != nil {
			t.Errorf("%s: Decrypt = %q, %v, want nil and an error", tc.name, gotOurs, errOurs)
		}
	}
}

// aeadRawGCM is AES-GCM under key in the payload format of Tink's envelope
// (IV || ciphertext || tag), for any AES key size.
func aeadRawGCM(t *testing.T, key []byte) tink.AEAD {
	t.Helper()
	b, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		t.Fatal(err)
	}
	return rawGCM{g}
}

type rawGCM struct{ g cipher.AEAD }

func (r rawGCM) Encrypt(pt, ad []byte) ([]byte, error) {
	iv := make([]byte, 12)
	rand.Read(iv)
	return r.g.Seal(iv, iv, pt, ad), nil
}

func (r rawGCM) Decrypt(ct, ad []byte) ([]byte, error) { return r.g.Open(nil, ct[:12], ct[12:], ad) }

func Example_envelopeAEAD() {
	kek, err := fakekms.NewAEAD(tinkVectorKEK) // in production: client.AEAD(region, keyset)
	if err != nil {
		panic(err)
	}
	env, err := kmsclient.NewEnvelopeAEAD(aead.AES256GCMKeyTemplate(), kek)
	if err != nil {
		panic(err)
	}
	ct, err := env.Encrypt([]byte("object"), []byte("object id"))
	if err != nil {
		panic(err)
	}
	// Tink's own envelope AEAD reads it, and the other way round.
	pt, err := aead.NewKMSEnvelopeAEAD2(aead.AES256GCMKeyTemplate(), kek).Decrypt(ct, []byte("object id"))
	fmt.Println(string(pt), err)
	// Output: object <nil>
}
