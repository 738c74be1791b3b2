package safety

import (
	"fmt"
	"time"
)

// State is the lifecycle state of a keyset version in the root KMS record.
type State uint8

const (
	// StateUnspecified is the zero State; it does not decrypt and cannot be
	// promoted.
	StateUnspecified State = iota
	// Enabled versions decrypt but are not primary: added and not yet
	// promoted, or demoted by a later promotion.
	Enabled
	// Primary is the one version a keyset encrypts with; it also decrypts.
	Primary
	// Disabled versions do not decrypt; the material is kept.
	Disabled
	// DestroyScheduled versions do not decrypt; the material is still present
	// until Version.DestroyAfter and the step can be undone until then.
	DestroyScheduled
	// Destroyed versions have no material left.
	Destroyed
)

// Decrypts reports whether a version in state s is in the decrypt set:
// true for Enabled and Primary.
func (s State) Decrypts() bool { return s == Enabled || s == Primary }

// String returns the lower-case state name, e.g. "destroy-scheduled".
func (s State) String() string {
	switch s {
	case StateUnspecified:
		return "unspecified"
	case Enabled:
		return "enabled"
	case Primary:
		return "primary"
	case Disabled:
		return "disabled"
	case DestroyScheduled:
		return "destroy-scheduled"
	case Destroyed:
		return "destroyed"
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// Version is the record of one keyset version (Tink key ID).
type Version struct {
	// KeyID is the Tink key ID; ciphertexts name it in their prefix.
	KeyID uint32
	// State is the version's lifecycle state.
	State State
	// Created is when the root KMS made the version. No server can have used
	// it before. Zero means unknown (treated as "may predate anything").
	Created time.Time
	// PrimarySince is when the version last became primary in the record;
	// zero if it never was.
	PrimarySince time.Time
	// SupersededAt is when the version stopped being primary in the record
	// (another version was promoted); zero if it never was primary or still
	// is. A version that was primary but has no SupersededAt cannot retire.
	SupersededAt time.Time
	// DisabledAt is when the version left the decrypt set in the record;
	// zero while it decrypts. Informational; no rule reads it.
	DisabledAt time.Time
	// DestroyAfter is when a DestroyScheduled version's material is destroyed.
	// Informational; no rule reads it.
	DestroyAfter time.Time
	// Propagated maps a region to the earliest time from which every server
	// of that region served the version decrypting. A region absent from the
	// map has not (yet) served it everywhere. Whoever maintains the record
	// must not move a time earlier, and must drop a region's entry if a
	// server of the region stops serving the version while still serving
	// something else.
	Propagated map[string]time.Time
}

// Keyset is the lifecycle record of one keyset, as the root KMS holds it.
type Keyset struct {
	// Name is the keyset name, e.g. "demo/notes".
	Name string
	// Regions lists the regions that serve the keyset.
	Regions []string
	// TTL is the keyset's TTL history, oldest first (see WithTTL). An empty
	// history is an unknown TTL: every rule that needs the TTL refuses.
	TTL []TTLPeriod
	// Versions lists every version the record knows, in any state.
	Versions []Version
}

// Version returns the version with keyID and whether the record has it.
func (k Keyset) Version(keyID uint32) (Version, bool) {
	for _, v := range k.Versions {
		if v.KeyID == keyID {
			return v, true
		}
	}
	return Version{}, false
}

// firstPrimary reports whether v is a keyset's first version, primary since
// its creation and never superseded: it was never promoted over another.
func (v *Version) firstPrimary() bool {
	return v.State == Primary && !v.Created.IsZero() && v.PrimarySince.Equal(v.Created) && v.SupersededAt.IsZero()
}
