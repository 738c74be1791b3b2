package keystore

import (
	"encoding/binary"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/tink-crypto/tink-go/v2/aead/aesgcm"
	"github.com/tink-crypto/tink-go/v2/key"
	"github.com/tink-crypto/tink-go/v2/tink"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/safety"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

// Op is a data-plane operation a keyset's ACL grants separately.
type Op int

// The operations of a keyset's ACL (bundlev1.Acl's fields).
const (
	OpEncrypt Op = iota
	OpDecrypt
	OpGenerateDataKey
	OpRewrap
	numOps
)

var opNames = [numOps]string{"encrypt", "decrypt", "generate_data_key", "rewrap"}

// String returns the ACL field name of op, e.g. "generate_data_key".
func (op Op) String() string {
	if op < 0 || op >= numOps {
		return "unknown"
	}
	return opNames[op]
}

// tinkPrefix is the first byte of a TINK output prefix; the 4 bytes after it
// are the big-endian key ID.
const (
	tinkPrefix    = 0x01
	tinkPrefixLen = 5
)

// KeyIDOf returns the key ID named by a ciphertext's TINK prefix.
func KeyIDOf(ciphertext []byte) (uint32, bool) {
	if len(ciphertext) < tinkPrefixLen || ciphertext[0] != tinkPrefix {
		return 0, false
	}
	return binary.BigEndian.Uint32(ciphertext[1:tinkPrefixLen]), true
}

// Keyset is one loaded customer keyset: immutable once built, safe for
// concurrent use. Only its versions' usage counters change.
type Keyset struct {
	name     string
	aead     tink.AEAD
	primary  *Version
	versions []*Version // in keyset order; a handful, so a scan beats a map
	acl      *[numOps]identity.Allowlist
	ttl      time.Duration

	// What the Safety check needs (see safety.go); never read by requests.
	//
	// ttlHistory is this server's own record of the keyset's TTL, carried
	// from snapshot to snapshot and across restarts; recordTTL, lifecycle,
	// window and regions are what the bundle carries from the root KMS
	// record.
	ttlHistory []safety.TTLPeriod
	recordTTL  []safety.TTLPeriod
	lifecycle  map[uint32]Lifecycle
	window     time.Duration
	regions    []string
}

// Lifecycle is one version's lifecycle times from the record, as a bundle
// carries them (bundlev1.VersionLifecycle); zero times are unset.
type Lifecycle struct {
	PropagatedEverywhere, PrimarySince, SupersededAt time.Time
	// EncryptCount is the version's fleet-wide encryption count the record
	// held when the bundle was built.
	EncryptCount uint64
}

// Name returns the keyset's name.
func (k *Keyset) Name() string { return k.name }

// Primary returns the version new encryptions use.
func (k *Keyset) Primary() *Version { return k.primary }

// CiphertextTTL returns how long a ciphertext of the keyset must stay
// decryptable, as the bundle says now.
func (k *Keyset) CiphertextTTL() time.Duration { return k.ttl }

// TTLHistory returns this server's own TTL history of the keyset, oldest
// first (the last period is open and is CiphertextTTL). The caller must not
// modify it.
func (k *Keyset) TTLHistory() []safety.TTLPeriod { return k.ttlHistory }

// EffectiveTTL is the TTL retirement must honour at now: the longest TTL of
// the periods, in this server's own history or in the record's the bundle
// carries, whose ciphertexts may still be live (safety.EffectiveTTL). A TTL
// decrease so counts only once the old TTL has passed since it.
func (k *Keyset) EffectiveTTL(now time.Time) time.Duration {
	return max(k.ttl, safety.EffectiveTTL(k.ttlHistory, now), safety.EffectiveTTL(k.recordTTL, now))
}

// Versions returns the keyset's versions in keyset order. The caller must not
// modify the slice.
func (k *Keyset) Versions() []*Version { return k.versions }

// Version returns the version with the given Tink key ID.
func (k *Keyset) Version(keyID uint32) (*Version, bool) {
	for _, v := range k.versions {
		if v.keyID == keyID {
			return v, true
		}
	}
	return nil, false
}

// Lifecycle returns the lifecycle times the bundle carries for the version
// with the given key ID (false if it carries none).
func (k *Keyset) Lifecycle(keyID uint32) (Lifecycle, bool) { return k.lifecycleOf(keyID) }

// Allows reports whether id may perform op with this keyset. It does not
// allocate. An empty ACL allows nobody.
func (k *Keyset) Allows(op Op, id identity.ID) bool {
	if op < 0 || op >= numOps {
		return false
	}
	return k.acl[op].Allows(id)
}

// Encrypt encrypts plaintext under the primary version and records the use
// at now. It returns the ciphertext (TINK prefix first) and the primary.
//
// It refuses, wrapping ErrBudget, once the primary has used up its message
// budget (see Version.Budget); the primary is then returned too, for the
// audit record. The check is one atomic load and a compare: no lock, no
// allocation. Concurrent encryptions may overshoot the limit by at most the
// number of them in flight (each checks before it counts).
func (k *Keyset) Encrypt(plaintext, associatedData []byte, now time.Time) ([]byte, *Version, error) {
	p := k.primary
	if p.usage.encrypts.Load()-p.encBase >= p.budget {
		return nil, p, k.budgetError(p)
	}
	ct, err := k.aead.Encrypt(plaintext, associatedData)
	if err != nil {
		return nil, nil, ErrEncrypt
	}
	p.usage.record(useEncrypt, now)
	return ct, p, nil
}

// budgetError is the refusal of an encryption with v, whose message budget
// is used up. It names no plaintext; the caller may encrypt with the keyset.
func (k *Keyset) budgetError(v *Version) error {
	return fmt.Errorf("%w: keyset %q version %d reached its AES-GCM message budget (limit %d encryptions); it still decrypts; rotate the keyset: regionctl keyset rotate %s, then promote the new version",
		ErrBudget, k.name, v.keyID, v.limit, k.name)
}

// Decrypt decrypts a ciphertext made under any version the keyset holds
// enabled, and records the use of that version at now. A ciphertext naming
// a version the keyset does not hold enabled fails with ErrVersionGone;
// every other failure is ErrDecrypt: which check failed is not told.
func (k *Keyset) Decrypt(ciphertext, associatedData []byte, now time.Time) ([]byte, *Version, error) {
	pt, v, err := k.open(ciphertext, associatedData)
	if err != nil {
		return nil, v, err
	}
	v.usage.record(useDecrypt, now)
	return pt, v, nil
}

// ProbeDecrypt is Decrypt without recording a use: golden probes run forever
// and must not keep a version looking used (which would block its
// retirement by the Safety check).
func (k *Keyset) ProbeDecrypt(ciphertext, associatedData []byte) ([]byte, *Version, error) {
	return k.open(ciphertext, associatedData)
}

// open routes a ciphertext to its version by the TINK prefix. It returns the
// version the prefix names (if the keyset has it) even when decryption fails,
// for the audit record.
func (k *Keyset) open(ciphertext, associatedData []byte) ([]byte, *Version, error) {
	id, ok := KeyIDOf(ciphertext)
	if !ok {
		return nil, nil, ErrDecrypt
	}
	v, ok := k.Version(id)
	if !ok {
		return nil, nil, fmt.Errorf("%w: keyset %q holds no key version %d (destroyed, or never delivered to this region)", ErrVersionGone, k.name, id)
	}
	if !v.Decrypts() {
		return nil, v, fmt.Errorf("%w: keyset %q key version %d is %s: it no longer decrypts", ErrVersionGone, k.name, id, strings.TrimPrefix(v.status.String(), "KEY_STATUS_"))
	}
	pt, err := k.aead.Decrypt(ciphertext, associatedData)
	if err != nil {
		return nil, v, ErrDecrypt
	}
	return pt, v, nil
}

// Version is one key of a keyset, as the decrypted keyset says it is.
type Version struct {
	keyID  uint32
	status cryptov1.KeyStatus
	usage  *Usage // shared with the same version of earlier and later snapshots
	// params are the key's Tink parameters (algorithm and sizes, no key
	// material); nil if Tink does not describe the key type.
	params key.Parameters

	// The message budget, fixed when the snapshot is built (see
	// setBudget). limit is the keyset's encrypt_limit; used is the
	// fleet-wide count of encryptions with the version known then; budget
	// is limit − used (0 if used ≥ limit): how many more encryptions this
	// server may make with the version under this snapshot. encBase is
	// usage.encrypts when the snapshot was built, plus what RestoreUsage
	// added since (history of earlier runs, not new encryptions): the
	// counter minus encBase is this server's encryptions with the version
	// since it applied the bundle.
	limit, used, budget, encBase uint64

	// gcmKey is the key if Batch seals and opens with it through
	// crypto/cipher (an AES-GCM key in Tink's own format, see setGCMKey);
	// nil: Batch uses the keyset's Tink AEAD. gcmAEAD is its cipher, built
	// on the first batch that uses it (see Version.gcm).
	gcmKey  *aesgcm.Key
	gcmAEAD atomic.Pointer[gcmCipher]
}

// KeyID returns the version's Tink key ID.
func (v *Version) KeyID() uint32 { return v.keyID }

// Status returns the version's status: PRIMARY, ENABLED, DISABLED or
// DESTROYED.
func (v *Version) Status() cryptov1.KeyStatus { return v.status }

// Parameters returns the key's Tink parameters (for example an
// *aesgcm.Parameters with its key size), or nil if Tink does not describe
// the key type. They hold no key material.
func (v *Version) Parameters() key.Parameters { return v.params }

// Decrypts reports whether the version can decrypt (PRIMARY or ENABLED).
func (v *Version) Decrypts() bool { return decrypts(v.status) }

// Usage returns the version's usage so far (on this server, since it was
// first loaded).
func (v *Version) Usage() UsageSnapshot { return v.usage.snapshot() }

// Budget returns the version's AES-GCM message budget: the keyset's limit
// of encryptions per version, fleet-wide, and the encryptions counted
// against it now (the fleet count the bundle's record held, or the count
// this server carried from the snapshot before if higher, plus this
// server's encryptions with the version since). The server refuses to
// encrypt with the version once used ≥ limit.
func (v *Version) Budget() (used, limit uint64) {
	return addSat(v.used, v.usage.encrypts.Load()-v.encBase), v.limit
}

func decrypts(s cryptov1.KeyStatus) bool {
	return s == cryptov1.KeyStatus_KEY_STATUS_PRIMARY || s == cryptov1.KeyStatus_KEY_STATUS_ENABLED
}

// Usage counts the uses of one key version. It is shared by every snapshot
// holding that version, so history survives bundle swaps.
type Usage struct {
	encrypts atomic.Uint64
	decrypts atomic.Uint64
	last     atomic.Int64 // unix nanoseconds of the last use; 0: never
	// lastEnc is the unix nanoseconds of the last encryption; 0: never. Kept
	// apart from last: a version keeps producing ciphertexts only while a
	// server encrypts with it, and those ciphertexts live for the TTL.
	lastEnc atomic.Int64
	// lost is set when the version's usage is not known: the server lost its
	// usage history at a boot and assumed the version was just used.
	lost atomic.Bool
}

type useKind int

const (
	useEncrypt useKind = iota
	useDecrypt
)

// lastUseGranularity bounds how often the shared last-use word is written:
// under load every request would otherwise write the same cache line.
const lastUseGranularity = time.Millisecond

func (u *Usage) record(kind useKind, now time.Time) { u.recordN(kind, 1, now) }

// recordN records count uses of one kind at now (a batch counts its run of
// items under one version at once).
func (u *Usage) recordN(kind useKind, count uint64, now time.Time) {
	if kind == useEncrypt {
		u.encrypts.Add(count)
	} else {
		u.decrypts.Add(count)
	}
	n := now.UnixNano()
	// Round up, so the recorded last use is never earlier than the real one
	// (the Safety check counts the TTL from it).
	n += int64(lastUseGranularity) - 1
	n -= n % int64(lastUseGranularity)
	if kind == useEncrypt {
		raise(&u.lastEnc, n)
	}
	raise(&u.last, n)
}

// raise raises w to n (unix nanoseconds) if n is later. Under load it is one
// load and no write (the word already holds this millisecond), so it costs
// the hot path no shared-cache-line write and no allocation.
func raise(w *atomic.Int64, n int64) {
	for {
		old := w.Load()
		if old >= n || w.CompareAndSwap(old, n) {
			return
		}
	}
}

// UsageSnapshot is a copy of a version's usage counters.
type UsageSnapshot struct {
	Encrypts, Decrypts uint64
	// LastUse is the last use (encryption or decryption), rounded up to the
	// millisecond; zero if never.
	LastUse time.Time
	// LastEncrypt is the last encryption, rounded up to the millisecond;
	// zero if never.
	LastEncrypt time.Time
	// HistoryLost: the server lost its usage history at a boot and assumed
	// the version used then; what it did before is unknown.
	HistoryLost bool
}

func (u *Usage) snapshot() UsageSnapshot {
	s := UsageSnapshot{Encrypts: u.encrypts.Load(), Decrypts: u.decrypts.Load(), HistoryLost: u.lost.Load()}
	if n := u.last.Load(); n != 0 {
		s.LastUse = time.Unix(0, n).UTC()
	}
	if n := u.lastEnc.Load(); n != 0 {
		s.LastEncrypt = time.Unix(0, n).UTC()
	}
	return s
}
