package rollout

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
)

// Phase is where the current stage of a rollout is.
type Phase string

const (
	// PhasePending: created, not started (Started starts it).
	PhasePending Phase = "pending"
	// PhaseDryRun: waiting for every server of the stage to dry-run the
	// bundle.
	PhaseDryRun Phase = "dry-run"
	// PhaseBaseline: every dry run passed; waiting for the stage's
	// measurement before the change.
	PhaseBaseline Phase = "baseline"
	// PhaseApplying: waiting for every server of the stage to apply.
	PhaseApplying Phase = "applying"
	// PhaseBaking: every server applied; waiting until Record.BakeUntil.
	PhaseBaking Phase = "baking"
	// PhaseGating: waiting for the stage's gate measurement and probes.
	PhaseGating Phase = "gating"
	// PhaseDone: the stage passed its gates and the rollout is paused before
	// the next stage (Resume starts it).
	PhaseDone Phase = "done"
	// PhaseFailed: halted with nothing of the current stage applied (a dry
	// run refused, or the first apply failed). Terminal.
	PhaseFailed Phase = "failed"
	// PhaseRollingBack: halted; waiting for the servers marked
	// RollbackWanted to serve their last good content again.
	PhaseRollingBack Phase = "rolling-back"
	// PhaseRolledBack: every server to roll back did. Terminal.
	PhaseRolledBack Phase = "rolled-back"
	// PhaseAborted: stopped by an operator, nothing rolled back. Terminal
	// (RollbackRequested still rolls back what was applied).
	PhaseAborted Phase = "aborted"
	// PhaseCompleted: every stage passed. Terminal (RollbackRequested still
	// rolls it back).
	PhaseCompleted Phase = "completed"
)

// Terminal reports whether the rollout has stopped: no stage will start and
// no apply will be asked for (a rollback may still be requested).
func (p Phase) Terminal() bool {
	switch p {
	case PhaseFailed, PhaseRolledBack, PhaseAborted, PhaseCompleted:
		return true
	}
	return false
}

// DryRunState is a server's dry-run outcome.
type DryRunState string

const (
	DryRunNone    DryRunState = ""
	DryRunOK      DryRunState = "ok"
	DryRunRefused DryRunState = "refused"
)

// ServerResult is what the rollout did to one server.
type ServerResult struct {
	Region string `json:"region"`
	Stage  int    `json:"stage"`
	// DryRun and DryRunReason are the last dry run's outcome.
	DryRun       DryRunState `json:"dry_run,omitempty"`
	DryRunReason string      `json:"dry_run_reason,omitempty"`
	// LastGood is what the server served before the rollout changed it:
	// what a rollback restores.
	LastGood BundleRef `json:"last_good,omitzero"`
	// Applied is the serial the server applied (0: not applied).
	Applied    uint64    `json:"applied,omitempty"`
	AppliedAt  time.Time `json:"applied_at,omitzero"`
	ApplyError string    `json:"apply_error,omitempty"`
	// RollbackWanted marks a server that applied and must be rolled back.
	RollbackWanted bool `json:"rollback_wanted,omitempty"`
	// RolledBack is the serial the rollback bundle has (0: not yet).
	RolledBack    uint64 `json:"rolled_back,omitempty"`
	RollbackError string `json:"rollback_error,omitempty"`
}

// StageResult is what happened to one stage.
type StageResult struct {
	Started  time.Time `json:"started,omitzero"`
	Baseline *Metrics  `json:"baseline,omitempty"`
	Gate     *Gate     `json:"gate,omitempty"`
	Done     time.Time `json:"done,omitzero"`
}

// Gate is a stage's evaluated gates.
type Gate struct {
	Pass    bool           `json:"pass"`
	Reasons []string       `json:"reasons,omitempty"`
	After   Metrics        `json:"after"`
	Probes  []ProbeFailure `json:"probes,omitempty"`
	At      time.Time      `json:"at"`
}

// Record is the durable state of one rollout, stored in the root KMS after
// every transition. It is plain data (JSON-tagged); the root KMS maps it to
// its proto. Treat it as a value: Next never modifies its argument.
type Record struct {
	ID   string `json:"id"`
	Plan Plan   `json:"plan"`
	// Epoch fences controllers: events must carry it, and TookOver raises
	// it. Owner is the controller that holds it.
	Epoch uint64 `json:"epoch"`
	Owner string `json:"owner,omitempty"`
	// Stage is the index into Plan.Stages of the current stage.
	Stage int   `json:"stage"`
	Phase Phase `json:"phase"`
	// Paused holds the rollout: no new dry run, apply, or gate is asked for;
	// what is in flight may finish; the bake clock is frozen with BakeLeft
	// remaining.
	Paused    bool          `json:"paused,omitempty"`
	BakeUntil time.Time     `json:"bake_until,omitzero"`
	BakeLeft  time.Duration `json:"bake_left,omitempty"`
	// Servers is keyed by server name (unique in a plan).
	Servers   map[string]ServerResult `json:"servers"`
	Stages    []StageResult           `json:"stages"`
	Published []string                `json:"published,omitempty"`
	// Halt says why the rollout halted, aborted or is rolling back.
	Halt    string    `json:"halt,omitempty"`
	Created time.Time `json:"created"`
	Updated time.Time `json:"updated"`
}

// NewRecord returns the pending record of a rollout of p, owned by the
// controller owner at epoch (the root KMS assigns both, and id).
func NewRecord(id string, p Plan, owner string, epoch uint64, now time.Time) Record {
	r := Record{ID: id, Plan: p, Epoch: epoch, Owner: owner, Phase: PhasePending,
		Servers: map[string]ServerResult{}, Stages: make([]StageResult, len(p.Stages)), Created: now, Updated: now}
	for i, st := range p.Stages {
		for _, t := range st.Targets {
			for _, s := range t.Servers {
				r.Servers[s] = ServerResult{Region: t.Region, Stage: i}
			}
		}
	}
	return r
}

// clone returns a deep copy of r, so that transitions never write through
// to the caller's record. The Plan is never modified and is shared.
func (r Record) clone() Record {
	c := r
	c.Servers = maps.Clone(r.Servers)
	c.Stages = slices.Clone(r.Stages)
	for i, s := range c.Stages {
		if s.Gate != nil {
			g := *s.Gate
			c.Stages[i].Gate = &g
		}
	}
	c.Published = slices.Clone(r.Published)
	return c
}

func (r Record) validate() error {
	switch {
	case len(r.Plan.Stages) == 0:
		return fmt.Errorf("%w: no stages", ErrInvalidRecord)
	case r.Stage < 0 || r.Stage >= len(r.Plan.Stages):
		return fmt.Errorf("%w: stage %d of %d", ErrInvalidRecord, r.Stage, len(r.Plan.Stages))
	case len(r.Stages) != len(r.Plan.Stages):
		return fmt.Errorf("%w: %d stage results for %d stages", ErrInvalidRecord, len(r.Stages), len(r.Plan.Stages))
	case r.Servers == nil:
		return fmt.Errorf("%w: no servers", ErrInvalidRecord)
	}
	return nil
}

// InFlight reports whether the rollout still owns its regions: it has not
// reached a terminal phase. A second rollout for one of its regions is
// refused (CheckConflict).
func (r Record) InFlight() bool { return !r.Phase.Terminal() }

// ConflictError is CheckConflict's refusal. It matches ErrRegionBusy.
type ConflictError struct {
	// Busy maps each region of the new plan that is busy to the ID of the
	// rollout in flight there.
	Busy map[string]string
}

func (e *ConflictError) Error() string {
	var parts []string
	for _, r := range slices.Sorted(maps.Keys(e.Busy)) {
		parts = append(parts, fmt.Sprintf("region %s has rollout %s in flight", r, e.Busy[r]))
	}
	return "rollout: refused: " + strings.Join(parts, "; ")
}

// Unwrap returns ErrRegionBusy.
func (e *ConflictError) Unwrap() error { return ErrRegionBusy }

// CheckConflict refuses a rollout of p while another rollout in existing
// that is in flight covers one of its regions. The root KMS runs it in the
// same write that stores the new record.
func CheckConflict(existing []Record, p Plan) error {
	busy := map[string]string{}
	for _, r := range existing {
		if !r.InFlight() {
			continue
		}
		for _, region := range r.Plan.Regions {
			if slices.Contains(p.Regions, region) {
				busy[region] = r.ID
			}
		}
	}
	if len(busy) > 0 {
		return &ConflictError{Busy: busy}
	}
	return nil
}

// Status prints the record for `regionctl rollout status`: the rollout, its
// phase, and every stage with its servers' results.
func Status(r Record) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "rollout %s by %s: %s\n", r.ID, r.Plan.Change.By, r.Plan.Change.Why)
	state := string(r.Phase)
	if r.Paused {
		state += " (paused)"
	}
	fmt.Fprintf(&sb, "epoch %d owner %s; stage %d/%d; %s", r.Epoch, r.Owner, r.Stage+1, len(r.Plan.Stages), state)
	if r.Phase == PhaseBaking && !r.Paused {
		fmt.Fprintf(&sb, " until %s", r.BakeUntil.UTC().Format(time.RFC3339))
	}
	if r.Paused && r.Phase == PhaseBaking {
		fmt.Fprintf(&sb, " with %v of bake left", r.BakeLeft)
	}
	sb.WriteString("\n")
	if r.Halt != "" {
		fmt.Fprintf(&sb, "halt: %s\n", r.Halt)
	}
	for i, st := range r.Plan.Stages {
		res := r.Stages[i]
		verdict := "not started"
		switch {
		case res.Gate != nil && res.Gate.Pass:
			verdict = "passed"
		case res.Gate != nil:
			verdict = "gate failed: " + strings.Join(res.Gate.Reasons, "; ")
		case i == r.Stage && r.Phase != PhasePending:
			verdict = string(r.Phase)
		}
		fmt.Fprintf(&sb, "  stage %d %s: %s\n", i+1, st.Name, verdict)
		for _, s := range st.Servers() {
			fmt.Fprintf(&sb, "    %s/%s: %s\n", r.Servers[s].Region, s, r.Servers[s].summary())
		}
	}
	if len(r.Published) > 0 {
		fmt.Fprintf(&sb, "published: %s\n", strings.Join(r.Published, ", "))
	}
	return strings.TrimSuffix(sb.String(), "\n")
}

func (s ServerResult) summary() string {
	var parts []string
	switch s.DryRun {
	case DryRunNone:
		parts = append(parts, "-")
	case DryRunOK:
		parts = append(parts, "dry-run ok")
	case DryRunRefused:
		parts = append(parts, "dry-run refused: "+s.DryRunReason)
	}
	if s.Applied != 0 {
		parts = append(parts, fmt.Sprintf("applied %d (last good %d)", s.Applied, s.LastGood.Serial))
	}
	if s.ApplyError != "" {
		parts = append(parts, "apply failed: "+s.ApplyError)
	}
	switch {
	case s.RolledBack != 0:
		parts = append(parts, fmt.Sprintf("rolled back at %d", s.RolledBack))
	case s.RollbackWanted:
		parts = append(parts, "rollback pending")
	}
	if s.RollbackError != "" {
		parts = append(parts, "rollback failed: "+s.RollbackError)
	}
	return strings.Join(parts, ", ")
}
