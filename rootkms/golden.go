package rootkms

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"fmt"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/keyset"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
)

// Golden ciphertexts. When a version is added (CreateKeyset's first,
// UpdateKeyset ADD_VERSION) the leader encrypts a random plaintext with
// exactly that key and records the ciphertext, its associated data and the
// plaintext's SHA-256 on the version; the plaintext is thrown away. Every
// region's copy holds the same key, so every KMS server serving the version
// must decrypt it to the recorded hash (KMSAdmin.Probe): a server serving a
// copy that lacks the key, or holds another key under its ID, fails the
// probe. The ciphertext carries the key's TINK prefix, so a KMS routes it to
// that version and to no other.

// goldenPlaintextSize is the size of a golden plaintext: a DEK's.
const goldenPlaintextSize = 32

// goldenAssociatedData is the associated data of the golden ciphertext of
// version keyID of keyset name: "cairn/golden/v1\x00" || name || "\x00" ||
// be32(keyID).
func goldenAssociatedData(name string, keyID uint32) []byte {
	b := make([]byte, 0, 24+len(name))
	b = append(b, "cairn/golden/v1\x00"...)
	b = append(b, name...)
	b = append(b, 0)
	return binary.BigEndian.AppendUint32(b, keyID)
}

// makeGolden makes the golden ciphertext of version keyID of h, the keyset
// name as it is about to be recorded. The encryption is made by a handle
// holding that key alone, as primary; the result is then checked to decrypt
// to the same plaintext with h itself, so a golden ciphertext is recorded
// only with copies that decrypt it.
func makeGolden(h *keyset.Handle, name string, keyID uint32) (*statev1.GoldenCiphertext, error) {
	// A copy of h with only keyID, made primary (h is not changed).
	m := keyset.NewManagerFromHandle(h)
	if err := m.SetPrimary(keyID); err != nil {
		return nil, fmt.Errorf("rootkms: golden ciphertext of keyset %s key %d: %w", name, keyID, err)
	}
	for i := range h.Len() {
		e, err := h.Entry(i)
		if err != nil {
			return nil, fmt.Errorf("rootkms: golden ciphertext of keyset %s: %w", name, err)
		}
		if e.KeyID() != keyID {
			if err := m.Delete(e.KeyID()); err != nil {
				return nil, fmt.Errorf("rootkms: golden ciphertext of keyset %s: %w", name, err)
			}
		}
	}
	one, err := m.Handle()
	if err != nil {
		return nil, fmt.Errorf("rootkms: golden ciphertext of keyset %s key %d: %w", name, keyID, err)
	}
	enc, err := aead.New(one)
	if err != nil {
		return nil, fmt.Errorf("rootkms: golden ciphertext of keyset %s key %d: %w", name, keyID, err)
	}
	pt := make([]byte, goldenPlaintextSize)
	defer clear(pt)
	if _, err := rand.Read(pt); err != nil {
		return nil, fmt.Errorf("rootkms: golden plaintext: %w", err)
	}
	ad := goldenAssociatedData(name, keyID)
	ct, err := enc.Encrypt(pt, ad)
	if err != nil {
		return nil, fmt.Errorf("rootkms: golden ciphertext of keyset %s key %d: %w", name, keyID, err)
	}
	if len(ct) < 5 || ct[0] != 1 || binary.BigEndian.Uint32(ct[1:5]) != keyID {
		return nil, fmt.Errorf("rootkms: golden ciphertext of keyset %s key %d: not routed to the key by a TINK prefix", name, keyID)
	}
	// The recorded keyset must decrypt it.
	dec, err := aead.New(h)
	if err != nil {
		return nil, fmt.Errorf("rootkms: keyset %s: %w", name, err)
	}
	back, err := dec.Decrypt(ct, ad)
	same := err == nil && subtle.ConstantTimeCompare(back, pt) == 1
	clear(back)
	if !same {
		return nil, fmt.Errorf("rootkms: golden ciphertext of keyset %s key %d does not decrypt with the keyset", name, keyID)
	}
	sum := sha256.Sum256(pt)
	return &statev1.GoldenCiphertext{Ciphertext: ct, AssociatedData: ad, PlaintextSha256: bytes.Clone(sum[:])}, nil
}
