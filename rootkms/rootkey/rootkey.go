// Package rootkey is the root master key (RMK) as the root KMS uses it: to
// wrap and unwrap region master key versions, and to tag and check backups
// of the root KMS state. The RMK itself is not kept; two keys derived from
// it with HKDF-SHA256 (domain separation from each other and from any other
// use of the RMK), the wrapping key and the backup tag key, live in one
// locked memory page.
package rootkey

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/cairnkms/cairn/internal/secret"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
)

// ErrUnwrap is the one error for a wrapped region key that does not open.
var ErrUnwrap = errors.New("rootkey: wrapped region key does not open under this root key (tampered, moved, or of another lineage)")

// ErrBackupTag is the one error for a backup tag that does not verify.
var ErrBackupTag = errors.New("rootkey: backup tag does not verify (the backup was changed, or made under another root key)")

const nonceSize = 12

// The locked buffer holds the wrapping key, then the backup tag key.
const (
	wrapKeySize = 32
	tagKeySize  = 32
)

// HKDF labels of the derived keys.
const (
	wrapKeyInfo = "cairn/rootkms/region-key-wrap/v1"
	tagKeyInfo  = "cairn/rootkms/backup-mac/v1"
)

// Key wraps and unwraps region key versions for one RMK lineage.
type Key struct {
	mu        sync.RWMutex
	buf       *lockedmem.Buffer // the derived wrapping and tag keys; nil once closed
	genesisID string
	kcv       []byte
}

// New derives the wrapping and backup tag keys from rmk after checking rmk
// against the pinned manifest's KCV. The caller still owns (and wipes) rmk.
func New(rmk secret.Bytes, m *safev1.GenesisManifest) (*Key, error) {
	if !safe.CheckKCV(rmk, m) {
		return nil, fmt.Errorf("rootkey: %w", safe.ErrKCVMismatch)
	}
	raw := rmk.Data()
	defer clear(raw)
	wk, err := hkdf.Key(sha256.New, raw, []byte(m.GetGenesisId()), wrapKeyInfo, wrapKeySize)
	if err != nil {
		return nil, err
	}
	defer clear(wk)
	tk, err := hkdf.Key(sha256.New, raw, []byte(m.GetGenesisId()), tagKeyInfo, tagKeySize)
	if err != nil {
		return nil, err
	}
	defer clear(tk)
	buf, err := lockedmem.New(wrapKeySize + tagKeySize)
	if err != nil {
		return nil, fmt.Errorf("rootkey: %w", err)
	}
	copy(buf.Bytes(), wk)
	copy(buf.Bytes()[wrapKeySize:], tk)
	return &Key{buf: buf, genesisID: m.GetGenesisId(), kcv: append([]byte(nil), m.GetKcv()...)}, nil
}

// KCV returns the RMK's public key check value.
func (k *Key) KCV() []byte { return append([]byte(nil), k.kcv...) }

// associatedData binds a wrapped version to its region, version and lineage:
// "cairn/region-key/v1\x00" || region || "\x00" || be32(version) || "\x00" ||
// genesis id.
func (k *Key) associatedData(region string, version uint32) []byte {
	b := append([]byte("cairn/region-key/v1\x00"), region...)
	b = append(b, 0)
	b = binary.BigEndian.AppendUint32(b, version)
	b = append(b, 0)
	return append(b, k.genesisID...)
}

func (k *Key) gcm() (cipher.AEAD, error) {
	if k.buf == nil {
		return nil, errors.New("rootkey: closed")
	}
	block, err := aes.NewCipher(k.buf.Bytes()[:wrapKeySize])
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// Wrap encrypts one region key version's material.
func (k *Key) Wrap(region string, version uint32, material secret.Bytes) (*statev1.WrappedRegionKeyVersion, error) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	g, err := k.gcm()
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, nonceSize)
	_, _ = rand.Read(nonce)
	pt := material.Data()
	defer clear(pt)
	return &statev1.WrappedRegionKeyVersion{
		Version:    version,
		WrappedKey: g.Seal(nonce, nonce, pt, k.associatedData(region, version)),
		RmkKcv:     k.KCV(),
	}, nil
}

// Unwrap decrypts one region key version's material.
func (k *Key) Unwrap(region string, w *statev1.WrappedRegionKeyVersion) (secret.Bytes, error) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	g, err := k.gcm()
	if err != nil {
		return secret.Bytes{}, err
	}
	ct := w.GetWrappedKey()
	if len(ct) < nonceSize+g.Overhead() {
		return secret.Bytes{}, ErrUnwrap
	}
	pt, err := g.Open(nil, ct[:nonceSize], ct[nonceSize:], k.associatedData(region, w.GetVersion()))
	if err != nil {
		return secret.Bytes{}, ErrUnwrap
	}
	defer clear(pt)
	return secret.New(pt), nil
}

// BackupTag returns the HMAC-SHA256 of msg under the backup tag key: a tag
// that only a holder of this lineage's RMK can make (the backup format
// decides what msg is).
func (k *Key) BackupTag(msg []byte) ([]byte, error) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	if k.buf == nil {
		return nil, errors.New("rootkey: closed")
	}
	m := hmac.New(sha256.New, k.buf.Bytes()[wrapKeySize:])
	m.Write(msg)
	return m.Sum(nil), nil
}

// CheckBackupTag reports whether tag is msg's BackupTag, comparing in
// constant time: nil, or ErrBackupTag.
func (k *Key) CheckBackupTag(msg, tag []byte) error {
	want, err := k.BackupTag(msg)
	if err != nil {
		return err
	}
	if !hmac.Equal(want, tag) {
		return ErrBackupTag
	}
	return nil
}

// Close wipes the wrapping and tag keys.
func (k *Key) Close() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.buf == nil {
		return nil
	}
	err := k.buf.Destroy()
	k.buf = nil
	return err
}
