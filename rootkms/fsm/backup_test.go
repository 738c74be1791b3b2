package fsm_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkmstest"
)

// TestEncodeDecode: Encode writes what Persist writes; Decode accepts what
// Restore accepts and refuses what it refuses, without changing the FSM.
func TestEncodeDecode(t *testing.T) {
	f := setupFSM(t)
	b, err := f.Encode(f.State())
	if err != nil {
		t.Fatalf("Encode = %v", err)
	}
	if !bytes.Equal(b, rootkmstest.SnapshotBytes(t, f)) {
		t.Error("Encode(State()) differs from what Persist writes")
	}
	fresh := fsm.New(rootkmstest.GenesisID, kcv)
	s, err := fresh.Decode(b)
	if err != nil {
		t.Fatalf("Decode(Encode(state)) = %v", err)
	}
	if s.NumRegions() != f.State().NumRegions() || fresh.State().NumRegions() != 0 {
		t.Errorf("Decode: %d regions (want %d), and the FSM now holds %d (want 0: Decode installs nothing)",
			s.NumRegions(), f.State().NumRegions(), fresh.State().NumRegions())
	}
	again, err := fresh.Encode(s)
	if err != nil || !bytes.Equal(again, b) {
		t.Errorf("Encode(Decode(b)) != b (%v)", err)
	}
	other := fsm.New("ffeeddccbbaa99887766554433221100", kcv)
	if _, err := other.Decode(b); !errors.Is(err, fsm.ErrWrongRMK) {
		t.Errorf("Decode(snapshot of another genesis) = %v, want ErrWrongRMK", err)
	}
	if _, err := fresh.Decode(b[:len(b)-3]); !errors.Is(err, fsm.ErrInvalidSnapshot) {
		t.Errorf("Decode(truncated) = %v, want ErrInvalidSnapshot", err)
	}
}

// TestWithMembers: the members are replaced (sorted), everything else kept;
// members without an address or given twice are refused.
func TestWithMembers(t *testing.T) {
	f := setupFSM(t)
	s := f.State()
	next, err := s.WithMembers([]fsm.Member{{ID: "n2", APIAddress: "h2:1"}, {ID: "n1", APIAddress: "h1:1"}})
	if err != nil {
		t.Fatalf("WithMembers = %v", err)
	}
	want := []fsm.Member{{ID: "n1", APIAddress: "h1:1"}, {ID: "n2", APIAddress: "h2:1"}}
	if d := cmp.Diff(want, next.Members()); d != "" {
		t.Errorf("WithMembers members (-want +got):\n%s", d)
	}
	if next.NumRegions() != s.NumRegions() || next.Index() != s.Index() {
		t.Errorf("WithMembers changed more than the members")
	}
	if d := cmp.Diff(f.State().Members(), s.Members()); d != "" {
		t.Errorf("WithMembers changed the original State's members:\n%s", d)
	}
	// The result is a state Restore accepts.
	b, err := f.Encode(next)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fsm.New(rootkmstest.GenesisID, kcv).Decode(b); err != nil {
		t.Errorf("Decode(Encode(WithMembers)) = %v", err)
	}
	for name, ms := range map[string][]fsm.Member{
		"no address": {{ID: "n1"}},
		"no id":      {{APIAddress: "h:1"}},
		"twice":      {{ID: "n1", APIAddress: "h:1"}, {ID: "n1", APIAddress: "h:2"}},
	} {
		if _, err := s.WithMembers(ms); !errors.Is(err, fsm.ErrInvalidCommand) {
			t.Errorf("WithMembers(%s) = %v, want ErrInvalidCommand", name, err)
		}
	}
}
