package safe

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestTamperedFileSafeMeta: a safe.json asking for absurd argon2id work is
// refused before any key derivation (it would allocate terabytes or spin
// for hours), and a sane one still loads.
func TestTamperedFileSafeMeta(t *testing.T) {
	const salt = `"AAAAAAAAAAAAAAAAAAAAAA=="`
	for _, tt := range []struct {
		name, json string
		ok         bool
	}{
		{"sane", `{"format":1,"kind":"insecure-file","label":"l","salt":` + salt + `,"argon2id_time":3,"argon2id_memory_kib":65536,"argon2id_threads":2}`, true},
		{"4 TiB of memory", `{"format":1,"kind":"insecure-file","label":"l","salt":` + salt + `,"argon2id_time":3,"argon2id_memory_kib":4294967295,"argon2id_threads":2}`, false},
		{"4 billion passes", `{"format":1,"kind":"insecure-file","label":"l","salt":` + salt + `,"argon2id_time":4294967295,"argon2id_memory_kib":65536,"argon2id_threads":2}`, false},
		{"255 threads", `{"format":1,"kind":"insecure-file","label":"l","salt":` + salt + `,"argon2id_time":3,"argon2id_memory_kib":65536,"argon2id_threads":255}`, false},
		{"below the floor", `{"format":1,"kind":"insecure-file","label":"l","salt":` + salt + `,"argon2id_time":3,"argon2id_memory_kib":1024,"argon2id_threads":2}`, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "safe.json")
			if err := os.WriteFile(path, []byte(tt.json), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := readFileSafeMeta(path)
			if (err == nil) != tt.ok {
				t.Errorf("readFileSafeMeta(%s) = %v, want ok %v", tt.name, err, tt.ok)
			}
		})
	}
}

// TestTamperedAttemptCounter: a counter below zero (it would buy extra
// passphrase attempts) is corrupt: the safe stays locked and the file is
// left for inspection. A count past the limit (it used to grow without
// bound, and would overflow) locks at the limit on the next failure.
func TestTamperedAttemptCounter(t *testing.T) {
	now := time.Date(2026, 12, 3, 0, 0, 0, 0, time.UTC)
	for _, counter := range []string{`{"failures":-1000000}`, `{"failures":-1}`} {
		t.Run(counter, func(t *testing.T) {
			l, err := NewAttemptLimiter(t.TempDir(), "insecure-file-safe-1", 5, time.Minute, func() time.Time { return now })
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(l.path, []byte(counter), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := l.Check(); !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "corrupt") {
				t.Errorf("Check() with counter %s = %v, want ErrLocked naming the corrupt counter", counter, err)
			}
			if err := l.Failure(); !errors.Is(err, ErrLocked) {
				t.Errorf("Failure() with counter %s = %v, want ErrLocked", counter, err)
			}
			if got, _ := os.ReadFile(l.path); string(got) != counter {
				t.Errorf("counter file became %q, want it left as %s", got, counter)
			}
		})
	}
}

func TestAttemptCounterStopsAtTheLimit(t *testing.T) {
	now := time.Date(2026, 12, 3, 0, 0, 0, 0, time.UTC)
	l, err := NewAttemptLimiter(t.TempDir(), "insecure-file-safe-1", 5, time.Minute, func() time.Time { return now })
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(l.path, []byte(`{"failures":9223372036854775807}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := l.Failure(); err != nil {
		t.Fatalf("Failure() = %v", err)
	}
	s, err := l.load()
	if err != nil || s.Failures != 5 || !s.LockedUntil.Equal(now.Add(time.Minute)) {
		t.Errorf("after a failure on a huge count: %+v, %v; want 5 failures, locked for the cooldown", s, err)
	}
	if err := l.Check(); !errors.Is(err, ErrLocked) {
		t.Errorf("Check() = %v, want ErrLocked", err)
	}
}
