package fsm_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkmstest"
)

// goldenOf is the golden ciphertext of version id of the ledger, nil if
// none (or no such version).
func goldenOf(t testing.TB, s *fsm.State, id uint32) *statev1.GoldenCiphertext {
	t.Helper()
	k, ok := s.Keyset(ledger)
	if !ok {
		t.Fatalf("Keyset(%q) = _, false", ledger)
	}
	for _, v := range k.GetVersions() {
		if v.GetKeyId() == id {
			return v.GetGolden()
		}
	}
	return nil
}

// TestGoldenCiphertext: the golden ciphertext of a version comes with the
// command that makes the version (create_keyset's first version,
// add_version), stays through every later step and observation, goes at
// DESTROY (its key is gone from every copy), and survives a snapshot.
func TestGoldenCiphertext(t *testing.T) {
	f := setupFSM(t)
	k, first := newTinkKeyset(t, ledger)
	rec := createKeysetRecord(ledger, euUS, first, k.copies(euUS, usable))
	rec.Versions[0].Golden = fakeGolden(first)
	mustApply(t, f, createKeyset(rec, at(100)))
	x := &keysetFixture{f: f, k: k, first: first}
	if got := goldenOf(t, f.State(), first); !proto.Equal(got, fakeGolden(first)) {
		t.Fatalf("after create_keyset, version %d golden = %v, want %v", first, got, fakeGolden(first))
	}
	second := x.k.add()
	if res := x.step(t, stepAdd, second, at(110)); res.Err != nil { // with fakeGolden(second)
		t.Fatalf("add_version: %v", res.Err)
	}
	want := map[uint32]*statev1.GoldenCiphertext{first: fakeGolden(first), second: fakeGolden(second)}
	check := func(when string) {
		t.Helper()
		for id, g := range want {
			if got := goldenOf(t, x.f.State(), id); !proto.Equal(got, g) {
				t.Errorf("%s: version %d golden = %v, want %v", when, id, got, g)
			}
		}
	}
	check("after add_version")
	for i, s := range []struct {
		step statev1.KeysetStep
		id   uint32
	}{
		{stepPromote, second}, {stepDisable, first}, {stepEnable, first}, {stepDisable, first}, {stepScheduleDestroy, first},
		{stepUndestroy, first}, {stepScheduleDestroy, first}, {stepRewrap, 0},
	} {
		if res := x.step(t, s.step, s.id, at(120+i)); res.Err != nil {
			t.Fatalf("%v %d: %v", s.step, s.id, res.Err)
		}
		check("after " + s.step.String())
	}
	mustApply(t, x.f, recordPropagation("eu", []uint32{2}, []*statev1.KeysetObservation{{Keyset: ledger, Versions: []*statev1.VersionObservation{
		{KeyId: second, ServedByAll: true, EncryptCount: 1}, {KeyId: first, ServedByAll: true}}}}, at(200)))
	check("after record_propagation")

	// A snapshot keeps them.
	b := rootkmstest.SnapshotBytes(t, x.f)
	dst := rootkmstest.NewFSM()
	if err := restoreBytes(dst, b); err != nil {
		t.Fatalf("Restore(Persist()) = %v", err)
	}
	if diff := cmp.Diff(x.f.State().Keysets(), dst.State().Keysets(), protocmp.Transform()); diff != "" {
		t.Errorf("Keysets() after Restore differ (-src +dst):\n%s", diff)
	}
	if got := goldenOf(t, dst.State(), second); !proto.Equal(got, want[second]) {
		t.Errorf("after Restore, version %d golden = %v, want %v", second, got, want[second])
	}

	// DESTROY drops it.
	if res := x.step(t, stepDestroy, first, at(4000)); res.Err != nil {
		t.Fatalf("destroy: %v", res.Err)
	}
	if got := goldenOf(t, x.f.State(), first); got != nil {
		t.Errorf("after DESTROY, version %d golden = %v, want none", first, got)
	}
	delete(want, first)
	check("after DESTROY")
	if err := restoreBytes(rootkmstest.NewFSM(), rootkmstest.SnapshotBytes(t, x.f)); err != nil {
		t.Errorf("Restore(after DESTROY) = %v", err)
	}
}

// TestGoldenCiphertextRefused: a golden ciphertext is optional (versions
// made before golden ciphertexts have none), but one that is present must be
// well formed and routed to its version; only the command that makes a
// version carries one. A refusal changes nothing.
func TestGoldenCiphertextRefused(t *testing.T) {
	bad := []struct {
		name   string
		mutate func(g *statev1.GoldenCiphertext, id uint32)
	}{
		{"empty", func(g *statev1.GoldenCiphertext, _ uint32) { proto.Reset(g) }},
		{"no ciphertext", func(g *statev1.GoldenCiphertext, _ uint32) { g.Ciphertext = nil }},
		{"only a prefix", func(g *statev1.GoldenCiphertext, _ uint32) { g.Ciphertext = g.Ciphertext[:5] }},
		{"no TINK prefix", func(g *statev1.GoldenCiphertext, _ uint32) { g.Ciphertext[0] = 0 }},
		{"another key's prefix", func(g *statev1.GoldenCiphertext, id uint32) { g.Ciphertext = fakeGolden(id + 1).Ciphertext }},
		{"ciphertext over 1 KiB", func(g *statev1.GoldenCiphertext, _ uint32) {
			g.Ciphertext = append(g.Ciphertext, bytes.Repeat([]byte{'x'}, fsm.MaxGoldenField)...)
		}},
		{"no associated data", func(g *statev1.GoldenCiphertext, _ uint32) { g.AssociatedData = nil }},
		{"associated data over 1 KiB", func(g *statev1.GoldenCiphertext, _ uint32) {
			g.AssociatedData = bytes.Repeat([]byte{'x'}, fsm.MaxGoldenField+1)
		}},
		{"no plaintext_sha256", func(g *statev1.GoldenCiphertext, _ uint32) { g.PlaintextSha256 = nil }},
		{"short plaintext_sha256", func(g *statev1.GoldenCiphertext, _ uint32) { g.PlaintextSha256 = g.PlaintextSha256[:31] }},
	}
	for _, tt := range bad {
		t.Run("create/"+tt.name, func(t *testing.T) {
			f := setupFSM(t)
			k, id := newTinkKeyset(t, ledger)
			rec := createKeysetRecord(ledger, euUS, id, k.copies(euUS, usable))
			rec.Versions[0].Golden = fakeGolden(id)
			tt.mutate(rec.Versions[0].Golden, id)
			before := f.State()
			if res := apply(t, f, createKeyset(rec, at(100))); !errors.Is(res.Err, fsm.ErrInvalidCommand) || f.State() != before {
				t.Errorf("Apply(create_keyset with golden %s).Err = %v, want %v and no change", tt.name, res.Err, fsm.ErrInvalidCommand)
			}
		})
		t.Run("add/"+tt.name, func(t *testing.T) {
			x := newKeysetFixture(t)
			id := x.k.add()
			cmd := updateKeyset(ledger, x.rev(t), stepAdd, id, x.k.copies(euUS, usable), at(110))
			cmd.GetUpdateKeyset().Golden = fakeGolden(id)
			tt.mutate(cmd.GetUpdateKeyset().Golden, id)
			before := x.f.State()
			if res := apply(t, x.f, cmd); !errors.Is(res.Err, fsm.ErrInvalidCommand) || x.f.State() != before {
				t.Errorf("Apply(add_version with golden %s).Err = %v, want %v and no change", tt.name, res.Err, fsm.ErrInvalidCommand)
			}
		})
	}
	// Only add_version carries one.
	for _, step := range []statev1.KeysetStep{stepPromote, stepRewrap} {
		t.Run("golden with "+step.String(), func(t *testing.T) {
			x := newKeysetFixture(t)
			id := x.k.add()
			if res := x.step(t, stepAdd, id, at(110)); res.Err != nil {
				t.Fatal(res.Err)
			}
			if step == stepRewrap {
				id = 0
			} else {
				x.k.step(step, id)
			}
			cmd := updateKeyset(ledger, x.rev(t), step, id, x.k.copies(euUS, usable), at(120))
			cmd.GetUpdateKeyset().Golden = fakeGolden(id)
			before := x.f.State()
			if res := apply(t, x.f, cmd); !errors.Is(res.Err, fsm.ErrInvalidCommand) || x.f.State() != before {
				t.Errorf("Apply(%v with a golden ciphertext).Err = %v, want %v and no change", step, res.Err, fsm.ErrInvalidCommand)
			}
		})
	}
	// Without one: accepted, as before golden ciphertexts.
	t.Run("none", func(t *testing.T) {
		x := newKeysetFixture(t) // created without one
		id := x.k.add()
		if res := apply(t, x.f, updateKeyset(ledger, x.rev(t), stepAdd, id, x.k.copies(euUS, usable), at(110))); res.Err != nil {
			t.Errorf("Apply(add_version without a golden ciphertext).Err = %v, want nil", res.Err)
		}
		if g := goldenOf(t, x.f.State(), id); g != nil {
			t.Errorf("version %d golden = %v, want none", id, g)
		}
	})
}
