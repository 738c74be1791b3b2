package fsm_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkmstest"
)

const (
	ctlA       = "spiffe://cairn.test/regionctl/global/regionctl#a"
	ctlB       = "spiffe://cairn.test/regionctl/global/regionctl#b"
	bodyFormat = "cairn.rollout.v1+json"
)

// newRollout returns a rollout record as a controller writes it.
func newRollout(id string, regions []string, inFlight bool, epoch uint64, owner string) *statev1.RolloutRecord {
	return &statev1.RolloutRecord{Id: id, Regions: regions, InFlight: inFlight, Epoch: epoch, Owner: owner,
		Reason: "bundle 42", BodyFormat: bodyFormat, Body: []byte(`{"stage":"canary"}`)}
}

// putRollout returns a put_rollout command of r against revision rev.
func putRollout(r *statev1.RolloutRecord, rev uint64, at time.Time) *statev1.Command {
	c := keysetCommand(at)
	c.Op = &statev1.Command_PutRollout{PutRollout: &statev1.PutRolloutCommand{Rollout: r, ExpectedRevision: rev}}
	return c
}

// rolloutOf returns the state's rollout id, failing t if there is none.
func rolloutOf(t testing.TB, f *fsm.FSM, id string) *statev1.RolloutRecord {
	t.Helper()
	r, ok := f.State().Rollout(id)
	if !ok {
		t.Fatalf("Rollout(%q) = _, false, want the record", id)
	}
	return r
}

// edited returns a copy of r changed by f.
func edited(r *statev1.RolloutRecord, f func(*statev1.RolloutRecord)) *statev1.RolloutRecord {
	c := proto.CloneOf(r)
	f(c)
	return c
}

func TestPutRolloutCreate(t *testing.T) {
	f := setupFSM(t)
	in := newRollout("r1", euUS, true, 1, ctlA)
	// Proposer revision and times are not taken.
	in.Revision, in.CreatedAt, in.UpdatedAt = 9, ts(at(1)), ts(at(2))
	res := apply(t, f, withRequest(putRollout(in, 0, at(100)), alice, "put-1"))
	if res.Err != nil {
		t.Fatalf("Apply(put_rollout create).Err = %v, want nil", res.Err)
	}
	want := &statev1.RolloutRecord{Id: "r1", Regions: euUS, InFlight: true, Epoch: 1, Owner: ctlA, Revision: 1,
		CreatedAt: ts(at(100)), UpdatedAt: ts(at(100)), StartedBy: alice, Reason: "bundle 42", BodyFormat: bodyFormat, Body: in.GetBody()}
	if diff := cmp.Diff(want, res.Rollout, protocmp.Transform()); diff != "" {
		t.Errorf("Result.Rollout mismatch (-want +got):\n%s", diff)
	}
	if got := rolloutOf(t, f, "r1"); got != res.Rollout {
		t.Errorf("Rollout(r1) = %p, want the Result's %p", got, res.Rollout)
	}
	if got := f.State().Latest(); !got.Equal(at(100)) {
		t.Errorf("Latest() = %v, want %v", got, at(100))
	}
	// A started_by given is kept.
	res = apply(t, f, putRollout(edited(newRollout("r2", []string{"us"}, false, 3, ctlB), func(r *statev1.RolloutRecord) { r.StartedBy = bob }), 0, at(110)))
	if res.Err != nil || res.Rollout.GetStartedBy() != bob || res.Rollout.GetEpoch() != 3 {
		t.Errorf("Apply(put_rollout with started_by) = %+v, want started_by %q, epoch 3", res, bob)
	}
	if ids := rolloutIDs(f.State().Rollouts()); !cmp.Equal(ids, []string{"r1", "r2"}) {
		t.Errorf("Rollouts() = %v, want [r1 r2]", ids)
	}
}

func rolloutIDs(rs []*statev1.RolloutRecord) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.GetId())
	}
	return out
}

func TestPutRolloutUpdate(t *testing.T) {
	f := setupFSM(t)
	mustApply(t, f, putRollout(newRollout("r1", euUS, true, 1, ctlA), 0, at(100)))
	// Immutable fields left unset mean unchanged.
	upd := &statev1.RolloutRecord{Id: "r1", InFlight: true, Epoch: 1, Owner: ctlA, BodyFormat: bodyFormat, Body: []byte(`{"stage":"rest"}`)}
	res := apply(t, f, putRollout(upd, 1, at(200)))
	if res.Err != nil {
		t.Fatalf("Apply(update).Err = %v", res.Err)
	}
	want := &statev1.RolloutRecord{Id: "r1", Regions: euUS, InFlight: true, Epoch: 1, Owner: ctlA, Revision: 2,
		CreatedAt: ts(at(100)), UpdatedAt: ts(at(200)), Reason: "bundle 42", BodyFormat: bodyFormat, Body: upd.GetBody()}
	if diff := cmp.Diff(want, res.Rollout, protocmp.Transform()); diff != "" {
		t.Errorf("after update (-want +got):\n%s", diff)
	}
	// The full record read back, changed and written: accepted.
	back := edited(res.Rollout, func(r *statev1.RolloutRecord) { r.InFlight = false; r.Body = []byte(`{"stage":"done"}`) })
	res = apply(t, f, putRollout(back, 2, at(300)))
	if res.Err != nil || res.Rollout.GetRevision() != 3 || res.Rollout.GetInFlight() || !res.Rollout.GetUpdatedAt().AsTime().Equal(at(300)) {
		t.Fatalf("Apply(finish) = %+v, want revision 3, finished, updated at 300", res)
	}
	// A finished rollout may still be written (staying finished).
	res = apply(t, f, putRollout(edited(res.Rollout, func(r *statev1.RolloutRecord) { r.Body = []byte(`{"note":"x"}`) }), 3, at(400)))
	if res.Err != nil || res.Rollout.GetRevision() != 4 {
		t.Errorf("Apply(write finished) = %+v, want revision 4", res)
	}
}

func TestPutRolloutRefuses(t *testing.T) {
	base := func() *statev1.RolloutRecord { return newRollout("r1", euUS, true, 2, ctlA) }
	// Each case runs on an FSM holding r1 (in flight, eu and us, epoch 2,
	// revision 1) and f1 (finished, us, epoch 1, revision 2).
	tests := []struct {
		name string
		cmd  *statev1.Command
		want error
	}{
		{"create: invalid ID", putRollout(edited(base(), func(r *statev1.RolloutRecord) { r.Id = "Bad" }), 0, at(500)), fsm.ErrInvalidCommand},
		{"create: ID starting with a dot", putRollout(edited(base(), func(r *statev1.RolloutRecord) { r.Id = ".x" }), 0, at(500)), fsm.ErrInvalidCommand},
		{"create: ID too long", putRollout(edited(base(), func(r *statev1.RolloutRecord) { r.Id = strings.Repeat("a", 64) }), 0, at(500)), fsm.ErrInvalidCommand},
		{"create: no rollout", putRollout(nil, 0, at(500)), fsm.ErrInvalidCommand},
		{"create: exists", putRollout(base(), 0, at(500)), fsm.ErrRolloutExists},
		{"create: no regions", putRollout(newRollout("r2", nil, false, 1, ctlA), 0, at(500)), fsm.ErrInvalidCommand},
		{"create: regions not sorted", putRollout(newRollout("r2", []string{"us", "eu"}, false, 1, ctlA), 0, at(500)), fsm.ErrInvalidCommand},
		{"create: region twice", putRollout(newRollout("r2", []string{"us", "us"}, false, 1, ctlA), 0, at(500)), fsm.ErrInvalidCommand},
		{"create: invalid region", putRollout(newRollout("r2", []string{"US"}, false, 1, ctlA), 0, at(500)), fsm.ErrInvalidCommand},
		{"create: unknown region", putRollout(newRollout("r2", []string{"ap"}, false, 1, ctlA), 0, at(500)), fsm.ErrNoRegion},
		{"create: epoch 0", putRollout(newRollout("r2", []string{"us"}, false, 0, ctlA), 0, at(500)), fsm.ErrInvalidCommand},
		{"create: no owner", putRollout(newRollout("r2", []string{"us"}, false, 1, ""), 0, at(500)), fsm.ErrInvalidCommand},
		{"create: no body_format", putRollout(edited(newRollout("r2", []string{"us"}, false, 1, ctlA), func(r *statev1.RolloutRecord) { r.BodyFormat = "" }), 0, at(500)), fsm.ErrInvalidCommand},
		{"create: body too large", putRollout(edited(newRollout("r2", []string{"us"}, false, 1, ctlA), func(r *statev1.RolloutRecord) { r.Body = make([]byte, fsm.MaxRolloutBody+1) }), 0, at(500)), fsm.ErrInvalidCommand},
		{"create: reason too long", putRollout(edited(newRollout("r2", []string{"us"}, false, 1, ctlA), func(r *statev1.RolloutRecord) {
			r.Reason = strings.Repeat("x", fsm.MaxRolloutField+1)
		}), 0, at(500)), fsm.ErrInvalidCommand},
		{"create: region in flight elsewhere", putRollout(newRollout("r2", []string{"us"}, true, 1, ctlB), 0, at(500)), fsm.ErrRegionBusy},
		{"update: no rollout", putRollout(newRollout("r2", []string{"us"}, true, 1, ctlA), 1, at(500)), fsm.ErrNoRollout},
		{"update: stale revision", putRollout(base(), 2, at(500)), fsm.ErrStaleRevision},
		{"update: stale epoch", putRollout(edited(base(), func(r *statev1.RolloutRecord) { r.Epoch = 1 }), 1, at(500)), fsm.ErrStaleEpoch},
		{"update: other owner at the same epoch", putRollout(edited(base(), func(r *statev1.RolloutRecord) { r.Owner = ctlB }), 1, at(500)), fsm.ErrStaleEpoch},
		{"update: regions change", putRollout(edited(base(), func(r *statev1.RolloutRecord) { r.Regions = []string{"eu"} }), 1, at(500)), fsm.ErrInvalidCommand},
		{"update: started_by change", putRollout(edited(base(), func(r *statev1.RolloutRecord) { r.StartedBy = bob }), 1, at(500)), fsm.ErrInvalidCommand},
		{"update: reason change", putRollout(edited(base(), func(r *statev1.RolloutRecord) { r.Reason = "other" }), 1, at(500)), fsm.ErrInvalidCommand},
		{"update: created_at change", putRollout(edited(base(), func(r *statev1.RolloutRecord) { r.CreatedAt = ts(at(1)) }), 1, at(500)), fsm.ErrInvalidCommand},
		{"update: epoch 0", putRollout(edited(base(), func(r *statev1.RolloutRecord) { r.Epoch = 0 }), 1, at(500)), fsm.ErrStaleEpoch},
		{"update: no body_format", putRollout(edited(base(), func(r *statev1.RolloutRecord) { r.BodyFormat = "" }), 1, at(500)), fsm.ErrInvalidCommand},
		// A rollback of f1 while r1 holds us: refused as a create would be.
		{"update: finished back in flight, its region in flight elsewhere", putRollout(newRollout("f1", []string{"us"}, true, 1, ctlA), 2, at(500)), fsm.ErrRegionBusy},
		{"update: finished back in flight at a takeover, its region in flight elsewhere", putRollout(newRollout("f1", []string{"us"}, true, 2, ctlB), 2, at(500)), fsm.ErrRegionBusy},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := setupFSM(t)
			mustApply(t, f,
				putRollout(newRollout("f1", []string{"us"}, true, 1, ctlA), 0, at(100)),
				putRollout(newRollout("f1", []string{"us"}, false, 1, ctlA), 1, at(110)),
				putRollout(base(), 0, at(120)))
			before, index := f.State(), f.AppliedIndex()
			res := apply(t, f, withRequest(tt.cmd, alice, "refused"))
			if !errors.Is(res.Err, tt.want) {
				t.Fatalf("Apply(%s).Err = %v, want %v", tt.name, res.Err, tt.want)
			}
			if res.Rollout != nil || f.State() != before || f.AppliedIndex() != index+1 {
				t.Errorf("refused Apply(%s) = %+v, State changed: %t", tt.name, res, f.State() != before)
			}
			if _, ok := f.State().Request(alice, "refused"); ok {
				t.Errorf("refused Apply(%s) was remembered", tt.name)
			}
		})
	}
}

// TestRolloutRegionExclusive: a region has at most one rollout in flight;
// another may start there once the first finishes.
func TestRolloutRegionExclusive(t *testing.T) {
	f := setupFSM(t)
	mustApply(t, f, putRollout(newRollout("first", []string{"eu"}, true, 1, ctlA), 0, at(100)))
	res := apply(t, f, putRollout(newRollout("second", euUS, true, 1, ctlB), 0, at(110)))
	if !errors.Is(res.Err, fsm.ErrRegionBusy) || !strings.Contains(res.Err.Error(), `"first"`) || !strings.Contains(res.Err.Error(), `"eu"`) {
		t.Fatalf("second rollout of eu = %v, want %v naming rollout first and region eu", res.Err, fsm.ErrRegionBusy)
	}
	// Not in flight, it does not hold the region.
	mustApply(t, f, putRollout(newRollout("planned", euUS, false, 1, ctlB), 0, at(115)))
	// Another region is free.
	mustApply(t, f, putRollout(newRollout("other", []string{"us"}, true, 1, ctlB), 0, at(120)))
	// The first finishes: eu is free again.
	first := rolloutOf(t, f, "first")
	mustApply(t, f, putRollout(edited(first, func(r *statev1.RolloutRecord) { r.InFlight = false }), first.GetRevision(), at(130)))
	res = apply(t, f, putRollout(newRollout("second", []string{"eu"}, true, 1, ctlB), 0, at(140)))
	if res.Err != nil {
		t.Fatalf("second rollout of eu after the first finished = %v, want accepted", res.Err)
	}
	// An update of a rollout in flight does not collide with itself.
	second := res.Rollout
	if res := apply(t, f, putRollout(second, second.GetRevision(), at(150))); res.Err != nil {
		t.Errorf("update of second = %v, want accepted", res.Err)
	}
}

// TestRolloutFinishedBackInFlight: a finished (completed or aborted)
// rollout goes back in flight to be rolled back when none of its regions is
// held by another rollout in flight, and then holds them again; it is
// refused (ErrRegionBusy) while one is; a finished rollout that was evicted
// cannot be rolled back (ErrNoRollout, NotFound at the API).
func TestRolloutFinishedBackInFlight(t *testing.T) {
	tests := []struct {
		name  string
		other *statev1.RolloutRecord // created before the rollback, if not nil
		evict bool                   // evict done before the rollback
		want  error
	}{
		{name: "regions free", want: nil},
		{name: "another region in flight", other: newRollout("other", []string{"ap"}, true, 1, ctlB), want: nil},
		{name: "another finished rollout of the regions", other: newRollout("other", euUS, false, 1, ctlB), want: nil},
		{name: "one of its regions in flight elsewhere", other: newRollout("other", []string{"us"}, true, 1, ctlB), want: fsm.ErrRegionBusy},
		{name: "all its regions in flight elsewhere", other: newRollout("other", euUS, true, 1, ctlB), want: fsm.ErrRegionBusy},
		{name: "evicted", evict: true, want: fsm.ErrNoRollout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := setupFSM(t)
			mustApply(t, f, rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), kcv, at(80)))
			mustApply(t, f,
				putRollout(newRollout("done", euUS, true, 1, ctlA), 0, at(100)),
				putRollout(newRollout("done", euUS, false, 1, ctlA), 1, at(110)))
			if tt.other != nil {
				mustApply(t, f, putRollout(tt.other, 0, at(120)))
			}
			if tt.evict {
				for i := range fsm.MaxFinishedRollouts {
					mustApply(t, f, putRollout(newRollout(fmt.Sprintf("later-%03d", i), euUS, false, 1, ctlB), 0, at(200+i)))
				}
				if _, ok := f.State().Rollout("done"); ok {
					t.Fatalf("done was not evicted by %d later finished rollouts", fsm.MaxFinishedRollouts)
				}
			}
			// regionctl rollout rollback: a takeover at a new epoch, then
			// the record rolling back (in flight).
			back := newRollout("done", euUS, true, 2, ctlB)
			before, index := f.State(), f.AppliedIndex()
			res := apply(t, f, putRollout(back, 2, at(1000)))
			if !errors.Is(res.Err, tt.want) || (tt.want == nil) != (res.Err == nil) {
				t.Fatalf("Apply(done back in flight) = %v, want %v", res.Err, tt.want)
			}
			if tt.want != nil {
				if res.Rollout != nil || f.State() != before || f.AppliedIndex() != index+1 {
					t.Errorf("refused Apply = %+v, State changed: %t", res, f.State() != before)
				}
				return
			}
			got := rolloutOf(t, f, "done")
			if !got.GetInFlight() || got.GetRevision() != 3 || got.GetEpoch() != 2 || got.GetOwner() != ctlB || !got.GetCreatedAt().AsTime().Equal(at(100)) {
				t.Fatalf("done after the rollback write = %v, want in flight, revision 3, epoch 2 by %q, created at 100", got, ctlB)
			}
			// In flight again, it holds its regions: a new rollout of us is
			// refused until it finishes again.
			if res := apply(t, f, putRollout(newRollout("next", []string{"us"}, true, 1, ctlA), 0, at(1010))); !errors.Is(res.Err, fsm.ErrRegionBusy) || !strings.Contains(res.Err.Error(), `"done"`) {
				t.Errorf("a new rollout of us while done rolls back = %v, want %v naming done", res.Err, fsm.ErrRegionBusy)
			}
			mustApply(t, f, putRollout(edited(got, func(r *statev1.RolloutRecord) { r.InFlight = false }), 3, at(1020)))
			mustApply(t, f, putRollout(newRollout("next", []string{"us"}, true, 1, ctlA), 0, at(1030)))
		})
	}
}

// TestRolloutFencing: a stale epoch is refused, a takeover with a higher
// epoch is accepted (and may change the owner), and then the old epoch is
// refused.
func TestRolloutFencing(t *testing.T) {
	f := setupFSM(t)
	mustApply(t, f, putRollout(newRollout("r", euUS, true, 5, ctlA), 0, at(100)))
	// A's own write at its epoch.
	a := rolloutOf(t, f, "r")
	mustApply(t, f, putRollout(edited(a, func(r *statev1.RolloutRecord) { r.Body = []byte("a1") }), a.GetRevision(), at(110)))
	// A lower epoch than the record's, even at the current revision.
	cur := rolloutOf(t, f, "r")
	if res := apply(t, f, putRollout(edited(cur, func(r *statev1.RolloutRecord) { r.Epoch = 4 }), cur.GetRevision(), at(120))); !errors.Is(res.Err, fsm.ErrStaleEpoch) {
		t.Fatalf("write at epoch 4 = %v, want %v", res.Err, fsm.ErrStaleEpoch)
	}
	// B takes over with epoch 6.
	res := apply(t, f, putRollout(edited(cur, func(r *statev1.RolloutRecord) { r.Epoch, r.Owner, r.Body = 6, ctlB, []byte("b1") }), cur.GetRevision(), at(130)))
	if res.Err != nil || res.Rollout.GetOwner() != ctlB || res.Rollout.GetEpoch() != 6 {
		t.Fatalf("takeover at epoch 6 = %+v, want owner %q, epoch 6", res, ctlB)
	}
	// A, not knowing, writes at epoch 5 against the revision it last read,
	// and again against the current one: refused both times.
	if res := apply(t, f, putRollout(edited(cur, func(r *statev1.RolloutRecord) { r.Body = []byte("a2") }), cur.GetRevision(), at(140))); !errors.Is(res.Err, fsm.ErrStaleRevision) {
		t.Errorf("A's write against an old revision = %v, want %v", res.Err, fsm.ErrStaleRevision)
	}
	b := rolloutOf(t, f, "r")
	if res := apply(t, f, putRollout(edited(b, func(r *statev1.RolloutRecord) { r.Epoch, r.Owner, r.Body = 5, ctlA, []byte("a2") }), b.GetRevision(), at(150))); !errors.Is(res.Err, fsm.ErrStaleEpoch) {
		t.Errorf("A's write at epoch 5 after the takeover = %v, want %v", res.Err, fsm.ErrStaleEpoch)
	}
	// B goes on at its epoch.
	if res := apply(t, f, putRollout(edited(b, func(r *statev1.RolloutRecord) { r.Body = []byte("b2") }), b.GetRevision(), at(160))); res.Err != nil {
		t.Errorf("B's write at epoch 6 = %v, want accepted", res.Err)
	}
	if got := rolloutOf(t, f, "r"); string(got.GetBody()) != "b2" || got.GetEpoch() != 6 {
		t.Errorf("record = %v, want B's body b2 at epoch 6", got)
	}
}

// TestRolloutEviction: every rollout in flight is kept, and at most
// MaxFinishedRollouts finished ones, the least recently updated evicted
// first (ties by ID), never the one just written.
func TestRolloutEviction(t *testing.T) {
	f := setupFSM(t)
	mustApply(t, f, putRollout(newRollout("live", []string{"eu"}, true, 1, ctlA), 0, at(100)))
	n := fsm.MaxFinishedRollouts + 6
	for i := range n {
		// Two per second: equal times are ordered by ID.
		mustApply(t, f, putRollout(newRollout(fmt.Sprintf("done-%03d", i), euUS, false, 1, ctlA), 0, at(200+i/2)))
	}
	rs := f.State().Rollouts()
	if got, want := len(rs), fsm.MaxFinishedRollouts+1; got != want {
		t.Fatalf("len(Rollouts()) = %d, want %d", got, want)
	}
	if _, ok := f.State().Rollout("live"); !ok {
		t.Errorf("the rollout in flight was evicted")
	}
	for i := range n {
		id := fmt.Sprintf("done-%03d", i)
		if _, ok := f.State().Rollout(id); ok != (i >= 6) {
			t.Errorf("Rollout(%s) kept = %t, want %t", id, ok, i >= 6)
		}
	}
	// An evicted ID may be used again.
	if res := apply(t, f, putRollout(newRollout("done-000", []string{"us"}, true, 1, ctlA), 0, at(1000))); res.Err != nil {
		t.Errorf("reusing an evicted ID = %v, want accepted", res.Err)
	}

	// The one just written is kept even when it is the oldest by (time, ID).
	g := setupFSM(t)
	for i := range fsm.MaxFinishedRollouts {
		mustApply(t, g, putRollout(newRollout(fmt.Sprintf("b-%03d", i), euUS, false, 1, ctlA), 0, at(100)))
	}
	mustApply(t, g, putRollout(newRollout("a", euUS, false, 1, ctlA), 0, at(100)))
	if _, ok := g.State().Rollout("a"); !ok {
		t.Errorf("the rollout just written was evicted")
	}
	if _, ok := g.State().Rollout("b-000"); ok {
		t.Errorf("b-000, the oldest other, was not evicted")
	}
	if got := len(g.State().Rollouts()); got != fsm.MaxFinishedRollouts {
		t.Errorf("len(Rollouts()) = %d, want %d", got, fsm.MaxFinishedRollouts)
	}
}

// TestRolloutBodiesBound: finished rollouts are evicted to keep the bodies
// within MaxRolloutBodies; rollouts in flight that alone would exceed it are
// refused.
func TestRolloutBodiesBound(t *testing.T) {
	f := setupFSM(t)
	big := func(r *statev1.RolloutRecord) { r.Body = make([]byte, fsm.MaxRolloutBody) }
	per := fsm.MaxRolloutBodies / fsm.MaxRolloutBody
	for i := range per + 2 {
		mustApply(t, f, putRollout(edited(newRollout(fmt.Sprintf("big-%02d", i), []string{"us"}, false, 1, ctlA), big), 0, at(100+i)))
	}
	if got := len(f.State().Rollouts()); got != per {
		t.Errorf("finished 1 MiB rollouts kept = %d, want %d", got, per)
	}
	if _, ok := f.State().Rollout("big-00"); ok {
		t.Errorf("big-00, the oldest, was not evicted")
	}
	// Rollouts in flight are never evicted: one region each.
	g := setupFSM(t)
	for i := range per + 1 {
		region := fmt.Sprintf("r%02d", i)
		mustApply(t, g, rootkmstest.CreateRegion(region, rootkmstest.Wrapped(region, 1), kcv, at(100)))
	}
	for i := range per {
		mustApply(t, g, putRollout(edited(newRollout(fmt.Sprintf("big-%02d", i), []string{fmt.Sprintf("r%02d", i)}, true, 1, ctlA), big), 0, at(200)))
	}
	res := apply(t, g, putRollout(edited(newRollout("one-more", []string{fmt.Sprintf("r%02d", per)}, true, 1, ctlA), big), 0, at(300)))
	if !errors.Is(res.Err, fsm.ErrInvalidCommand) {
		t.Errorf("a rollout in flight beyond the bodies bound = %v, want %v", res.Err, fsm.ErrInvalidCommand)
	}
}

func TestRolloutRequests(t *testing.T) {
	f := setupFSM(t)
	create := withRequest(putRollout(newRollout("r", euUS, true, 1, ctlA), 0, at(100)), alice, "put-r")
	mustApply(t, f, create)
	rec, ok := f.State().Request(alice, "put-r")
	if want := (fsm.RequestRecord{Identity: alice, RequestID: "put-r", Index: f.AppliedIndex(), Subject: "rollout/r", Operation: "put_rollout"}); !ok || rec != want {
		t.Errorf("Request(put-r) = %+v, %v, want %+v", rec, ok, want)
	}
	// Changed since: the retry is answered with the record as it is now.
	cur := rolloutOf(t, f, "r")
	mustApply(t, f, putRollout(edited(cur, func(r *statev1.RolloutRecord) { r.Body = []byte("next") }), 1, at(110)))
	before := f.State()
	res := apply(t, f, create)
	if res.Err != nil || !res.Duplicate || res.Rollout != rolloutOf(t, f, "r") || f.State() != before {
		t.Errorf("retry = %+v, want Duplicate with the current record and no change", res)
	}
	// The request ID reused for another rollout: refused.
	if res := apply(t, f, withRequest(putRollout(newRollout("other", []string{"us"}, false, 1, ctlA), 0, at(120)), alice, "put-r")); !errors.Is(res.Err, fsm.ErrInvalidCommand) {
		t.Errorf("reused request ID = %v, want %v", res.Err, fsm.ErrInvalidCommand)
	}
}

// rolloutFSM returns an FSM holding euSetup, a keyset and rollouts in every
// kind of state, with remembered requests.
func rolloutFSM(t testing.TB) *fsm.FSM {
	t.Helper()
	x := newKeysetFixture(t)
	f := x.f
	mustApply(t, f,
		withRequest(putRollout(newRollout("b-live", []string{"eu"}, true, 1, ctlA), 0, at(200)), alice, "b"),
		putRollout(newRollout("a-done", []string{"us"}, true, 1, ctlA), 0, at(210)),
	)
	// a-done held us too: it must finish before c-live starts there.
	a := rolloutOf(t, f, "a-done")
	mustApply(t, f,
		putRollout(edited(a, func(r *statev1.RolloutRecord) { r.InFlight = false; r.Epoch, r.Owner = 2, ctlB }), 1, at(220)),
		withRequest(putRollout(newRollout("c-live", []string{"us"}, true, 7, ctlB), 0, at(230)), bob, "c"),
		putRollout(newRollout("d-planned", euUS, false, 1, ctlA), 0, at(240)),
	)
	return f
}

func TestRolloutSnapshotRoundTrip(t *testing.T) {
	src := rolloutFSM(t)
	b := rootkmstest.SnapshotBytes(t, src)
	snap := decodeSnapshot(t, b)
	if ids := rolloutIDs(snap.GetRollouts()); !cmp.Equal(ids, []string{"a-done", "b-live", "c-live", "d-planned"}) {
		t.Fatalf("snapshot rollouts = %v, want sorted a-done b-live c-live d-planned", ids)
	}
	dst := rootkmstest.NewFSM()
	if err := restoreBytes(dst, b); err != nil {
		t.Fatalf("Restore() = %v", err)
	}
	if diff := cmp.Diff(src.State().Rollouts(), dst.State().Rollouts(), protocmp.Transform()); diff != "" {
		t.Errorf("restored rollouts (-want +got):\n%s", diff)
	}
	if !dst.State().Latest().Equal(src.State().Latest()) {
		t.Errorf("restored Latest() = %v, want %v", dst.State().Latest(), src.State().Latest())
	}
	if got := rootkmstest.SnapshotBytes(t, dst); !bytes.Equal(got, b) {
		t.Errorf("snapshot of the restored state differs from the original")
	}
	// The request table came along: a retry is a Duplicate with the record.
	res := apply(t, dst, withRequest(putRollout(newRollout("c-live", []string{"us"}, true, 7, ctlB), 0, at(300)), bob, "c"))
	if res.Err != nil || !res.Duplicate || res.Rollout == nil || res.Rollout.GetId() != "c-live" {
		t.Errorf("retry after Restore = %+v, want Duplicate with c-live", res)
	}
	// And region exclusivity: eu is held by b-live.
	if res := apply(t, dst, putRollout(newRollout("e", []string{"eu"}, true, 1, ctlA), 0, at(300))); !errors.Is(res.Err, fsm.ErrRegionBusy) {
		t.Errorf("rollout of eu after Restore = %v, want %v", res.Err, fsm.ErrRegionBusy)
	}
}

func TestRestoreRefusesRollouts(t *testing.T) {
	base := decodeSnapshot(t, rootkmstest.SnapshotBytes(t, rolloutFSM(t)))
	// Rollouts: a-done (finished), b-live (eu), c-live (us), d-planned.
	finished := func(s *statev1.Snapshot, n int) {
		for i := range n {
			r := edited(s.Rollouts[3], func(r *statev1.RolloutRecord) { r.Id = fmt.Sprintf("z-%03d", i) })
			s.Rollouts = append(s.Rollouts, r)
		}
	}
	tests := []struct {
		name   string
		mutate func(*statev1.Snapshot)
	}{
		{"not sorted", func(s *statev1.Snapshot) { s.Rollouts[0], s.Rollouts[1] = s.Rollouts[1], s.Rollouts[0] }},
		{"twice", func(s *statev1.Snapshot) { s.Rollouts = append(s.Rollouts, s.Rollouts[3]) }},
		{"invalid ID", func(s *statev1.Snapshot) { s.Rollouts[0].Id = "A" }},
		{"no regions", func(s *statev1.Snapshot) { s.Rollouts[0].Regions = nil }},
		{"regions not sorted", func(s *statev1.Snapshot) { s.Rollouts[0].Regions = []string{"us", "eu"} }},
		{"unknown region", func(s *statev1.Snapshot) { s.Rollouts[3].Regions = []string{"zz"} }},
		{"epoch 0", func(s *statev1.Snapshot) { s.Rollouts[0].Epoch = 0 }},
		{"revision 0", func(s *statev1.Snapshot) { s.Rollouts[0].Revision = 0 }},
		{"no owner", func(s *statev1.Snapshot) { s.Rollouts[0].Owner = "" }},
		{"no body_format", func(s *statev1.Snapshot) { s.Rollouts[0].BodyFormat = "" }},
		{"no created_at", func(s *statev1.Snapshot) { s.Rollouts[0].CreatedAt = nil }},
		{"no updated_at", func(s *statev1.Snapshot) { s.Rollouts[0].UpdatedAt = nil }},
		{"updated before created", func(s *statev1.Snapshot) { s.Rollouts[0].UpdatedAt = ts(at(1)) }},
		{"body too large", func(s *statev1.Snapshot) { s.Rollouts[0].Body = make([]byte, fsm.MaxRolloutBody+1) }},
		{"bodies too large", func(s *statev1.Snapshot) {
			finished(s, fsm.MaxRolloutBodies/fsm.MaxRolloutBody+1)
			for _, r := range s.Rollouts {
				r.Body = make([]byte, fsm.MaxRolloutBody)
			}
		}},
		{"two in flight in a region", func(s *statev1.Snapshot) { s.Rollouts[3].InFlight = true }},
		{"too many finished", func(s *statev1.Snapshot) { finished(s, fsm.MaxFinishedRollouts-1) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := proto.CloneOf(base)
			tt.mutate(s)
			f := rootkmstest.NewFSM()
			before := f.State()
			if err := restoreBytes(f, encodeSnapshot(t, s)); !errors.Is(err, fsm.ErrInvalidSnapshot) {
				t.Fatalf("Restore(%s) = %v, want %v", tt.name, err, fsm.ErrInvalidSnapshot)
			}
			if f.State() != before {
				t.Errorf("refused Restore(%s) changed the State", tt.name)
			}
		})
	}
	// The bound itself is accepted.
	s := proto.CloneOf(base)
	finished(s, fsm.MaxFinishedRollouts-2)
	if err := restoreBytes(rootkmstest.NewFSM(), encodeSnapshot(t, s)); err != nil {
		t.Errorf("Restore(%d finished) = %v, want nil", fsm.MaxFinishedRollouts, err)
	}
}

func encodeSnapshot(t testing.TB, s *statev1.Snapshot) []byte {
	t.Helper()
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(s)
	if err != nil {
		t.Fatalf("Marshal(snapshot) = %v", err)
	}
	return b
}

// rolloutGenerator proposes random put_rollout commands for the state it is
// shown: creates, updates, finishes and takeovers, with a share of stale
// revisions and epochs, regions in flight elsewhere, unknown regions and
// finished rollouts put back in flight, which Apply must refuse.
type rolloutGenerator struct {
	r   *rand.Rand
	now time.Time
	i   int
}

func (g *rolloutGenerator) next(s *fsm.State) *statev1.Command {
	g.i++
	g.now = g.now.Add(time.Duration(g.r.IntN(3)) * time.Second) // equal times too
	regionSets := [][]string{{"eu"}, {"us"}, euUS, {"eu", "zz"}}
	id := fmt.Sprintf("r%d", g.r.IntN(12))
	old, ok := s.Rollout(id)
	var cmd *statev1.Command
	if !ok || g.r.IntN(10) == 0 {
		rec := newRollout(id, regionSets[g.r.IntN(len(regionSets))], g.r.IntN(3) == 0, uint64(1+g.r.IntN(2)), ctlA)
		cmd = putRollout(rec, 0, g.now)
	} else {
		rec := proto.CloneOf(old)
		rec.Body = fmt.Appendf(nil, "step %d", g.i)
		switch g.r.IntN(8) {
		case 0, 1:
			rec.InFlight = false
		case 2:
			rec.Epoch, rec.Owner = rec.Epoch+1, ctlB
		case 3:
			rec.Epoch--
		case 4:
			rec.InFlight = true
		}
		rev := rec.GetRevision()
		if g.r.IntN(8) == 0 {
			rev--
		}
		cmd = putRollout(rec, rev, g.now)
	}
	if g.r.IntN(4) == 0 {
		cmd = withRequest(cmd, alice, fmt.Sprintf("q%d", g.r.IntN(20)))
	}
	return cmd
}

// TestRolloutDeterminism: replicas applying the same rollout commands, one
// of them restored from a snapshot midway, reach equal results, equal
// states (snapshot bytes) and equal Latest.
func TestRolloutDeterminism(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3} {
		gen := &rolloutGenerator{r: rand.New(rand.NewPCG(seed, 0x726f6c6c)), now: t0}
		src := setupFSM(t)
		var data [][]byte
		for range 300 {
			data = append(data, encode(t, gen.next(src.State())))
			applyBytes(src, data[len(data)-1])
		}
		run := func(f *fsm.FSM, from int) []*fsm.Result {
			var out []*fsm.Result
			base := setupFSM(t).AppliedIndex()
			for i := from; i < len(data); i++ {
				out = append(out, f.Apply(&raft.Log{Type: raft.LogCommand, Index: base + uint64(i) + 1, Data: data[i]}).(*fsm.Result))
			}
			return out
		}
		a, b := setupFSM(t), setupFSM(t)
		ra, rb := run(a, 0), run(b, 0)
		accepted := 0
		for i := range ra {
			if fmt.Sprint(ra[i].Err) != fmt.Sprint(rb[i].Err) || ra[i].Duplicate != rb[i].Duplicate || !proto.Equal(ra[i].Rollout, rb[i].Rollout) {
				t.Fatalf("seed %d entry %d: Apply() = %+v and %+v", seed, i, ra[i], rb[i])
			}
			if ra[i].Err == nil {
				accepted++
			}
		}
		if accepted < 50 || accepted > 280 {
			t.Errorf("seed %d: %d of %d accepted; the generator should make a mix", seed, accepted, len(ra))
		}
		final := rootkmstest.SnapshotBytes(t, a)
		if !bytes.Equal(final, rootkmstest.SnapshotBytes(t, b)) {
			t.Fatalf("seed %d: equal logs gave different snapshots", seed)
		}
		for _, k := range []int{1, 150, 299} {
			c := setupFSM(t)
			base := c.AppliedIndex()
			for i := range k {
				c.Apply(&raft.Log{Type: raft.LogCommand, Index: base + uint64(i) + 1, Data: data[i]})
			}
			g := rootkmstest.NewFSM()
			if err := restoreBytes(g, rootkmstest.SnapshotBytes(t, c)); err != nil {
				t.Fatalf("seed %d: Restore(after %d) = %v", seed, k, err)
			}
			rg := run(g, k)
			for i, res := range rg {
				if w := ra[k+i]; fmt.Sprint(res.Err) != fmt.Sprint(w.Err) || res.Duplicate != w.Duplicate || !proto.Equal(res.Rollout, w.Rollout) {
					t.Fatalf("seed %d: restored at %d, entry %d: Apply() = %+v, want %+v", seed, k, k+i, res, w)
				}
			}
			if !bytes.Equal(rootkmstest.SnapshotBytes(t, g), final) {
				t.Errorf("seed %d: restored at %d and replayed: snapshot differs", seed, k)
			}
			if !g.State().Latest().Equal(a.State().Latest()) {
				t.Errorf("seed %d: restored at %d: Latest() = %v, want %v", seed, k, g.State().Latest(), a.State().Latest())
			}
		}
	}
}
