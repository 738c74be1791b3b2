package fsm_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkmstest"
)

// FuzzApply applies arbitrary bytes as a LogCommand entry to an FSM holding
// euSetup. Apply must panic exactly on the entries of a newer binary (format
// above 1, or no known operation but unknown fields), with the documented
// error; otherwise it refuses without touching the State, or publishes a State
// that keeps every invariant and survives a snapshot round trip.
func FuzzApply(f *testing.F) {
	for _, cmd := range append(euSetup(),
		rootkmstest.AddVersion("eu", 6, rootkmstest.Wrapped("eu", 6), kcv, true, at(100)),
		rootkmstest.SetStatus("eu", 5, primary, at(100)),
		rootkmstest.SetStatus("eu", 3, destroyed, at(100)),
		rootkmstest.DeregisterMember("node-1", at(100)),
	) {
		f.Add(encode(f, cmd))
	}
	for _, cmd := range keysetSeeds() {
		f.Add(encode(f, cmd))
	}
	f.Add(encode(f, putRollout(newRollout("r", euUS, true, 1, ctlA), 0, at(100))))
	noOp := &statev1.Command{FormatVersion: 1, Time: timestamppb.New(at(100))}
	f.Add(withUnknownField(f, noOp))
	f.Add(encode(f, modify(noOp, func(c *statev1.Command) { c.FormatVersion = 2 })))
	f.Add([]byte{})
	f.Add([]byte{0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		// The oracle: what the bytes say about their version and operation.
		var cmd statev1.Command
		decodes := proto.Unmarshal(data, &cmd) == nil
		newer := decodes && (cmd.GetFormatVersion() > 1 ||
			cmd.GetFormatVersion() == 1 && cmd.GetOp() == nil && len(cmd.ProtoReflect().GetUnknown()) > 0)

		fsmv := setupFSM(t)
		before, index := fsmv.State(), fsmv.AppliedIndex()
		var out any
		p := catchPanic(func() { out = applyBytes(fsmv, data) })
		if newer {
			err, ok := p.(error)
			if !ok || !errors.Is(err, fsm.ErrUnsupportedCommand) || !strings.Contains(err.Error(), "upgrade it before it applies this log") {
				t.Fatalf("Apply(%x) (a newer command) panicked with %v, want the %v panic", data, p, fsm.ErrUnsupportedCommand)
			}
			if fsmv.State() != before || fsmv.AppliedIndex() != index {
				t.Fatalf("Apply(%x) panicked but changed the FSM", data)
			}
			return
		}
		if p != nil {
			t.Fatalf("Apply(%x) panicked with %v, want no panic", data, p)
		}
		res := out.(*fsm.Result)
		if res.Err != nil {
			if fsmv.State() != before {
				t.Fatalf("Apply(%x) = %v but published a new State", data, res.Err)
			}
			return
		}
		if !decodes {
			t.Fatalf("Apply(%x) accepted bytes that do not decode", data)
		}
		if err := rootkmstest.CheckInvariants(fsmv.State(), kcv); err != nil {
			t.Fatalf("Apply(%x): CheckInvariants = %v", data, err)
		}
		b := rootkmstest.SnapshotBytes(t, fsmv)
		g := rootkmstest.NewFSM()
		if err := restoreBytes(g, b); err != nil {
			t.Fatalf("Apply(%x): Restore(Persist()) = %v", data, err)
		}
		if got := rootkmstest.SnapshotBytes(t, g); !bytes.Equal(got, b) {
			t.Fatalf("Apply(%x): snapshot round trip = %x, want %x", data, got, b)
		}
	})
}

// FuzzRestore restores arbitrary bytes. Restore must not panic; it may succeed
// only on a snapshot of this lineage and format whose state keeps every
// invariant, and then persist it to bytes that restore to the same bytes.
func FuzzRestore(f *testing.F) {
	f.Add(rootkmstest.SnapshotBytes(f, setupFSM(f)))
	f.Add(rootkmstest.SnapshotBytes(f, rootkmstest.NewFSM()))
	f.Add(rootkmstest.SnapshotBytes(f, bigFSM(f, 3)))
	withKeysets, _ := keysetFSM(f)
	f.Add(rootkmstest.SnapshotBytes(f, withKeysets))
	other := fsm.New("other-genesis", kcv)
	f.Add(rootkmstest.SnapshotBytes(f, other))
	f.Add([]byte{})
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, data []byte) {
		fsmv := setupFSM(t)
		before := fsmv.State()
		var err error
		if p := catchPanic(func() { err = restoreBytes(fsmv, data) }); p != nil {
			t.Fatalf("Restore(%x) panicked: %v", data, p)
		}
		if err != nil {
			if fsmv.State() != before {
				t.Fatalf("Restore(%x) = %v but changed the State", data, err)
			}
			return
		}
		var snap statev1.Snapshot
		if uerr := proto.Unmarshal(data, &snap); uerr != nil || snap.GetFormatVersion() != 1 ||
			snap.GetGenesisId() != rootkmstest.GenesisID || !bytes.Equal(snap.GetRmkKcv(), kcv) {
			t.Fatalf("Restore(%x) accepted a snapshot that is not format 1 of this lineage (%v)", data, uerr)
		}
		if err := rootkmstest.CheckInvariants(fsmv.State(), kcv); err != nil {
			t.Fatalf("Restore(%x): CheckInvariants = %v", data, err)
		}
		if got, want := len(fsmv.State().Regions()), len(snap.GetRegions()); got != want {
			t.Fatalf("Restore(%x) holds %d regions, the snapshot %d", data, got, want)
		}
		b := rootkmstest.SnapshotBytes(t, fsmv)
		g := rootkmstest.NewFSM()
		if err := restoreBytes(g, b); err != nil {
			t.Fatalf("Restore(Persist(Restore(%x))) = %v", data, err)
		}
		if got := rootkmstest.SnapshotBytes(t, g); !bytes.Equal(got, b) {
			t.Fatalf("Restore(%x): round trip = %x, want %x", data, got, b)
		}
	})
}
