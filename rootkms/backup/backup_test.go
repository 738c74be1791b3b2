package backup_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/secret"
	backupv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/backup/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/rootkms/backup"
	"github.com/cairnkms/cairn/rootkms/rootkey"
	"github.com/cairnkms/cairn/safe"
)

const gid = "00112233445566778899aabbccddeeff"

func newKey(t *testing.T, fill byte, genesis string) (*rootkey.Key, *safev1.GenesisManifest) {
	t.Helper()
	rmk := secret.New(bytes.Repeat([]byte{fill}, 32))
	m := &safev1.GenesisManifest{GenesisId: genesis, Kcv: safe.KCV(rmk, genesis)}
	k, err := rootkey.New(rmk, m)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	return k, m
}

func contents(t *testing.T, m *safev1.GenesisManifest) *backupv1.BackupContents {
	t.Helper()
	snap, err := proto.Marshal(&statev1.Snapshot{FormatVersion: 1, GenesisId: m.GetGenesisId(), RmkKcv: m.GetKcv(),
		Regions: []*statev1.RegionRecord{{Name: "us-east"}}})
	if err != nil {
		t.Fatal(err)
	}
	return &backupv1.BackupContents{GenesisId: m.GetGenesisId(), RmkKcv: m.GetKcv(), Index: 42, Term: 3,
		CreatedAt: timestamppb.New(time.Unix(1700000000, 0)), CreatedBy: "spiffe://cairn.test/officer/global/officer-1", ReplicaId: "rootkms-1", Snapshot: snap}
}

func TestSealOpen(t *testing.T) {
	k, m := newKey(t, 7, gid)
	want := contents(t, m)
	b, err := backup.Seal(want, k)
	if err != nil {
		t.Fatalf("Seal = %v", err)
	}
	again, err := backup.Seal(want, k)
	if err != nil || !bytes.Equal(b, again) {
		t.Errorf("Seal twice gave different bytes (%v): the encoding must be deterministic", err)
	}
	got, err := backup.Open(b, m.GetGenesisId(), m.GetKcv(), k)
	if err != nil {
		t.Fatalf("Open(Seal(c)) = %v", err)
	}
	if d := cmp.Diff(want, got, protocmp.Transform()); d != "" {
		t.Errorf("Open(Seal(c)) differs (-want +got):\n%s", d)
	}
	f, err := backup.Inspect(b)
	if err != nil {
		t.Fatalf("Inspect = %v", err)
	}
	if d := cmp.Diff(want, f.Contents, protocmp.Transform()); d != "" {
		t.Errorf("Inspect(Seal(c)) differs (-want +got):\n%s", d)
	}
	snap, err := backup.Snapshot(got)
	if err != nil || len(snap.GetRegions()) != 1 {
		t.Errorf("Snapshot = %v, %v; want one region", snap, err)
	}
}

// TestOpenRefuses: every byte of the contents and the tag is covered, a
// backup of another lineage is told apart from a tampered one, and a key of
// another RMK (same genesis id) cannot make a tag this one accepts.
func TestOpenRefuses(t *testing.T) {
	k, m := newKey(t, 7, gid)
	b, err := backup.Seal(contents(t, m), k)
	if err != nil {
		t.Fatal(err)
	}
	var f backupv1.Backup
	if err := proto.Unmarshal(b, &f); err != nil {
		t.Fatal(err)
	}
	reencode := func(change func(*backupv1.Backup)) []byte {
		g := proto.Clone(&f).(*backupv1.Backup)
		change(g)
		out, err := proto.Marshal(g)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	// Flip each byte of the contents and of the tag in turn.
	for i := range f.GetContents() {
		bad := reencode(func(g *backupv1.Backup) { g.Contents[i] ^= 0x01 })
		if _, err := backup.Open(bad, m.GetGenesisId(), m.GetKcv(), k); err == nil {
			t.Fatalf("Open(contents byte %d flipped) = nil error", i)
		}
	}
	for i := range f.GetTag() {
		bad := reencode(func(g *backupv1.Backup) { g.Tag[i] ^= 0x80 })
		if _, err := backup.Open(bad, m.GetGenesisId(), m.GetKcv(), k); !errors.Is(err, rootkey.ErrBackupTag) {
			t.Fatalf("Open(tag byte %d flipped) = %v, want ErrBackupTag", i, err)
		}
	}
	otherRMK, _ := newKey(t, 8, gid)
	forged, err := backup.Seal(contents(t, m), otherRMK) // claims this lineage, tagged under another RMK
	if err != nil {
		t.Fatal(err)
	}
	if _, err := backup.Open(forged, m.GetGenesisId(), m.GetKcv(), k); !errors.Is(err, rootkey.ErrBackupTag) {
		t.Errorf("Open(tagged under another RMK) = %v, want ErrBackupTag", err)
	}
	if _, err := backup.Open(b, "ffeeddccbbaa99887766554433221100", m.GetKcv(), k); !errors.Is(err, backup.ErrLineage) || !strings.Contains(err.Error(), gid) {
		t.Errorf("Open(into another genesis) = %v, want ErrLineage naming %s", err, gid)
	}
	if _, err := backup.Open(b, m.GetGenesisId(), []byte("other kcv"), k); !errors.Is(err, backup.ErrLineage) {
		t.Errorf("Open(into another RMK KCV) = %v, want ErrLineage", err)
	}
	for name, bad := range map[string][]byte{
		"empty":          nil,
		"garbage":        []byte("not a backup"),
		"format 2":       reencode(func(g *backupv1.Backup) { g.FormatVersion = 2 }),
		"format 0":       reencode(func(g *backupv1.Backup) { g.FormatVersion = 0 }),
		"no tag":         reencode(func(g *backupv1.Backup) { g.Tag = nil }),
		"bad contents":   reencode(func(g *backupv1.Backup) { g.Contents = []byte{0xff, 0xff} }),
		"empty contents": reencode(func(g *backupv1.Backup) { g.Contents = nil }),
		"too large":      make([]byte, backup.MaxSize+1),
	} {
		if _, err := backup.Open(bad, m.GetGenesisId(), m.GetKcv(), k); !errors.Is(err, backup.ErrFormat) {
			t.Errorf("Open(%s) = %v, want ErrFormat", name, err)
		}
	}
}

func TestSealRefusesIncompleteContents(t *testing.T) {
	k, m := newKey(t, 7, gid)
	for name, change := range map[string]func(*backupv1.BackupContents){
		"no genesis":  func(c *backupv1.BackupContents) { c.GenesisId = "" },
		"no kcv":      func(c *backupv1.BackupContents) { c.RmkKcv = nil },
		"no snapshot": func(c *backupv1.BackupContents) { c.Snapshot = nil },
		"no time":     func(c *backupv1.BackupContents) { c.CreatedAt = nil },
	} {
		c := contents(t, m)
		change(c)
		if _, err := backup.Seal(c, k); !errors.Is(err, backup.ErrFormat) {
			t.Errorf("Seal(%s) = %v, want ErrFormat", name, err)
		}
	}
}
