package safe

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// FuzzReadFileSafeMeta feeds arbitrary contents of safe.json to
// readFileSafeMeta. What it accepts meets the invariants it promises and
// reads back unchanged after mustJSON; what it refuses is one fixed error
// that names the file and echoes none of its bytes.
func FuzzReadFileSafeMeta(f *testing.F) {
	m, err := newFileSafeMeta(FileSafeConfig{Label: "safe-1", KDFMemoryKiB: 8 * 1024})
	if err != nil {
		f.Fatal(err)
	}
	noCheck := mustJSON(m)
	m.Check = bytes.Repeat([]byte{0xc7}, 32)
	good := mustJSON(m)
	f.Add(good)
	f.Add(noCheck)
	f.Add(good[:len(good)/2])
	for _, s := range []string{``, `null`, `{}`, `[]`, `{"format": 2}`,
		`{"format":1,"kind":"insecure-file","label":"l","salt":"AAAAAAAAAAAAAAAAAAAAAA==","argon2id_time":1,"argon2id_memory_kib":8192,"argon2id_threads":1}`,
		`{"format":1,"kind":"insecure-file","label":"l","salt":"AAAA","argon2id_time":1,"argon2id_memory_kib":8192,"argon2id_threads":1}`,
		`{"format":1,"kind":"insecure-file","label":"l","salt":"AAAAAAAAAAAAAAAAAAAAAA==","argon2id_time":1,"argon2id_memory_kib":8192,"argon2id_threads":256}`,
		`{"format":1,"kind":"pkcs11","label":"l","salt":"AAAAAAAAAAAAAAAAAAAAAA==","argon2id_time":1,"argon2id_memory_kib":8192,"argon2id_threads":1}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), "safe.json")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		m, err := readFileSafeMeta(path)
		if err != nil {
			if want := "safe: " + path + " is not a valid file safe description"; err.Error() != want {
				t.Fatalf("readFileSafeMeta(%q) error = %q, want %q", data, err, want)
			}
			return
		}
		if m.Format != 1 || m.Kind != KindInsecureFile || len(m.Salt) < 16 || m.MemoryKiB < 8*1024 || m.Time < 1 || m.Threads < 1 {
			t.Fatalf("readFileSafeMeta(%q) accepted %+v, which breaks its invariants", data, m)
		}
		again := filepath.Join(t.TempDir(), "safe.json")
		if err := os.WriteFile(again, mustJSON(m), 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := readFileSafeMeta(again)
		if err != nil {
			t.Fatalf("readFileSafeMeta(mustJSON(%+v)) = %v", m, err)
		}
		if diff := cmp.Diff(m, got); diff != "" {
			t.Fatalf("readFileSafeMeta after mustJSON mismatch (-first +second):\n%s", diff)
		}
	})
}

// FuzzAttemptCounter feeds arbitrary contents of the attempt counter file to
// an AttemptLimiter. A counter that does not decode locks the safe and is
// left as it is; one that decodes counts the next failure on top of it.
func FuzzAttemptCounter(f *testing.F) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, s := range []string{``, `{}`, `{"failures":0}`, `{"failures":2}`, `{"failures":3,"locked_until":"2026-01-02T03:05:05Z"}`,
		`{"failures":3,"locked_until":"2025-01-02T03:05:05Z"}`, `{"failures":"3"}`, `{"failures":1e3}`, `{"failures":-1}`,
		`{"failures":9223372036854775807}`, `{"locked_until":"yesterday"}`, `null`, `[]`, `{"failures":1`} {
		f.Add([]byte(s))
	}
	const max, cooldown = 3, time.Minute
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		l, err := NewAttemptLimiter(dir, "insecure-file-safe-1", max, cooldown, func() time.Time { return now })
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(l.path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		before, decodeErr := l.load()
		checkErr := l.Check()
		if decodeErr != nil {
			if !errors.Is(decodeErr, ErrLocked) || !errors.Is(checkErr, ErrLocked) {
				t.Fatalf("counter %q: load() = %v, Check() = %v, want ErrLocked from both", data, decodeErr, checkErr)
			}
			if err := l.Failure(); !errors.Is(err, ErrLocked) {
				t.Fatalf("counter %q: Failure() = %v, want ErrLocked", data, err)
			}
			if got, err := os.ReadFile(l.path); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("corrupt counter %q became %q, %v, want it left as it is", data, got, err)
			}
			return
		}
		locked := before.Failures >= max && now.Before(before.LockedUntil)
		if locked != errors.Is(checkErr, ErrLocked) || !locked && checkErr != nil {
			t.Fatalf("counter %q (%+v): Check() = %v, want locked %v", data, before, checkErr, locked)
		}
		if before.Failures < 0 {
			t.Fatalf("counter %q loaded with failures %d: a negative count must be refused as corrupt", data, before.Failures)
		}
		if err := l.Failure(); err != nil {
			t.Fatalf("counter %q: Failure() = %v", data, err)
		}
		after, err := l.load()
		if err != nil {
			t.Fatalf("counter after Failure() does not load: %v", err)
		}
		if want := min(before.Failures, max-1) + 1; after.Failures != want {
			t.Fatalf("counter %q: Failure() took failures %d to %d, want %d (the count stops at the limit)", data, before.Failures, after.Failures, want)
		}
		if after.Failures >= max && !after.LockedUntil.Equal(now.Add(cooldown)) {
			t.Fatalf("counter %q: failure %d locks until %v, want %v", data, after.Failures, after.LockedUntil, now.Add(cooldown))
		}
		if after.Failures >= max && !errors.Is(l.Check(), ErrLocked) {
			t.Fatalf("counter %q: Check() after failure %d of %d = nil, want ErrLocked", data, after.Failures, max)
		}
		if err := l.Success(); err != nil {
			t.Fatal(err)
		}
		if err := l.Check(); err != nil {
			t.Fatalf("Check() after Success() = %v, want nil", err)
		}
	})
}
