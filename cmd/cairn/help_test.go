package main

import (
	"strings"
	"testing"
)

// TestHelp checks that every command's -h prints its help on stdout,
// starting with one line that says what it is, and exits 0.
func TestHelp(t *testing.T) {
	tests := []struct {
		args      []string
		firstLine string // prefix
		contains  string
	}{
		{[]string{"-h"}, "cairn: the Cairn command-line tool for people: ", "up restart"},
		{[]string{"--help"}, "cairn: the Cairn command-line tool for people: ", "Commands:"},
		{[]string{"help"}, "cairn: the Cairn command-line tool for people: ", "Commands:"},
		{[]string{"dev", "-h"}, "cairn dev: development helpers", "certs"},
		{[]string{"dev", "certs", "-h"}, "cairn dev certs: write a development CA", "-trust-domain"},
		{[]string{"up", "-h"}, "cairn up: start the whole Cairn chain on this machine", "-base-port"},
		{[]string{"up", "--help"}, "cairn up: start the whole Cairn chain on this machine", "cairn up restart"},
		{[]string{"up", "restart", "-h"}, "cairn up restart: restart one component of the running chain", "us-east/kms-1"},
		{[]string{"up", "restart", "us-east/kms-1", "--help"}, "cairn up restart: restart one component of the running chain", "-state-dir"},
		{[]string{"kms", "-h"}, "cairn kms: encrypt, decrypt and show status against a running chain", "status"},
		{[]string{"kms", "encrypt", "-h"}, "cairn kms encrypt: encrypt TEXT (or standard input)", "-ad"},
		{[]string{"kms", "decrypt", "-h"}, "cairn kms decrypt: decrypt a ciphertext", "-key"},
		{[]string{"kms", "status", "-h"}, "cairn kms status: every KMS server of the running chain", "bundle_serial"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, stdout, stderr := runArgs(t, tt.args...)
			first, _, _ := strings.Cut(stdout, "\n")
			if code != exitOK || !strings.HasPrefix(first, tt.firstLine) || !strings.Contains(stdout, tt.contains) || stderr != "" {
				t.Errorf("cairn %v = %d, stdout %q, stderr %q; want 0, a first line starting %q, containing %q, nothing on stderr",
					tt.args, code, stdout, stderr, tt.firstLine, tt.contains)
			}
		})
	}
}
