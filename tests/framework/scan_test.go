package framework

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestScanFindsEveryEncoding plants a secret, embedded in other bytes, in
// each form a careless program might write it, and checks that Scan finds
// each one: a scan that cannot fail proves nothing.
func TestScanFindsEveryEncoding(t *testing.T) {
	secret := make([]byte, 33)
	if _, err := rand.Read(secret); err != nil {
		t.Fatal(err)
	}
	embed := func(prefix int) []byte {
		return append(append(bytes.Repeat([]byte{0xA5}, prefix), secret...), 0x5A, 0x5A)
	}
	jsonOf := func(v any) string { b, _ := json.Marshal(v); return string(b) }
	tests := []struct {
		name, content string
	}{
		{"raw", "log line " + string(secret) + " end"},
		{"hex", "key=" + hex.EncodeToString(secret) + "\n"},
		{"HEX", "KEY=" + strings.ToUpper(hex.EncodeToString(secret))},
		{"decimal", fmt.Sprintf("msg=%v", append([]byte{7}, secret...))},
		{"base64 alone", base64.StdEncoding.EncodeToString(secret)},
		{"base64 json []byte", jsonOf(map[string][]byte{"share": secret})},
		{"base64 embedded at 0", base64.StdEncoding.EncodeToString(embed(0))},
		{"base64 embedded at 1", base64.StdEncoding.EncodeToString(embed(1))},
		{"base64 embedded at 2", base64.StdEncoding.EncodeToString(embed(2))},
		{"base64 embedded at 4", base64.StdEncoding.EncodeToString(embed(4))},
		{"base64url embedded at 5", base64.RawURLEncoding.EncodeToString(embed(5))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "f"), []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			found, stats, err := Scan([]string{dir}, []Secret{{Name: "share", Value: secret}})
			if err != nil {
				t.Fatal(err)
			}
			if len(found) == 0 || stats.Files != 1 {
				t.Errorf("Scan(%s) = %v (%d files), want the share found in 1 file", tt.name, found, stats.Files)
			}
		})
	}
}

func TestScanCleanFile(t *testing.T) {
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	other := make([]byte, 4096)
	if _, err := rand.Read(other); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "f"), append(other, hex.EncodeToString(other)...), 0o600); err != nil {
		t.Fatal(err)
	}
	found, stats, err := Scan([]string{dir}, []Secret{{Name: "rmk", Value: secret}})
	if err != nil || len(found) != 0 || stats.Files != 1 {
		t.Errorf("Scan(clean) = %v, %+v, %v, want nothing found in 1 file", found, stats, err)
	}
}

func TestScanRefusesShortSecret(t *testing.T) {
	if _, _, err := Scan([]string{t.TempDir()}, []Secret{{Name: "tiny", Value: []byte{1, 2, 3}}}); err == nil {
		t.Errorf("Scan(3-byte secret) = nil error, want a refusal")
	}
}

// TestScanManySecrets checks the one-pass scan against the obvious one
// (bytes.Contains for every encoding): many secrets, some sharing their
// first bytes, some at the very end of a file, most absent.
func TestScanManySecrets(t *testing.T) {
	var secrets []Secret
	for i := range 200 {
		v := make([]byte, 16+i%65)
		if _, err := rand.Read(v); err != nil {
			t.Fatal(err)
		}
		if i%10 == 1 { // same first 16 bytes as the one before
			copy(v, secrets[i-1].Value[:16])
		}
		secrets = append(secrets, Secret{Name: fmt.Sprintf("s%d", i), Value: v})
	}
	noise := make([]byte, 1<<16)
	if _, err := rand.Read(noise); err != nil {
		t.Fatal(err)
	}
	var content []byte
	for i, s := range secrets {
		if i%3 != 0 {
			continue
		}
		enc := Encodings(s.Value)[i%len(Encodings(s.Value))]
		content = append(content, noise[:i*7]...)
		content = append(content, enc.Bytes...)
	}
	last := Encodings(secrets[199].Value)[0].Bytes // raw, at the very end
	content = append(append(content, noise...), last...)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "f"), content, 0o600); err != nil {
		t.Fatal(err)
	}
	found, _, err := Scan([]string{dir}, secrets)
	if err != nil {
		t.Fatal(err)
	}
	var want []Finding
	for _, s := range secrets {
		for _, e := range Encodings(s.Value) {
			if bytes.Contains(content, e.Bytes) {
				want = append(want, Finding{Path: filepath.Join(dir, "f"), Secret: s.Name, Encoding: e.Name})
			}
		}
	}
	if len(want) < 60 {
		t.Fatalf("the test planted only %d findings", len(want))
	}
	if fmt.Sprint(found) != fmt.Sprint(want) {
		t.Errorf("Scan found %d:\n%v\nwant %d:\n%v", len(found), found, len(want), want)
	}
}

// TestScanSkipsASecretsHome: a secret in its own file (a PIN file) is no
// finding; the same secret in any other file is.
func TestScanSkipsASecretsHome(t *testing.T) {
	dir := t.TempDir()
	pin := []byte("user-pin-1001-of-the-e2e-tests")
	home, leak := filepath.Join(dir, "safe-1.pin"), filepath.Join(dir, "distributor.log")
	for _, f := range []string{home, leak} {
		if err := os.WriteFile(f, append(bytes.Clone(pin), '\n'), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	found, _, err := Scan([]string{dir}, []Secret{{Name: "PIN", Value: pin, Home: home}})
	if err != nil {
		t.Fatal(err)
	}
	if len(found) != 1 || found[0].Path != leak {
		t.Errorf("Scan = %v, want exactly the PIN in %s (not in its own file)", found, leak)
	}
}
