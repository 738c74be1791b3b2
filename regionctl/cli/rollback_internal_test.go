package cli

import (
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

// copyOf is an encrypted copy of name (region key version rk) whose
// versions are ids, primary the given one, others ENABLED.
func copyOf(name string, rk, primary uint32, ids ...uint32) *cryptov1.EncryptedKeyset {
	ek := &cryptov1.EncryptedKeyset{Name: name, Region: "us", RegionKeyVersion: rk, PrimaryKeyId: primary, Ciphertext: []byte(name)}
	for _, id := range ids {
		st := cryptov1.KeyStatus_KEY_STATUS_ENABLED
		if id == primary {
			st = cryptov1.KeyStatus_KEY_STATUS_PRIMARY
		}
		ek.Versions = append(ek.Versions, &cryptov1.KeyVersionInfo{KeyId: id, Status: st})
	}
	return ek
}

func cfgOf(ek *cryptov1.EncryptedKeyset, acl string) *bundlev1.KeysetConfig {
	k := &bundlev1.KeysetConfig{Name: ek.GetName(), Keyset: ek, Acl: &bundlev1.Acl{Decrypt: []string{acl}}}
	for _, v := range ek.GetVersions() {
		k.Lifecycle = append(k.Lifecycle, &bundlev1.VersionLifecycle{KeyId: v.GetKeyId()})
	}
	return k
}

// TestRollbackContent: what a rollback keeps of the change's content so
// that every version the change served decrypting stays decryptable.
func TestRollbackContent(t *testing.T) {
	last := &bundlev1.Bundle{Region: "us", RegionKeyVersions: []uint32{1}, Keysets: []*bundlev1.KeysetConfig{
		cfgOf(copyOf("a/promoted", 1, 1, 1, 2), "old"), // the change promoted 2: restored as it was
		cfgOf(copyOf("a/removed", 1, 7, 7), "old"),     // the change removed it: restored
		cfgOf(copyOf("a/rotated", 1, 3, 3), "old"),     // the change added 4, decrypt-only
		cfgOf(copyOf("a/same", 1, 5, 5), "old"),        // the change changed its ACL only
		cfgOf(copyOf("a/switched", 1, 8, 8), "old"),    // the change added 9 and made it primary
	}}
	cur := &bundlev1.Bundle{Region: "us", RegionKeyVersions: []uint32{2}, Keysets: []*bundlev1.KeysetConfig{
		cfgOf(copyOf("a/added", 2, 11, 11), "new"),
		cfgOf(copyOf("a/promoted", 2, 2, 1, 2), "new"),
		cfgOf(copyOf("a/rotated", 2, 3, 3, 4), "new"),
		cfgOf(copyOf("a/same", 2, 5, 5), "new"),
		cfgOf(copyOf("a/switched", 2, 9, 9), "new"),
	}}
	b := proto.Clone(last).(*bundlev1.Bundle)
	m := rollbackContent(b, cur)
	if len(m.added) != 1 || m.added[0].GetName() != "a/added" {
		t.Fatalf("added = %v, want [a/added]", m.added)
	}
	by := map[string]*bundlev1.KeysetConfig{}
	for _, k := range m.bundle.GetKeysets() {
		by[k.GetName()] = k
	}
	for name, want := range map[string]*cryptov1.EncryptedKeyset{
		"a/promoted": last.Keysets[0].GetKeyset(), "a/removed": last.Keysets[1].GetKeyset(), "a/same": last.Keysets[3].GetKeyset(),
		"a/rotated": cur.Keysets[2].GetKeyset(), "a/switched": cur.Keysets[4].GetKeyset(),
	} {
		k := by[name]
		if !proto.Equal(k.GetKeyset(), want) {
			t.Errorf("%s: copy %v, want %v", name, k.GetKeyset(), want)
		}
		if got := k.GetAcl().GetDecrypt(); !slices.Equal(got, []string{"old"}) {
			t.Errorf("%s: ACL %v, want the last good one", name, got)
		}
		var ids []uint32
		for _, l := range k.GetLifecycle() {
			ids = append(ids, l.GetKeyId())
		}
		var held []uint32
		for _, v := range k.GetKeyset().GetVersions() {
			held = append(held, v.GetKeyId())
		}
		if !slices.Equal(ids, held) {
			t.Errorf("%s: lifecycle of %v, the copy holds %v", name, ids, held)
		}
	}
	if _, ok := by["a/added"]; ok {
		t.Errorf("a/added is in the bundle before keepAdded")
	}
	if got := m.bundle.GetRegionKeyVersions(); !slices.Equal(got, []uint32{1, 2}) {
		t.Errorf("region key versions %v, want [1 2]", got)
	}
	notes := strings.Join(m.notes, "\n")
	for _, want := range []string{"keyset a/rotated: kept the keys the change made it serve (version(s) 4 it added",
		"keyset a/switched: kept", "version(s) 8 the change took out are not restored", "its primary stays version 9, not 8"} {
		if !strings.Contains(notes, want) {
			t.Errorf("notes lack %q:\n%s", want, notes)
		}
	}
	if strings.Contains(notes, "a/promoted") || strings.Contains(notes, "a/same") {
		t.Errorf("notes name a keyset restored as it was:\n%s", notes)
	}

	m.keepAdded(map[string]bool{"a/added": true})
	var names []string
	for _, k := range m.bundle.GetKeysets() {
		names = append(names, k.GetName())
	}
	if want := []string{"a/added", "a/promoted", "a/removed", "a/rotated", "a/same", "a/switched"}; !slices.Equal(names, want) {
		t.Errorf("keysets after keepAdded %v, want %v (sorted)", names, want)
	}
	if !strings.Contains(strings.Join(m.notes, "\n"), "keyset a/added, added by the change, is kept") {
		t.Errorf("notes lack the kept added keyset:\n%s", strings.Join(m.notes, "\n"))
	}
	// Dropping it when the Safety Condition allows, and no change content.
	m2 := rollbackContent(proto.Clone(last).(*bundlev1.Bundle), cur)
	m2.keepAdded(nil)
	if len(m2.bundle.GetKeysets()) != 5 || !strings.Contains(strings.Join(m2.notes, "\n"), "a/added, added by the change, is dropped") {
		t.Errorf("keepAdded(nil): %d keysets, notes %q; want 5, a/added dropped", len(m2.bundle.GetKeysets()), m2.notes)
	}
	if m3 := rollbackContent(proto.Clone(last).(*bundlev1.Bundle), nil); !proto.Equal(m3.bundle, last) || len(m3.added)+len(m3.notes) != 0 {
		t.Errorf("rollbackContent(last, nil) changed the bundle or noted something: %+v", m3)
	}
}
