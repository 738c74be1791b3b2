package keystore

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// ErrUnsafe is wrapped by every refusal of CheckSafety.
var ErrUnsafe = errors.New("keystore: the bundle would break the Safety Condition")

// Violation is one key version a bundle would stop decrypting although this
// server used it within its keyset's ciphertext TTL.
type Violation struct {
	Keyset string
	KeyID  uint32
	// Change says what the new bundle does to the version: "keyset dropped",
	// "version dropped", or "version <status>" (disabled, destroyed).
	Change  string
	LastUse time.Time
	TTL     time.Duration
}

// Until is when the version may leave the decrypt set (LastUse + TTL).
func (v Violation) Until() time.Time { return v.LastUse.Add(v.TTL) }

func (v Violation) String() string {
	return fmt.Sprintf("keyset %q version %d (%s): last used %s, ciphertext TTL %v, so it must keep decrypting until %s",
		v.Keyset, v.KeyID, v.Change, v.LastUse.UTC().Format(time.RFC3339), v.TTL, v.Until().UTC().Format(time.RFC3339))
}

// UnsafeError lists every violation CheckSafety found.
type UnsafeError struct {
	Violations []Violation
}

// maxListed bounds how many violations an error message spells out.
const maxListed = 5

func (e *UnsafeError) Error() string {
	var b strings.Builder
	b.WriteString(ErrUnsafe.Error())
	b.WriteString(": ")
	for i, v := range e.Violations {
		if i == maxListed {
			fmt.Fprintf(&b, "; and %d more", len(e.Violations)-maxListed)
			break
		}
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(v.String())
	}
	return b.String()
}

// Unwrap makes errors.Is(err, ErrUnsafe) hold.
func (e *UnsafeError) Unwrap() error { return ErrUnsafe }

// CheckSafety is the KMS's own check of the Safety Condition before a swap:
// it refuses next if it drops a keyset, or drops or disables a key version,
// that cur decrypts with and that this server used within the keyset's
// ciphertext TTL (last use + TTL > now). The TTL is the larger of the
// keyset's TTL in cur and in next. There is no override: force does not
// apply here. A nil cur (nothing served yet) has no history and passes.
//
// It sees only this server's usage since the version was loaded; regionctl
// checks the fleet-wide condition before a rollout.
func CheckSafety(cur, next *Store, now time.Time) error {
	if cur == nil {
		return nil
	}
	return CheckUsage(cur.UsageRecords(), next, now)
}

// CheckUsage is CheckSafety against usage records rather than a served
// store: a server that restarted and serves nothing yet still refuses a
// bundle that drops a version its persisted history says was used within
// the TTL. Records of versions that did not decrypt are skipped.
func CheckUsage(records []UsageRecord, next *Store, now time.Time) error {
	var out []Violation
	for _, r := range records {
		if !r.Decrypting {
			continue // it did not decrypt before either
		}
		nk := next.keysets[r.Keyset]
		ttl := r.TTL
		if nk != nil {
			ttl = max(ttl, nk.ttl)
		}
		if r.LastUse.IsZero() || !r.LastUse.Add(ttl).After(now) {
			continue
		}
		change := ""
		switch nv, ok := nk.version(r.KeyID); {
		case nk == nil:
			change = "keyset dropped"
		case !ok:
			change = "version dropped"
		case !nv.Decrypts():
			change = "version " + strings.ToLower(strings.TrimPrefix(nv.status.String(), "KEY_STATUS_"))
		}
		if change != "" {
			out = append(out, Violation{Keyset: r.Keyset, KeyID: r.KeyID, Change: change, LastUse: r.LastUse, TTL: ttl})
		}
	}
	if len(out) > 0 {
		return &UnsafeError{Violations: out}
	}
	return nil
}

// version is Version on a possibly nil keyset.
func (k *Keyset) version(keyID uint32) (*Version, bool) {
	if k == nil {
		return nil, false
	}
	return k.Version(keyID)
}
