package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestKMSCommandLine covers what cairn kms decides before it calls anything:
// usage errors, and a missing or unusable chain named clearly. (The commands
// against a running chain are exercised by tests/, which starts one.)
func TestKMSCommandLine(t *testing.T) {
	noChain := t.TempDir()
	other := t.TempDir()
	if err := os.WriteFile(filepath.Join(other, "chain.json"), []byte(`{"version":1,"trust_domain":"cairn.local","ca":"/x","regions":[{"name":"us-east","kms":["127.0.0.1:1"],"keysets":["cairn-kms://us-east/demo/notes"]}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStderr string
	}{
		{"no command", []string{"kms"}, exitUsage, "Usage: cairn kms"},
		{"unknown command", []string{"kms", "rotate"}, exitUsage, `unknown command "rotate"`},
		{"two arguments", []string{"kms", "encrypt", "a", "b"}, exitUsage, "unexpected arguments"},
		{"bad flag", []string{"kms", "status", "--frobnicate"}, exitUsage, "flag provided but not defined"},
		{"no chain", []string{"kms", "encrypt", "--chain", noChain, "x"}, exitError, "make up"},
		{"status without a chain", []string{"kms", "status", "--chain", noChain}, exitError, "make up"},
		{"bad key URI", []string{"kms", "encrypt", "--chain", other, "--key", "gcp-kms://x/y", "x"}, exitError, "invalid key URI"},
		{"region not in the chain", []string{"kms", "decrypt", "--chain", other, "--key", "cairn-kms://ap-south/demo/notes", "AAAA"}, exitError, `no region "ap-south" (it has us-east)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, _, stderr := runArgs(t, tt.args...)
			if code != tt.wantCode || !strings.Contains(stderr, tt.wantStderr) {
				t.Errorf("cairn %s = exit %d, stderr %q; want exit %d, stderr containing %q", strings.Join(tt.args, " "), code, stderr, tt.wantCode, tt.wantStderr)
			}
		})
	}
	if code, stdout, _ := runArgs(t, "kms", "-h"); code != exitOK || !strings.Contains(stdout, "standard input") {
		t.Errorf("cairn kms -h = exit %d, %q; want usage on stdout", code, stdout)
	}
}

func TestKeyVersion(t *testing.T) {
	for _, tt := range []struct {
		ct   []byte
		want uint32
	}{
		{[]byte{1, 0x5b, 0x9c, 0x2e, 0xdb, 9, 9}, 0x5b9c2edb},
		{[]byte{0, 0, 0, 0, 7, 9}, 0}, // a LEGACY prefix: not what Cairn serves
		{[]byte{1, 0, 0}, 0},
		{nil, 0},
	} {
		if got := keyVersion(tt.ct); got != tt.want {
			t.Errorf("keyVersion(%x) = %d, want %d", tt.ct, got, tt.want)
		}
	}
}
