package cli_test

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestRunUsage(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		args     []string
		code     int
		contains string
	}{
		{nil, 2, "usage: regionctl"},
		{[]string{"help"}, 0, "bundle push"},
		{[]string{"--help"}, 0, "Identity flags"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"bundle"}, 2, "missing verb (build, inspect, push)"},
		{[]string{"bundle", "-h"}, 0, "bundle build"},
		{[]string{"bundle", "sign"}, 2, `unknown verb "sign" (build, inspect, push)`},
		{[]string{"keys", "generate"}, 2, "--out is required"},
		{[]string{"keys", "generate", "--out", dir, "extra"}, 2, "unexpected arguments: [extra]"},
		{[]string{"keys", "generate", "-h"}, 2, "-out"},
		{[]string{"region", "create"}, 2, "--rootkms and --region are required"},
		{[]string{"region", "create", "--rootkms", "127.0.0.1:1", "--region", "US-EAST"}, 2, "--region"},
		{[]string{"region", "create", "--rootkms", " , ", "--region", "us-east"}, 2, "--rootkms and --region are required"},
		{[]string{"region", "create", "--rootkms", "127.0.0.1:1", "--region", "us-east"}, 1, "--trust-domain"},
		{[]string{"keyset", "create", "--rootkms", "127.0.0.1:1", "--teams", dir}, 2, "--rootkms, --teams and --store are required"},
		{[]string{"keyset", "create", "--rootkms", "127.0.0.1:1", "--teams", dir, "--store", dir, "--only", "Bad Name"}, 2, "--only"},
		{[]string{"bundle", "build", "--region", "us-east"}, 2, "are required"},
		{[]string{"bundle", "build", "--region", "us-east", "--serial", "0", "--teams", dir, "--store", dir, "--signing-key", "k", "--out", "o"}, 2, "--serial (1 or more)"},
		{[]string{"bundle", "build", "--region", "us-east", "--serial", "-1", "--teams", dir, "--store", dir, "--signing-key", "k", "--out", "o"}, 2, "invalid value"},
		{[]string{"bundle", "build", "--region", "Nope", "--serial", "1", "--teams", dir, "--store", dir, "--signing-key", "k", "--out", "o"}, 2, "--region"},
		{[]string{"bundle", "build", "--region", "us-east", "--serial", "1", "--teams", dir, "--store", dir, "--signing-key", "k", "--out", "o", "--created-by", "someone"}, 2, "--created-by"},
		{[]string{"bundle", "build", "--region", "us-east", "--serial", "1", "--teams", dir, "--store", dir, "--signing-key", "k", "--out", "o"}, 1, "no --created-by, and the identity flags name no usable identity"},
		{[]string{"bundle", "build", "--region", "us-east", "--serial", "1", "--teams", dir, "--store", dir, "--signing-key", filepath.Join(dir, "missing.key"), "--out", "o", "--created-by", regionctlID}, 1, "no such file"},
		{[]string{"bundle", "inspect", "--bundle", "b"}, 2, "--bundle and --signing-pub are required"},
		{[]string{"bundle", "inspect", "--bundle", "b", "--signing-pub", filepath.Join(dir, "missing.pub")}, 1, "no such file"},
		{[]string{"bundle", "push", "--kms", "127.0.0.1:1"}, 2, "--kms and --bundle are required"},
		{[]string{"bundle", "push", "--kms", "127.0.0.1:1", "--bundle", "b", "--force"}, 2, "--force and --reason go together"},
		{[]string{"bundle", "push", "--kms", "127.0.0.1:1", "--bundle", "b", "--reason", "because"}, 2, "--force and --reason go together"},
		{[]string{"bundle", "push", "--kms", "127.0.0.1:1", "--bundle", "b", "--force", "--reason", "  "}, 2, "--force and --reason go together"},
		{[]string{"bundle", "push", "--kms", "127.0.0.1:1", "--bundle", filepath.Join(dir, "missing")}, 1, "no such file"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			r := run(t, tt.args...)
			if r.code != tt.code || !strings.Contains(r.stdout+r.stderr, tt.contains) {
				t.Errorf("regionctl %v = %d, output %q; want %d containing %q", tt.args, r.code, r.stdout+r.stderr, tt.code, tt.contains)
			}
		})
	}
}
