package safeconfig_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/safe/pkcs11safe/softhsmtest"
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
		{"trailing data", `{"kind":"insecure-file","label":"s","dir":"d"} garbage`, "data after the config object"},
		{"two objects", `{"kind":"insecure-file","label":"s","dir":"d"}{"kind":"pkcs11"}`, "data after the config object"},
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

// TestSoftHSM2Conf opens a SoftHSM2 token whose config is named only by the
// safe config's softhsm2_conf: SOFTHSM2_CONF in the environment points
// elsewhere, as in an officer's shell.
func TestSoftHSM2Conf(t *testing.T) {
	env := softhsmtest.New(t)
	env.InitToken("conf-1", "so-pin-1234", "user-pin-1234")
	dir := env.Dir()
	softhsmtest.WritePINFile(t, dir, "conf-1.pin", "user-pin-1234")
	bogus := filepath.Join(t.TempDir(), "softhsm2.conf") // no such file: SoftHSM2 cannot start from it
	t.Setenv("SOFTHSM2_CONF", bogus)
	ctx := context.Background()
	cfg := func(name, extra string) string {
		return write(t, dir, name, `{"kind":"pkcs11","module":"`+env.Module()+`","token_label":"conf-1","pin_file":"conf-1.pin","attempt_dir":"attempts"`+extra+`}`, 0o600)
	}

	// Without softhsm2_conf, the environment's (missing) config is used.
	// C_Initialize fails, and the error names the safe config, the module
	// and the SoftHSM2 config it read (RELIABILITY row 6 b).
	noConf := cfg("no-conf.json", "")
	if s, err := safeconfig.OpenFile(ctx, noConf); err == nil {
		s.Close()
		t.Fatalf("OpenFile(no softhsm2_conf, SOFTHSM2_CONF=%s) = nil error, want a failure", bogus)
	} else {
		for _, want := range []string{noConf, "C_Initialize of PKCS#11 module " + env.Module(), "SOFTHSM2_CONF=" + bogus} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("OpenFile(no softhsm2_conf, SOFTHSM2_CONF=%s) = %v, want it to name %q", bogus, err, want)
			}
		}
	}
	// With it (relative to the config's directory), the token opens.
	c, err := safeconfig.Load(cfg("conf.json", `,"softhsm2_conf":"softhsm2.conf"`))
	if err != nil {
		t.Fatalf("Load = %v", err)
	}
	if c.SoftHSM2Conf != env.Conf() {
		t.Errorf("Load: softhsm2_conf = %s, want %s (resolved against the config's directory)", c.SoftHSM2Conf, env.Conf())
	}
	s, err := safeconfig.OpenFile(ctx, filepath.Join(dir, "conf.json"))
	if err != nil {
		t.Fatalf("OpenFile(softhsm2_conf %s) = %v", env.Conf(), err)
	}
	if s.Label() != "conf-1" || s.Kind() != "pkcs11" {
		t.Errorf("opened %s (%s), want conf-1 pkcs11", s.Label(), s.Kind())
	}
	if got := os.Getenv("SOFTHSM2_CONF"); got != env.Conf() {
		t.Errorf("SOFTHSM2_CONF = %s after OpenFile, want %s", got, env.Conf())
	}
	s.Close()

	// SoftHSM2 reads its config once per process: another one is refused.
	other := write(t, t.TempDir(), "softhsm2.conf", "directories.tokendir = /nonexistent\n", 0o600)
	if s, err := safeconfig.OpenFile(ctx, cfg("other.json", `,"softhsm2_conf":"`+other+`"`)); err == nil || !strings.Contains(err.Error(), "once per process") {
		if s != nil {
			s.Close()
		}
		t.Errorf("OpenFile(a second softhsm2_conf) = %v, want an error saying SoftHSM2 reads its config once per process", err)
	}
	for _, tt := range []struct{ name, json, want string }{
		{"missing conf", `{"kind":"pkcs11","module":"/m","token_label":"t","softhsm2_conf":"/nonexistent/softhsm2.conf"}`, "softhsm2_conf /nonexistent/softhsm2.conf is not a readable file"},
		{"conf on a file safe", `{"kind":"insecure-file","label":"x","dir":"d","softhsm2_conf":"` + env.Conf() + `"}`, "softhsm2_conf is for pkcs11 safes"},
	} {
		if _, err := safeconfig.Load(write(t, t.TempDir(), "c.json", tt.json, 0o600)); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Load(%s) = %v, want an error containing %q", tt.name, err, tt.want)
		}
	}
}
