package rootkey_test

import (
	"bytes"
	"errors"
	"testing"

	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/internal/secret"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/rootkms/rootkey"
	"github.com/cairnkms/cairn/safe"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func manifest(rmk secret.Bytes, gid string) *safev1.GenesisManifest {
	return &safev1.GenesisManifest{GenesisId: gid, Kcv: safe.KCV(rmk, gid)}
}

func TestWrapUnwrap(t *testing.T) {
	rmk := secret.New(bytes.Repeat([]byte{7}, 32))
	gid := "00112233445566778899aabbccddeeff"
	k, err := rootkey.New(rmk, manifest(rmk, gid))
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	material := secret.New([]byte("region-key-material-0123456789"))
	w, err := k.Wrap("us-east", 2, material)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(w.GetWrappedKey(), []byte("region-key-material")) || !bytes.Equal(w.GetRmkKcv(), safe.KCV(rmk, gid)) || w.GetVersion() != 2 {
		t.Errorf("wrapped = %x, want ciphertext with the RMK's KCV and version 2", w.GetWrappedKey())
	}
	got, err := k.Unwrap("us-east", w)
	if err != nil || !got.Equal(material) {
		t.Fatalf("Unwrap = %v", err)
	}
	// Bound to region, version and lineage.
	if _, err := k.Unwrap("eu-west", w); !errors.Is(err, rootkey.ErrUnwrap) {
		t.Errorf("Unwrap as another region = %v, want ErrUnwrap", err)
	}
	w.Version = 3
	if _, err := k.Unwrap("us-east", w); !errors.Is(err, rootkey.ErrUnwrap) {
		t.Errorf("Unwrap as another version = %v, want ErrUnwrap", err)
	}
	w.Version = 2
	other, err := rootkey.New(rmk, manifest(rmk, "ffeeddccbbaa99887766554433221100"))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := other.Unwrap("us-east", w); !errors.Is(err, rootkey.ErrUnwrap) {
		t.Errorf("Unwrap under another lineage = %v, want ErrUnwrap", err)
	}
	for _, bad := range [][]byte{nil, {1, 2, 3}, append(bytes.Clone(w.GetWrappedKey()[:len(w.GetWrappedKey())-1]), 0)} {
		w2 := &statev1.WrappedRegionKeyVersion{Version: w.GetVersion(), WrappedKey: bad, RmkKcv: w.GetRmkKcv()}
		if _, err := k.Unwrap("us-east", w2); !errors.Is(err, rootkey.ErrUnwrap) {
			t.Errorf("Unwrap(%x) = %v, want ErrUnwrap", bad, err)
		}
	}
	// A key that does not match the manifest KCV is refused outright.
	if _, err := rootkey.New(secret.New(bytes.Repeat([]byte{8}, 32)), manifest(rmk, gid)); !errors.Is(err, safe.ErrKCVMismatch) {
		t.Errorf("New(wrong RMK) = %v, want ErrKCVMismatch", err)
	}
	k.Close()
	if _, err := k.Wrap("us-east", 1, material); err == nil {
		t.Errorf("Wrap after Close = nil error")
	}
}

func TestBackupTag(t *testing.T) {
	rmk := secret.New(bytes.Repeat([]byte{7}, 32))
	gid := "00112233445566778899aabbccddeeff"
	k, err := rootkey.New(rmk, manifest(rmk, gid))
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	msg := []byte("cairn/rootkms/backup/v1\x00contents")
	tag, err := k.BackupTag(msg)
	if err != nil || len(tag) != 32 {
		t.Fatalf("BackupTag = %x, %v; want 32 bytes", tag, err)
	}
	if err := k.CheckBackupTag(msg, tag); err != nil {
		t.Errorf("CheckBackupTag(its own tag) = %v", err)
	}
	if err := k.CheckBackupTag(append(bytes.Clone(msg), 'x'), tag); !errors.Is(err, rootkey.ErrBackupTag) {
		t.Errorf("CheckBackupTag(another message) = %v, want ErrBackupTag", err)
	}
	if err := k.CheckBackupTag(msg, tag[:31]); !errors.Is(err, rootkey.ErrBackupTag) {
		t.Errorf("CheckBackupTag(short tag) = %v, want ErrBackupTag", err)
	}
	// The same RMK under another genesis, and another RMK, tag otherwise.
	other := secret.New(bytes.Repeat([]byte{9}, 32))
	for name, o := range map[string]struct {
		rmk secret.Bytes
		gid string
	}{
		"another genesis": {rmk, "ffeeddccbbaa99887766554433221100"},
		"another RMK":     {other, gid},
	} {
		ok, err := rootkey.New(o.rmk, manifest(o.rmk, o.gid))
		if err != nil {
			t.Fatal(err)
		}
		if err := ok.CheckBackupTag(msg, tag); !errors.Is(err, rootkey.ErrBackupTag) {
			t.Errorf("CheckBackupTag under %s = %v, want ErrBackupTag", name, err)
		}
		ok.Close()
	}
	k.Close()
	if _, err := k.BackupTag(msg); err == nil {
		t.Error("BackupTag after Close = nil error")
	}
}
