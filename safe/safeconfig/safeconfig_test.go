package safeconfig_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/safe/safeconfig"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func write(t *testing.T, dir, name, content string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name, json, want string
	}{
		{"unknown field", `{"kind":"pkcs11","module":"/m","token_label":"t","pin":"1234"}`, `unknown field "pin"`},
		{"unknown kind", `{"kind":"usb-stick"}`, `kind "usb-stick"`},
		{"pkcs11 without token", `{"kind":"pkcs11","module":"/m"}`, "needs module and token_label"},
		{"two pin sources", `{"kind":"pkcs11","module":"/m","token_label":"t","pin_file":"a","pin_env":"B"}`, "not both"},
		{"file safe without dir", `{"kind":"insecure-file","label":"x"}`, "needs label and dir"},
		{"two passphrase sources", `{"kind":"insecure-file","label":"x","dir":"d","passphrase_file":"a","passphrase_env":"B"}`, "not both"},
		{"not json", `kind: pkcs11`, "invalid character"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := safeconfig.Load(write(t, dir, "c.json", tt.json, 0o644))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Load(%s) = %v, want an error containing %q", tt.json, err, tt.want)
			}
		})
	}
	c, err := safeconfig.Load(write(t, dir, "ok.json", `{"kind":"insecure-file","label":"x","dir":"data","passphrase_file":"pass","attempt_dir":"/abs"}`, 0o644))
	if err != nil {
		t.Fatal(err)
	}
	if c.Dir != filepath.Join(dir, "data") || c.PassphraseFile != filepath.Join(dir, "pass") || c.AttemptDir != "/abs" {
		t.Errorf("relative paths not resolved against the config's directory: %+v", c)
	}
}

func TestOpenFileSafe(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	write(t, dir, "pass", "a long enough passphrase\n", 0o600)
	cfg := write(t, dir, "safe.json", `{"kind":"insecure-file","label":"dev-1","dir":"data","passphrase_file":"pass","kdf_memory_kib":8192,"attempt_dir":"attempts"}`, 0o644)
	s, err := safeconfig.OpenFile(ctx, cfg)
	if err != nil {
		t.Fatalf("OpenFile = %v", err)
	}
	if s.Label() != "dev-1" || s.Kind() != "insecure-file" {
		t.Errorf("opened %s (%s), want dev-1 insecure-file", s.Label(), s.Kind())
	}
	s.Close()
	// The trailing newline is not part of the passphrase: the same safe
	// opens from an environment variable without it.
	t.Setenv("CAIRN_TEST_PASS", "a long enough passphrase")
	cfg2 := write(t, dir, "safe-env.json", `{"kind":"insecure-file","label":"dev-1","dir":"data","passphrase_env":"CAIRN_TEST_PASS","attempt_dir":"attempts"}`, 0o644)
	s, err = safeconfig.OpenFile(ctx, cfg2)
	if err != nil {
		t.Fatalf("OpenFile(env passphrase) = %v", err)
	}
	s.Close()
	// A passphrase file others can read is refused; so is an unset variable.
	write(t, dir, "loose", "a long enough passphrase", 0o644)
	cfg3 := write(t, dir, "safe-loose.json", `{"kind":"insecure-file","label":"dev-1","dir":"data","passphrase_file":"loose","attempt_dir":"attempts"}`, 0o644)
	if _, err := safeconfig.OpenFile(ctx, cfg3); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("OpenFile(0644 passphrase file) = %v, want a chmod 600 error", err)
	}
	cfg4 := write(t, dir, "safe-unset.json", `{"kind":"insecure-file","label":"dev-1","dir":"data","passphrase_env":"CAIRN_TEST_UNSET","attempt_dir":"attempts"}`, 0o644)
	if _, err := safeconfig.OpenFile(ctx, cfg4); err == nil || !strings.Contains(err.Error(), "not set") {
		t.Errorf("OpenFile(unset variable) = %v, want a not-set error", err)
	}
}
