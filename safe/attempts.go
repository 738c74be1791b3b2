package safe

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

// AttemptLimiter counts failed PIN or passphrase attempts against one safe
// and refuses further attempts for a cooldown once too many failed in a row.
// SoftHSM2 (and some HSMs) never lock a token after wrong PINs, so the safe
// tool keeps its own counter. The count lives in a small file so that it
// survives restarts: killing the tool does not reset it.
type AttemptLimiter struct {
	path     string
	max      int
	cooldown time.Duration
	now      func() time.Time
}

// Default limits: 5 failures in a row lock the safe for 15 minutes.
const (
	DefaultMaxAttempts = 5
	DefaultCooldown    = 15 * time.Minute
)

type attemptState struct {
	Failures    int       `json:"failures"`
	LockedUntil time.Time `json:"locked_until,omitzero"`
}

var unsafeName = regexp.MustCompile(`[^A-Za-z0-9._-]`)

// NewAttemptLimiter keeps the counter for the safe named key (a token serial
// and label, or a file safe path) in dir. max <= 0 and cooldown <= 0 mean the
// defaults; now == nil means time.Now.
func NewAttemptLimiter(dir, key string, max int, cooldown time.Duration, now func() time.Time) (*AttemptLimiter, error) {
	if dir == "" {
		return nil, errors.New("safe: attempt limiter needs a state directory")
	}
	if key == "" {
		return nil, errors.New("safe: attempt limiter needs a key")
	}
	if max <= 0 {
		max = DefaultMaxAttempts
	}
	if cooldown <= 0 {
		cooldown = DefaultCooldown
	}
	if now == nil {
		now = time.Now
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("safe: attempt state directory: %w", err)
	}
	name := unsafeName.ReplaceAllString(key, "_") + ".attempts"
	return &AttemptLimiter{path: filepath.Join(dir, name), max: max, cooldown: cooldown, now: now}, nil
}

func (l *AttemptLimiter) load() (attemptState, error) {
	var s attemptState
	data, err := os.ReadFile(l.path)
	if errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return s, fmt.Errorf("safe: reading attempt counter: %w", err)
	}
	// A count below zero was not written by this code: it would buy extra
	// attempts. (Counts at or above the limit are kept at the limit: see
	// Failure.)
	if err := json.Unmarshal(data, &s); err != nil || s.Failures < 0 {
		// A corrupt counter must not unlock the safe: treat it as locked.
		return attemptState{Failures: l.max, LockedUntil: l.now().Add(l.cooldown)},
			fmt.Errorf("%w: attempt counter %s is corrupt; remove it only after checking who tampered with it", ErrLocked, l.path)
	}
	return s, nil
}

func (l *AttemptLimiter) store(s attemptState) error {
	data, err := json.Marshal(s)
	if err != nil {
		return err
	}
	tmp := l.path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("safe: writing attempt counter: %w", err)
	}
	if err := os.Rename(tmp, l.path); err != nil {
		return fmt.Errorf("safe: writing attempt counter: %w", err)
	}
	return nil
}

// Check returns ErrLocked (with when it unlocks) if the safe is in its
// cooldown; call it before every PIN or passphrase attempt.
func (l *AttemptLimiter) Check() error {
	s, err := l.load()
	if err != nil {
		return err
	}
	if s.Failures >= l.max && l.now().Before(s.LockedUntil) {
		return fmt.Errorf("%w: %d failed attempts; try again after %s", ErrLocked, s.Failures, s.LockedUntil.UTC().Format(time.RFC3339))
	}
	return nil
}

// Failure records a failed attempt. The max-th failure in a row starts the
// cooldown; a failure after a cooldown starts a new one at once.
func (l *AttemptLimiter) Failure() error {
	s, err := l.load()
	if err != nil {
		return err
	}
	// The count stops at the limit: past it, only the cooldown matters,
	// and a count that can only grow would eventually overflow.
	s.Failures = min(s.Failures, l.max-1) + 1
	if s.Failures >= l.max {
		s.LockedUntil = l.now().Add(l.cooldown)
	}
	return l.store(s)
}

// Success resets the counter after a correct PIN or passphrase.
func (l *AttemptLimiter) Success() error {
	if err := os.Remove(l.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("safe: resetting attempt counter: %w", err)
	}
	return nil
}
