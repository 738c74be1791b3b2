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
