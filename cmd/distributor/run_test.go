package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/internal/secret"
	"github.com/cairnkms/cairn/safe"
)

func TestRunRefusesBadConfig(t *testing.T) {
	garbage := filepath.Join(t.TempDir(), "genesis.json")
	if err := os.WriteFile(garbage, []byte(`{"threshold": "x"`), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args     []string
		code     int
		contains string
	}{
		{[]string{"--bogus"}, 2, "flag provided but not defined"},
		{[]string{"--log-format", "yaml"}, 2, `--log-format: "yaml" is not one of text, json`},
		{[]string{"--trust-domain", "cairn.test"}, 1, "--state-dir is required"},
		{[]string{"--state-dir", t.TempDir(), "--trust-domain", "Bad Domain"}, 1, "--trust-domain"},
		{[]string{"--state-dir", t.TempDir(), "--trust-domain", "cairn.test", "--dev-certs", t.TempDir(), "--name", "x"}, 1, "want <tier>/<region>/<name>"},
		{[]string{"--state-dir", t.TempDir(), "--manifest", "/nonexistent/genesis.json"}, 1, "--manifest: safe: reading manifest"},
		{[]string{"--state-dir", t.TempDir(), "--manifest", garbage}, 1, "--manifest:"},
		{[]string{"--state-dir", t.TempDir(), "--manifest", "/dev/zero"}, 1, "not a regular file"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var errb bytes.Buffer
			if code := run(context.Background(), tt.args, &errb); code != tt.code || !strings.Contains(errb.String(), tt.contains) {
				t.Errorf("distributor %v = %d, %q; want %d containing %q", tt.args, code, errb.String(), tt.code, tt.contains)
			}
		})
	}
}

// TestRunRefusesManifestOfAnotherTrustDomain: --manifest binding its shares
// to officers of another trust domain than the distributor's (none of them
// could ever connect to release a share) is refused at start, exit 1, naming
// the officer, and nothing is pinned. A relative officer is refused as a
// malformed manifest, before the identity is even loaded.
func TestRunRefusesManifestOfAnotherTrustDomain(t *testing.T) {
	dir := t.TempDir()
	var safes []safe.Safe
	for i := range 2 {
		s, err := safe.OpenFileSafe(safe.FileSafeConfig{Dir: filepath.Join(dir, fmt.Sprint(i)), Label: fmt.Sprintf("safe-%d", i+1),
			Passphrase: secret.New([]byte("test passphrase")), KDFMemoryKiB: 8 * 1024, AttemptDir: filepath.Join(dir, "attempts")})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		safes = append(safes, s)
	}
	m, rmk, err := safe.Genesis(context.Background(), safe.SplitConfig{Threshold: 2, Safes: safes,
		Officers: []string{"spiffe://other.test/officer/global/officer-1", "spiffe://other.test/officer/global/officer-2"}})
	if err != nil {
		t.Fatal(err)
	}
	rmk.Wipe()
	foreign := filepath.Join(dir, "foreign.json")
	if err := safe.WriteManifest(foreign, m); err != nil {
		t.Fatal(err)
	}
	m.Slots[0].Officer = "officer/global/officer-1"
	data, err := protojson.Marshal(m) // safe.WriteManifest would refuse it
	if err != nil {
		t.Fatal(err)
	}
	relative := filepath.Join(dir, "relative.json")
	if err := os.WriteFile(relative, data, 0o644); err != nil {
		t.Fatal(err)
	}

	pki := identitytest.New(t, identitytest.TrustDomain)
	_, cert, key := pki.Issue("spiffe://cairn.test/distributor/global/distributor-1", devca.LeafOptions{})
	for _, tt := range []struct{ manifest, want string }{
		{foreign, "--manifest: safe: invalid genesis manifest: officer spiffe://other.test/officer/global/officer-1 of share 1 is not of this distributor's trust domain cairn.test"},
		{relative, `--manifest: safe: invalid genesis manifest: officer \"officer/global/officer-1\" of share 1 is not a full SPIFFE ID`},
	} {
		t.Run(filepath.Base(tt.manifest), func(t *testing.T) {
			state := t.TempDir()
			args := []string{"--state-dir", state, "--trust-domain", "cairn.test", "--cert", cert, "--key", key, "--ca", pki.BundleFile(),
				"--listen", "127.0.0.1:0", "--manifest", tt.manifest}
			// Cancelled: a distributor that started would stop at once.
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			var errb bytes.Buffer
			if code := run(ctx, args, &errb); code != 1 || !strings.Contains(errb.String(), tt.want) {
				t.Errorf("distributor --manifest %s = %d, %q; want 1 containing %q", tt.manifest, code, errb.String(), tt.want)
			}
			if _, err := os.Stat(filepath.Join(state, "genesis.json")); !os.IsNotExist(err) {
				t.Errorf("a refused --manifest was pinned (%v)", err)
			}
		})
	}
}
