package rollout_test

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/cairnkms/cairn/regionctl/rollout"
)

// walker drives a rollout the way adapters and operators would, with random
// refusals, failures, pauses, aborts, rollbacks, controller crashes and
// stale controllers, and checks the invariants that span transitions.
type walker struct {
	t       *testing.T
	rng     *rand.Rand
	rec     rollout.Record
	now     time.Time
	queue   []rollout.Action
	halted  bool // failed, rolling back, rolled back or aborted once
	manual  bool // an operator asked for a rollback
	history []string
}

func TestRandomWalk(t *testing.T) {
	fleet := map[string][]string{"us-east": {"u1", "u2", "u3"}, "eu-west": {"e1", "e2"}, "ap-south": {"a1"}, "sa-east": {"s1", "s2"}}
	ch := change("us-east", "eu-west", "ap-south", "sa-east")
	ch.Keysets = []rollout.KeysetScope{{Name: "k-us", Regions: []string{"us-east"}}, {Name: "k-all", Regions: []string{"us-east", "eu-west", "ap-south", "sa-east"}}}
	p, err := rollout.NewPlan(ch, fleet, rollout.Options{Regions: []string{"us-east", "eu-west", "ap-south", "sa-east"}, WaveSize: 2})
	if err != nil {
		t.Fatal(err)
	}
	outcomes := map[rollout.Phase]int{}
	for seed := range uint64(400) {
		w := &walker{t: t, rng: rand.New(rand.NewPCG(seed, 1)), rec: rollout.NewRecord("r", p, "ctl-1", 1, t0), now: t0}
		w.do(rollout.Started{Epoch: 1})
		for range 300 {
			if !w.move() {
				break
			}
		}
		outcomes[w.rec.Phase]++
		if t.Failed() {
			t.Fatalf("seed %d; history:\n%v", seed, w.history)
		}
	}
	// The walk must reach every ending, or it tests little.
	for _, ph := range []rollout.Phase{rollout.PhaseCompleted, rollout.PhaseFailed, rollout.PhaseRolledBack, rollout.PhaseAborted} {
		if outcomes[ph] == 0 {
			t.Errorf("no walk ended %s: %v", ph, outcomes)
		}
	}
	t.Logf("endings: %v", outcomes)
}

// move makes one random step; false when the rollout is over.
func (w *walker) move() bool {
	r := w.rng.IntN(100)
	switch {
	case r < 3:
		w.crash()
		return true
	case r < 5:
		w.do(rollout.Pause{Epoch: w.rec.Epoch, By: "op", Why: "look"})
		return true
	case r < 8 && w.rec.Paused:
		w.do(rollout.Resume{Epoch: w.rec.Epoch, By: "op"})
		return true
	case r < 9:
		w.do(rollout.Abort{Epoch: w.rec.Epoch, By: "op", Why: "stop"})
		return true
	case r < 10:
		w.do(rollout.RollbackRequested{Epoch: w.rec.Epoch, By: "op", Why: "undo"})
		return true
	case r < 12:
		// A fenced-off controller's event is refused, whatever it is.
		old := w.rec
		_, acts, err := rollout.Next(w.rec, rollout.Tick{Epoch: w.rec.Epoch - 1}, w.now)
		if !errors.Is(err, rollout.ErrStaleEpoch) || acts != nil {
			w.t.Errorf("stale Tick: err %v, actions %v", err, acts)
		}
		if !cmp.Equal(old, w.rec) {
			w.t.Errorf("stale event changed the record")
		}
		return true
	}
	if len(w.queue) == 0 {
		w.queue = rollout.Actions(w.rec) // the controller polls the record
	}
	if len(w.queue) == 0 {
		if w.rec.Paused {
			w.do(rollout.Resume{Epoch: w.rec.Epoch, By: "op"})
			return true
		}
		return !w.rec.Phase.Terminal()
	}
	i := w.rng.IntN(len(w.queue)) // adapters answer in any order
	a := w.queue[i]
	w.queue = slices.Delete(w.queue, i, i+1)
	e := w.rec.Epoch
	ok := func() bool { return w.rng.IntN(100) >= 4 }
	switch a := a.(type) {
	case rollout.DryRunAction:
		for _, s := range a.Servers {
			w.do(rollout.DryRunResult{Epoch: e, Server: s, OK: ok(), Reason: "refused", Serving: lastGoodRef(a.Region)})
		}
	case rollout.MeasureAction:
		w.do(rollout.Measured{Epoch: e, Stage: a.Stage, Metrics: rollout.Metrics{ErrorRate: 0.001, P99: 8 * time.Millisecond}})
	case rollout.ApplyAction:
		for _, s := range a.Servers {
			if ok() {
				w.do(rollout.Applied{Epoch: e, Server: s, Serial: a.Bundle.Serial, Previous: lastGoodRef(a.Region)})
			} else {
				w.do(rollout.ApplyFailed{Epoch: e, Server: s, Reason: "unavailable"})
			}
		}
	case rollout.WaitAction:
		if w.now.Before(a.Until) {
			w.now = a.Until
		}
		w.do(rollout.Tick{Epoch: e})
	case rollout.ProbeAction:
		g := rollout.GateResult{Epoch: e, Stage: a.Stage, After: rollout.Metrics{ErrorRate: 0.001, P99: 9 * time.Millisecond}}
		switch w.rng.IntN(20) {
		case 0:
			g.After.ErrorRate = 0.2
		case 1:
			g.Probes = []rollout.ProbeFailure{{Server: a.Servers[0], Keyset: "k-all", KeyID: 2, Reason: "bad"}}
		case 2:
			g.After.NotReady = a.Servers[:1]
		}
		w.do(g)
	case rollout.RollbackAction:
		for _, s := range a.Servers {
			if ok() {
				w.do(rollout.RolledBack{Epoch: e, Server: s, Serial: a.MinSerial})
			} else {
				w.do(rollout.RollbackFailed{Epoch: e, Server: s, Reason: "unavailable"})
			}
		}
	}
	return true
}

// crash is the controller dying: a new one reloads the record and takes
// over; the old one's queued work is lost.
func (w *walker) crash() {
	reloaded := reload(w.t, w.rec)
	want := rollout.Actions(reloaded)
	if diff := cmp.Diff(actionLines(rollout.Actions(w.rec)), actionLines(want)); diff != "" {
		w.t.Errorf("Actions differ after a reload:\n%s", diff)
	}
	before := w.rec
	w.rec = reloaded
	acts := w.do(rollout.TookOver{Epoch: w.rec.Epoch + 1, By: "ctl-new"})
	var work []rollout.Action
	for _, a := range acts {
		if _, ok := a.(rollout.ReportAction); !ok {
			work = append(work, a)
		}
	}
	if diff := cmp.Diff(actionLines(want), actionLines(work)); diff != "" {
		w.t.Errorf("TookOver's actions are not the record's outstanding work (-want +got):\n%s", diff)
	}
	if w.rec.Stage != before.Stage || w.rec.Phase != before.Phase {
		w.t.Errorf("TookOver moved the rollout from stage %d %s to stage %d %s", before.Stage, before.Phase, w.rec.Stage, w.rec.Phase)
	}
	w.queue = work
}

// do applies one event and checks what spans transitions.
func (w *walker) do(ev rollout.Event) []rollout.Action {
	t := w.t
	t.Helper()
	old := w.rec
	next, acts, err := rollout.Next(old, ev, w.now)
	w.history = append(w.history, fmtEvent(ev, err))
	if err != nil {
		if !errors.Is(err, rollout.ErrUnexpectedEvent) && !errors.Is(err, rollout.ErrStaleEpoch) {
			t.Errorf("Next(%T) = %v: not a refusal", ev, err)
		}
		return nil
	}
	if err := rollout.Check(next); err != nil {
		t.Errorf("Check after %T: %v", ev, err)
	}
	checkActions(t, next, acts)
	// Never skip a stage, never go back.
	switch {
	case next.Stage < old.Stage || next.Stage > old.Stage+1:
		t.Errorf("%T moved from stage %d to stage %d", ev, old.Stage+1, next.Stage+1)
	case next.Stage == old.Stage+1 && (next.Stages[old.Stage].Gate == nil || !next.Stages[old.Stage].Gate.Pass):
		t.Errorf("%T started stage %d before stage %d passed", ev, next.Stage+1, old.Stage+1)
	}
	if _, ok := ev.(rollout.RollbackRequested); ok {
		w.manual = true
	}
	if w.halted {
		if next.Stage != old.Stage {
			t.Errorf("%T moved a halted rollout to stage %d", ev, next.Stage+1)
		}
		switch next.Phase {
		case rollout.PhaseFailed, rollout.PhaseRollingBack, rollout.PhaseRolledBack, rollout.PhaseAborted:
		default:
			t.Errorf("%T revived a halted rollout: %s", ev, next.Phase)
		}
	}
	switch next.Phase {
	case rollout.PhaseFailed, rollout.PhaseRollingBack, rollout.PhaseRolledBack, rollout.PhaseAborted:
		w.halted = true
	}
	for _, a := range acts {
		switch a := a.(type) {
		case rollout.DryRunAction, rollout.MeasureAction, rollout.ApplyAction, rollout.ProbeAction:
			if w.halted || next.Phase == rollout.PhaseCompleted {
				t.Errorf("%T asked for %v after the rollout stopped", ev, a)
			}
		case rollout.RollbackAction:
			// Without an operator's request, only the failed stage rolls back.
			if !w.manual && a.Stage != next.Stage {
				t.Errorf("%T asked for %v while stage %d failed", ev, a, next.Stage+1)
			}
		case rollout.PublishAction:
			for _, k := range a.Keysets {
				i := slices.IndexFunc(next.Plan.Change.Keysets, func(ks rollout.KeysetScope) bool { return ks.Name == k })
				for _, region := range next.Plan.Change.Keysets[i].Regions {
					for s, sr := range next.Servers {
						if sr.Region == region && sr.Applied == 0 {
							t.Errorf("published %s before %s/%s applied", k, region, s)
						}
					}
				}
			}
		}
	}
	w.rec = next
	w.queue = append(w.queue, nonReports(acts)...)
	return acts
}

func nonReports(acts []rollout.Action) []rollout.Action {
	var out []rollout.Action
	for _, a := range acts {
		if _, ok := a.(rollout.ReportAction); !ok {
			out = append(out, a)
		}
	}
	return out
}

func fmtEvent(ev rollout.Event, err error) string {
	s := fmt.Sprintf("%T%+v", ev, ev)
	if err != nil {
		s += " => " + err.Error()
	}
	return s
}
