package kmsclient

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/core/registry"
	gcmpb "github.com/tink-crypto/tink-go/v2/proto/aes_gcm_go_proto"
	tinkpb "github.com/tink-crypto/tink-go/v2/proto/tink_go_proto"
	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/protobuf/proto"
)

// The envelope format of Tink's KMS envelope AEAD (tink-go
// aead/kms_envelope_aead.go): uint32 big-endian len(EDEK) || EDEK ||
// payload, where the EDEK is the serialized DEK proto encrypted by the
// key-encryption AEAD with empty associated data, and the payload is the
// DEK's raw AEAD output (for AES-GCM: IV || ciphertext || tag).
const (
	envelopeLenSize = 4
	// maxEncryptedDEK is Tink's bound on the EDEK, on encrypt and decrypt.
	maxEncryptedDEK = 4096
	gcmIVSize       = 12
	gcmTagSize      = 16
	// maxGCMPlaintext is Tink's bound on an AES-GCM plaintext (RFC 5116).
	maxGCMPlaintext = 1<<36 - 31
	// aesGCMTypeURL is the type URL of Tink's AES-GCM keys.
	aesGCMTypeURL = "type.googleapis.com/google.crypto.tink.AesGcmKey"
	// aesGCMKeyValueTag is the tag byte of AesGcmKey.key_value (field 3,
	// length-delimited). The serialized AesGcmKey{version: 0, key_value: k}
	// is this byte, len(k) (one byte for 16 and 32), then k: what
	// proto.Marshal gives, and what Tink sends to the key-encryption AEAD.
	aesGCMKeyValueTag = 3<<3 | 2
)

// errEnvelopeDecrypt is the single error of a payload that does not decrypt
// (wrong associated data, tampered, truncated): no oracle.
var errEnvelopeDecrypt = errors.New("kmsclient: envelope decrypt: the ciphertext does not decrypt")

// EnvelopeAEAD is Tink's KMS envelope AEAD with far fewer allocations per
// object: it writes and reads exactly the ciphertexts of tink-go's
// aead.NewKMSEnvelopeAEAD2 and aead.NewKMSEnvelopeAEADWithContext, so either
// decrypts what the other encrypts. Each Encrypt makes a fresh DEK from
// crypto/rand, has the key-encryption AEAD (usually an *AEAD of this
// package) wrap its serialized Tink key proto with empty associated data,
// and encrypts the object locally under the DEK with the caller's
// associated data; Decrypt reverses it. As with Tink, the associated data
// binds the object's payload, not its wrapped DEK (see the package
// documentation).
//
// DEKs of the AES128_GCM and AES256_GCM templates (any AES-GCM template of
// a 16- or 32-byte key) take a direct path: no key manager, proto or
// keyset handle per object. Every other DEK template Tink's envelope
// accepts (AES-CTR-HMAC, ChaCha20-Poly1305, XChaCha20-Poly1305, AES-GCM-SIV)
// is served by Tink's own envelope AEAD. A wrapped DEK that is not in the
// form Tink writes is parsed by Tink's AES-GCM key manager, so what decrypts
// is exactly what Tink decrypts. Safe for concurrent use.
type EnvelopeAEAD struct {
	kek    tink.AEAD
	kekCtx tink.AEADWithContext // kek, if it takes a context
	// keySize is the AES-GCM DEK size of the direct path; 0 means Tink's
	// envelope AEAD (tinkEnv, and tinkEnvCtx if kek takes a context).
	keySize    int
	tinkEnv    *aead.KMSEnvelopeAEAD
	tinkEnvCtx *aead.KMSEnvelopeAEADWithContext
}

var (
	_ tink.AEAD            = (*EnvelopeAEAD)(nil)
	_ tink.AEADWithContext = (*EnvelopeAEAD)(nil)
)

// NewEnvelopeAEAD returns the envelope AEAD of DEKs made from dekTemplate,
// wrapped by kek. It refuses the templates Tink's envelope AEAD refuses
// (any but AesGcmKey, AesCtrHmacAeadKey, ChaCha20Poly1305Key,
// XChaCha20Poly1305Key, AesGcmSivKey). The ...WithContext methods pass
// their context to kek when kek is a tink.AEADWithContext (as *AEAD is);
// otherwise they only check it before calling kek.
func NewEnvelopeAEAD(dekTemplate *tinkpb.KeyTemplate, kek tink.AEAD) (*EnvelopeAEAD, error) {
	if kek == nil {
		return nil, errors.New("kmsclient: NewEnvelopeAEAD: nil key-encryption AEAD")
	}
	if dekTemplate == nil {
		return nil, errors.New("kmsclient: NewEnvelopeAEAD: nil DEK template; use e.g. aead.AES256GCMKeyTemplate()")
	}
	e := &EnvelopeAEAD{kek: kek}
	e.kekCtx, _ = kek.(tink.AEADWithContext)
	if n := directKeySize(dekTemplate); n != 0 {
		e.keySize = n
		return e, nil
	}
	if e.kekCtx != nil {
		env, err := aead.NewKMSEnvelopeAEADWithContext(dekTemplate, e.kekCtx)
		if err != nil {
			return nil, fmt.Errorf("kmsclient: NewEnvelopeAEAD: DEK template %s: %v", dekTemplate.GetTypeUrl(), err)
		}
		e.tinkEnvCtx = env
	}
	e.tinkEnv = aead.NewKMSEnvelopeAEAD2(dekTemplate, kek)
	// NewKMSEnvelopeAEAD2 reports a refused template only on use; check
	// it here the way NewKMSEnvelopeAEADWithContext does.
	if _, err := aead.NewKMSEnvelopeAEADWithContext(dekTemplate, contextAEAD{kek}); err != nil {
		return nil, fmt.Errorf("kmsclient: NewEnvelopeAEAD: DEK template %s: %v", dekTemplate.GetTypeUrl(), err)
	}
	return e, nil
}

// directKeySize returns the DEK size if t is an AES-GCM template the direct
// path serves exactly as Tink does (format version 0, 16- or 32-byte key),
// else 0. The template's output prefix type does not matter: Tink's
// envelope always uses the DEK's raw primitive.
func directKeySize(t *tinkpb.KeyTemplate) int {
	if t.GetTypeUrl() != aesGCMTypeURL {
		return 0
	}
	var f gcmpb.AesGcmKeyFormat
	if err := proto.Unmarshal(t.GetValue(), &f); err != nil || f.GetVersion() != 0 {
		return 0
	}
	switch n := f.GetKeySize(); n {
	case 16, 32:
		return int(n)
	}
	return 0
}

// Encrypt encrypts plaintext under a fresh DEK; associatedData binds the
// payload.
func (e *EnvelopeAEAD) Encrypt(plaintext, associatedData []byte) ([]byte, error) {
	if e.keySize == 0 {
		return e.tinkEnv.Encrypt(plaintext, associatedData)
	}
	return e.encrypt(context.Background(), plaintext, associatedData)
}

// Decrypt decrypts a ciphertext of Encrypt (or of Tink's envelope AEAD).
func (e *EnvelopeAEAD) Decrypt(ciphertext, associatedData []byte) ([]byte, error) {
	if e.keySize == 0 {
		return e.tinkEnv.Decrypt(ciphertext, associatedData)
	}
	return e.decrypt(context.Background(), ciphertext, associatedData)
}

// EncryptWithContext is Encrypt, with ctx bounding the key-encryption call.
func (e *EnvelopeAEAD) EncryptWithContext(ctx context.Context, plaintext, associatedData []byte) ([]byte, error) {
	if e.keySize == 0 {
		if e.tinkEnvCtx != nil {
			return e.tinkEnvCtx.EncryptWithContext(ctx, plaintext, associatedData)
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return e.tinkEnv.Encrypt(plaintext, associatedData)
	}
	if ctx == nil {
		return nil, errors.New("kmsclient: envelope encrypt: nil context")
	}
	return e.encrypt(ctx, plaintext, associatedData)
}

// DecryptWithContext is Decrypt, with ctx bounding the key-encryption call.
func (e *EnvelopeAEAD) DecryptWithContext(ctx context.Context, ciphertext, associatedData []byte) ([]byte, error) {
	if e.keySize == 0 {
		if e.tinkEnvCtx != nil {
			return e.tinkEnvCtx.DecryptWithContext(ctx, ciphertext, associatedData)
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return e.tinkEnv.Decrypt(ciphertext, associatedData)
	}
	if ctx == nil {
		return nil, errors.New("kmsclient: envelope decrypt: nil context")
	}
	return e.decrypt(ctx, ciphertext, associatedData)
}

// wrap has the key-encryption AEAD encrypt a serialized DEK, with empty
// associated data as Tink does.
func (e *EnvelopeAEAD) wrap(ctx context.Context, dek []byte) ([]byte, error) {
	if e.kekCtx == nil {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return e.kek.Encrypt(dek, []byte{})
	}
	return e.kekCtx.EncryptWithContext(ctx, dek, []byte{})
}

// unwrap is wrap's inverse.
func (e *EnvelopeAEAD) unwrap(ctx context.Context, edek []byte) ([]byte, error) {
	if e.kekCtx == nil {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return e.kek.Decrypt(edek, []byte{})
	}
	return e.kekCtx.DecryptWithContext(ctx, edek, []byte{})
}

// encrypt is the direct path's Encrypt: one DEK buffer, one AES-GCM
// instance and one output buffer besides the KEK call.
func (e *EnvelopeAEAD) encrypt(ctx context.Context, plaintext, associatedData []byte) ([]byte, error) {
	if uint64(len(plaintext)) > maxGCMPlaintext {
		return nil, fmt.Errorf("kmsclient: envelope encrypt: plaintext of %d bytes is more than AES-GCM's limit", len(plaintext))
	}
	// The DEK, serialized as Tink's AesGcmKey proto.
	dek := make([]byte, 2+e.keySize)
	defer clear(dek)
	dek[0], dek[1] = aesGCMKeyValueTag, byte(e.keySize)
	_, _ = rand.Read(dek[2:]) // crypto/rand.Read never fails (Go 1.24+)
	edek, err := e.wrap(ctx, dek)
	if err != nil {
		return nil, err
	}
	if len(edek) == 0 {
		return nil, errors.New("kmsclient: envelope encrypt: the key-encryption AEAD returned an empty encrypted DEK")
	}
	if len(edek) > maxEncryptedDEK {
		return nil, fmt.Errorf("kmsclient: envelope encrypt: the encrypted DEK is %d bytes, more than Tink's limit of %d", len(edek), maxEncryptedDEK)
	}
	gcm, err := newGCM(dek[2:])
	if err != nil {
		return nil, fmt.Errorf("kmsclient: envelope encrypt: %v", err)
	}
	head := envelopeLenSize + len(edek)
	out := make([]byte, head+gcmIVSize, head+gcmIVSize+len(plaintext)+gcmTagSize)
	binary.BigEndian.PutUint32(out, uint32(len(edek)))
	copy(out[envelopeLenSize:], edek)
	iv := out[head:]
	_, _ = rand.Read(iv)
	return gcm.Seal(out, iv, plaintext, associatedData), nil
}

// decrypt is the direct path's Decrypt.
func (e *EnvelopeAEAD) decrypt(ctx context.Context, ciphertext, associatedData []byte) ([]byte, error) {
	edek, payload, err := parseEnvelope(ciphertext)
	if err != nil {
		return nil, err
	}
	// An AES-GCM payload has at least an IV and a tag: a shorter one
	// cannot decrypt, and is refused before a KMS call.
	if len(payload) < gcmIVSize+gcmTagSize {
		return nil, errEnvelopeDecrypt
	}
	dek, err := e.unwrap(ctx, edek)
	if err != nil {
		return nil, err
	}
	defer clear(dek)
	key, ok := parseAESGCMKey(dek)
	if !ok {
		// Not the form Tink writes (another encoder's AesGcmKey, or no
		// AesGcmKey at all): Tink's key manager decides, as in Tink's own
		// envelope.
		return decryptWithTinkDEK(dek, payload, associatedData)
	}
	gcm, err := newGCM(key)
	if err != nil {
		return nil, fmt.Errorf("kmsclient: envelope decrypt: %v", err)
	}
	pt, err := gcm.Open(make([]byte, 0, len(payload)-gcmIVSize-gcmTagSize), payload[:gcmIVSize], payload[gcmIVSize:], associatedData)
	if err != nil {
		return nil, errEnvelopeDecrypt
	}
	return pt, nil
}

// parseEnvelope splits a ciphertext into its EDEK and payload, with Tink's
// checks: a length of 0, over 4096, or past the end is refused.
func parseEnvelope(ciphertext []byte) (edek, payload []byte, err error) {
	if len(ciphertext) <= envelopeLenSize {
		return nil, nil, errors.New("kmsclient: envelope decrypt: the ciphertext is too short to be an envelope")
	}
	n := binary.BigEndian.Uint32(ciphertext)
	if n == 0 || n > maxEncryptedDEK || uint64(n) > uint64(len(ciphertext)-envelopeLenSize) {
		return nil, nil, errors.New("kmsclient: envelope decrypt: the ciphertext's encrypted DEK length is invalid")
	}
	rest := ciphertext[envelopeLenSize:]
	return rest[:n], rest[n:], nil
}

// parseAESGCMKey returns the key of a serialized AesGcmKey in exactly the
// form Tink writes (version 0 omitted, a 16- or 32-byte key_value, nothing
// else).
func parseAESGCMKey(dek []byte) ([]byte, bool) {
	if len(dek) < 2 || dek[0] != aesGCMKeyValueTag {
		return nil, false
	}
	n := int(dek[1])
	if (n != 16 && n != 32) || len(dek) != 2+n {
		return nil, false
	}
	return dek[2:], true
}

// decryptWithTinkDEK decrypts payload with the AES-GCM DEK serialized in
// dek, through Tink's registry, exactly as Tink's envelope does.
func decryptWithTinkDEK(dek, payload, associatedData []byte) ([]byte, error) {
	p, err := registry.Primitive(aesGCMTypeURL, dek)
	if err != nil {
		return nil, fmt.Errorf("kmsclient: envelope decrypt: the DEK is not an AES-GCM key: %v", err)
	}
	a, ok := p.(tink.AEAD)
	if !ok {
		return nil, errors.New("kmsclient: envelope decrypt: the DEK's primitive is not an AEAD")
	}
	pt, err := a.Decrypt(payload, associatedData)
	if err != nil {
		return nil, errEnvelopeDecrypt
	}
	return pt, nil
}

// newGCM returns AES-GCM with a 12-byte IV and a 16-byte tag, Tink's
// AesGcmKey parameters.
func newGCM(key []byte) (cipher.AEAD, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// contextAEAD adapts a tink.AEAD to tink.AEADWithContext, only to have Tink
// check a DEK template.
type contextAEAD struct{ tink.AEAD }

func (a contextAEAD) EncryptWithContext(_ context.Context, pt, ad []byte) ([]byte, error) {
	return a.Encrypt(pt, ad)
}

func (a contextAEAD) DecryptWithContext(_ context.Context, ct, ad []byte) ([]byte, error) {
	return a.Decrypt(ct, ad)
}
