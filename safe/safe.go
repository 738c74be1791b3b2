// Package safe is the top of Cairn's chain: the HSM safes that keep the root
// master key (RMK) as Shamir shares, and the ceremonies around them (genesis,
// combining shares, rekey).
//
// A Safe seals one share under a key that lives inside it and cannot leave
// it. Implementations: safe/pkcs11safe (a PKCS#11 token; production) and
// FileSafe (a passphrase-derived key in a file; development only, named
// "insecure-file" so that nobody mistakes it for an HSM). Both store a share
// as a cairn.safe.v1.SealedShare whose AES-256-GCM associated data binds the
// genesis id, the epoch and the share index (see ShareAAD), so a sealed share
// cannot be moved to another slot or lineage.
package safe

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"regexp"

	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/secret"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
)

// Kinds of safe, as written in genesis manifests.
const (
	KindPKCS11       = "pkcs11"
	KindInsecureFile = "insecure-file"
)

// Errors callers branch on. Implementations wrap them with context.
var (
	// ErrNotFound: no share is stored under the reference.
	ErrNotFound = errors.New("safe: share not found")
	// ErrExists: a share is already stored under the reference; a safe never
	// overwrites one (destroy it first, as rekey does).
	ErrExists = errors.New("safe: share already exists")
	// ErrTampered: the stored share does not authenticate (modified, moved
	// to another slot, or sealed under another key). Deliberately one error
	// for every such cause.
	ErrTampered = errors.New("safe: sealed share does not authenticate (tampered, moved, or sealed by another safe)")
	// ErrLocked: too many failed PIN or passphrase attempts; the safe refuses
	// to try again until its cooldown has passed.
	ErrLocked = errors.New("safe: locked after too many failed attempts")
	// ErrBadCredential: wrong PIN or passphrase.
	ErrBadCredential = errors.New("safe: wrong PIN or passphrase")
	// ErrClosed: the safe was closed.
	ErrClosed = errors.New("safe: closed")
)

// ShareRef names one share: which RMK lineage (genesis id), which split of
// it (epoch, incremented by each rekey) and which share (1-based index).
type ShareRef struct {
	GenesisID string
	Epoch     uint32
	Index     uint32
}

var genesisIDPattern = regexp.MustCompile(`^[0-9a-f]{32}$`)

// Validate reports a malformed reference.
func (r ShareRef) Validate() error {
	if !genesisIDPattern.MatchString(r.GenesisID) {
		return fmt.Errorf("safe: genesis id %q is not 32 lowercase hex digits", r.GenesisID)
	}
	if r.Index < 1 || r.Index > 255 {
		return fmt.Errorf("safe: share index %d out of range 1..255", r.Index)
	}
	return nil
}

// String returns "<genesis id>/<epoch>/<index>".
func (r ShareRef) String() string {
	return fmt.Sprintf("%s/%d/%d", r.GenesisID, r.Epoch, r.Index)
}

// Safe seals and unseals shares. Implementations are safe for concurrent use
// and honour context cancellation. A share is the raw bytes of a Shamir share
// (as made by hashicorp/vault/shamir); a Safe never logs or returns it other
// than through Unseal.
type Safe interface {
	// Label names the safe: a token label or a file safe's name.
	Label() string
	// Kind is KindPKCS11 or KindInsecureFile.
	Kind() string
	// Seal encrypts share under the safe's key and stores it under ref. It
	// returns ErrExists if a share is stored under ref already.
	Seal(ctx context.Context, ref ShareRef, share secret.Bytes) error
	// Unseal returns the share stored under ref: ErrNotFound if there is
	// none, ErrTampered if it does not authenticate.
	Unseal(ctx context.Context, ref ShareRef) (secret.Bytes, error)
	// List returns the references of every stored share.
	List(ctx context.Context) ([]ShareRef, error)
	// Destroy deletes the share stored under ref (ErrNotFound if none).
	Destroy(ctx context.Context, ref ShareRef) error
	// Close releases the safe's resources.
	Close() error
}

// ShareAAD is the associated data a sealed share is authenticated with:
// "cairn/sealed-share/v1\x00" || genesis id || "\x00" || be32(epoch) ||
// be32(index).
func ShareAAD(ref ShareRef) []byte {
	b := make([]byte, 0, 64)
	b = append(b, "cairn/sealed-share/v1\x00"...)
	b = append(b, ref.GenesisID...)
	b = append(b, 0)
	b = binary.BigEndian.AppendUint32(b, ref.Epoch)
	b = binary.BigEndian.AppendUint32(b, ref.Index)
	return b
}

// NonceSize is the AES-GCM nonce size of sealed shares.
const NonceSize = 12

// EncodeSealed serializes a sealed share record.
func EncodeSealed(ref ShareRef, keyLabel string, nonce, ciphertext []byte) ([]byte, error) {
	return proto.MarshalOptions{Deterministic: true}.Marshal(&safev1.SealedShare{
		FormatVersion: 1,
		GenesisId:     ref.GenesisID,
		Epoch:         ref.Epoch,
		Index:         ref.Index,
		KeyLabel:      keyLabel,
		Nonce:         nonce,
		Ciphertext:    ciphertext,
	})
}

// DecodeSealed parses a sealed share record and checks that it is the one
// stored under want. Any malformation is ErrTampered: a stored record is
// either intact or not to be trusted.
func DecodeSealed(data []byte, want ShareRef) (*safev1.SealedShare, error) {
	var s safev1.SealedShare
	if err := proto.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("%w: %s: undecodable record", ErrTampered, want)
	}
	switch {
	case s.GetFormatVersion() != 1:
		return nil, fmt.Errorf("%w: %s: format version %d", ErrTampered, want, s.GetFormatVersion())
	case s.GetGenesisId() != want.GenesisID || s.GetEpoch() != want.Epoch || s.GetIndex() != want.Index:
		return nil, fmt.Errorf("%w: %s: record is for %s/%d/%d", ErrTampered, want, s.GetGenesisId(), s.GetEpoch(), s.GetIndex())
	case len(s.GetNonce()) != NonceSize:
		return nil, fmt.Errorf("%w: %s: nonce of %d bytes", ErrTampered, want, len(s.GetNonce()))
	case len(s.GetCiphertext()) < 16+1:
		return nil, fmt.Errorf("%w: %s: ciphertext of %d bytes", ErrTampered, want, len(s.GetCiphertext()))
	}
	return &s, nil
}
