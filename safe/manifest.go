package safe

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/atomicfile"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/secret"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
)

// RMKSize is the size of the root master key in bytes (AES-256).
const RMKSize = 32

// MaxShares is the most shares vault/shamir can make (x in GF(2^8) \ {0}).
const MaxShares = 255

// ErrInvalidManifest is wrapped by every manifest validation error.
var ErrInvalidManifest = errors.New("safe: invalid genesis manifest")

// KCV is the RMK's key check value: HMAC-SHA256(RMK, "cairn/rmk-kcv/v1\x00"
// || genesis id). It is public: it identifies a reconstructed key without
// revealing anything about it.
func KCV(rmk secret.Bytes, genesisID string) []byte {
	key := rmk.Data()
	defer clear(key)
	m := hmac.New(sha256.New, key)
	m.Write([]byte("cairn/rmk-kcv/v1\x00"))
	m.Write([]byte(genesisID))
	return m.Sum(nil)
}

// CheckKCV reports, in constant time, whether rmk has the manifest's KCV.
func CheckKCV(rmk secret.Bytes, m *safev1.GenesisManifest) bool {
	return rmk.Len() == RMKSize && hmac.Equal(KCV(rmk, m.GetGenesisId()), m.GetKcv())
}

// Commitment is the public commitment to one share: HMAC-SHA256 keyed with
// "cairn/share-commitment/v1\x00" || genesis id || "\x00" || be32(epoch) ||
// be32(index), over the share. A share is uniformly random on its own, so
// its commitment reveals nothing; it identifies a valid share (and so the
// safe or officer that gave a bad one) before any combination is tried.
func Commitment(ref ShareRef, share []byte) []byte {
	key := make([]byte, 0, 72)
	key = append(key, "cairn/share-commitment/v1\x00"...)
	key = append(key, ref.GenesisID...)
	key = append(key, 0)
	key = binary.BigEndian.AppendUint32(key, ref.Epoch)
	key = binary.BigEndian.AppendUint32(key, ref.Index)
	m := hmac.New(sha256.New, key)
	m.Write(share)
	sum := m.Sum(nil)
	// SHA-256 keeps the last, unfinished block of its input in a buffer
	// that nothing clears: here the share itself, which would stay in the
	// freed heap object. A block of zeros written after the sum is taken
	// pushes it out (the buffered tail is overwritten in place).
	m.Write(make([]byte, sha256.BlockSize))
	return sum
}

// ValidateManifest checks a manifest's structure (not its signature: the
// manifest is public and pinned by operators; its KCV is what authenticates a
// reconstructed key).
func ValidateManifest(m *safev1.GenesisManifest) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidManifest, fmt.Sprintf(format, a...))
	}
	switch {
	case m == nil:
		return bad("no manifest")
	case m.GetFormatVersion() != 1:
		return bad("format version %d, want 1", m.GetFormatVersion())
	case !genesisIDPattern.MatchString(m.GetGenesisId()):
		return bad("genesis id %q is not 32 lowercase hex digits", m.GetGenesisId())
	case m.GetThreshold() < 2:
		return bad("threshold %d, want at least 2", m.GetThreshold())
	case len(m.GetSlots()) < int(m.GetThreshold()):
		return bad("%d shares for threshold %d", len(m.GetSlots()), m.GetThreshold())
	case len(m.GetSlots()) > MaxShares:
		return bad("%d shares, at most %d", len(m.GetSlots()), MaxShares)
	case len(m.GetKcv()) != sha256.Size:
		return bad("KCV of %d bytes, want %d", len(m.GetKcv()), sha256.Size)
	}
	seenIdx := map[uint32]bool{}
	seenLabel := map[string]bool{}
	for _, s := range m.GetSlots() {
		switch {
		case s.GetIndex() < 1 || s.GetIndex() > MaxShares:
			return bad("share index %d out of range", s.GetIndex())
		case seenIdx[s.GetIndex()]:
			return bad("share index %d listed twice", s.GetIndex())
		case s.GetSafeLabel() == "":
			return bad("share %d has no safe label", s.GetIndex())
		case seenLabel[s.GetSafeLabel()]:
			return bad("safe %q holds two shares; each share needs its own safe", s.GetSafeLabel())
		case s.GetSafeKind() != KindPKCS11 && s.GetSafeKind() != KindInsecureFile:
			return bad("share %d: unknown safe kind %q", s.GetIndex(), s.GetSafeKind())
		case len(s.GetCommitment()) != sha256.Size:
			return bad("share %d: commitment of %d bytes", s.GetIndex(), len(s.GetCommitment()))
		}
		seenIdx[s.GetIndex()] = true
		seenLabel[s.GetSafeLabel()] = true
	}
	return nil
}

// Officers lists the officer m binds each share to, in share order (""
// where none is named), for ValidateOfficers.
func Officers(m *safev1.GenesisManifest) []string {
	officers := make([]string, len(m.GetSlots()))
	for i, s := range m.GetSlots() {
		officers[i] = s.GetOfficer()
	}
	return officers
}

// ValidateOfficers checks the officers a split binds its shares to, one
// entry per share in order ("" where none is named). It is checked where a
// manifest is made or accepted anew (genesis, a rekey, a provisioning, a
// drill), not by ValidateManifest: a manifest already pinned with such an
// entry must still be read, so that its distributors and root KMS still
// start and hand the key to one another, and only the ceremonies it breaks
// are refused, saying why. A distributor compares
// each named officer with the verified SPIFFE ID of the officer who submits
// that share, as a string, so each must be a full Cairn SPIFFE ID
// (spiffe://<trust-domain>/<tier>/<region>/<name>): a relative one, as the
// allowlists are written, or any other malformed entry matches no one, and
// its share could never be released. Named officers must also be distinct
// (a ceremony takes one share per officer) and of one trust domain (a
// distributor trusts one). The error names the share and the entry.
func ValidateOfficers(officers []string) error {
	seen := map[string]int{}
	var first identity.ID
	for i, o := range officers {
		if o == "" {
			continue
		}
		id, err := identity.Parse(o)
		if err != nil {
			return fmt.Errorf("officer %q of share %d is not a full SPIFFE ID spiffe://<trust-domain>/<tier>/<region>/<name>: %w", o, i+1, err)
		}
		if j, ok := seen[o]; ok {
			return fmt.Errorf("officer %s is named for shares %d and %d; each share needs its own officer", o, j, i+1)
		}
		seen[o] = i + 1
		if first.IsZero() {
			first = id
		} else if id.TrustDomain() != first.TrustDomain() {
			return fmt.Errorf("officer %s of share %d is of trust domain %s, but officer %s is of %s; a distributor trusts one",
				o, i+1, id.TrustDomain().Name(), first, first.TrustDomain().Name())
		}
	}
	return nil
}

// Slot returns the manifest's slot for a share index, or nil.
func Slot(m *safev1.GenesisManifest, index uint32) *safev1.ShareSlot {
	for _, s := range m.GetSlots() {
		if s.GetIndex() == index {
			return s
		}
	}
	return nil
}

// ManifestHash is the SHA-256 of a manifest's deterministic encoding; a
// rekeyed manifest links to its predecessor with it.
func ManifestHash(m *safev1.GenesisManifest) ([]byte, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return nil, err
	}
	h := sha256.Sum256(b)
	return h[:], nil
}

// CheckSuccessor reports an error unless next is a rekey of prev: the same
// genesis id and KCV, the next epoch, and linked to prev by prev's
// ManifestHash.
func CheckSuccessor(prev, next *safev1.GenesisManifest) error {
	ph, err := ManifestHash(prev)
	if err != nil {
		return err
	}
	switch {
	case next.GetGenesisId() != prev.GetGenesisId() || subtle.ConstantTimeCompare(next.GetKcv(), prev.GetKcv()) != 1:
		return fmt.Errorf("safe: manifest of genesis %s is not of the lineage of genesis %s", next.GetGenesisId(), prev.GetGenesisId())
	case next.GetEpoch() != prev.GetEpoch()+1:
		return fmt.Errorf("safe: manifest of epoch %d does not follow epoch %d", next.GetEpoch(), prev.GetEpoch())
	case subtle.ConstantTimeCompare(next.GetPreviousManifestSha256(), ph) != 1:
		return fmt.Errorf("safe: manifest of epoch %d does not link to epoch %d (previous sha256 %x, want %x)", next.GetEpoch(), prev.GetEpoch(), next.GetPreviousManifestSha256(), ph)
	}
	return nil
}

// infoRekeyShare is the HPKE info label of a rekeyed share (distributor.proto).
const infoRekeyShare = "cairn/distributor/v1/rekey-share"

// RekeyShareInfo is the HPKE info a distributor seals new share index of a
// rekey ceremony with, and the officer opens it with: the label, then the
// ceremony id, genesis id, epoch and index.
func RekeyShareInfo(ceremonyID, genesisID string, epoch, index uint32) ([]byte, error) {
	return hpkeseal.Info(infoRekeyShare, ceremonyID, genesisID, strconv.FormatUint(uint64(epoch), 10), strconv.FormatUint(uint64(index), 10))
}

// WriteManifest writes m as indented JSON (it is public and meant to be read
// by people) to path, atomically, mode 0644.
func WriteManifest(path string, m *safev1.GenesisManifest) error {
	if err := ValidateManifest(m); err != nil {
		return err
	}
	data, err := protojson.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(m)
	if err != nil {
		return fmt.Errorf("safe: encoding manifest: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("safe: writing manifest: %w", err)
	}
	// Atomic and durable: temporary file, fsync, rename, directory fsync.
	if err := atomicfile.Write(path, append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("safe: writing manifest: %w", err)
	}
	return nil
}

// maxManifestSize bounds what ReadManifest reads: a manifest of 255 shares
// is a few tens of kilobytes.
const maxManifestSize = 1 << 20

// ReadManifest reads and validates a manifest written by WriteManifest.
// It refuses anything but a regular file of at most maxManifestSize bytes
// (an operator's --manifest /dev/zero must not hang a start).
func ReadManifest(path string) (*safev1.GenesisManifest, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("safe: reading manifest: %w", err)
	}
	defer f.Close() // read-only
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("safe: reading manifest: %w", err)
	}
	if !fi.Mode().IsRegular() || fi.Size() > maxManifestSize {
		return nil, fmt.Errorf("safe: reading manifest: %s is not a regular file of at most %d bytes", path, maxManifestSize)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxManifestSize+1))
	if err != nil {
		return nil, fmt.Errorf("safe: reading manifest: %w", err)
	}
	if len(data) > maxManifestSize {
		return nil, fmt.Errorf("safe: reading manifest: %s grew past %d bytes", path, maxManifestSize)
	}
	return ParseManifest(data)
}

// ParseManifest decodes a manifest from JSON (as written by WriteManifest)
// or from its binary protobuf encoding, and validates it.
func ParseManifest(data []byte) (*safev1.GenesisManifest, error) {
	var m safev1.GenesisManifest
	if err := protojson.Unmarshal(data, &m); err != nil {
		if perr := proto.Unmarshal(data, &m); perr != nil {
			return nil, fmt.Errorf("%w: neither JSON (%v) nor protobuf", ErrInvalidManifest, err)
		}
	}
	if err := ValidateManifest(&m); err != nil {
		return nil, err
	}
	return &m, nil
}
