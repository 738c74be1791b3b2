package rootkms_test

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/cairnkms/cairn/internal/audit"
	backupv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/backup/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/backup"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
)

const (
	officerID  = "spiffe://cairn.test/officer/global/officer-1"
	operatorID = "spiffe://cairn.test/operator/global/operator"
)

// populate records two regions (us-east with a second key version) and a
// keyset served in both.
func populate(t *testing.T, cl *rootkmsclient.Client) {
	t.Helper()
	createRegion(t, cl, "us-east")
	createRegion(t, cl, "eu-west")
	if err := cl.Do(bg(t), func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		_, err := c.RotateRegionKey(ctx, &rootkmsv1.RotateRegionKeyRequest{Region: "us-east"})
		return err
	}); err != nil {
		t.Fatalf("RotateRegionKey(us-east) = %v", err)
	}
	if err := cl.Do(bg(t), func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		_, err := c.CreateKeyset(ctx, &rootkmsv1.CreateKeysetRequest{Name: "payments/ledger", Regions: []string{"eu-west", "us-east"},
			CiphertextTtl: durationpb.New(time.Hour), RotationPeriod: durationpb.New(24 * time.Hour)})
		return err
	}); err != nil {
		t.Fatalf("populating the record: %v", err)
	}
}

func exportBackup(t *testing.T, cl *rootkmsclient.Client) *rootkmsv1.ExportBackupResponse {
	t.Helper()
	var out *rootkmsv1.ExportBackupResponse
	if err := cl.Do(bg(t), func(ctx context.Context, c rootkmsv1.RootKMSClient) (err error) {
		out, err = c.ExportBackup(ctx, &rootkmsv1.ExportBackupRequest{})
		return err
	}); err != nil {
		t.Fatalf("ExportBackup = %v", err)
	}
	return out
}

func restoreBackup(t *testing.T, cl *rootkmsclient.Client, req *rootkmsv1.RestoreBackupRequest) (*rootkmsv1.RestoreBackupResponse, error) {
	t.Helper()
	var out *rootkmsv1.RestoreBackupResponse
	err := cl.Do(bg(t), func(ctx context.Context, c rootkmsv1.RootKMSClient) (err error) {
		out, err = c.RestoreBackup(ctx, req)
		return err
	})
	return out, err
}

// record is what a cluster's record looks like to regionctl: every region
// and every keyset with its copies, without the Raft indexes (which differ
// between clusters).
type record struct {
	regions []*rootkmsv1.Region
	keysets []*rootkmsv1.Keyset
}

func readRecord(t *testing.T, cl *rootkmsclient.Client) record {
	t.Helper()
	var r record
	if err := cl.Do(bg(t), func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		regions, err := c.ListRegions(ctx, &rootkmsv1.ListRegionsRequest{})
		if err != nil {
			return err
		}
		keysets, err := c.ListKeysets(ctx, &rootkmsv1.ListKeysetsRequest{IncludeCopies: true})
		if err != nil {
			return err
		}
		r = record{regions: regions.GetRegions(), keysets: keysets.GetKeysets()}
		return nil
	}); err != nil {
		t.Fatalf("reading the record: %v", err)
	}
	return r
}

func requireSameRecord(t *testing.T, what string, got, want record) {
	t.Helper()
	opts := []cmp.Option{protocmp.Transform(),
		protocmp.IgnoreFields(&rootkmsv1.Region{}, "commit_index"), protocmp.IgnoreFields(&rootkmsv1.Keyset{}, "commit_index")}
	if d := cmp.Diff(want.regions, got.regions, opts...); d != "" {
		t.Errorf("%s: regions differ from the backed-up cluster's (-want +got):\n%s", what, d)
	}
	if d := cmp.Diff(want.keysets, got.keysets, opts...); d != "" {
		t.Errorf("%s: keysets differ from the backed-up cluster's (-want +got):\n%s", what, d)
	}
}

// TestBackupRestoreIntoFreshCluster is issue 15's done-when in one process:
// a cluster's record is exported and restored into a fresh two-replica
// cluster of the same root key, which then holds the same regions (with the
// same key material, from the follower's own state too) and keysets, keeps
// its own membership, takes new writes, and can be restored over with
// overwrite.
func TestBackupRestoreIntoFreshCluster(t *testing.T) {
	c := newChain(t)
	src := c.startReplica("rootkms-1", true, false)
	if err := src.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	populate(t, c.client(regionctlID, src.api))
	want := readRecord(t, c.client(regionctlID, src.api))
	wantKeys, err := c.unwrap(kmsEast, src.api, "us-east")
	if err != nil {
		t.Fatal(err)
	}

	exp := exportBackup(t, c.client(operatorID, src.api))
	if exp.GetRegions() != 2 || exp.GetKeysets() != 1 || exp.GetIndex() == 0 || exp.GetTerm() == 0 || exp.GetGenesisId() != c.manifest.GetGenesisId() {
		t.Fatalf("ExportBackup = regions %d, keysets %d, index %d, term %d, genesis %q; want 2, 1, >0, >0, %q",
			exp.GetRegions(), exp.GetKeysets(), exp.GetIndex(), exp.GetTerm(), exp.GetGenesisId(), c.manifest.GetGenesisId())
	}
	f, err := backup.Inspect(exp.GetBackup())
	if err != nil {
		t.Fatalf("backup.Inspect(exported) = %v", err)
	}
	if got := f.Contents; got.GetIndex() != exp.GetIndex() || got.GetTerm() != exp.GetTerm() || got.GetCreatedBy() != operatorID || got.GetReplicaId() != "rootkms-1" {
		t.Errorf("backup contents: index %d term %d by %q from %q; want %d, %d, %q, rootkms-1",
			got.GetIndex(), got.GetTerm(), got.GetCreatedBy(), got.GetReplicaId(), exp.GetIndex(), exp.GetTerm(), operatorID)
	}
	for _, k := range wantKeys.GetVersions() {
		if bytes.Contains(exp.GetBackup(), k.GetKey()) {
			t.Fatalf("the backup holds region key version %d in plaintext", k.GetVersion())
		}
	}

	// A fresh cluster of the same root key: two replicas.
	n1 := c.startReplica("restored-1", true, false)
	n2 := c.startReplica("restored-2", false, false, n1.api)
	for _, r := range []*replica{n1, n2} {
		if err := r.srv.WaitReady(bg(t)); err != nil {
			t.Fatal(err)
		}
	}
	waitMembers(t, n1, 2)
	fresh := []*replica{n1, n2}
	officer := c.client(officerID, addrs(fresh)...)
	req := &rootkmsv1.RestoreBackupRequest{Backup: exp.GetBackup(), Reason: "disaster recovery drill"}
	res, err := restoreBackup(t, officer, req)
	if err != nil {
		t.Fatalf("RestoreBackup into a fresh cluster = %v", err)
	}
	if res.GetRegions() != 2 || res.GetKeysets() != 1 || res.GetReplacedRegions() != 0 || res.GetBackupIndex() != exp.GetIndex() || res.GetIndex() <= exp.GetIndex() {
		t.Errorf("RestoreBackup = %v; want 2 regions, 1 keyset, nothing replaced, backup index %d, index above it", res, exp.GetIndex())
	}
	requireSameRecord(t, "restored cluster", readRecord(t, c.client(regionctlID, addrs(fresh)...)), want)

	// The follower installed the restored state and serves the same region
	// keys from it.
	deadline := time.Now().Add(10 * time.Second)
	var got *rootkmsv1.RegionKeyMaterial
	for got, err = c.unwrap(kmsEast, n2.api, "us-east"); err != nil && time.Now().Before(deadline); got, err = c.unwrap(kmsEast, n2.api, "us-east") {
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("UnwrapRegionKey(us-east) from the restored follower = %v", err)
	}
	if d := cmp.Diff(wantKeys, got, protocmp.Transform()); d != "" {
		t.Errorf("restored us-east key material differs (-want +got):\n%s", d)
	}

	// The restored state keeps this cluster's member records; the old
	// cluster's server is not among them (as a backup of it shows). The
	// leader registers its own record within a quarter second of leading
	// (memberLoop), so it may arrive just after the restore: poll.
	wantMembers := []string{"restored-1@" + n1.api, "restored-2@" + n2.api}
	var members []string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		again, err := backup.Inspect(exportBackup(t, officer).GetBackup())
		if err != nil {
			t.Fatal(err)
		}
		snap, err := backup.Snapshot(again.Contents)
		if err != nil {
			t.Fatal(err)
		}
		members = members[:0]
		for _, m := range snap.GetMembers() {
			members = append(members, m.GetId()+"@"+m.GetApiAddress())
		}
		if slices.Equal(members, wantMembers) || time.Now().After(deadline) {
			break
		}
	}
	if d := cmp.Diff(wantMembers, members); d != "" {
		t.Errorf("member records after the restore (-want +got):\n%s", d)
	}

	// It takes new writes; then the backup is restored over it, which needs
	// overwrite and drops what was written since.
	admin := c.client(regionctlID, addrs(fresh)...)
	createRegion(t, admin, "ap-south")
	if _, err := restoreBackup(t, officer, req); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "3 regions and 1 keysets") {
		t.Errorf("RestoreBackup into a cluster holding a record = %v, want FailedPrecondition naming 3 regions and 1 keysets", err)
	}
	if n := len(readRecord(t, admin).regions); n != 3 {
		t.Errorf("after a refused restore: %d regions, want 3 (nothing changed)", n)
	}
	req.Overwrite = true
	res, err = restoreBackup(t, officer, req)
	if err != nil {
		t.Fatalf("RestoreBackup with overwrite = %v", err)
	}
	if res.GetReplacedRegions() != 3 || res.GetReplacedKeysets() != 1 {
		t.Errorf("RestoreBackup with overwrite replaced %d regions, %d keysets; want 3, 1", res.GetReplacedRegions(), res.GetReplacedKeysets())
	}
	requireSameRecord(t, "restored over", readRecord(t, admin), want)
	// The backup of a restored cluster with writes of its own (its request
	// table holds the old cluster's requests and its own) restores too.
	createRegion(t, admin, "ap-south")
	later := readRecord(t, admin)
	b2 := exportBackup(t, officer)
	req.Backup = b2.GetBackup()
	if _, err := restoreBackup(t, officer, req); err != nil {
		t.Fatalf("RestoreBackup(a backup of the restored cluster) = %v", err)
	}
	requireSameRecord(t, "restored from the restored cluster's backup", readRecord(t, admin), later)

	// The reason is on record.
	recs, err := audit.ReadFile(n1.auditLog)
	if err != nil {
		t.Fatal(err)
	}
	reasons := 0
	for _, r := range recs {
		if r.Operation == "/cairn.rootkms.v1.RootKMS/RestoreBackup" && r.Outcome == audit.OutcomeAttempt && r.Reason == "disaster recovery drill" && r.Identity == officerID {
			reasons++
		}
	}
	if reasons != 3 {
		t.Errorf("audit records of a restore with its reason = %d, want 3", reasons)
	}
}

// TestRestoreBackupRefusals: a backup is refused, and nothing changes, when
// it is not a backup file, was edited (its tag no longer verifies), is of
// another root key lineage, or the cluster already holds a record; only
// officers restore, only operators and officers export, and every refusal is
// audited.
func TestRestoreBackupRefusals(t *testing.T) {
	c := newChain(t)
	r1 := c.startReplica("rootkms-1", true, false)
	if err := r1.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	populate(t, c.client(regionctlID, r1.api))
	good := exportBackup(t, c.client(officerID, r1.api)).GetBackup()

	// A fresh, empty cluster of the same root key.
	fresh := c.startReplica("fresh-1", true, false)
	if err := fresh.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	officer := c.client(officerID, fresh.api)

	edit := func(change func(*backupv1.Backup, *backupv1.BackupContents)) []byte {
		var f backupv1.Backup
		var ct backupv1.BackupContents
		if err := proto.Unmarshal(good, &f); err != nil {
			t.Fatal(err)
		}
		if err := proto.Unmarshal(f.GetContents(), &ct); err != nil {
			t.Fatal(err)
		}
		change(&f, &ct)
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(&ct)
		if err != nil {
			t.Fatal(err)
		}
		f.Contents = b
		out, err := proto.MarshalOptions{Deterministic: true}.Marshal(&f)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	// A keyset's policy is plaintext in the record: an edit of it must not
	// restore.
	editPolicy := func() []byte {
		return edit(func(_ *backupv1.Backup, ct *backupv1.BackupContents) {
			snap, err := backup.Snapshot(ct)
			if err != nil {
				t.Fatal(err)
			}
			snap.GetKeysets()[0].RotationPeriod = durationpb.New(1000 * time.Hour)
			b, err := proto.MarshalOptions{Deterministic: true}.Marshal(snap)
			if err != nil {
				t.Fatal(err)
			}
			ct.Snapshot = b
		})
	}
	other := newChain(t)
	o1 := other.startReplica("other-1", true, false)
	if err := o1.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	otherBackup := exportBackup(t, other.client(officerID, o1.api)).GetBackup()

	for _, tt := range []struct {
		name   string
		backup []byte
		reason string
		code   codes.Code
		want   string
	}{
		{"no reason", good, "", codes.InvalidArgument, "needs a reason"},
		{"empty", nil, "test", codes.InvalidArgument, "not a valid backup file"},
		{"not a backup", []byte("hello, I am a tarball"), "test", codes.InvalidArgument, "not a valid backup file"},
		{"truncated", good[:len(good)/2], "test", codes.InvalidArgument, "not a valid backup file"},
		{"other format version", edit(func(f *backupv1.Backup, _ *backupv1.BackupContents) { f.FormatVersion = 2 }), "test", codes.InvalidArgument, "format version 2"},
		{"keyset policy edited", editPolicy(), "test", codes.InvalidArgument, "tag does not verify"},
		{"index edited", edit(func(_ *backupv1.Backup, ct *backupv1.BackupContents) { ct.Index++ }), "test", codes.InvalidArgument, "tag does not verify"},
		{"tag edited", edit(func(f *backupv1.Backup, _ *backupv1.BackupContents) { f.Tag[0] ^= 1 }), "test", codes.InvalidArgument, "tag does not verify"},
		{"another lineage", otherBackup, "test", codes.InvalidArgument, "of another root key lineage"},
		{"lineage edited", edit(func(_ *backupv1.Backup, ct *backupv1.BackupContents) {
			ct.GenesisId = other.manifest.GetGenesisId()
		}), "test", codes.InvalidArgument, "of another root key lineage"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := restoreBackup(t, officer, &rootkmsv1.RestoreBackupRequest{Backup: tt.backup, Reason: tt.reason})
			if status.Code(err) != tt.code || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("RestoreBackup(%s) = %v, want %v containing %q", tt.name, err, tt.code, tt.want)
			}
			if n := len(readRecord(t, c.client(regionctlID, fresh.api)).regions); n != 0 {
				t.Errorf("after a refused restore the cluster holds %d regions, want 0", n)
			}
		})
	}

	// A cluster holding a record: refused without overwrite.
	if _, err := restoreBackup(t, c.client(officerID, r1.api), &rootkmsv1.RestoreBackupRequest{Backup: good, Reason: "test"}); status.Code(err) != codes.FailedPrecondition ||
		!strings.Contains(err.Error(), "holds 2 regions and 1 keysets") {
		t.Errorf("RestoreBackup into the populated cluster = %v, want FailedPrecondition naming 2 regions and 1 keysets", err)
	}

	// Who may: export operators and officers, restore officers.
	ctx := bg(t)
	for _, id := range []string{regionctlID, "spiffe://cairn.test/rootkms/global/rootkms-1", kmsEast} {
		if _, err := c.rawClient(t, id, fresh.api).ExportBackup(ctx, &rootkmsv1.ExportBackupRequest{}); status.Code(err) != codes.PermissionDenied {
			t.Errorf("ExportBackup as %s = %v, want PermissionDenied", id, err)
		}
	}
	for _, id := range []string{regionctlID, operatorID, "spiffe://cairn.test/rootkms/global/rootkms-1"} {
		if _, err := c.rawClient(t, id, fresh.api).RestoreBackup(ctx, &rootkmsv1.RestoreBackupRequest{Backup: good, Reason: "x"}); status.Code(err) != codes.PermissionDenied {
			t.Errorf("RestoreBackup as %s = %v, want PermissionDenied", id, err)
		}
	}
	recs, err := audit.ReadFile(fresh.auditLog)
	if err != nil {
		t.Fatal(err)
	}
	denied := map[string]int{}
	for _, r := range recs {
		if r.Outcome == audit.OutcomeDenied {
			denied[r.Operation+" "+r.Identity]++
		}
	}
	for _, want := range []string{
		"/cairn.rootkms.v1.RootKMS/ExportBackup " + regionctlID,
		"/cairn.rootkms.v1.RootKMS/RestoreBackup " + operatorID,
	} {
		if denied[want] != 1 {
			t.Errorf("denied audit records of %s = %d, want 1", want, denied[want])
		}
	}
	if n := len(readRecord(t, c.client(regionctlID, fresh.api)).regions); n != 0 {
		t.Errorf("after the refusals the fresh cluster holds %d regions, want 0", n)
	}
	// The good backup still restores: none of the above was its fault.
	if _, err := restoreBackup(t, officer, &rootkmsv1.RestoreBackupRequest{Backup: good, Reason: "test"}); err != nil {
		t.Errorf("RestoreBackup(good) after the refusals = %v", err)
	}
}
