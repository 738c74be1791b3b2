package cli_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/rootkms/backup"
	"github.com/cairnkms/cairn/rootkms/rootkmstest/live"
)

const (
	operatorID = "spiffe://cairn.test/operator/global/operator"
	officerID  = "spiffe://cairn.test/officer/global/officer-1"
)

// TestBackupCommands drives backup export, inspect and restore against a
// real in-process root KMS: the file is 0600 and never overwritten, the
// output names the index, term and counts, regionctl's own identity is
// refused with a hint, and a restore into the cluster that holds the record
// is refused unless --overwrite.
func TestBackupCommands(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	chain := live.Start(t, pki)
	root := []string{"--rootkms", chain.Addr}
	asRegionctl := append(root, identityFlags(pki, regionctlID)...)
	for _, region := range []string{"us-east", "eu-west"} {
		mustRun(t, append([]string{"region", "create", "--region", region}, asRegionctl...)...)
	}
	out := filepath.Join(t.TempDir(), "root.backup")

	// Usage errors and the wrong identity.
	if r := run(t, append([]string{"backup", "export"}, asRegionctl...)...); r.code != 2 || !strings.Contains(r.stderr, "--out is required") {
		t.Errorf("backup export without --out = %d %q, want 2 and --out is required", r.code, r.stderr)
	}
	r := run(t, append([]string{"backup", "export", "--out", out}, asRegionctl...)...)
	if r.code != 1 || !strings.Contains(r.stderr, "PermissionDenied") || !strings.Contains(r.stderr, "--name operator/global/operator") {
		t.Errorf("backup export as regionctl = %d %q, want 1, PermissionDenied and the identity hint", r.code, r.stderr)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("a refused export left %s (%v)", out, err)
	}

	r = mustRun(t, append([]string{"backup", "export", "--out", out}, append(root, identityFlags(pki, operatorID)...)...)...)
	contains(t, "backup export stdout", r.stdout, "backup written to "+out, "mode 0600", "Raft index ", ", term ", "2 regions, 0 keysets, 0 rollouts",
		"regionctl backup restore --in "+out)
	st, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("backup file mode %v, want 0600", st.Mode().Perm())
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	f, err := backup.Inspect(b)
	if err != nil {
		t.Fatalf("backup.Inspect(%s) = %v", out, err)
	}
	if f.Contents.GetGenesisId() != chain.Manifest.GetGenesisId() || f.Contents.GetCreatedBy() != operatorID {
		t.Errorf("backup of genesis %q by %q, want %q by %q", f.Contents.GetGenesisId(), f.Contents.GetCreatedBy(), chain.Manifest.GetGenesisId(), operatorID)
	}
	r = run(t, append([]string{"backup", "export", "--out", out}, append(root, identityFlags(pki, operatorID)...)...)...)
	if r.code != 1 || !strings.Contains(r.stderr, "never overwritten") {
		t.Errorf("backup export onto an existing file = %d %q, want 1 and never overwritten", r.code, r.stderr)
	}
	if again, _ := os.ReadFile(out); string(again) != string(b) {
		t.Error("a refused export changed the existing file")
	}

	r = mustRun(t, "backup", "inspect", "--in", out)
	contains(t, "backup inspect stdout", r.stdout, "UNVERIFIED", "genesis "+chain.Manifest.GetGenesisId(), "2 regions, 0 keysets, 0 rollouts", "for "+operatorID)

	asOfficer := append(root, identityFlags(pki, officerID)...)
	if r := run(t, append([]string{"backup", "restore", "--in", out}, asOfficer...)...); r.code != 2 || !strings.Contains(r.stderr, "--reason") {
		t.Errorf("backup restore without --reason = %d %q, want 2", r.code, r.stderr)
	}
	bad := filepath.Join(t.TempDir(), "bad.backup")
	writeFile(t, bad, "not a backup")
	if r := run(t, append([]string{"backup", "restore", "--in", bad, "--reason", "drill"}, asOfficer...)...); r.code != 1 || !strings.Contains(r.stderr, "not a valid backup file") {
		t.Errorf("backup restore of a bad file = %d %q, want 1 and not a valid backup file", r.code, r.stderr)
	}
	r = run(t, append([]string{"backup", "restore", "--in", out, "--reason", "drill"}, append(root, identityFlags(pki, operatorID)...)...)...)
	if r.code != 1 || !strings.Contains(r.stderr, "PermissionDenied") || !strings.Contains(r.stderr, "officer/global/officer-1") {
		t.Errorf("backup restore as an operator = %d %q, want 1, PermissionDenied and the hint", r.code, r.stderr)
	}
	r = run(t, append([]string{"backup", "restore", "--in", out, "--reason", "drill"}, asOfficer...)...)
	if r.code != 1 || !strings.Contains(r.stderr, "REFUSED by the root KMS") || !strings.Contains(r.stderr, "2 regions and 0 keysets") || !strings.Contains(r.stderr, "--overwrite") {
		t.Errorf("backup restore into the cluster holding the record = %d %q, want 1, REFUSED naming 2 regions and --overwrite", r.code, r.stderr)
	}
	mustRun(t, append([]string{"region", "create", "--region", "ap-south"}, asRegionctl...)...)
	r = mustRun(t, append([]string{"backup", "restore", "--in", out, "--reason", "drill", "--overwrite"}, asOfficer...)...)
	contains(t, "backup restore stdout", r.stdout, "restored "+out, "2 regions, 0 keysets, 0 rollouts", "replaced: 3 regions, 0 keysets")
	r = mustRun(t, append([]string{"region", "list"}, asRegionctl...)...)
	if strings.Contains(r.stdout, "ap-south") || !strings.Contains(r.stdout, "us-east") || !strings.Contains(r.stdout, "eu-west") {
		t.Errorf("region list after the restore = %q, want us-east and eu-west, not ap-south", r.stdout)
	}
}
