package rollout

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
)

// EpochError is Next refusing an event of another controller's epoch. It
// matches ErrStaleEpoch.
type EpochError struct {
	// Got is the event's epoch, Want the record's.
	Got, Want uint64
	// TakeOver is set when the event was a TookOver not above the record's
	// epoch.
	TakeOver bool
}

func (e *EpochError) Error() string {
	if e.TakeOver {
		return fmt.Sprintf("rollout: stale epoch: a takeover at epoch %d must be above the record's epoch %d", e.Got, e.Want)
	}
	return fmt.Sprintf("rollout: stale epoch: event from epoch %d, the record is at epoch %d", e.Got, e.Want)
}

// Unwrap returns ErrStaleEpoch.
func (e *EpochError) Unwrap() error { return ErrStaleEpoch }

// EventError is Next refusing an event the record's phase does not accept.
// It matches ErrUnexpectedEvent.
type EventError struct {
	Event  string // the event's type, e.g. "Applied"
	Phase  Phase
	Reason string
}

func (e *EventError) Error() string {
	return fmt.Sprintf("rollout: unexpected event %s in phase %s: %s", e.Event, e.Phase, e.Reason)
}

// Unwrap returns ErrUnexpectedEvent.
func (e *EventError) Unwrap() error { return ErrUnexpectedEvent }

// Next is the rollout's transition function: from rec, on ev observed at
// now, it returns the next record and the actions the adapters must perform
// (in order). On error the record is returned unchanged and no action is
// asked for. It never modifies rec.
//
// It guarantees (Check verifies the record side in test builds):
//
//   - no server of a stage is asked to apply before every server of that
//     stage passed its dry run; a refused dry run halts with nothing of the
//     stage applied;
//   - stages run in plan order, one at a time: a stage starts only after
//     the previous one passed its gates, so at most one wave of regions is
//     in flight;
//   - a failed gate or apply halts the rollout and asks to roll back exactly
//     the servers that applied the current stage (also one whose apply
//     completes late);
//   - Pause asks for nothing new (no dry run, apply or gate) but accepts
//     what was in flight and freezes the bake clock; a rollback, once
//     started, is not paused;
//   - Abort stops without rolling back; RollbackRequested rolls back every
//     server the rollout applied, one stage at a time, last stage first;
//   - events of an epoch other than the record's are refused; TookOver
//     raises the epoch and answers with Actions(rec), the outstanding work
//     of the current phase and never of a later stage.
func Next(rec Record, ev Event, now time.Time) (Record, []Action, error) {
	if err := rec.validate(); err != nil {
		return rec, nil, err
	}
	if ev == nil {
		return rec, nil, &EventError{Event: "nil", Phase: rec.Phase, Reason: "no event"}
	}
	if t, ok := ev.(TookOver); ok {
		if t.Epoch <= rec.Epoch {
			return rec, nil, &EpochError{Got: t.Epoch, Want: rec.Epoch, TakeOver: true}
		}
	} else if ev.epoch() != rec.Epoch {
		return rec, nil, &EpochError{Got: ev.epoch(), Want: rec.Epoch}
	}
	r := rec.clone()
	m := machine{r: &r, now: now, ev: ev}
	if err := m.step(); err != nil {
		return rec, nil, err
	}
	r.Updated = now
	if invariants {
		if err := Check(r); err != nil {
			panic(fmt.Sprintf("rollout: after %T in phase %s: %v", ev, rec.Phase, err))
		}
	}
	return r, m.acts, nil
}

// Actions returns the outstanding work of rec's current phase: what a
// controller resuming from the stored record (after a crash or a takeover)
// must do next. It asks only for the current stage (or, rolling back, the
// latest stage with servers to roll back), and nothing new while paused. It
// returns nil for an invalid record.
func Actions(rec Record) []Action {
	if rec.validate() != nil {
		return nil
	}
	p, i := rec.Plan, rec.Stage
	st := p.Stages[i]
	if rec.Paused && rec.Phase != PhaseRollingBack {
		return nil
	}
	var out []Action
	switch rec.Phase {
	case PhaseDryRun:
		todo := slices.DeleteFunc(st.Servers(), func(s string) bool { return rec.Servers[s].DryRun != DryRunNone })
		for _, t := range byRegion(p, todo) {
			out = append(out, DryRunAction{Stage: i, Region: t.Region, Servers: t.Servers, Bundle: p.Change.bundle(t.Region)})
		}
	case PhaseBaseline:
		out = append(out, MeasureAction{Stage: i, Servers: st.Servers()})
	case PhaseApplying:
		todo := slices.DeleteFunc(st.Servers(), func(s string) bool { return rec.Servers[s].Applied != 0 })
		for _, t := range byRegion(p, todo) {
			out = append(out, ApplyAction{Stage: i, Region: t.Region, Servers: t.Servers, Bundle: p.Change.bundle(t.Region)})
		}
	case PhaseBaking:
		out = append(out, WaitAction{Until: rec.BakeUntil})
	case PhaseGating:
		out = append(out, ProbeAction{Stage: i, Regions: st.Regions(), Servers: st.Servers()})
	case PhaseRollingBack:
		out = rollbackActions(rec, rollbackBatch(rec))
	}
	return out
}

// rollbackBatch returns the servers still to roll back in the latest stage
// that has any, in plan order.
func rollbackBatch(rec Record) []string {
	for i := len(rec.Plan.Stages) - 1; i >= 0; i-- {
		var out []string
		for _, s := range rec.Plan.Stages[i].Servers() {
			if sr := rec.Servers[s]; sr.RollbackWanted && sr.RolledBack == 0 {
				out = append(out, s)
			}
		}
		if len(out) > 0 {
			return out
		}
	}
	return nil
}

// rollbackActions asks to roll back servers, grouped by region and last
// good bundle.
func rollbackActions(rec Record, servers []string) []Action {
	var out []RollbackAction
	for _, s := range servers {
		sr := rec.Servers[s]
		i := slices.IndexFunc(out, func(a RollbackAction) bool { return a.Region == sr.Region && a.To == sr.LastGood })
		if i < 0 {
			out = append(out, RollbackAction{Stage: sr.Stage, Region: sr.Region, From: rec.Plan.Change.bundle(sr.Region), To: sr.LastGood})
			i = len(out) - 1
		}
		out[i].Servers = append(out[i].Servers, s)
		out[i].MinSerial = max(out[i].MinSerial, sr.Applied+1)
	}
	acts := make([]Action, len(out))
	for i, a := range out {
		acts[i] = a
	}
	return acts
}

// machine runs one transition on r.
type machine struct {
	r    *Record
	now  time.Time
	ev   Event
	acts []Action
}

func (m *machine) refuse(format string, args ...any) error {
	name := fmt.Sprintf("%T", m.ev)
	name = name[strings.LastIndex(name, ".")+1:]
	return &EventError{Event: name, Phase: m.r.Phase, Reason: fmt.Sprintf(format, args...)}
}

func (m *machine) report(format string, args ...any) {
	m.acts = append(m.acts, ReportAction{Text: fmt.Sprintf(format, args...)})
}

// emit asks for the current phase's outstanding work.
func (m *machine) emit() { m.acts = append(m.acts, Actions(*m.r)...) }

func (m *machine) stage() Stage { return m.r.Plan.Stages[m.r.Stage] }

// stageName is "stage N/M NAME".
func (m *machine) stageName() string {
	return fmt.Sprintf("stage %d/%d %s", m.r.Stage+1, len(m.r.Plan.Stages), m.stage().Name)
}

// server returns the result of a server of the current stage.
func (m *machine) server(name string) (ServerResult, error) {
	sr, ok := m.r.Servers[name]
	switch {
	case !ok:
		return sr, m.refuse("server %q is not in the plan", name)
	case sr.Stage != m.r.Stage:
		return sr, m.refuse("server %s is in stage %d, the current stage is %d", name, sr.Stage+1, m.r.Stage+1)
	}
	return sr, nil
}

// all reports whether f holds for every server of the current stage.
func (m *machine) all(f func(ServerResult) bool) bool {
	for _, s := range m.stage().Servers() {
		if !f(m.r.Servers[s]) {
			return false
		}
	}
	return true
}

// stop clears what only a running rollout has.
func (m *machine) stop(p Phase) {
	m.r.Phase = p
	m.r.Paused = false
	m.r.BakeUntil = time.Time{}
	m.r.BakeLeft = 0
}

func (m *machine) step() error {
	r := m.r
	switch e := m.ev.(type) {
	case TookOver:
		r.Epoch, r.Owner = e.Epoch, e.By
		m.report("taken over by %s at epoch %d: %s, %s", e.By, e.Epoch, m.stageName(), m.phaseText())
		m.emit()

	case Started:
		if r.Phase != PhasePending {
			return m.refuse("the rollout has already started")
		}
		m.report("rollout %s by %s started: %s", r.ID, r.Plan.Change.By, r.Plan.Change.Why)
		m.startStage(0)

	case DryRunResult:
		sr, err := m.server(e.Server)
		if err != nil {
			return err
		}
		if r.Phase != PhaseDryRun {
			if (r.Phase.Terminal() || r.Phase == PhaseRollingBack) && sr.DryRun == DryRunNone {
				m.recordDryRun(e, sr) // late: recorded, acts on nothing
				return nil
			}
			if sr.DryRun != DryRunNone {
				return nil // a duplicate
			}
			return m.refuse("no dry run was asked for")
		}
		if sr.DryRun == DryRunRefused {
			return nil // a refusal stands
		}
		m.recordDryRun(e, sr)
		switch {
		case !e.OK:
			m.stop(PhaseFailed)
			r.Halt = fmt.Sprintf("%s: dry run refused on %s: %s", m.stageName(), e.Server, e.Reason)
			m.report("HALTED: %s; nothing of the stage was applied", r.Halt)
		case m.all(func(s ServerResult) bool { return s.DryRun == DryRunOK }):
			r.Phase = PhaseBaseline
			m.report("%s: dry run passed on all %d server(s)%s", m.stageName(), len(m.stage().Servers()), m.held())
			m.emit()
		}

	case Measured:
		if r.Phase != PhaseBaseline || e.Stage != r.Stage {
			return m.refuse("no baseline was asked for stage %d", e.Stage+1)
		}
		mm := e.Metrics
		mm.NotReady = slices.Clone(mm.NotReady)
		r.Stages[r.Stage].Baseline = &mm
		r.Phase = PhaseApplying
		m.report("%s: applying to %d server(s)%s", m.stageName(), len(m.stage().Servers()), m.held())
		m.emit()

	case Applied:
		sr, err := m.server(e.Server)
		if err != nil {
			return err
		}
		if sr.Applied != 0 {
			if sr.Applied == e.Serial {
				return nil // a duplicate
			}
			return m.refuse("server %s already applied serial %d, not %d", e.Server, sr.Applied, e.Serial)
		}
		if want := r.Plan.Change.bundle(sr.Region).Serial; e.Serial != want {
			return m.refuse("server %s applied serial %d; the rollout's bundle for %s has serial %d", e.Server, e.Serial, sr.Region, want)
		}
		if !m.all(func(s ServerResult) bool { return s.DryRun == DryRunOK }) {
			return m.refuse("server %s applied before every server of the stage passed its dry run", e.Server)
		}
		switch r.Phase {
		case PhaseApplying, PhaseRollingBack, PhaseFailed, PhaseRolledBack, PhaseAborted:
		default:
			return m.refuse("no apply was asked for")
		}
		sr.Applied, sr.AppliedAt = e.Serial, m.now
		sr.LastGood = m.lastGood(sr, e.Previous)
		r.Servers[e.Server] = sr
		switch r.Phase {
		case PhaseApplying:
			if m.all(func(s ServerResult) bool { return s.Applied != 0 }) {
				m.enterBaking()
			}
		case PhaseAborted:
			m.report("%s applied serial %d after the abort; not rolled back", e.Server, e.Serial)
		default: // halted: an apply that was in flight completed; undo it too
			sr.RollbackWanted = true
			r.Servers[e.Server] = sr
			r.Phase = PhaseRollingBack
			m.report("%s applied serial %d after the halt; rolling it back too", e.Server, e.Serial)
			m.acts = append(m.acts, rollbackActions(*r, []string{e.Server})...)
		}

	case ApplyFailed:
		sr, err := m.server(e.Server)
		if err != nil {
			return err
		}
		switch r.Phase {
		case PhaseApplying:
			sr.ApplyError = e.Reason
			r.Servers[e.Server] = sr
			m.halt(fmt.Sprintf("%s: apply failed on %s: %s", m.stageName(), e.Server, e.Reason))
		case PhaseRollingBack, PhaseFailed, PhaseRolledBack, PhaseAborted:
			sr.ApplyError = e.Reason
			r.Servers[e.Server] = sr
		default:
			return m.refuse("no apply was asked for")
		}

	case Tick:
		if r.Phase == PhaseBaking && !r.Paused && !m.now.Before(r.BakeUntil) {
			r.Phase = PhaseGating
			r.BakeUntil = time.Time{}
			m.report("%s: baked; evaluating the gates", m.stageName())
			m.emit()
		}

	case GateResult:
		if r.Phase != PhaseGating || e.Stage != r.Stage {
			return m.refuse("no gate was asked for stage %d", e.Stage+1)
		}
		var before Metrics
		if b := r.Stages[r.Stage].Baseline; b != nil {
			before = *b
		}
		pass, reasons := EvaluateGate(before, e.After, e.Probes, r.Plan.Thresholds)
		after := e.After
		after.NotReady = slices.Clone(after.NotReady)
		r.Stages[r.Stage].Gate = &Gate{Pass: pass, Reasons: reasons, After: after, Probes: slices.Clone(e.Probes), At: m.now}
		if !pass {
			m.halt(fmt.Sprintf("%s failed its gates: %s", m.stageName(), strings.Join(reasons, "; ")))
			return nil
		}
		r.Stages[r.Stage].Done = m.now
		m.report("%s passed its gates", m.stageName())
		if ks := r.Plan.publishAfter(r.Stage); len(ks) > 0 {
			r.Published = append(r.Published, ks...)
			m.acts = append(m.acts, PublishAction{Keysets: ks})
		}
		switch {
		case r.Stage == len(r.Plan.Stages)-1:
			m.stop(PhaseCompleted)
			m.report("rollout %s completed: every stage passed", r.ID)
		case r.Paused:
			r.Phase = PhaseDone
			m.report("paused before stage %d/%d", r.Stage+2, len(r.Plan.Stages))
		default:
			m.startStage(r.Stage + 1)
		}

	case RolledBack:
		sr, ok := r.Servers[e.Server]
		switch {
		case !ok:
			return m.refuse("server %q is not in the plan", e.Server)
		case !sr.RollbackWanted:
			return m.refuse("no rollback was asked for on %s", e.Server)
		case sr.RolledBack != 0:
			if sr.RolledBack == e.Serial {
				return nil // a duplicate
			}
			return m.refuse("server %s already rolled back at serial %d", e.Server, sr.RolledBack)
		case e.Serial <= sr.Applied:
			return m.refuse("rollback serial %d on %s must be above the applied serial %d", e.Serial, e.Server, sr.Applied)
		case r.Phase != PhaseRollingBack && r.Phase != PhaseAborted:
			return m.refuse("no rollback is in progress")
		}
		sr.RolledBack, sr.RollbackError = e.Serial, ""
		r.Servers[e.Server] = sr
		if r.Phase != PhaseRollingBack {
			return nil
		}
		next := rollbackBatch(*r)
		switch {
		case len(next) == 0:
			m.stop(PhaseRolledBack)
			m.report("rolled back: every server that applied serves its last good content again")
		case r.Servers[next[0]].Stage < sr.Stage:
			m.report("stage %d rolled back; rolling back stage %d", sr.Stage+1, r.Servers[next[0]].Stage+1)
			m.emit()
		}

	case RollbackFailed:
		sr, ok := r.Servers[e.Server]
		if !ok || !sr.RollbackWanted || sr.RolledBack != 0 || r.Phase != PhaseRollingBack {
			return m.refuse("no rollback is pending on %s", e.Server)
		}
		sr.RollbackError = e.Reason
		r.Servers[e.Server] = sr
		m.report("rollback failed on %s: %s (retry from the record's actions)", e.Server, e.Reason)

	case Pause:
		switch r.Phase {
		case PhaseDryRun, PhaseBaseline, PhaseApplying, PhaseBaking, PhaseGating, PhaseDone:
		case PhasePending:
			return m.refuse("the rollout has not started")
		default:
			return m.refuse("only a running stage can be paused")
		}
		if r.Paused {
			return nil
		}
		r.Paused = true
		if r.Phase == PhaseBaking {
			r.BakeLeft = max(0, r.BakeUntil.Sub(m.now))
			r.BakeUntil = time.Time{}
		}
		m.report("paused by %s: %s (%s, %s)", e.By, e.Why, m.stageName(), m.phaseText())

	case Resume:
		if !r.Paused {
			if r.Phase.Terminal() || r.Phase == PhaseRollingBack || r.Phase == PhasePending {
				return m.refuse("the rollout is not paused")
			}
			return nil // a duplicate
		}
		r.Paused = false
		m.report("resumed by %s", e.By)
		switch r.Phase {
		case PhaseDryRun, PhaseBaseline:
			m.enterDryRun() // time passed: dry-run again
		case PhaseApplying:
			if m.all(func(s ServerResult) bool { return s.Applied == 0 }) {
				m.enterDryRun()
			} else {
				m.emit()
			}
		case PhaseBaking:
			r.BakeUntil, r.BakeLeft = m.now.Add(r.BakeLeft), 0
			m.emit()
		case PhaseGating:
			m.emit()
		case PhaseDone:
			m.startStage(r.Stage + 1)
		}

	case Abort:
		if r.Phase.Terminal() {
			return m.refuse("the rollout has already stopped")
		}
		m.stop(PhaseAborted)
		r.Halt = fmt.Sprintf("aborted by %s: %s", e.By, e.Why)
		var applied []string
		for _, s := range slices.Sorted(maps.Keys(r.Servers)) {
			if sr := r.Servers[s]; sr.Applied != 0 && sr.RolledBack == 0 {
				applied = append(applied, s)
			}
		}
		m.report("ABORTED: %s; nothing rolled back; %d server(s) keep the change: %s", r.Halt, len(applied), strings.Join(applied, " "))

	case RollbackRequested:
		var n int
		for s, sr := range r.Servers {
			if sr.Applied != 0 && sr.RolledBack == 0 {
				sr.RollbackWanted = true
				r.Servers[s] = sr
				n++
			}
		}
		r.Halt = fmt.Sprintf("rollback requested by %s: %s", e.By, e.Why)
		if n == 0 {
			if r.Phase.Terminal() {
				return m.refuse("nothing to roll back")
			}
			m.stop(PhaseRolledBack)
			m.report("ROLLED BACK: %s; nothing was applied", r.Halt)
			return nil
		}
		m.stop(PhaseRollingBack)
		m.report("ROLLING BACK: %s; %d server(s), last stage first", r.Halt, n)
		m.emit()

	default:
		return m.refuse("unknown event")
	}
	return nil
}

// startStage makes stage i current and starts its dry run.
func (m *machine) startStage(i int) {
	m.r.Stage = i
	m.r.Stages[i].Started = m.now
	st := m.stage()
	var ts []string
	for _, t := range st.Targets {
		ts = append(ts, fmt.Sprintf("%s [%s]", t.Region, strings.Join(t.Servers, " ")))
	}
	m.report("%s: %s", m.stageName(), strings.Join(ts, ", "))
	m.enterDryRun()
}

// enterDryRun (re)starts the current stage's dry run on every server.
func (m *machine) enterDryRun() {
	m.r.Phase = PhaseDryRun
	for _, s := range m.stage().Servers() {
		sr := m.r.Servers[s]
		sr.DryRun, sr.DryRunReason = DryRunNone, ""
		m.r.Servers[s] = sr
	}
	m.emit()
}

func (m *machine) recordDryRun(e DryRunResult, sr ServerResult) {
	sr.DryRun, sr.DryRunReason = DryRunOK, ""
	if !e.OK {
		sr.DryRun, sr.DryRunReason = DryRunRefused, e.Reason
	}
	if sr.Applied == 0 {
		sr.LastGood = m.lastGood(sr, e.Serving)
	}
	m.r.Servers[e.Server] = sr
}

// lastGood is sr's rollback target once its server reported seen as what
// it serves (a dry run) or served before the apply (Applied): seen, unless
// seen names nothing or is the rollout's own bundle, and then the target
// the record already has. The target must be the server's content before
// the rollout first touched it, never the change: a server already serves
// the change when an apply is repeated after a takeover (the earlier
// controller applied but could not store Applied, and the KMS answers the
// repeat with previous = the bundle it serves) or a dry run is repeated
// after a pause, and a rollback to the change would leave it served while
// the record says rolled back. The record has the right target: every
// server of a stage passed a dry run before any applied, and the first one
// recorded what it served before the change. If that was nothing, there is
// no content to go back to, and the rollback is refused rather than made a
// no-op.
func (m *machine) lastGood(sr ServerResult, seen BundleRef) BundleRef {
	if seen.IsZero() || seen.SHA256 == m.r.Plan.Change.bundle(sr.Region).SHA256 {
		return sr.LastGood
	}
	return seen
}

func (m *machine) enterBaking() {
	r := m.r
	r.Phase = PhaseBaking
	bake := m.stage().Bake
	if r.Paused {
		r.BakeLeft = bake
		m.report("%s: applied on all %d server(s); paused with %v of bake left", m.stageName(), len(m.stage().Servers()), bake)
		return
	}
	r.BakeUntil = m.now.Add(bake)
	m.report("%s: applied on all %d server(s); baking until %s", m.stageName(), len(m.stage().Servers()), r.BakeUntil.UTC().Format(time.RFC3339))
	m.emit()
}

// halt stops the rollout on a failure in the current stage and rolls back
// the servers of the stage that applied.
func (m *machine) halt(reason string) {
	r := m.r
	r.Halt = reason
	var n int
	for _, s := range m.stage().Servers() {
		if sr := r.Servers[s]; sr.Applied != 0 && sr.RolledBack == 0 {
			sr.RollbackWanted = true
			r.Servers[s] = sr
			n++
		}
	}
	if n == 0 {
		m.stop(PhaseFailed)
		m.report("HALTED: %s; nothing of the stage was applied", reason)
		return
	}
	m.stop(PhaseRollingBack)
	m.report("HALTED: %s; rolling back %d server(s) of the stage", reason, n)
	m.emit()
}

// held is the suffix of a report made while paused.
func (m *machine) held() string {
	if m.r.Paused {
		return " (paused: held)"
	}
	return ""
}

func (m *machine) phaseText() string {
	if m.r.Paused {
		return string(m.r.Phase) + " (paused)"
	}
	return string(m.r.Phase)
}
