package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
