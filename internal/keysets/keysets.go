// Package keysets holds the key material of the two lower levels of Cairn's
// hierarchy and how each is encrypted under the one above:
//
//   - a region master key version is a Tink keyset with one AES-256-GCM key
//     (made and wrapped by the root KMS, unwrapped into a region's KMS
//     servers);
//   - a customer keyset is a Tink keyset (made inside the root KMS) that each
//     region stores encrypted under its region key, with associated data
//     binding keyset name, region and region key version.
//
// The root KMS and the regional KMS both use it, so both agree on formats.
package keysets

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/insecurecleartextkeyset"
	"github.com/tink-crypto/tink-go/v2/keyset"
	tinkpb "github.com/tink-crypto/tink-go/v2/proto/tink_go_proto"
	"github.com/tink-crypto/tink-go/v2/tink"

	"github.com/cairnkms/cairn/internal/secret"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

// ErrDecrypt is the one error for an encrypted keyset that does not open
// (wrong region key, wrong name/region/version binding, tampered).
var ErrDecrypt = errors.New("keysets: encrypted keyset does not decrypt under this region key")

// DefaultTemplate is the template CreateKeyset uses when none is named.
const DefaultTemplate = "AES256_GCM"

// templates are the AEAD key templates a Cairn keyset may use. All produce
// TINK-prefixed ciphertexts, so a ciphertext names its key version.
var templates = map[string]func() *tinkpb.KeyTemplate{
	"AES128_GCM":         aead.AES128GCMKeyTemplate,
	"AES256_GCM":         aead.AES256GCMKeyTemplate,
	"AES256_GCM_SIV":     aead.AES256GCMSIVKeyTemplate,
	"CHACHA20_POLY1305":  aead.ChaCha20Poly1305KeyTemplate,
	"XCHACHA20_POLY1305": aead.XChaCha20Poly1305KeyTemplate,
}

// Template returns the named key template ("" means DefaultTemplate).
func Template(name string) (*tinkpb.KeyTemplate, error) {
	if name == "" {
		name = DefaultTemplate
	}
	t, ok := templates[name]
	if !ok {
		names := make([]string, 0, len(templates))
		for n := range templates {
			names = append(names, n)
		}
		slices.Sort(names)
		return nil, fmt.Errorf("keysets: unknown key template %q (one of %v)", name, names)
	}
	return t(), nil
}

// validName is the grammar of keyset names, checked by hand rather than by
// a regular expression because a KMS checks every name of a bundle of 100k
// keysets at boot: ^[a-z0-9][a-z0-9._-]{0,62}(/[a-z0-9][a-z0-9._-]{0,62}){0,7}$
// (TestValidNameMatchesGrammar holds it to that expression).
func validName(name string) bool {
	const maxSegments, maxSegment = 8, 63
	segments, segLen := 1, 0
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c == '/':
			if segLen == 0 || segments == maxSegments {
				return false
			}
			segments, segLen = segments+1, 0
			continue
		case 'a' <= c && c <= 'z' || '0' <= c && c <= '9':
		case c == '.' || c == '_' || c == '-':
			if segLen == 0 {
				return false
			}
		default:
			return false
		}
		if segLen++; segLen > maxSegment {
			return false
		}
	}
	return segLen > 0
}

// ValidName checks a keyset name: lowercase path segments of [a-z0-9._-]
// joined by "/", e.g. "payments/ledger".
func ValidName(name string) error {
	if !validName(name) {
		return fmt.Errorf("keysets: keyset name %q: use lowercase segments of a-z 0-9 . _ - joined by /, e.g. payments/ledger", name)
	}
	return nil
}

// NewRegionKey makes a region master key version: a serialized Tink keyset
// holding one fresh AES-256-GCM key. The caller wraps it and wipes it.
func NewRegionKey() (secret.Bytes, error) {
	h, err := keyset.NewHandle(aead.AES256GCMKeyTemplate())
	if err != nil {
		return secret.Bytes{}, fmt.Errorf("keysets: new region key: %w", err)
	}
	var buf bytes.Buffer
	if err := insecurecleartextkeyset.Write(h, keyset.NewBinaryWriter(&buf)); err != nil {
		return secret.Bytes{}, fmt.Errorf("keysets: serializing region key: %w", err)
	}
	out := secret.New(buf.Bytes())
	clear(buf.Bytes())
	return out, nil
}

// RegionAEAD builds the AEAD of a region master key version from its
// serialized keyset.
func RegionAEAD(material secret.Bytes) (tink.AEAD, error) {
	b := material.Data()
	defer clear(b)
	h, err := insecurecleartextkeyset.Read(keyset.NewBinaryReader(bytes.NewReader(b)))
	if err != nil {
		return nil, fmt.Errorf("keysets: region key material: %w", err)
	}
	if h.Len() != 1 {
		return nil, fmt.Errorf("keysets: region key material holds %d keys, want 1", h.Len())
	}
	return aead.New(h)
}

// AssociatedData binds an encrypted keyset to its name, region and region
// key version: "cairn/keyset/v1\x00" || name || "\x00" || region || "\x00"
// || be32(version).
func AssociatedData(name, region string, regionKeyVersion uint32) []byte {
	b := make([]byte, 0, 32+len(name)+len(region))
	b = append(b, "cairn/keyset/v1\x00"...)
	b = append(b, name...)
	b = append(b, 0)
	b = append(b, region...)
	b = append(b, 0)
	return binary.BigEndian.AppendUint32(b, regionKeyVersion)
}

// Generate makes a new keyset of one key of the named template.
func Generate(template string) (*keyset.Handle, error) {
	t, err := Template(template)
	if err != nil {
		return nil, err
	}
	return keyset.NewHandle(t)
}

// Encrypt encrypts a keyset for one region under that region's key version.
func Encrypt(h *keyset.Handle, name, region string, regionKeyVersion uint32, regionKey tink.AEAD) (*cryptov1.EncryptedKeyset, error) {
	var buf bytes.Buffer
	if err := h.WriteWithAssociatedData(keyset.NewBinaryWriter(&buf), regionKey, AssociatedData(name, region, regionKeyVersion)); err != nil {
		return nil, fmt.Errorf("keysets: encrypting keyset %s for %s: %w", name, region, err)
	}
	info := h.KeysetInfo()
	out := &cryptov1.EncryptedKeyset{Name: name, Region: region, RegionKeyVersion: regionKeyVersion, Ciphertext: buf.Bytes(), PrimaryKeyId: info.GetPrimaryKeyId()}
	for _, k := range info.GetKeyInfo() {
		st := cryptov1.KeyStatus_KEY_STATUS_ENABLED
		switch {
		case k.GetKeyId() == info.GetPrimaryKeyId():
			st = cryptov1.KeyStatus_KEY_STATUS_PRIMARY
		case k.GetStatus() == tinkpb.KeyStatusType_DISABLED:
			st = cryptov1.KeyStatus_KEY_STATUS_DISABLED
		case k.GetStatus() == tinkpb.KeyStatusType_DESTROYED:
			st = cryptov1.KeyStatus_KEY_STATUS_DESTROYED
		}
		out.Versions = append(out.Versions, &cryptov1.KeyVersionInfo{KeyId: k.GetKeyId(), Status: st, TypeUrl: k.GetTypeUrl()})
	}
	return out, nil
}

// Decrypt opens one region's copy of a keyset and checks that its public
// metadata (primary and key IDs) matches what is inside.
func Decrypt(ek *cryptov1.EncryptedKeyset, regionKey tink.AEAD) (*keyset.Handle, error) {
	h, _, err := DecryptInfo(ek, regionKey)
	return h, err
}

// DecryptInfo is Decrypt that also returns the decrypted keyset's
// KeysetInfo, which Tink computes by serializing every key: a caller that
// needs it (a KMS loading 100k keysets) should not pay for it twice.
func DecryptInfo(ek *cryptov1.EncryptedKeyset, regionKey tink.AEAD) (*keyset.Handle, *tinkpb.KeysetInfo, error) {
	h, err := keyset.ReadWithAssociatedData(keyset.NewBinaryReader(bytes.NewReader(ek.GetCiphertext())), regionKey,
		AssociatedData(ek.GetName(), ek.GetRegion(), ek.GetRegionKeyVersion()))
	if err != nil {
		return nil, nil, ErrDecrypt
	}
	info := h.KeysetInfo()
	if info.GetPrimaryKeyId() != ek.GetPrimaryKeyId() || len(info.GetKeyInfo()) != len(ek.GetVersions()) {
		return nil, nil, fmt.Errorf("keysets: keyset %s for %s: public metadata does not match its contents", ek.GetName(), ek.GetRegion())
	}
	for i, k := range info.GetKeyInfo() {
		if k.GetKeyId() != ek.GetVersions()[i].GetKeyId() {
			return nil, nil, fmt.Errorf("keysets: keyset %s for %s: public key IDs do not match its contents", ek.GetName(), ek.GetRegion())
		}
	}
	return h, info, nil
}

// Fingerprint is a deterministic encoding of a keyset's secret contents, to
// check (in constant time) that two regions' copies hold the same keys. The
// caller wipes it.
func Fingerprint(h *keyset.Handle) (secret.Bytes, error) {
	var buf bytes.Buffer
	if err := insecurecleartextkeyset.Write(h, keyset.NewBinaryWriter(&buf)); err != nil {
		return secret.Bytes{}, err
	}
	out := secret.New(buf.Bytes())
	clear(buf.Bytes())
	return out, nil
}
