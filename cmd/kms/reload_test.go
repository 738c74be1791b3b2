package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/bundle"
)

// writeAtomic replaces path's content the way a config manager would.
func writeAtomic(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// newPub writes a fresh bundle-signing key pair into dir and returns the
// public key file and its key ID.
func newPub(t *testing.T, dir, name string) (string, string) {
	t.Helper()
	pubKey, priv, err := bundle.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	pub := filepath.Join(dir, name+".pub")
	if err := bundle.WriteKeys(filepath.Join(dir, name+".key"), pub, priv); err != nil {
		t.Fatal(err)
	}
	return pub, bundle.KeyID(pubKey)
}

// waitLog waits until out holds want after offset, and returns the offset
// past it.
func waitLog(t *testing.T, out *syncBuffer, from int, want ...string) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := out.String()
		for _, line := range strings.Split(s[min(from, len(s)):], "\n") {
			ok := true
			for _, w := range want {
				ok = ok && strings.Contains(line, w)
			}
			if ok {
				return from + strings.Index(s[from:], line) + len(line)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the log never had a line with %q; it is:\n%s", want, s[min(from, len(s)):])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestRunReloadsTrust: the binary re-reads its --signing-key files and
// --admins-file every --reload-interval and on SIGHUP; a changed set is
// swapped in, logged with the new key IDs and audited; a file that does not
// parse is logged and the set in force stays.
func TestRunReloadsTrust(t *testing.T) {
	tests := []struct {
		name     string
		interval string
		trigger  func(t *testing.T)
	}{
		{"poll", "50ms", func(*testing.T) {}},
		{"SIGHUP", "0s", func(t *testing.T) {
			if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			certs, pub := fixture(t)
			dir := t.TempDir()
			admins := filepath.Join(dir, "admins")
			writeAtomic(t, admins, "# who may push bundles\nregionctl/*/*\n")
			state := t.TempDir()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var out syncBuffer
			done := make(chan int)
			go func() {
				done <- run(ctx, []string{"--trust-domain", "cairn.test", "--dev-certs", certs, "--name", "kms/us-east/kms-1", "--region", "us-east",
					"--state-dir", state, "--rootkms", "127.0.0.1:1", "--signing-key", pub, "--admins-file", admins,
					"--reload-interval", tt.interval, "--listen", "127.0.0.1:0", "--log-format", "json"}, &out)
			}()
			off := waitLog(t, &out, 0, "kms: started")

			// A new key beside the old one, and a new admin allowlist.
			pub2, id2 := newPub(t, dir, "next")
			data, err := os.ReadFile(pub2)
			if err != nil {
				t.Fatal(err)
			}
			writeAtomic(t, pub, string(data)) // the pinned file now holds the new key
			writeAtomic(t, admins, "regionctl/global/ops\n")
			tt.trigger(t)
			off = waitLog(t, &out, off, "kms: trust reloaded", id2, "regionctl/global/ops")

			// A broken admins file: logged, the set in force stays.
			writeAtomic(t, admins, "regionctl/x*/y\n")
			tt.trigger(t)
			waitLog(t, &out, off, "reloading the signing keys and admins failed; keeping the current set", "--admins-file", id2)

			cancel()
			if code := <-done; code != 0 {
				t.Fatalf("run after cancel = %d, want 0\n%s", code, out.String())
			}
			if n := strings.Count(out.String(), "kms: trust reloaded\""); n != 1 {
				t.Errorf("logged %d trust reloads, want 1 (the broken file changes nothing)\n%s", n, out.String())
			}
			recs, err := audit.ReadFile(filepath.Join(state, "audit.log"))
			if err != nil {
				t.Fatal(err)
			}
			var reloads []string
			for _, r := range recs {
				if r.Operation == "kms/SetTrust" {
					reloads = append(reloads, r.Reason)
				}
			}
			if len(reloads) != 1 || !strings.Contains(reloads[0], "now "+id2) {
				t.Errorf("kms/SetTrust audit records = %q, want one naming the new key %s", reloads, id2)
			}
		})
	}
}
