package main

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestRunUpCommandLine covers `cairn up`'s command line up to the point
// where it would start something; the whole chain is started by
// TestUpFirstRunRerunAndTakenPort in tests/, with the real binaries.
func TestRunUpCommandLine(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state")
	emptyBin := t.TempDir()
	up := func(args ...string) []string {
		return append([]string{"up", "--state-dir", state}, args...)
	}
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string // substring; "" means stdout must be empty
		wantStderr string // substring; "" means stderr must be empty
	}{
		{"help lists up", []string{"help"}, 0, "up          start the whole chain", ""},
		{"-h", []string{"up", "-h"}, 0, "-base-port", ""},
		{"--help", []string{"up", "--help"}, 0, "-no-demo", ""},
		{"unknown flag", up("--frob"), 2, "", "frob"},
		{"extra argument", up("extra"), 2, "", "unexpected arguments"},
		{"bad safes", up("--safes", "tpm"), 2, "", `safes "tpm"`},
		{"privileged base port", up("--base-port", "80"), 2, "", "base port 80"},
		{"bad region", up("--regions", "us-east,EU"), 2, "", `region "EU"`},
		{"bad trust domain", up("--trust-domain", "Bad Domain"), 2, "", `trust domain "Bad Domain"`},
		{"no binaries", up("--bin-dir", emptyBin, "--base-port", "29000", "--safes", "file"), 1, "preflight", "run `make build`"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runArgs(t, tt.args...)
			if code != tt.wantCode {
				t.Errorf("run(%q) = %d, want %d (stdout %q, stderr %q)", tt.args, code, tt.wantCode, stdout, stderr)
			}
			checkOutput(t, tt.args, "stdout", stdout, tt.wantStdout)
			checkOutput(t, tt.args, "stderr", stderr, tt.wantStderr)
			if _, err := os.Stat(state); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("run(%q) created %s (%v), want nothing written", tt.args, state, err)
			}
		})
	}
}

func TestRunUpUnfinishedStateDir(t *testing.T) {
	state := t.TempDir()
	if err := os.WriteFile(filepath.Join(state, "genesis.json"), []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := runArgs(t, "up", "--state-dir", state, "--bin-dir", t.TempDir())
	if code != 1 || stdout != "" {
		t.Errorf("cairn up on an unfinished state dir = %d, stdout %q; want 1 and nothing", code, stdout)
	}
	want := "state dir " + state + " is from an unfinished run"
	if !strings.Contains(stderr, want) || !strings.Contains(stderr, "rm -rf "+state) {
		t.Errorf("cairn up on an unfinished state dir: stderr %q, want %q and how to remove it", stderr, want)
	}
}

// TestRunUpRestartCommandLine covers what `cairn up restart` decides before
// it asks a launcher: usage errors, and a missing, stopped or unknown chain
// or component named clearly. (Restarts of a running chain's components
// are in tests/, with the real binaries.)
func TestRunUpRestartCommandLine(t *testing.T) {
	noChain := t.TempDir()
	stopped := t.TempDir()
	if err := os.WriteFile(filepath.Join(stopped, "chain.json"), []byte(`{"version":1,"trust_domain":"cairn.local","ca":"/x","launcher_pid":1,`+
		`"stopped_at":"2026-01-02T03:04:05Z","components":[{"name":"us-east/kms-1","kind":"kms"}],`+
		`"regions":[{"name":"us-east","kms":["127.0.0.1:1"]}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	gone := t.TempDir()
	if err := os.WriteFile(filepath.Join(gone, "chain.json"), []byte(`{"version":1,"trust_domain":"cairn.local","ca":"/x","launcher_pid":0,`+
		`"components":[{"name":"us-east/kms-1","kind":"kms"}],"control":"`+filepath.Join(gone, "run", "launcher.sock")+`",`+
		`"regions":[{"name":"us-east","kms":["127.0.0.1:1"]}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStderr string
	}{
		{"no component", []string{"up", "restart", "--state-dir", noChain}, exitUsage, "give the COMPONENT to restart"},
		{"two components", []string{"up", "restart", "us-east/kms-1", "rootkms-1"}, exitUsage, `unexpected arguments ["rootkms-1"]`},
		{"bad flag", []string{"up", "restart", "--frob", "x"}, exitUsage, "flag provided but not defined: -frob"},
		{"bad timeout", []string{"up", "restart", "--timeout", "0s", "x"}, exitUsage, "--timeout must be positive"},
		{"no chain", []string{"up", "restart", "--state-dir", noChain, "us-east/kms-1"}, exitError, "make up"},
		{"stopped chain", []string{"up", "restart", "us-east/kms-1", "--state-dir", stopped}, exitError, "the chain is not running: the chain in " + stopped + " was stopped at"},
		{"launcher gone", []string{"up", "restart", "--state-dir", gone, "us-east/kms-1"}, exitError, "the chain is not running: its launcher (pid 0) is gone"},
		{"unknown component of a chain", []string{"up", "restart", "--state-dir", gone, "us-east/kms-9"}, exitError, `no component "us-east/kms-9" in the chain in ` + gone + "; it has us-east/kms-1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runArgs(t, tt.args...)
			if code != tt.wantCode || !strings.Contains(stderr, tt.wantStderr) || stdout != "" {
				t.Errorf("cairn %s = exit %d, stdout %q, stderr %q; want exit %d, nothing on stdout, stderr containing %q",
					strings.Join(tt.args, " "), code, stdout, stderr, tt.wantCode, tt.wantStderr)
			}
		})
	}
}
