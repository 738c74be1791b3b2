package safeconfig

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/cairnkms/cairn/safe"
)

// FuzzLoad feeds arbitrary file contents to Load. Whatever it accepts has a
// known kind, only absolute paths, and loads again unchanged once written
// back as JSON; whatever it refuses is a safeconfig: error and no config.
func FuzzLoad(f *testing.F) {
	conf := filepath.Join(f.TempDir(), "softhsm2.conf")
	if err := os.WriteFile(conf, []byte("directories.tokendir = /nonexistent\n"), 0o600); err != nil {
		f.Fatal(err)
	}
	for _, c := range []Config{
		{Kind: safe.KindPKCS11, Module: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "safe-1", PINFile: "safe-1.pin", SoftHSM2Conf: conf},
		{Kind: safe.KindPKCS11, Module: "m.so", TokenLabel: "t", PINEnv: "PIN", AttemptDir: "attempts"},
		{Kind: safe.KindInsecureFile, Label: "safe-4", Dir: "/var/lib/cairn/safe-4", PassphraseEnv: "CAIRN_SAFE4_PASSPHRASE", KDFMemoryKiB: 8192},
		{Kind: safe.KindInsecureFile, Label: "s", Dir: "d", PassphraseFile: "p", PassphraseEnv: "E"},
		{Kind: safe.KindInsecureFile, Label: "s", Dir: "d", SoftHSM2Conf: conf},
		{Kind: "hsm"},
	} {
		b, err := json.Marshal(c)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	for _, s := range []string{``, `null`, `{}`, `[]`, `{"kind": "pkcs11", "module": "m", "token_label": "t", "pin": "1234"}`,
		`{"kind": "insecure-file", "label": "s", "dir": "d", "kdf_memory_kib": -1}`, `{"kind": 1}`, `{"kind": "pkcs11"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), "safe.json")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		c, err := Load(path)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "safeconfig: ") {
				t.Fatalf("Load(%q) error = %q, want the safeconfig: prefix", data, err)
			}
			return
		}
		if c.Kind != safe.KindPKCS11 && c.Kind != safe.KindInsecureFile {
			t.Fatalf("Load(%q) accepted kind %q", data, c.Kind)
		}
		for _, p := range []string{c.PINFile, c.Dir, c.PassphraseFile, c.AttemptDir, c.SoftHSM2Conf} {
			if p != "" && !filepath.IsAbs(p) {
				t.Fatalf("Load(%q) left path %q relative", data, p)
			}
		}
		if c.PINFile != "" && c.PINEnv != "" || c.PassphraseFile != "" && c.PassphraseEnv != "" {
			t.Fatalf("Load(%q) accepted two sources of one secret: %+v", data, c)
		}
		b, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		again := filepath.Join(t.TempDir(), "safe.json")
		if err := os.WriteFile(again, b, 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := Load(again)
		if err != nil {
			t.Fatalf("Load(rewritten %s) = %v, want the config Load(%q) accepted", b, err, data)
		}
		if diff := cmp.Diff(c, got); diff != "" {
			t.Fatalf("Load after rewriting mismatch (-first +second):\n%s", diff)
		}
	})
}
