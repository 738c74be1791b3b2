package keystore

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"strings"
	"time"

	"github.com/tink-crypto/tink-go/v2/aead/aesgcm"
	"github.com/tink-crypto/tink-go/v2/insecuresecretdataaccess"
	"github.com/tink-crypto/tink-go/v2/key"
)

// The layout of a Tink AES-GCM ciphertext with the TINK prefix:
// prefix (5) || nonce (12) || ciphertext || tag (16).
const (
	gcmNonceSize = 12
	gcmTagSize   = 16
	// AESGCMOverhead is how much longer than its plaintext a ciphertext of
	// an AES-GCM version is. A batch sizes its output buffers by it.
	AESGCMOverhead = tinkPrefixLen + gcmNonceSize + gcmTagSize
	// maxGCMPlaintext is the most crypto/cipher's GCM seals in one message
	// ((2³² − 2) blocks); Tink's own limit is lower still.
	maxGCMPlaintext = (1<<32 - 2) * 16
)

// gcmCipher is a version's AES-GCM cipher for batches.
type gcmCipher struct{ aead cipher.AEAD }

// setGCMKey keeps k for batches if it is an AES-GCM key a Batch can seal and
// open itself with crypto/cipher, producing exactly Tink's ciphertexts: a
// 12-byte nonce, a 16-byte tag, and the TINK prefix of v's key ID. Versions
// that cannot decrypt, and every other key, keep none (a Batch then goes
// through the keyset's Tink AEAD).
func (v *Version) setGCMKey(k key.Key) {
	g, ok := k.(*aesgcm.Key)
	if !ok || !v.Decrypts() {
		return
	}
	p, ok := g.Parameters().(*aesgcm.Parameters)
	if !ok || p.IVSizeInBytes() != gcmNonceSize || p.TagSizeInBytes() != gcmTagSize || p.Variant() != aesgcm.VariantTink {
		return
	}
	if !bytes.Equal(g.OutputPrefix(), tinkPrefixOf(v.keyID)) {
		return
	}
	v.gcmKey = g
}

// tinkPrefixOf is the TINK output prefix of a key ID.
func tinkPrefixOf(id uint32) []byte {
	p := [tinkPrefixLen]byte{tinkPrefix}
	binary.BigEndian.PutUint32(p[1:], id)
	return p[:]
}

// gcm returns v's AES-GCM cipher, building it on first use, or nil if v
// has no key for batches. Concurrent first uses may each build one; all
// are equal and one is kept.
func (v *Version) gcm() cipher.AEAD {
	if v.gcmKey == nil {
		return nil
	}
	if c := v.gcmAEAD.Load(); c != nil {
		return c.aead
	}
	raw := v.gcmKey.KeyBytes().Data(insecuresecretdataaccess.Token{})
	defer clear(raw)
	b, err := aes.NewCipher(raw)
	if err != nil {
		return nil
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		return nil
	}
	v.gcmAEAD.CompareAndSwap(nil, &gcmCipher{aead: g})
	return v.gcmAEAD.Load().aead
}

// Batch is one batch call's use of a keyset, at one instant. Its
// EncryptAppend and DecryptAppend are Keyset.Encrypt and Keyset.Decrypt
// (the same ciphertexts, errors, message budget and usage counts) made for
// runs of items:
//
//   - they append to a buffer of the caller's, so that a whole batch's
//     outputs can share one allocation;
//   - an AES-GCM version seals and opens with crypto/cipher directly, into
//     that buffer, allocating nothing (Tink's AES-GCM primitive is the same
//     crypto/cipher call behind an allocation per call);
//   - a ciphertext naming the same version as the one before it skips the
//     version lookup;
//   - decryptions are counted once per run of items under one version,
//     and encryption nonces are read from crypto/rand once per batch.
//
// Any other key type goes through the keyset's Tink AEAD. Call Done once
// the batch is over: it records the uses not recorded yet. A Batch is not
// safe for concurrent use.
type Batch struct {
	k     *Keyset
	now   time.Time
	items int // how many items the batch holds: what the nonce pool reads

	// cur is the version the last decryption named, curGCM its cipher
	// (nil: Tink), and opened the decryptions with it not yet recorded.
	cur    *Version
	curGCM cipher.AEAD
	opened uint64

	// primaryGCM is the primary's cipher (nil: Tink), resolved on the
	// first encryption.
	primaryGCM      cipher.AEAD
	primaryResolved bool
	// nonces holds the random nonces not used yet, gcmNonceSize bytes each.
	nonces []byte
}

// NewBatch starts a batch of items items at now.
func (k *Keyset) NewBatch(items int, now time.Time) Batch {
	return Batch{k: k, now: now, items: items}
}

// Done records the uses the batch has not recorded yet. The batch may be
// used again after it.
func (b *Batch) Done() {
	if b.opened > 0 {
		b.cur.usage.recordN(useDecrypt, b.opened, b.now)
		b.opened = 0
	}
}

// batchCipher returns v's AES-GCM cipher for a batch, or nil if the batch
// must use the keyset's Tink AEAD for v: v is not such a key, or another
// version of the keyset has the same key ID (Tink would try both).
func (k *Keyset) batchCipher(v *Version) cipher.AEAD {
	g := v.gcm()
	if g == nil {
		return nil
	}
	for _, o := range k.versions {
		if o != v && o.keyID == v.keyID {
			return nil
		}
	}
	return g
}

// EncryptAppend encrypts plaintext under the primary version, like
// Keyset.Encrypt, and appends the ciphertext to dst. It returns the
// extended buffer and the primary; on failure dst is returned unchanged.
func (b *Batch) EncryptAppend(dst, plaintext, associatedData []byte) ([]byte, *Version, error) {
	k := b.k
	p := k.primary
	if p.usage.encrypts.Load()-p.encBase >= p.budget {
		return dst, p, k.budgetError(p)
	}
	if !b.primaryResolved {
		b.primaryGCM, b.primaryResolved = k.batchCipher(p), true
	}
	if g := b.primaryGCM; g != nil && len(plaintext) <= maxGCMPlaintext {
		nonce := b.nonce()
		dst = append(dst, tinkPrefix, byte(p.keyID>>24), byte(p.keyID>>16), byte(p.keyID>>8), byte(p.keyID))
		dst = append(dst, nonce...)
		dst = g.Seal(dst, nonce, plaintext, associatedData)
		p.usage.record(useEncrypt, b.now)
		return dst, p, nil
	}
	ct, err := k.aead.Encrypt(plaintext, associatedData)
	if err != nil {
		return dst, nil, ErrEncrypt
	}
	p.usage.record(useEncrypt, b.now)
	return append(dst, ct...), p, nil
}

// nonce returns a fresh random nonce, from a pool read for the whole batch
// with one crypto/rand call.
func (b *Batch) nonce() []byte {
	if len(b.nonces) < gcmNonceSize {
		b.nonces = make([]byte, gcmNonceSize*max(b.items, 1))
		_, _ = rand.Read(b.nonces) // crypto/rand.Read never fails (Go 1.24+)
	}
	n := b.nonces[:gcmNonceSize:gcmNonceSize]
	b.nonces = b.nonces[gcmNonceSize:]
	return n
}

// DecryptAppend decrypts ciphertext, like Keyset.Decrypt, and appends the
// plaintext to dst. It returns the extended buffer and the version the
// ciphertext names (if the keyset holds it, even on failure, for the audit
// record); on failure dst is returned unchanged. The errors are
// Keyset.Decrypt's: ErrVersionGone naming the version, else ErrDecrypt.
func (b *Batch) DecryptAppend(dst, ciphertext, associatedData []byte) ([]byte, *Version, error) {
	id, ok := KeyIDOf(ciphertext)
	if !ok {
		return dst, nil, ErrDecrypt
	}
	v := b.cur
	if v == nil || v.keyID != id {
		nv, err := b.k.decryptingVersion(id)
		if err != nil {
			return dst, nv, err
		}
		b.Done()
		b.cur, b.curGCM, v = nv, b.k.batchCipher(nv), nv
	}
	if g := b.curGCM; g != nil {
		if len(ciphertext) < AESGCMOverhead {
			return dst, v, ErrDecrypt
		}
		out, err := g.Open(dst, ciphertext[tinkPrefixLen:tinkPrefixLen+gcmNonceSize], ciphertext[tinkPrefixLen+gcmNonceSize:], associatedData)
		if err != nil {
			return dst, v, ErrDecrypt
		}
		b.opened++
		return out, v, nil
	}
	pt, err := b.k.aead.Decrypt(ciphertext, associatedData)
	if err != nil {
		return dst, v, ErrDecrypt
	}
	dst = append(dst, pt...)
	clear(pt)
	b.opened++
	return dst, v, nil
}

// decryptingVersion returns the version with key ID id if the keyset holds
// it enabled; else ErrVersionGone (with the version, if the keyset holds it
// disabled or destroyed), in the words of Keyset.Decrypt.
func (k *Keyset) decryptingVersion(id uint32) (*Version, error) {
	v, ok := k.Version(id)
	if !ok {
		return nil, fmt.Errorf("%w: keyset %q holds no key version %d (destroyed, or never delivered to this region)", ErrVersionGone, k.name, id)
	}
	if !v.Decrypts() {
		return v, fmt.Errorf("%w: keyset %q key version %d is %s: it no longer decrypts", ErrVersionGone, k.name, id, strings.TrimPrefix(v.status.String(), "KEY_STATUS_"))
	}
	return v, nil
}
