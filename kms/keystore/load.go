package keystore

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/aead/aesgcm"
	"github.com/tink-crypto/tink-go/v2/insecurecleartextkeyset"
	"github.com/tink-crypto/tink-go/v2/insecuresecretdataaccess"
	"github.com/tink-crypto/tink-go/v2/keyset"
	gcmpb "github.com/tink-crypto/tink-go/v2/proto/aes_gcm_go_proto"
	tinkpb "github.com/tink-crypto/tink-go/v2/proto/tink_go_proto"
	"github.com/tink-crypto/tink-go/v2/secretdata"
	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/keysets"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

// Loading a keyset the way a KMS boot needs it: 100k of them in well under a
// second, in little memory. keysets.DecryptInfo builds a keyset.Handle
// (every key parsed into Tink's key objects), its KeysetInfo (every key
// serialized again) and then aead.New a primitive set with a prefix map:
// most of a boot's time and of a keyset's memory. openKeyset does what
// keyset.ReadWithAssociatedData does up to the Handle (the same decryption,
// the same associated data, Tink's own keyset.Validate), and a keyset whose
// keys are all AES-GCM gets its AEAD straight from the key material:
// aes.NewCipher and cipher.NewGCM, exactly what aesgcm.NewAEAD builds, in
// Tink's ciphertext format (TINK prefix || 12-byte IV || ciphertext || 16-byte
// tag). Any other key type goes through keyset.Handle and aead.New as
// before.

// aesGCMTypeURL is the type URL of Tink's AES-GCM keys.
const aesGCMTypeURL = "type.googleapis.com/google.crypto.tink.AesGcmKey"

// aesGCMParams are the Tink parameters of the AES-GCM keys a keyset may
// hold (TINK variant, 12-byte IV, 16-byte tag), by key size: immutable, so
// every version of that size shares one.
var aesGCMParams = func() map[int]*aesgcm.Parameters {
	out := make(map[int]*aesgcm.Parameters, 3)
	for _, size := range []int{16, 24, 32} {
		p, err := aesgcm.NewParameters(aesgcm.ParametersOpts{KeySizeInBytes: size, IVSizeInBytes: gcmNonceSize, TagSizeInBytes: gcmTagSize, Variant: aesgcm.VariantTink})
		if err != nil {
			panic(fmt.Sprintf("keystore: AES-GCM parameters of %d-byte keys: %v", size, err))
		}
		out[size] = p
	}
	return out
}()

// openKeyset decrypts ek under regionKey as keyset.ReadWithAssociatedData
// does, checks the keyset with Tink's keyset.Validate, and checks ek's
// public key IDs and primary against it (as keysets.DecryptInfo does). The
// caller wipes the key material of the returned keyset (wipeKeyset) once it
// has built its AEADs.
func openKeyset(ek *cryptov1.EncryptedKeyset, regionKey tink.AEAD) (*tinkpb.Keyset, error) {
	var enc tinkpb.EncryptedKeyset
	if err := proto.Unmarshal(ek.GetCiphertext(), &enc); err != nil {
		return nil, keysets.ErrDecrypt
	}
	plain, err := regionKey.Decrypt(enc.GetEncryptedKeyset(), keysets.AssociatedData(ek.GetName(), ek.GetRegion(), ek.GetRegionKeyVersion()))
	if err != nil {
		return nil, keysets.ErrDecrypt
	}
	ks := new(tinkpb.Keyset)
	err = proto.Unmarshal(plain, ks) // copies every field out of plain
	clear(plain)
	if err != nil {
		wipeKeyset(ks)
		return nil, keysets.ErrDecrypt
	}
	if err := keyset.Validate(ks); err != nil {
		wipeKeyset(ks)
		return nil, fmt.Errorf("invalid keyset: %v", err)
	}
	hints := ek.GetVersions()
	if ks.GetPrimaryKeyId() != ek.GetPrimaryKeyId() || len(ks.GetKey()) != len(hints) {
		wipeKeyset(ks)
		return nil, errors.New("public metadata does not match the keyset's contents")
	}
	for i, k := range ks.GetKey() {
		if k.GetKeyId() != hints[i].GetKeyId() {
			wipeKeyset(ks)
			return nil, errors.New("public key IDs do not match its contents")
		}
	}
	return ks, nil
}

// wipeKeyset zeroes the serialized key material ks holds.
func wipeKeyset(ks *tinkpb.Keyset) {
	for _, k := range ks.GetKey() {
		clear(k.GetKeyData().GetValue())
	}
}

// allAESGCM reports whether every key of ks is an AES-GCM key.
func allAESGCM(ks *tinkpb.Keyset) bool {
	for _, k := range ks.GetKey() {
		if k.GetKeyData().GetTypeUrl() != aesGCMTypeURL {
			return false
		}
	}
	return true
}

// parseAESGCMKey parses an AES-GCM key as Tink's key parser does (the same
// checks: key material type, version, key size) and returns its Tink key
// (which holds its own copy of the key bytes). raw is the key bytes; the
// caller wipes them.
func parseAESGCMKey(k *tinkpb.Keyset_Key) (key *aesgcm.Key, raw []byte, err error) {
	kd := k.GetKeyData()
	if kd.GetKeyMaterialType() != tinkpb.KeyData_SYMMETRIC {
		return nil, nil, errors.New("AES-GCM key is not a SYMMETRIC key")
	}
	var pk gcmpb.AesGcmKey
	err = proto.Unmarshal(kd.GetValue(), &pk)
	raw = pk.GetKeyValue()
	if err != nil {
		clear(raw)
		return nil, nil, errors.New("AES-GCM key does not decode")
	}
	if pk.GetVersion() != 0 {
		clear(raw)
		return nil, nil, fmt.Errorf("AES-GCM key has unsupported version %d", pk.GetVersion())
	}
	params, ok := aesGCMParams[len(raw)]
	if !ok {
		clear(raw)
		return nil, nil, fmt.Errorf("AES-GCM key of %d bytes; want 16, 24 or 32", len(raw))
	}
	key, err = aesgcm.NewKey(secretdata.NewBytesFromData(raw, insecuresecretdataaccess.Token{}), k.GetKeyId(), params)
	if err != nil {
		clear(raw)
		return nil, nil, fmt.Errorf("AES-GCM key: %v", err)
	}
	return key, raw, nil
}

// newAESGCM is aesgcm.NewAEAD's cipher: AES with a 12-byte nonce and a
// 16-byte tag. Tink serves only 16- and 32-byte keys.
func newAESGCM(raw []byte) (cipher.AEAD, error) {
	if len(raw) != 16 && len(raw) != 32 {
		return nil, fmt.Errorf("AES-GCM key of %d bytes; Tink serves 16 or 32", len(raw))
	}
	b, err := aes.NewCipher(raw)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// tinkAEAD builds ks's AEAD through Tink (keyset.Handle and aead.New), for
// keysets holding keys other than AES-GCM, and each key's Tink key by
// position (nil where Tink has no key object for it).
func tinkAEAD(ks *tinkpb.Keyset) (tink.AEAD, []*keyset.Entry, error) {
	h := insecurecleartextkeyset.KeysetHandle(ks)
	if h == nil {
		return nil, nil, errors.New("the keyset does not parse")
	}
	entries := make([]*keyset.Entry, h.Len())
	for i := range entries {
		if e, err := h.Entry(i); err == nil {
			entries[i] = e
		}
	}
	a, err := aead.New(h)
	if err != nil {
		return nil, nil, fmt.Errorf("building the AEAD: %v", err)
	}
	return a, entries, nil
}

// gcmKeyset is the AEAD of a keyset whose keys are all AES-GCM with the
// TINK prefix, as aead.New builds it from the keyset's Handle: encryption
// with the primary; decryption routed by the ciphertext's prefix to the
// enabled key with that ID (keyset.Validate refuses duplicate IDs, so there
// is at most one). Its ciphers are those of the keyset's versions.
type gcmKeyset struct {
	primary gcmKey
	others  []gcmKey // the other enabled keys, in keyset order
}

// gcmKey is one enabled key of a gcmKeyset.
type gcmKey struct {
	id     uint32
	cipher cipher.AEAD
}

// errGCM is the one error of a ciphertext a gcmKeyset does not decrypt (the
// keystore answers ErrDecrypt for it in any case).
var errGCM = errors.New("keystore: AES-GCM: ciphertext does not decrypt")

// Encrypt implements tink.AEAD: TINK prefix || IV || ciphertext || tag.
func (g *gcmKeyset) Encrypt(plaintext, associatedData []byte) ([]byte, error) {
	if uint64(len(plaintext)) > maxTinkGCMPlaintext {
		return nil, fmt.Errorf("keystore: AES-GCM: plaintext of %d bytes is too long", len(plaintext))
	}
	dst := make([]byte, tinkPrefixLen+gcmNonceSize, AESGCMOverhead+len(plaintext))
	dst[0] = tinkPrefix
	dst[1], dst[2], dst[3], dst[4] = byte(g.primary.id>>24), byte(g.primary.id>>16), byte(g.primary.id>>8), byte(g.primary.id)
	iv := dst[tinkPrefixLen:]
	if _, err := rand.Read(iv); err != nil {
		return nil, err
	}
	return g.primary.cipher.Seal(dst, iv, plaintext, associatedData), nil
}

// Decrypt implements tink.AEAD.
func (g *gcmKeyset) Decrypt(ciphertext, associatedData []byte) ([]byte, error) {
	id, ok := KeyIDOf(ciphertext)
	if !ok || len(ciphertext) < AESGCMOverhead {
		return nil, errGCM
	}
	c := g.cipherOf(id)
	if c == nil {
		return nil, errGCM
	}
	body := ciphertext[tinkPrefixLen+gcmNonceSize:]
	pt, err := c.Open(make([]byte, 0, len(body)-gcmTagSize), ciphertext[tinkPrefixLen:tinkPrefixLen+gcmNonceSize], body, associatedData)
	if err != nil {
		return nil, errGCM
	}
	return pt, nil
}

// cipherOf returns the cipher of the enabled key id, or nil.
func (g *gcmKeyset) cipherOf(id uint32) cipher.AEAD {
	if g.primary.id == id {
		return g.primary.cipher
	}
	for _, k := range g.others {
		if k.id == id {
			return k.cipher
		}
	}
	return nil
}

// maxTinkGCMPlaintext is the longest plaintext Tink's AES-GCM encrypts
// (RFC 5116's limit, as Tink's CheckAESGCMPlaintextSize has it).
const maxTinkGCMPlaintext = 1<<36 - 31
