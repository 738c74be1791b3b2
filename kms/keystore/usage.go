package keystore

import (
	"time"
)

// UsageRecord is one key version's usage as it outlives the process: what a
// KMS server persists so that, after a restart, its Safety check still knows
// which versions were used within their keyset's ciphertext TTL.
type UsageRecord struct {
	Keyset string
	KeyID  uint32
	// Decrypting says whether the version decrypted (primary or enabled)
	// when the record was taken.
	Decrypting bool
	// TTL is the keyset's ciphertext TTL then.
	TTL          time.Duration
	EncryptCount uint64
	DecryptCount uint64
	LastUse      time.Time
}

// UsageRecords returns the usage of every version of s that was ever used,
// in keyset name order and, within a keyset, in the keyset's key order.
func (s *Store) UsageRecords() []UsageRecord {
	var out []UsageRecord
	for _, name := range s.names {
		k := s.keysets[name]
		for _, v := range k.versions {
			u := v.Usage()
			if u.LastUse.IsZero() {
				continue
			}
			out = append(out, UsageRecord{Keyset: name, KeyID: v.keyID, Decrypting: v.Decrypts(), TTL: k.ttl,
				EncryptCount: u.Encrypts, DecryptCount: u.Decrypts, LastUse: u.LastUse})
		}
	}
	return out
}

// RestoreUsage adds records of an earlier run to the usage of the versions
// of s they name: counts are added, and the last use is the later of the
// two. It returns the records of keysets or versions s does not hold, which
// the caller keeps (their ciphertexts still count for the Safety check until
// their TTL passes). Call it on a store nobody serves yet.
func (s *Store) RestoreUsage(records []UsageRecord) (unmatched []UsageRecord) {
	for _, r := range records {
		v, ok := s.keysets[r.Keyset].version(r.KeyID)
		if !ok {
			unmatched = append(unmatched, r)
			continue
		}
		v.usage.encrypts.Add(r.EncryptCount)
		v.usage.decrypts.Add(r.DecryptCount)
		if !r.LastUse.IsZero() {
			v.usage.noteLastUse(r.LastUse.UnixNano())
		}
	}
	return unmatched
}

// Live reports whether the record still matters to the Safety check at now:
// a version that decrypted, last used within its TTL.
func (r UsageRecord) Live(now time.Time) bool {
	return r.Decrypting && !r.LastUse.IsZero() && r.LastUse.Add(r.TTL).After(now)
}
