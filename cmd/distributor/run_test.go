package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

func TestRunRefusesBadConfig(t *testing.T) {
	tests := []struct {
		args     []string
		code     int
		contains string
	}{
		{[]string{"--bogus"}, 2, "flag provided but not defined"},
		{[]string{"--trust-domain", "cairn.test"}, 1, "--state-dir is required"},
		{[]string{"--state-dir", t.TempDir(), "--trust-domain", "Bad Domain"}, 1, "--trust-domain"},
		{[]string{"--state-dir", t.TempDir(), "--trust-domain", "cairn.test", "--dev-certs", t.TempDir(), "--name", "x"}, 1, "want <tier>/<region>/<name>"},
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
