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
		{[]string{"--log-format", "yaml"}, 2, `--log-format: "yaml" is not one of text, json`},
		{[]string{"--id", "r1"}, 1, "--id, --data-dir, --manifest and --distributors are required"},
		{[]string{"--id", "r1", "--data-dir", t.TempDir(), "--manifest", "/nonexistent.json", "--distributors", "x:1", "--trust-domain", "cairn.test", "--cert", "/nonexistent", "--key", "/k", "--ca", "/c"}, 1, "no such file"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var errb bytes.Buffer
			if code := run(context.Background(), tt.args, &errb); code != tt.code || !strings.Contains(errb.String(), tt.contains) {
				t.Errorf("rootkms %v = %d, %q; want %d containing %q", tt.args, code, errb.String(), tt.code, tt.contains)
			}
		})
	}
}
