package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
)

// TestAuditVerify: an intact signed log verifies against the CA (exit 0, a
// summary); a deleted line is named (exit 1); no files is a usage error.
func TestAuditVerify(t *testing.T) {
	pki := identitytest.New(t, spiffeid.RequireTrustDomainFromString("cairn.test"))
	src := pki.Source("spiffe://cairn.test/kms/us-east/kms-1")
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := audit.Open(path, audit.Options{Signer: audit.SVIDSigner(src), CheckpointEvery: 2})
	if err != nil {
		t.Fatal(err)
	}
	for _, rid := range []string{"a", "b", "c", "d"} {
		if err := l.Write(context.Background(), audit.Record{RequestID: rid, Operation: "op", Outcome: audit.OutcomeOK}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := runArgs(t, "audit", "verify", "--ca", pki.BundleFile(), path)
	if code != exitOK || !strings.HasPrefix(stdout, "intact: 1 files, 4 records, 3 checkpoints") {
		t.Errorf("cairn audit verify (intact) = %d, %q, %q; want 0 and the summary", code, stdout, stderr)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(string(b), "\n")
	cut := filepath.Join(t.TempDir(), "cut.log")
	if err := os.WriteFile(cut, []byte(strings.Join(append(lines[:1:1], lines[2:]...), "")), 0o600); err != nil {
		t.Fatal(err)
	}
	code, stdout, _ = runArgs(t, "audit", "verify", cut)
	if code != exitError || !strings.HasPrefix(stdout, cut+":2: does not link to line 1") {
		t.Errorf("cairn audit verify (line 2 deleted) = %d, %q; want 1 and %s:2 named", code, stdout, cut)
	}
	if code, _, _ := runArgs(t, "audit", "verify"); code != exitUsage {
		t.Errorf("cairn audit verify (no files) = %d, want %d", code, exitUsage)
	}
}
