package tests

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/tests/framework"
)

// TestAuditLogVerifiesAcrossRestarts: a real distributor's audit log, over a
// clean restart and a kill -9, holds the refusals of its run, is one chain
// with signed checkpoints that `cairn audit verify --ca` accepts, and a line
// deleted from it is named by file and line.
func TestAuditLogVerifiesAcrossRestarts(t *testing.T) {
	w := framework.NewWorld(t, bin)
	d := w.Distributors(1, false)[0]
	refuse := func() {
		t.Helper()
		// An officer is no root key reader: refused, and audited.
		if _, _, err := d.FetchRootKey(framework.Officer(1), "genesis"); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("FetchRootKey as %s = %v, want PermissionDenied", framework.Officer(1), err)
		}
	}
	d.Start()
	d.WaitState(sealed)
	refuse()
	d.Stop() // SIGTERM: a final checkpoint
	d.Start()
	d.WaitState(sealed)
	refuse()
	d.Kill() // no final checkpoint: the restart links to the last record
	d.Start()
	d.WaitState(sealed)
	refuse()
	d.Stop()

	path := filepath.Join(d.StateDir, "audit.log")
	denied := 0
	for _, r := range d.Audit() {
		if r.Outcome == audit.OutcomeDenied && r.Identity == framework.SPIFFEID(framework.Officer(1)) {
			denied++
		}
	}
	if denied != 3 {
		t.Errorf("%d denied records of %s in %s, want 3", denied, framework.Officer(1), path)
	}
	ca := filepath.Join(w.Certs, "ca.pem")
	r := w.Run("audit-verify", bin.Cairn, "audit", "verify", "--ca", ca, path)
	if r.ExitCode != 0 || !strings.HasPrefix(r.Stdout, "intact: 1 files, ") || !strings.Contains(r.Stdout, "ends with a final checkpoint") {
		t.Fatalf("cairn audit verify of %s: want exit 0 and an intact summary ending with a final checkpoint\n%s", path, r)
	}

	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(string(b), "\n")
	cut := filepath.Join(t.TempDir(), "audit.log")
	if err := os.WriteFile(cut, []byte(strings.Join(append(lines[:1:1], lines[2:]...), "")), 0o600); err != nil {
		t.Fatal(err)
	}
	r = w.Run("audit-verify-cut", bin.Cairn, "audit", "verify", "--ca", ca, cut)
	if r.ExitCode != 1 || !strings.HasPrefix(r.Stdout, cut+":2: does not link to line 1") {
		t.Errorf("cairn audit verify of a log with line 2 deleted: want exit 1 naming %s:2\n%s", cut, r)
	}
}
