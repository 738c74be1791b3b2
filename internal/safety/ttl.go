package safety

import (
	"slices"
	"time"
)

// TTLPeriod is one stretch of a keyset's TTL history: from From (inclusive)
// to Until (exclusive) every ciphertext the keyset produced must stay
// decipherable for TTL after it was produced. Until zero means the period is
// in force now.
type TTLPeriod struct {
	TTL   time.Duration
	From  time.Time
	Until time.Time
}

// live reports whether a ciphertext produced in the period may still be
// within its TTL at now: the period is open, or Until + TTL > now (a
// ciphertext produced just before Until lives until just before Until+TTL).
func (tp TTLPeriod) live(now time.Time) bool {
	return tp.Until.IsZero() || tp.Until.Add(tp.TTL).After(now)
}

// EffectiveTTL is the TTL retirement must honour at now: the maximum TTL over
// the periods of history (oldest first) whose ciphertexts may still be live
// at now (TTLPeriod.Until zero, or Until + TTL > now). A TTL decrease
// therefore takes effect for retirement only once the old TTL has passed
// since the decrease. An empty history gives 0; checks treat an empty
// history as an unknown TTL, never as a zero one.
func EffectiveTTL(history []TTLPeriod, now time.Time) time.Duration {
	var ttl time.Duration
	for _, tp := range history {
		if tp.live(now) {
			ttl = max(ttl, tp.TTL)
		}
	}
	return ttl
}

// TTLAt is the TTL in force at t: that of the period with From ≤ t < Until
// (or Until zero). ok is false when no period covers t. A ciphertext
// produced at t must stay decipherable until t + TTLAt(history, t).
func TTLAt(history []TTLPeriod, t time.Time) (ttl time.Duration, ok bool) {
	for i := len(history) - 1; i >= 0; i-- {
		tp := history[i]
		if !t.Before(tp.From) && (tp.Until.IsZero() || t.Before(tp.Until)) {
			return tp.TTL, true
		}
	}
	return 0, false
}

// WithTTL returns a copy of history (oldest first) with the TTL set to ttl
// from at on: the open period (Until zero), if any, is closed at at and a new
// open period {ttl, at, zero} is appended. If the open period already has
// ttl, the copy is returned unchanged. history itself is never modified.
// at should not be before the open period's From; if it is, the open period
// is closed at its From (an empty period), so no history is rewritten.
func WithTTL(history []TTLPeriod, ttl time.Duration, at time.Time) []TTLPeriod {
	out := slices.Clone(history)
	if n := len(out); n > 0 && out[n-1].Until.IsZero() {
		if out[n-1].TTL == ttl {
			return out
		}
		until := at
		if until.Before(out[n-1].From) {
			until = out[n-1].From
		}
		out[n-1].Until = until
	}
	return append(out, TTLPeriod{TTL: ttl, From: at})
}
