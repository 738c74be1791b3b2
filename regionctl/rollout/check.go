package rollout

import (
	"errors"
	"fmt"
	"maps"
	"slices"
)

// Check verifies the invariants of a record; nil when they all hold. Next
// runs it after every transition in builds with the invariants or race tag
// (and panics on a violation: it is a bug in this package); tests run it
// on every record they make. The invariants:
//
//   - every server of the plan has a result, in its own region and stage;
//   - no server of a later stage than the current one has been dry-run or
//     applied: stages are never skipped and one stage (wave) at a time is
//     in flight;
//   - every stage before the current one applied everywhere and passed its
//     gates;
//   - a server applied only its region's bundle, and only once every
//     server of its stage passed the dry run;
//   - from baking on, every server of the stage applied; applying needs a
//     baseline; a failed gate only for the current stage, and then every
//     server of the stage that applied is marked for rollback and the
//     rollout is rolling back, rolled back or aborted;
//   - a failed rollout (PhaseFailed) applied nothing of its stage;
//   - a rollback only for a server that applied, at a higher serial;
//     rolling back while one is pending, rolled back when none is;
//   - a keyset published only when every stage of its regions passed;
//     completed only when every stage passed;
//   - paused only while a stage runs; PhaseDone only paused; a bake time
//     only while baking and not paused.
func Check(r Record) error {
	if err := r.validate(); err != nil {
		return err
	}
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("rollout: invariant: "+format, args...))
	}
	p := r.Plan
	seen := 0
	for i, st := range p.Stages {
		for _, t := range st.Targets {
			for _, s := range t.Servers {
				seen++
				sr, ok := r.Servers[s]
				if !ok {
					bad("server %s has no result", s)
					continue
				}
				if sr.Region != t.Region || sr.Stage != i {
					bad("server %s recorded in %s stage %d, planned in %s stage %d", s, sr.Region, sr.Stage+1, t.Region, i+1)
				}
			}
		}
	}
	if seen != len(r.Servers) {
		bad("%d server results for %d planned servers", len(r.Servers), seen)
	}
	passed := func(i int) bool { return r.Stages[i].Gate != nil && r.Stages[i].Gate.Pass }
	stageAll := func(i int, f func(ServerResult) bool) bool {
		for _, s := range p.Stages[i].Servers() {
			if !f(r.Servers[s]) {
				return false
			}
		}
		return true
	}
	dryRunOK := func(sr ServerResult) bool { return sr.DryRun == DryRunOK }
	applied := func(sr ServerResult) bool { return sr.Applied != 0 }
	pending := 0
	for _, s := range slices.Sorted(maps.Keys(r.Servers)) {
		sr := r.Servers[s]
		if sr.Stage > r.Stage && (sr.DryRun != DryRunNone || sr.Applied != 0) {
			bad("server %s of stage %d was touched while the rollout is at stage %d", s, sr.Stage+1, r.Stage+1)
		}
		if sr.Applied != 0 {
			if want := p.Change.bundle(sr.Region).Serial; sr.Applied != want {
				bad("server %s applied serial %d, the bundle for %s has %d", s, sr.Applied, sr.Region, want)
			}
			if sr.Stage >= 0 && sr.Stage < len(p.Stages) && !stageAll(sr.Stage, dryRunOK) {
				bad("server %s applied but not every server of stage %d passed the dry run", s, sr.Stage+1)
			}
		}
		if sr.RollbackWanted && sr.Applied == 0 {
			bad("server %s is to be rolled back but applied nothing", s)
		}
		if sr.RolledBack != 0 && (!sr.RollbackWanted || sr.RolledBack <= sr.Applied) {
			bad("server %s rolled back at serial %d (applied %d, wanted %v)", s, sr.RolledBack, sr.Applied, sr.RollbackWanted)
		}
		if sr.RollbackWanted && sr.RolledBack == 0 {
			pending++
		}
	}
	for i := range r.Stage {
		if !passed(i) || !stageAll(i, applied) {
			bad("stage %d is behind the current stage %d but did not apply everywhere and pass its gates", i+1, r.Stage+1)
		}
	}
	for i := r.Stage + 1; i < len(p.Stages); i++ {
		if r.Stages[i] != (StageResult{}) {
			bad("stage %d after the current stage %d has results", i+1, r.Stage+1)
		}
	}
	cur := r.Stages[r.Stage]
	switch r.Phase {
	case PhasePending:
		if r.Stage != 0 || cur != (StageResult{}) {
			bad("pending at stage %d with results", r.Stage+1)
		}
	case PhaseBaseline:
		if !stageAll(r.Stage, dryRunOK) {
			bad("measuring the baseline before every dry run passed")
		}
	case PhaseApplying:
		if !stageAll(r.Stage, dryRunOK) || cur.Baseline == nil {
			bad("applying without every dry run passed and a baseline")
		}
	case PhaseBaking, PhaseGating, PhaseDone, PhaseCompleted:
		if !stageAll(r.Stage, applied) || cur.Baseline == nil {
			bad("%s before every server of the stage applied", r.Phase)
		}
	case PhaseFailed:
		if !stageAll(r.Stage, func(sr ServerResult) bool { return !applied(sr) }) {
			bad("failed, but a server of the stage applied and is not rolling back")
		}
	}
	if (r.Phase == PhaseDone || r.Phase == PhaseCompleted) && !passed(r.Stage) {
		bad("%s without passing the stage's gates", r.Phase)
	}
	if r.Phase == PhaseCompleted && r.Stage != len(p.Stages)-1 {
		bad("completed at stage %d of %d", r.Stage+1, len(p.Stages))
	}
	if g := cur.Gate; g != nil && !g.Pass {
		switch r.Phase {
		case PhaseRollingBack, PhaseRolledBack, PhaseAborted:
		default:
			bad("the gates of stage %d failed but the rollout is %s", r.Stage+1, r.Phase)
		}
		if !stageAll(r.Stage, func(sr ServerResult) bool { return !applied(sr) || sr.RollbackWanted }) {
			bad("the gates of stage %d failed but not every server that applied is to be rolled back", r.Stage+1)
		}
	}
	switch {
	case r.Phase == PhaseRollingBack && pending == 0:
		bad("rolling back with nothing to roll back")
	case r.Phase == PhaseRolledBack && pending != 0:
		bad("rolled back with %d server(s) still to roll back", pending)
	}
	for _, k := range r.Published {
		i := slices.IndexFunc(p.Change.Keysets, func(ks KeysetScope) bool { return ks.Name == k })
		if i < 0 {
			bad("published keyset %s is not the change's", k)
			continue
		}
		for _, region := range p.Change.Keysets[i].Regions {
			if last := p.lastStageOf(region); last < 0 || !passed(last) {
				bad("keyset %s published before region %s passed every stage", k, region)
			}
		}
	}
	if r.Paused {
		switch r.Phase {
		case PhaseDryRun, PhaseBaseline, PhaseApplying, PhaseBaking, PhaseGating, PhaseDone:
		default:
			bad("paused in phase %s", r.Phase)
		}
	}
	if r.Phase == PhaseDone && !r.Paused {
		bad("done with a stage but not paused")
	}
	if !r.BakeUntil.IsZero() != (r.Phase == PhaseBaking && !r.Paused) {
		bad("bake time %v in phase %s (paused %v)", r.BakeUntil, r.Phase, r.Paused)
	}
	return errors.Join(errs...)
}
