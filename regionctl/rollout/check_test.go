package rollout_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/cairnkms/cairn/regionctl/rollout"
)

// midway returns a record at stage 2 (region us-east) baking: the canary u1
// passed, u2 and u3 applied.
func midway(t *testing.T) rollout.Record {
	t.Helper()
	p, err := rollout.NewPlan(change("us-east", "eu-west"), map[string][]string{"us-east": {"u1", "u2", "u3"}, "eu-west": {"e1"}},
		rollout.Options{Regions: []string{"us-east", "eu-west"}, Thresholds: rollout.Thresholds{}})
	if err != nil {
		t.Fatal(err)
	}
	rec := rollout.NewRecord("r", p, "ctl", 1, t0)
	now := t0
	steps := []rollout.Event{
		rollout.Started{Epoch: 1},
		rollout.DryRunResult{Epoch: 1, Server: "u1", OK: true, Serving: lastGoodRef("us-east")},
		rollout.Measured{Epoch: 1, Stage: 0},
		rollout.Applied{Epoch: 1, Server: "u1", Serial: bundleSerial, Previous: lastGoodRef("us-east")},
		rollout.Tick{Epoch: 1}, // at the bake's end, below
		rollout.GateResult{Epoch: 1, Stage: 0},
		rollout.DryRunResult{Epoch: 1, Server: "u2", OK: true},
		rollout.DryRunResult{Epoch: 1, Server: "u3", OK: true},
		rollout.Measured{Epoch: 1, Stage: 1},
		rollout.Applied{Epoch: 1, Server: "u2", Serial: bundleSerial, Previous: lastGoodRef("us-east")},
		rollout.Applied{Epoch: 1, Server: "u3", Serial: bundleSerial, Previous: lastGoodRef("us-east")},
	}
	for _, ev := range steps {
		if _, ok := ev.(rollout.Tick); ok {
			now = now.Add(time.Hour)
		}
		if rec, _, err = rollout.Next(rec, ev, now); err != nil {
			t.Fatalf("Next(%T) = %v", ev, err)
		}
	}
	if rec.Stage != 1 || rec.Phase != rollout.PhaseBaking {
		t.Fatalf("midway record at stage %d %s, want stage 2 baking", rec.Stage+1, rec.Phase)
	}
	return rec
}

// TestCheckCatchesViolations proves each invariant fires on a record that
// breaks it (an invariant check that cannot fail is worse than none).
func TestCheckCatchesViolations(t *testing.T) {
	tests := []struct {
		name  string
		edit  func(r *rollout.Record)
		match string
	}{
		{"a later stage was dry-run", func(r *rollout.Record) { set(r, "e1", func(s *rollout.ServerResult) { s.DryRun = rollout.DryRunOK }) }, "was touched"},
		{"a later stage applied", func(r *rollout.Record) { set(r, "e1", func(s *rollout.ServerResult) { s.Applied = bundleSerial }) }, "was touched"},
		{"a stage skipped", func(r *rollout.Record) { r.Stages[0].Gate = nil }, "did not apply everywhere and pass its gates"},
		{"applied before the stage's dry runs passed", func(r *rollout.Record) {
			set(r, "u3", func(s *rollout.ServerResult) { s.DryRun = rollout.DryRunNone })
		}, "not every server of stage 2 passed the dry run"},
		{"baking before every server applied", func(r *rollout.Record) { set(r, "u3", func(s *rollout.ServerResult) { s.Applied = 0 }) }, "baking before every server of the stage applied"},
		{"applied another serial", func(r *rollout.Record) { set(r, "u2", func(s *rollout.ServerResult) { s.Applied = 7 }) }, "applied serial 7"},
		{"a failed gate still running", func(r *rollout.Record) {
			r.Phase = rollout.PhaseGating
			r.BakeUntil = time.Time{}
			r.Stages[1].Gate = &rollout.Gate{Pass: false, Reasons: []string{"x"}}
		}, "failed but the rollout is gating"},
		{"a failed gate not rolling back every applier", func(r *rollout.Record) {
			r.Phase = rollout.PhaseRollingBack
			r.BakeUntil = time.Time{}
			r.Stages[1].Gate = &rollout.Gate{Pass: false}
			set(r, "u2", func(s *rollout.ServerResult) { s.RollbackWanted = true })
		}, "not every server that applied is to be rolled back"},
		{"rolled back at a lower serial", func(r *rollout.Record) {
			set(r, "u2", func(s *rollout.ServerResult) { s.RollbackWanted, s.RolledBack = true, 50 })
		}, "rolled back at serial 50"},
		{"rollback of a server that applied nothing", func(r *rollout.Record) {
			set(r, "e1", func(s *rollout.ServerResult) { s.RollbackWanted = true })
		}, "applied nothing"},
		{"rolled back with work pending", func(r *rollout.Record) {
			r.Phase, r.BakeUntil = rollout.PhaseRolledBack, time.Time{}
			set(r, "u2", func(s *rollout.ServerResult) { s.RollbackWanted = true })
		}, "still to roll back"},
		{"published early", func(r *rollout.Record) { r.Published = []string{"nope"} }, "is not the change's"},
		{"completed early", func(r *rollout.Record) { r.Phase, r.BakeUntil = rollout.PhaseCompleted, time.Time{} }, "completed"},
		{"paused in a terminal phase", func(r *rollout.Record) {
			r.Phase, r.BakeUntil, r.Paused = rollout.PhaseAborted, time.Time{}, true
		}, "paused in phase aborted"},
		{"baking without a bake end", func(r *rollout.Record) { r.BakeUntil = time.Time{} }, "bake time"},
		{"a server missing", func(r *rollout.Record) { delete(r.Servers, "u1") }, "has no result"},
		{"a server in the wrong stage", func(r *rollout.Record) { set(r, "u1", func(s *rollout.ServerResult) { s.Stage = 1 }) }, "planned in us-east stage 1"},
		{"stage out of range", func(r *rollout.Record) { r.Stage = 7 }, "invalid record"},
	}
	if err := rollout.Check(midway(t)); err != nil {
		t.Fatalf("Check(midway) = %v", err)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := midway(t)
			tt.edit(&rec)
			err := rollout.Check(rec)
			if err == nil || !strings.Contains(err.Error(), tt.match) {
				t.Errorf("Check() = %v, want an error containing %q", err, tt.match)
			}
		})
	}
}

func set(r *rollout.Record, server string, f func(*rollout.ServerResult)) {
	s := r.Servers[server]
	f(&s)
	r.Servers[server] = s
}

func TestCheckConflict(t *testing.T) {
	busy := midway(t) // us-east, eu-west; in flight
	done := midway(t)
	done.ID = "old"
	done.Phase, done.BakeUntil = rollout.PhaseAborted, time.Time{}
	planFor := func(regions ...string) rollout.Plan {
		fleet := map[string][]string{}
		for _, r := range regions {
			fleet[r] = []string{r + "-1", r + "-2"}
		}
		p, err := rollout.NewPlan(change(regions...), fleet, rollout.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	if err := rollout.CheckConflict([]rollout.Record{busy, done}, planFor("ap-south")); err != nil {
		t.Errorf("CheckConflict(other region) = %v, want nil", err)
	}
	if err := rollout.CheckConflict([]rollout.Record{done}, planFor("us-east")); err != nil {
		t.Errorf("CheckConflict(stopped rollout) = %v, want nil", err)
	}
	err := rollout.CheckConflict([]rollout.Record{busy, done}, planFor("eu-west", "ap-south"))
	var ce *rollout.ConflictError
	if !errors.As(err, &ce) || !errors.Is(err, rollout.ErrRegionBusy) {
		t.Fatalf("CheckConflict(busy region) = %v, want a *ConflictError matching ErrRegionBusy", err)
	}
	if want := "rollout: refused: region eu-west has rollout r in flight"; err.Error() != want {
		t.Errorf("CheckConflict(busy region) = %q, want %q", err, want)
	}
}

func TestNextRefusesBadInput(t *testing.T) {
	rec := midway(t)
	tests := []struct {
		name string
		rec  rollout.Record
		ev   rollout.Event
		want error
	}{
		{"nil event", rec, nil, rollout.ErrUnexpectedEvent},
		{"empty record", rollout.Record{}, rollout.Tick{}, rollout.ErrInvalidRecord},
		{"stale epoch", rec, rollout.Tick{Epoch: 0}, rollout.ErrStaleEpoch},
		{"future epoch without takeover", rec, rollout.Tick{Epoch: 9}, rollout.ErrStaleEpoch},
		{"takeover at a lower epoch", rec, rollout.TookOver{Epoch: 1}, rollout.ErrStaleEpoch},
		{"unknown server", rec, rollout.Applied{Epoch: 1, Server: "zz", Serial: bundleSerial}, rollout.ErrUnexpectedEvent},
		{"start twice", rec, rollout.Started{Epoch: 1}, rollout.ErrUnexpectedEvent},
		{"rollback of nothing asked", rec, rollout.RolledBack{Epoch: 1, Server: "u1", Serial: 200}, rollout.ErrUnexpectedEvent},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, acts, err := rollout.Next(tt.rec, tt.ev, t0)
			if !errors.Is(err, tt.want) {
				t.Errorf("Next() = %v, want %v", err, tt.want)
			}
			if acts != nil || got.Phase != tt.rec.Phase || got.Epoch != tt.rec.Epoch {
				t.Errorf("Next() refused but returned actions %v or a changed record", acts)
			}
		})
	}
}
