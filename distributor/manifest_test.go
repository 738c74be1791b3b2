package distributor_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/distributor"
	"github.com/cairnkms/cairn/safe"
)

func TestPinManifest(t *testing.T) {
	w := newWorld(t, 2, 3)
	other := newWorld(t, 2, 3) // another root key
	path := filepath.Join(t.TempDir(), "d", "genesis.json")
	read := func() []byte {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}

	if wrote, err := distributor.PinManifest(path, w.manifest); err != nil || !wrote {
		t.Fatalf("PinManifest(empty dir) = %v, %v; want written", wrote, err)
	}
	if m, err := safe.ReadManifest(path); err != nil || !proto.Equal(m, w.manifest) {
		t.Fatalf("pinned manifest = %v, %v; want the given one", m, err)
	}
	before := read()
	if wrote, err := distributor.PinManifest(path, w.manifest); err != nil || wrote {
		t.Errorf("PinManifest(same manifest again) = %v, %v; want unchanged", wrote, err)
	}

	// Another root key is refused, and the pinned file stays.
	if wrote, err := distributor.PinManifest(path, other.manifest); err == nil || wrote || !strings.Contains(err.Error(), "another root key") {
		t.Errorf("PinManifest(another lineage) = %v, %v; want refused", wrote, err)
	}
	if string(read()) != string(before) {
		t.Error("a refused PinManifest changed the pinned file")
	}

	// A later epoch of the same lineage (a rekey) replaces it; an earlier
	// one does not.
	later := proto.CloneOf(w.manifest)
	later.Epoch = w.manifest.GetEpoch() + 1
	if wrote, err := distributor.PinManifest(path, later); err != nil || !wrote {
		t.Errorf("PinManifest(later epoch) = %v, %v; want written", wrote, err)
	}
	if wrote, err := distributor.PinManifest(path, w.manifest); err != nil || wrote {
		t.Errorf("PinManifest(earlier epoch after a later one) = %v, %v; want unchanged", wrote, err)
	}
	if m, _ := safe.ReadManifest(path); m.GetEpoch() != later.GetEpoch() {
		t.Errorf("pinned epoch = %d, want %d", m.GetEpoch(), later.GetEpoch())
	}

	// A damaged pinned file is an error, not silently replaced.
	if err := os.WriteFile(path, []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if wrote, err := distributor.PinManifest(path, w.manifest); err == nil || wrote {
		t.Errorf("PinManifest(over a damaged pinned file) = %v, %v; want an error", wrote, err)
	}
	// An invalid manifest is refused.
	bad := proto.CloneOf(w.manifest)
	bad.Threshold = 0
	if wrote, err := distributor.PinManifest(filepath.Join(t.TempDir(), "genesis.json"), bad); err == nil || wrote {
		t.Errorf("PinManifest(threshold 0) = %v, %v; want an error", wrote, err)
	}
}
