// Package hpkeseal seals key material for transfer between Cairn's tiers
// with HPKE (RFC 9180), base mode, single shot, to an ephemeral key of the
// one recipient that may open it.
//
// The suite is fixed: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and
// AES-256-GCM ([KEM], [KDF], [AEAD]). A requester makes a [Recipient] for one
// exchange, sends [Recipient.PublicKey] with its request, opens the reply
// with [Recipient.Open] and calls [Recipient.Close]. The responder seals with
// [Seal]. Both sides bind the exchange's purpose and parties with the same
// info string, built with [Info].
//
// The messages are the wire types of cairn.crypto.v1: [cryptov1.HpkePublicKey]
// and [cryptov1.HpkeSealed], whose ciphertext is the encapsulated key
// followed by the AEAD ciphertext, exactly as crypto/hpke.Seal produces it.
package hpkeseal

import (
	"bytes"
	"crypto/ecdh"
	"crypto/hpke"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/cairnkms/cairn/internal/secret"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

// The IANA HPKE identifiers of the one suite Cairn uses. Messages and keys
// naming any other algorithm are refused.
const (
	KEM  uint16 = 0x0020 // DHKEM(X25519, HKDF-SHA256)
	KDF  uint16 = 0x0001 // HKDF-SHA256
	AEAD uint16 = 0x0002 // AES-256-GCM
)

// PublicKeySize is the length of an X25519 public key, and of the
// encapsulated key at the start of every sealed ciphertext.
const PublicKeySize = 32

// Overhead is how much longer a sealed ciphertext is than its plaintext: the
// encapsulated key and the AES-GCM tag.
const Overhead = PublicKeySize + 16

// Redacted is what every textual rendering of a [Recipient] produces.
const Redacted = "hpkeseal.Recipient(REDACTED)"

// ErrOpen is the one error [Recipient.Open] returns, whatever went wrong:
// an unknown suite, a message for another key or another info string, a
// tampered, truncated or empty ciphertext, or a closed Recipient. Telling
// these apart would give an attacker an oracle. It is returned unwrapped.
var ErrOpen = errors.New("hpkeseal: cannot open sealed message")

// The crypto/hpke implementations of KEM, KDF and AEAD.
var (
	suiteKEM  = hpke.DHKEM(ecdh.X25519())
	suiteKDF  = hpke.HKDFSHA256()
	suiteAEAD = hpke.AES256GCM()
)

// Recipient is the receiving end of one exchange: an ephemeral X25519 key
// pair whose private half never leaves memory.
//
// A Recipient is safe for concurrent use by multiple goroutines. Printing or
// logging it yields [Redacted].
type Recipient struct {
	public  []byte       // serialized public key; never modified
	private secret.Bytes // serialized private key; wiped by Close
}

// NewRecipient returns a Recipient with a fresh key pair. Call
// [Recipient.Close] once the exchange is over.
func NewRecipient() (*Recipient, error) {
	k, err := suiteKEM.GenerateKey()
	if err != nil {
		return nil, fmt.Errorf("hpkeseal: generate key: %w", err)
	}
	return newRecipient(k)
}

// newRecipient returns a Recipient holding k, which must be a key of
// suiteKEM.
func newRecipient(k hpke.PrivateKey) (*Recipient, error) {
	sk, err := k.Bytes()
	if err != nil {
		return nil, fmt.Errorf("hpkeseal: serialize private key: %w", err)
	}
	defer clear(sk)
	return &Recipient{public: k.PublicKey().Bytes(), private: secret.New(sk)}, nil
}

// PublicKey returns the public key to send to the party that will seal to
// r, as a new message. It returns nil once r is closed, so that a closed
// Recipient cannot be asked for messages it could not open.
func (r *Recipient) PublicKey() *cryptov1.HpkePublicKey {
	if r == nil || r.private.IsZero() {
		return nil
	}
	return &cryptov1.HpkePublicKey{KemId: uint32(KEM), PublicKey: bytes.Clone(r.public)}
}

// Open decrypts a message sealed to r's public key with [Seal] under the
// same info, and returns the plaintext. Any failure returns [ErrOpen] and a
// zero [secret.Bytes]; so does a message whose plaintext is empty, which
// [Seal] never makes. Open does not modify sealed.
func (r *Recipient) Open(sealed *cryptov1.HpkeSealed, info []byte) (secret.Bytes, error) {
	if r == nil || sealed == nil ||
		sealed.GetKemId() != uint32(KEM) || sealed.GetKdfId() != uint32(KDF) || sealed.GetAeadId() != uint32(AEAD) ||
		len(sealed.GetCiphertext()) <= Overhead { // also refuses an empty plaintext
		return secret.Bytes{}, ErrOpen
	}
	sk := r.private.Data()
	defer clear(sk)
	if sk == nil { // closed
		return secret.Bytes{}, ErrOpen
	}
	k, err := suiteKEM.NewPrivateKey(sk)
	if err != nil {
		return secret.Bytes{}, ErrOpen
	}
	plaintext, err := hpke.Open(k, suiteKDF, suiteAEAD, info, sealed.GetCiphertext())
	defer clear(plaintext)
	if err != nil {
		return secret.Bytes{}, ErrOpen
	}
	return secret.New(plaintext), nil
}

// Close wipes r's private key; afterwards [Recipient.Open] returns [ErrOpen]
// and [Recipient.PublicKey] returns nil. The wipe is best effort: it zeroes
// the copy r holds, while copies that crypto/hpke and crypto/ecdh made
// during earlier calls are left to the garbage collector. Close is safe to
// call more than once, concurrently with Open, and on a nil Recipient.
func (r *Recipient) Close() {
	if r != nil {
		r.private.Wipe()
	}
}

// String returns [Redacted].
func (Recipient) String() string { return Redacted }

// GoString returns [Redacted], so %#v does not reveal the key.
func (Recipient) GoString() string { return Redacted }

// Format writes [Redacted] for every verb and flag.
func (Recipient) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, Redacted) }

// LogValue implements [slog.LogValuer]; it returns [Redacted] as a string.
func (Recipient) LogValue() slog.Value { return slog.StringValue(Redacted) }

// Seal encrypts plaintext to the public key to, binding it to info, and
// returns the message for the key's holder to open with [Recipient.Open].
// Every call uses a fresh ephemeral key, so sealing the same plaintext twice
// gives different messages.
//
// Seal refuses a nil key, a key for another KEM than [KEM], a key that is not
// [PublicKeySize] bytes or is a low-order X25519 point, and an empty
// plaintext. The caller keeps ownership of plaintext and should clear it
// when done.
func Seal(to *cryptov1.HpkePublicKey, info []byte, plaintext []byte) (*cryptov1.HpkeSealed, error) {
	switch {
	case to == nil:
		return nil, errors.New("hpkeseal: nil public key")
	case to.GetKemId() != uint32(KEM):
		return nil, fmt.Errorf("hpkeseal: public key for KEM %#04x, want %#04x (DHKEM(X25519, HKDF-SHA256))", to.GetKemId(), KEM)
	case len(to.GetPublicKey()) != PublicKeySize:
		return nil, fmt.Errorf("hpkeseal: public key is %d bytes, want %d", len(to.GetPublicKey()), PublicKeySize)
	case len(plaintext) == 0:
		return nil, errors.New("hpkeseal: empty plaintext")
	}
	pk, err := suiteKEM.NewPublicKey(to.GetPublicKey())
	if err != nil {
		return nil, fmt.Errorf("hpkeseal: invalid public key: %w", err)
	}
	ciphertext, err := hpke.Seal(pk, suiteKDF, suiteAEAD, info, plaintext)
	if err != nil {
		// X25519 with a low-order point yields the all-zero shared
		// secret, which crypto/ecdh rejects.
		return nil, fmt.Errorf("hpkeseal: seal: %w", err)
	}
	return &cryptov1.HpkeSealed{
		KemId:      uint32(KEM),
		KdfId:      uint32(KDF),
		AeadId:     uint32(AEAD),
		Ciphertext: ciphertext,
	}, nil
}

// Info builds an HPKE info string: label, then each part, each preceded by
// a NUL byte (label || 0x00 || part1 || 0x00 || part2 ...). Because no
// element may contain NUL, distinct (label, parts) lists give distinct info
// strings. Info returns an error if label is empty or if label or a part
// contains a NUL byte. Parts may be empty.
//
// Labels name the exchange and its version, for example
// Info("cairn/rmk-sync/v1", fromID, toID).
func Info(label string, parts ...string) ([]byte, error) {
	if label == "" {
		return nil, errors.New("hpkeseal: empty info label")
	}
	if strings.IndexByte(label, 0) >= 0 {
		return nil, fmt.Errorf("hpkeseal: info label %q contains NUL", label)
	}
	n := len(label)
	for i, p := range parts {
		if strings.IndexByte(p, 0) >= 0 {
			return nil, fmt.Errorf("hpkeseal: info part %d (%q) contains NUL", i, p)
		}
		n += 1 + len(p)
	}
	info := make([]byte, 0, n)
	info = append(info, label...)
	for _, p := range parts {
		info = append(info, 0)
		info = append(info, p...)
	}
	return info, nil
}
