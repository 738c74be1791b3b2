// Package serverconfigtest holds what the server binaries' config tests
// share: the pinned key list check and writing a config file.
package serverconfigtest

import (
	"flag"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cairnkms/cairn/internal/serverconfig"
)

// RequireKeys fails t unless spec's keys for fs are exactly wantKeys and
// its secrets exactly wantSecrets (both sorted), and every list flag is in
// spec.Lists (serverconfig.Spec.Keys): adding a flag forces a decision on
// its key and whether it is secret.
func RequireKeys(t *testing.T, spec serverconfig.Spec, fs *flag.FlagSet, wantKeys, wantSecrets []string) {
	t.Helper()
	keys, secrets, err := spec.Keys(fs)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(keys, wantKeys) {
		t.Errorf("config keys = %q, want %q", keys, wantKeys)
	}
	if !slices.Equal(secrets, wantSecrets) {
		t.Errorf("secret keys = %q, want %q", secrets, wantSecrets)
	}
}

// WriteFile writes body as the config file name (mode 0600) in a new
// temporary directory of t and returns its path.
func WriteFile(t *testing.T, name, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
