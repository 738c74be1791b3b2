package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

func TestRunUsage(t *testing.T) {
	tests := []struct {
		args     []string
		code     int
		contains string
	}{
		{nil, 2, "usage: safe"},
		{[]string{"help"}, 0, "Commands:"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"genesis"}, 2, "--threshold, --safe (N times) and --manifest are required"},
		{[]string{"genesis", "--threshold", "2", "--pin", "1234"}, 2, "flag provided but not defined: -pin"},
		{[]string{"release", "--ceremony", "x"}, 2, "--distributor, --ceremony, --safe and --manifest are required"},
		{[]string{"ceremony"}, 2, "usage: safe ceremony"},
		{[]string{"ceremony", "open"}, 2, "--distributor is required"},
		{[]string{"rekey"}, 2, "are required"},
		{[]string{"drill"}, 2, "--manifest and --safe are required"},
		{[]string{"list"}, 2, "--safe is required"},
		{[]string{"list", "--safe", "/nonexistent/safe.json"}, 1, "no such file"},
		{[]string{"drill", "--manifest", "/nonexistent.json", "--safe", "x"}, 1, "reading manifest"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run(context.Background(), tt.args, &out, &errb)
			if code != tt.code || !strings.Contains(out.String()+errb.String(), tt.contains) {
				t.Errorf("safe %v = %d, output %q; want %d containing %q", tt.args, code, out.String()+errb.String(), tt.code, tt.contains)
			}
		})
	}
}
