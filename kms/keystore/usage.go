package keystore

import (
	"maps"
	"time"

	"github.com/cairnkms/cairn/internal/safety"
)

// UsageRecord is one key version's usage as it outlives the process: what a
// KMS server persists so that, after a restart, its Safety check still knows
// which versions were used within their keyset's effective TTL.
type UsageRecord struct {
	Keyset string
	KeyID  uint32
	// Decrypting says whether the version decrypted (primary or enabled)
	// when the record was taken.
	Decrypting bool
	// TTL is the keyset's effective TTL when the record was taken (see
	// Keyset.EffectiveTTL); Window its propagation window then.
	TTL          time.Duration
	Window       time.Duration
	EncryptCount uint64
	DecryptCount uint64
	LastUse      time.Time
	// LastEncrypt is the last encryption (zero: none, or unknown in a record
	// written before it was kept; LastUse then stands for it).
	LastEncrypt time.Time
	// HistoryLost: the server lost its usage history at a boot and assumed
	// the version used then (LastUse and LastEncrypt are that boot).
	HistoryLost bool
}

// UsageRecords returns the usage of every version of s that was ever used,
// in keyset name order and, within a keyset, in the keyset's key order, with
// the keysets' effective TTLs at now.
func (s *Store) UsageRecords(now time.Time) []UsageRecord {
	var out []UsageRecord
	for _, name := range s.names {
		k := s.keysets[name]
		var ttl time.Duration
		for _, v := range k.versions {
			u := v.Usage()
			if u.LastUse.IsZero() {
				continue
			}
			if ttl == 0 {
				ttl = k.EffectiveTTL(now)
			}
			out = append(out, UsageRecord{Keyset: name, KeyID: v.keyID, Decrypting: v.Decrypts(), TTL: ttl, Window: k.window,
				EncryptCount: u.Encrypts, DecryptCount: u.Decrypts, LastUse: u.LastUse, LastEncrypt: u.LastEncrypt, HistoryLost: u.HistoryLost})
		}
	}
	return out
}

// RestoreUsage adds records of an earlier run to the usage of the versions
// of s they name: counts are added, the last use and last encryption are the
// later of the two, and a lost history stays lost. Restored encryptions are
// history, not new encryptions since s was built: they do not count against
// the versions' message budgets (see Version.setBudget). It returns the
// records of keysets or versions s does not hold, which the caller keeps
// (their ciphertexts still count for the Safety check until their TTL
// passes).
// Call it on a store nobody serves yet.
func (s *Store) RestoreUsage(records []UsageRecord) (unmatched []UsageRecord) {
	for _, r := range records {
		v, ok := s.keysets[r.Keyset].version(r.KeyID)
		if !ok {
			unmatched = append(unmatched, r)
			continue
		}
		v.usage.encrypts.Add(r.EncryptCount)
		v.encBase += r.EncryptCount
		v.usage.decrypts.Add(r.DecryptCount)
		if !r.LastUse.IsZero() {
			raise(&v.usage.last, r.LastUse.UnixNano())
		}
		if t := r.lastEncrypt(); !t.IsZero() {
			// A record that does not tell encryptions apart (usage file
			// version 1) counts its last use as one.
			raise(&v.usage.lastEnc, t.UnixNano())
		}
		if r.HistoryLost {
			v.usage.lost.Store(true)
		}
	}
	return unmatched
}

// Live reports whether the record still matters to the Safety check at now:
// a version that decrypted, last used within its TTL and window.
func (r UsageRecord) Live(now time.Time) bool {
	return r.Decrypting && !r.LastUse.IsZero() && r.LastUse.Add(r.TTL+r.Window).After(now)
}

// lastEncrypt is the record's last encryption, or its last use for a record
// that does not tell (written before encryptions were told apart).
func (r UsageRecord) lastEncrypt() time.Time {
	if r.LastEncrypt.IsZero() {
		return r.LastUse
	}
	return r.LastEncrypt
}

// TTLHistories returns this server's own TTL history of every keyset of s,
// by keyset name (see Keyset.TTLHistory). The caller must not modify the
// slices.
func (s *Store) TTLHistories() map[string][]safety.TTLPeriod {
	out := make(map[string][]safety.TTLPeriod, len(s.keysets))
	for name, k := range s.keysets {
		out[name] = k.ttlHistory
	}
	return out
}

// RestoreTTL continues the TTL histories of an earlier run (persisted, or
// carried while the keyset was not served): a keyset of s with a history in
// histories takes it on, with its bundle's TTL in force from now if it
// differs. It returns the histories of keysets s does not hold, for the
// caller to keep. Call it on a store nobody serves yet.
func (s *Store) RestoreTTL(histories map[string][]safety.TTLPeriod, now time.Time) (unmatched map[string][]safety.TTLPeriod) {
	unmatched = maps.Clone(histories)
	for name, h := range histories {
		k, ok := s.keysets[name]
		if !ok {
			continue
		}
		delete(unmatched, name)
		k.ttlHistory = withTTL(h, k.ttl, now)
	}
	return unmatched
}

// ClosedTTL returns history with its open period, if any, closed at now
// (the keyset stopped being served), without the periods over at now. It
// returns nil when nothing is left.
func ClosedTTL(history []safety.TTLPeriod, now time.Time) []safety.TTLPeriod {
	out := make([]safety.TTLPeriod, 0, len(history))
	for _, tp := range history {
		if tp.Until.IsZero() {
			tp.Until = now
			if now.Before(tp.From) {
				tp.Until = tp.From
			}
		}
		out = append(out, tp)
	}
	out = pruneTTL(out, now)
	if len(out) == 0 {
		return nil
	}
	return out
}
