package safe_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/internal/secret"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/safetest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testKDFMemory keeps argon2id cheap in tests (the floor); production safes
// use the 64 MiB default.
const testKDFMemory = 8 * 1024

var testPassphrase = secret.New([]byte("correct horse battery staple"))

func fileSafeConfig(dir, label string) safe.FileSafeConfig {
	return safe.FileSafeConfig{
		Dir: filepath.Join(dir, label), Label: label, Passphrase: testPassphrase,
		KDFMemoryKiB: testKDFMemory, AttemptDir: filepath.Join(dir, "attempts"),
	}
}

func openFileSafe(t *testing.T, dir, label string) *safe.FileSafe {
	t.Helper()
	s, err := safe.OpenFileSafe(fileSafeConfig(dir, label))
	if err != nil {
		t.Fatalf("OpenFileSafe(%s) = %v", label, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestFileSafeConformance(t *testing.T) {
	safetest.Run(t, func(t *testing.T) safetest.Harness {
		dir := t.TempDir()
		s := openFileSafe(t, dir, "dev-safe")
		path := func(ref safe.ShareRef) string {
			return filepath.Join(dir, "dev-safe", "shares", strings.ReplaceAll(ref.String(), "/", "-")+".sealed")
		}
		return safetest.Harness{
			Safe:   s,
			Reopen: func(t *testing.T) safe.Safe { return openFileSafe(t, dir, "dev-safe") },
			ReadRaw: func(t *testing.T, ref safe.ShareRef) []byte {
				b, err := os.ReadFile(path(ref))
				if err != nil {
					t.Fatalf("reading %v: %v", ref, err)
				}
				return b
			},
			WriteRaw: func(t *testing.T, ref safe.ShareRef, data []byte) {
				if err := os.WriteFile(path(ref), data, 0o600); err != nil {
					t.Fatal(err)
				}
			},
		}
	})
}

func TestFileSafeFiles(t *testing.T) {
	dir := t.TempDir()
	s := openFileSafe(t, dir, "dev-safe")
	ref := safe.ShareRef{GenesisID: "00112233445566778899aabbccddeeff", Index: 1}
	if err := s.Seal(context.Background(), ref, secret.New([]byte("0123456789abcdef0123456789abcdefX"))); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"dev-safe", "dev-safe/shares"} {
		if fi, err := os.Stat(filepath.Join(dir, p)); err != nil || fi.Mode().Perm() != 0o700 {
			t.Errorf("mode of %s = %v (%v), want 0700", p, fi.Mode().Perm(), err)
		}
	}
	for _, p := range []string{"dev-safe/safe.json", "dev-safe/shares/00112233445566778899aabbccddeeff-0-1.sealed"} {
		if fi, err := os.Stat(filepath.Join(dir, p)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("mode of %s = %v (%v), want 0600", p, fi.Mode().Perm(), err)
		}
	}
	if s.Kind() != "insecure-file" {
		t.Errorf("Kind() = %q, want insecure-file", s.Kind())
	}
}

func TestFileSafeWrongPassphrase(t *testing.T) {
	dir := t.TempDir()
	openFileSafe(t, dir, "dev-safe").Close()
	now := time.Date(2026, 11, 23, 0, 0, 0, 0, time.UTC)
	cfg := fileSafeConfig(dir, "dev-safe")
	cfg.Now = func() time.Time { return now }
	wrong := cfg
	wrong.Passphrase = secret.New([]byte("not the passphrase"))
	for i := range safe.DefaultMaxAttempts {
		if _, err := safe.OpenFileSafe(wrong); !errors.Is(err, safe.ErrBadCredential) {
			t.Fatalf("attempt %d with a wrong passphrase = %v, want ErrBadCredential", i+1, err)
		}
	}
	// Locked now, even with the right passphrase, and across "restarts"
	// (every Open reads the counter from disk).
	if _, err := safe.OpenFileSafe(cfg); !errors.Is(err, safe.ErrLocked) {
		t.Fatalf("right passphrase while locked = %v, want ErrLocked", err)
	}
	now = now.Add(safe.DefaultCooldown + time.Second)
	s, err := safe.OpenFileSafe(cfg)
	if err != nil {
		t.Fatalf("right passphrase after the cooldown = %v", err)
	}
	s.Close()
	// The success reset the counter: one wrong attempt is not a lockout.
	if _, err := safe.OpenFileSafe(wrong); !errors.Is(err, safe.ErrBadCredential) {
		t.Errorf("wrong passphrase after reset = %v, want ErrBadCredential", err)
	}
}

func TestFileSafeOpenErrors(t *testing.T) {
	dir := t.TempDir()
	openFileSafe(t, dir, "a").Close()
	tests := []struct {
		name string
		cfg  func(safe.FileSafeConfig) safe.FileSafeConfig
	}{
		{"no dir", func(c safe.FileSafeConfig) safe.FileSafeConfig { c.Dir = ""; return c }},
		{"bad label", func(c safe.FileSafeConfig) safe.FileSafeConfig { c.Label = "a/b"; return c }},
		{"short passphrase", func(c safe.FileSafeConfig) safe.FileSafeConfig { c.Passphrase = secret.New([]byte("short")); return c }},
		{"no attempt dir", func(c safe.FileSafeConfig) safe.FileSafeConfig { c.AttemptDir = ""; return c }},
		{"other label in dir", func(c safe.FileSafeConfig) safe.FileSafeConfig { c.Label = "b"; return c }},
		{"weak KDF", func(c safe.FileSafeConfig) safe.FileSafeConfig {
			c.Dir, c.KDFMemoryKiB = filepath.Join(dir, "weak"), 1024
			return c
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if s, err := safe.OpenFileSafe(tt.cfg(fileSafeConfig(dir, "a"))); err == nil {
				s.Close()
				t.Errorf("OpenFileSafe(%s) = nil error, want error", tt.name)
			}
		})
	}
}
