package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// runArgs runs run with args and returns its exit code and output.
func runArgs(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(t.Context(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestRunUsage(t *testing.T) {
	// out is a directory no command below may create.
	out := filepath.Join(t.TempDir(), "certs")
	certs := func(args ...string) []string {
		return append([]string{"dev", "certs", "--out", out}, args...)
	}
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string // substring; "" means stdout must be empty
		wantStderr string // substring; "" means stderr must be empty
	}{
		{"no arguments", nil, 2, "", "Usage: cairn <command>"},
		{"help", []string{"help"}, 0, "dev certs", ""},
		{"--help", []string{"--help"}, 0, "dev certs", ""},
		{"unknown command", []string{"frobnicate"}, 2, "", `unknown command "frobnicate"`},
		{"unknown command shows usage", []string{"frobnicate"}, 2, "", "dev certs"},
		{"dev alone", []string{"dev"}, 2, "", "certs"},
		{"dev help", []string{"dev", "help"}, 0, "certs", ""},
		{"dev unknown", []string{"dev", "keys"}, 2, "", `unknown command "keys"`},
		{"certs -h", []string{"dev", "certs", "-h"}, 0, "-trust-domain", ""},
		{"certs --help", []string{"dev", "certs", "--help"}, 0, "-kms-per-region", ""},
		{"missing --out", []string{"dev", "certs", "--trust-domain", "dev.cairn.test"}, 2, "", "--out is required"},
		{"missing --trust-domain", certs(), 2, "", "--trust-domain is required"},
		{"bad trust domain", certs("--trust-domain", "Bad!Domain"), 2, "", `invalid --trust-domain "Bad!Domain"`},
		{"bad trust domain scheme", certs("--trust-domain", "https://dev.cairn.test"), 2, "", "invalid --trust-domain"},
		{"bad region", certs("--trust-domain", "dev.cairn.test", "--regions", "us-east,EU_West"), 2, "", `region "EU_West"`},
		{"region global", certs("--trust-domain", "dev.cairn.test", "--regions", "global"), 2, "", `region "global" is reserved`},
		{"empty region", certs("--trust-domain", "dev.cairn.test", "--regions", "us-east,,eu-west"), 2, "", "empty region"},
		{"duplicate region", certs("--trust-domain", "dev.cairn.test", "--regions", "a,a"), 2, "", `region "a" listed twice`},
		{"zero officers", certs("--trust-domain", "dev.cairn.test", "--officers", "0"), 2, "", "0 officers"},
		{"too many distributors", certs("--trust-domain", "dev.cairn.test", "--distributors", "1000"), 2, "", "1000 distributors"},
		{"non-numeric count", certs("--trust-domain", "dev.cairn.test", "--rootkms", "three"), 2, "", "invalid value"},
		{"unknown flag", certs("--trust-domain", "dev.cairn.test", "--frob"), 2, "", "frob"},
		{"extra argument", certs("--trust-domain", "dev.cairn.test", "extra"), 2, "", "unexpected arguments"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runArgs(t, tt.args...)
			if code != tt.wantCode {
				t.Errorf("run(%q) = %d, want %d (stderr %q)", tt.args, code, tt.wantCode, stderr)
			}
			checkOutput(t, tt.args, "stdout", stdout, tt.wantStdout)
			checkOutput(t, tt.args, "stderr", stderr, tt.wantStderr)
			if _, err := os.Stat(out); err == nil {
				t.Fatalf("run(%q) created %s, want nothing written", tt.args, out)
			}
		})
	}
}

func checkOutput(t *testing.T, args []string, stream, got, want string) {
	t.Helper()
	switch {
	case want == "" && got != "":
		t.Errorf("run(%q) %s = %q, want empty", args, stream, got)
	case !strings.Contains(got, want):
		t.Errorf("run(%q) %s = %q, want it to contain %q", args, stream, got, want)
	}
}

func TestRunDevCerts(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("dev.cairn.test")
	tests := []struct {
		name  string
		flags []string
		plan  devca.Plan
	}{
		{"defaults", nil, devca.DefaultPlan(td)},
		{
			name:  "custom plan",
			flags: []string{"--regions", "ap-south, us-west", "--distributors", "1", "--rootkms", "5", "--kms-per-region", "1", "--officers", "2"},
			plan:  devca.Plan{TrustDomain: td, Regions: []string{"ap-south", "us-west"}, Distributors: 1, RootKMS: 5, KMSPerRegion: 1, Officers: 2},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "certs")
			args := append([]string{"dev", "certs", "--out", out, "--trust-domain", "dev.cairn.test"}, tt.flags...)
			ids := tt.plan.IDs()

			for i, verb := range []string{"issued", "kept"} {
				code, stdout, stderr := runArgs(t, args...)
				if code != 0 || stderr != "" {
					t.Fatalf("run %d of run(%q) = %d, stderr %q, want 0, \"\"", i+1, args, code, stderr)
				}
				if diff := cmp.Diff(wantOutput(out, verb, ids), normalizeSpaces(stdout)); diff != "" {
					t.Errorf("run %d of run(%q) stdout mismatch (-want +got):\n%s", i+1, args, diff)
				}
			}

			bundle, err := x509bundle.Load(td, filepath.Join(out, "ca.pem"))
			if err != nil {
				t.Fatalf("x509bundle.Load(%s/ca.pem) error = %v", out, err)
			}
			for _, id := range ids {
				certPath, keyPath := devca.LeafPaths(out, id)
				certPEM, err := os.ReadFile(certPath)
				if err != nil {
					t.Errorf("ReadFile(%s) error = %v", certPath, err)
					continue
				}
				block, _ := pem.Decode(certPEM)
				if block == nil {
					t.Errorf("pem.Decode(%s) = nil, want a certificate", certPath)
					continue
				}
				if got, _, err := x509svid.ParseAndVerify([][]byte{block.Bytes}, bundle); err != nil || got != id {
					t.Errorf("ParseAndVerify(%s) = %s, %v, want %s, nil", certPath, got, err, id)
				}
				if _, err := tls.LoadX509KeyPair(certPath, keyPath); err != nil {
					t.Errorf("LoadX509KeyPair(%s, %s) error = %v", certPath, keyPath, err)
				}
				if fi, err := os.Stat(keyPath); err != nil || fi.Mode().Perm() != 0o600 {
					t.Errorf("Stat(%s) = %v, %v, want mode 0600", keyPath, fi, err)
				}
			}
		})
	}
}

// wantOutput is the stdout of "cairn dev certs" with runs of spaces
// collapsed.
func wantOutput(out, verb string, ids []spiffeid.ID) string {
	var b strings.Builder
	for _, id := range ids {
		certPath, _ := devca.LeafPaths(out, id)
		fmt.Fprintf(&b, "%s %s %s\n", verb, id, certPath)
	}
	issued, kept := len(ids), 0
	if verb == "kept" {
		issued, kept = 0, len(ids)
	}
	fmt.Fprintf(&b, "%d identities: %d issued, %d kept\n", len(ids), issued, kept)
	fmt.Fprintf(&b, "trust bundle: %s\n", filepath.Join(out, "ca.pem"))
	return b.String()
}

func normalizeSpaces(s string) string {
	lines := strings.Split(s, "\n")
	for i, l := range lines {
		lines[i] = strings.Join(strings.Fields(l), " ")
	}
	return strings.Join(lines, "\n")
}

func TestRunDevCertsFailures(t *testing.T) {
	tests := []struct {
		name       string
		setup      func(t *testing.T, out string)
		ctx        func(context.Context) context.Context
		wantStderr string
	}{
		{
			name: "CA of another trust domain",
			setup: func(t *testing.T, out string) {
				if code, _, stderr := runArgs(t, "dev", "certs", "--out", out, "--trust-domain", "other.cairn.test"); code != 0 {
					t.Fatalf("setup run = %d, want 0 (stderr %q)", code, stderr)
				}
			},
			wantStderr: `trust domain "other.cairn.test"`,
		},
		{
			name: "out is a file",
			setup: func(t *testing.T, out string) {
				if err := os.WriteFile(out, []byte("x"), 0o600); err != nil {
					t.Fatal(err)
				}
			},
			wantStderr: "devca: ",
		},
		{
			name: "CA key readable by others",
			setup: func(t *testing.T, out string) {
				if code, _, stderr := runArgs(t, "dev", "certs", "--out", out, "--trust-domain", "dev.cairn.test"); code != 0 {
					t.Fatalf("setup run = %d, want 0 (stderr %q)", code, stderr)
				}
				if err := os.Chmod(filepath.Join(out, "ca-key.pem"), 0o644); err != nil {
					t.Fatal(err)
				}
			},
			wantStderr: "must not be accessible by group or others",
		},
		{
			name:  "canceled",
			setup: func(*testing.T, string) {},
			ctx: func(ctx context.Context) context.Context {
				ctx, cancel := context.WithCancel(ctx)
				cancel()
				return ctx
			},
			wantStderr: "context canceled",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "certs")
			tt.setup(t, out)
			ctx := t.Context()
			if tt.ctx != nil {
				ctx = tt.ctx(ctx)
			}
			args := []string{"dev", "certs", "--out", out, "--trust-domain", "dev.cairn.test"}
			var stdout, stderr bytes.Buffer
			if code := run(ctx, args, &stdout, &stderr); code != 1 {
				t.Errorf("run(%q) = %d, want 1 (stderr %q)", args, code, stderr.String())
			}
			if !strings.Contains(stderr.String(), tt.wantStderr) {
				t.Errorf("run(%q) stderr = %q, want it to contain %q", args, stderr.String(), tt.wantStderr)
			}
			if stdout.Len() != 0 {
				t.Errorf("run(%q) stdout = %q, want empty", args, stdout.String())
			}
		})
	}
}
