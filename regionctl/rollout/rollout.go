// Package rollout is the staged-rollout state machine behind `regionctl
// rollout`: it carries one change (a set of per-region bundles) through
// stages, so that no change ever reaches every region at once (the lesson of
// the 2014 global KMS outage: a bad configuration pushed everywhere at once
// is a global outage).
//
// The stages of a Plan (NewPlan) are: the canary server(s) of the first
// region, then the rest of that region, then the other regions in waves of
// Options.WaveSize regions. Each stage runs the same phases:
//
//	dry-run   ApplyBundle with dry_run on every server of the stage; any
//	          refusal halts the rollout before the stage changes anything
//	baseline  measure the stage's servers (readiness, error rate, p99)
//	applying  apply the region's bundle on every server of the stage
//	baking    wait the stage's bake time
//	gating    measure again and decrypt the golden probes; EvaluateGate
//	          compares with the baseline. Pass: the next stage starts.
//	          Fail: the rollout halts and the servers that applied this
//	          stage are rolled back to their last good content at a new
//	          serial.
//
// The package is pure: it does no I/O, speaks no gRPC and reads no clock
// (now is always a parameter). A Record is the whole durable state; the
// controller stores it in the root KMS after every transition. Next maps
// (Record, Event, now) to the next Record and the Actions the adapters must
// perform; Actions(rec) re-derives the outstanding work of a stored Record,
// so a controller that crashed resumes exactly where the record says and
// never skips a stage. Every Record carries a fencing Epoch: a controller
// taking over sends TookOver with a higher epoch, after which events of the
// old epoch are refused (ErrStaleEpoch).
//
// Refusals are typed errors: *PlanError (ErrInvalidPlan), *EpochError
// (ErrStaleEpoch), *EventError (ErrUnexpectedEvent), *ConflictError
// (ErrRegionBusy).
package rollout

import (
	"encoding/hex"
	"errors"
	"fmt"
	"time"
)

var (
	// ErrInvalidPlan is matched by every error of NewPlan.
	ErrInvalidPlan = errors.New("rollout: invalid plan")
	// ErrStaleEpoch is matched by an event whose epoch is not the record's:
	// it comes from a controller that has been fenced off (or from one that
	// never took over).
	ErrStaleEpoch = errors.New("rollout: stale epoch")
	// ErrUnexpectedEvent is matched by an event the record's phase does not
	// accept (e.g. Applied for a server whose stage has not passed its dry
	// run, or a GateResult for another stage). The record is unchanged.
	ErrUnexpectedEvent = errors.New("rollout: unexpected event")
	// ErrRegionBusy is matched by CheckConflict's refusal: a region of the
	// new plan has a rollout in flight.
	ErrRegionBusy = errors.New("rollout: region has a rollout in flight")
	// ErrInvalidRecord is matched when Next or Actions is given a record
	// that cannot be a rollout's (no plan, stage out of range).
	ErrInvalidRecord = errors.New("rollout: invalid record")
)

// BundleRef names one signed region bundle, as bundlev1.BundleRef does.
type BundleRef struct {
	Region string `json:"region"`
	Serial uint64 `json:"serial"`
	// SHA256 is the bundle's digest, 64 lowercase hex digits.
	SHA256 string `json:"sha256"`
}

// IsZero reports whether r names no bundle.
func (r BundleRef) IsZero() bool { return r == BundleRef{} }

// String returns "region serial N sha256 PREFIX" (the digest's first 12
// digits), or "(none)".
func (r BundleRef) String() string {
	if r.IsZero() {
		return "(none)"
	}
	sum := r.SHA256
	if len(sum) > 12 {
		sum = sum[:12]
	}
	return fmt.Sprintf("%s serial %d sha256 %s", r.Region, r.Serial, sum)
}

func (r BundleRef) validate() error {
	if r.Serial == 0 {
		return fmt.Errorf("bundle for region %q: serial 0", r.Region)
	}
	if b, err := hex.DecodeString(r.SHA256); err != nil || len(b) != 32 || hex.EncodeToString(b) != r.SHA256 {
		return fmt.Errorf("bundle for region %q: sha256 %q is not 64 lowercase hex digits", r.Region, r.SHA256)
	}
	return nil
}

// KeysetScope is a keyset the change adds, and the regions it serves in. It
// is published (Publish action) once the rollout has reached, and passed the
// gates on, every server of those regions.
type KeysetScope struct {
	Name    string   `json:"name"`
	Regions []string `json:"regions"`
}

// Change is what one rollout carries: one bundle per region, plus who
// started it and why (both required; both are recorded and audited).
type Change struct {
	Bundles []BundleRef   `json:"bundles"`
	Keysets []KeysetScope `json:"keysets,omitempty"`
	By      string        `json:"by"`
	Why     string        `json:"why"`
}

// bundle returns the change's bundle for region.
func (c Change) bundle(region string) BundleRef {
	for _, b := range c.Bundles {
		if b.Region == region {
			return b
		}
	}
	return BundleRef{}
}

// Defaults for the zero values of Options and Thresholds.
const (
	DefaultCanary               = 1
	DefaultWaveSize             = 1
	DefaultCanaryBake           = 10 * time.Minute
	DefaultRegionBake           = 30 * time.Minute
	DefaultWaveBake             = time.Hour
	DefaultMaxErrorRateIncrease = 0.001 // 0.1 percentage points
	DefaultMaxP99Ratio          = 1.5
	DefaultP99Floor             = 5 * time.Millisecond
)

// Options shape a Plan. Every zero value means its default.
type Options struct {
	// Regions is the order the regions are rolled out in; the first is the
	// canary region. It must list exactly the regions of the change's
	// bundles. Empty: the bundles' regions, sorted by name.
	Regions []string
	// Canary is how many servers of the first region make up the canary
	// stage (the first Canary servers in fleet order). Default 1. It must be
	// smaller than the region's server count, unless the region has a single
	// server (then the canary is the whole region and there is no "rest of
	// the region" stage).
	Canary int
	// WaveSize is how many regions each stage after the first region covers.
	// Default 1. A plan with two or more regions is refused when WaveSize is
	// at least the number of regions: that asks for every region at once.
	WaveSize int
	// CanaryBake, RegionBake and WaveBake are how long each kind of stage
	// bakes before its gates are evaluated. Defaults DefaultCanaryBake,
	// DefaultRegionBake, DefaultWaveBake.
	CanaryBake, RegionBake, WaveBake time.Duration
	// Thresholds are the gates' limits.
	Thresholds Thresholds
}

// Thresholds are the limits EvaluateGate applies. Every zero value means its
// default.
type Thresholds struct {
	// MaxErrorRateIncrease is the largest allowed increase of the error rate
	// (a fraction of requests, 0..1) from before the stage to after its bake.
	// Default DefaultMaxErrorRateIncrease.
	MaxErrorRateIncrease float64 `json:"max_error_rate_increase"`
	// MaxP99Ratio is the largest allowed after/before ratio of p99 latency;
	// at least 1. Default DefaultMaxP99Ratio.
	MaxP99Ratio float64 `json:"max_p99_ratio"`
	// P99Floor is the smallest "before" p99 the ratio is taken against, so
	// that a near-idle server's noise (or no traffic at all before) does
	// not fail the gate. Default DefaultP99Floor.
	P99Floor time.Duration `json:"p99_floor"`
}

func (t Thresholds) withDefaults() Thresholds {
	if t.MaxErrorRateIncrease == 0 {
		t.MaxErrorRateIncrease = DefaultMaxErrorRateIncrease
	}
	if t.MaxP99Ratio == 0 {
		t.MaxP99Ratio = DefaultMaxP99Ratio
	}
	if t.P99Floor == 0 {
		t.P99Floor = DefaultP99Floor
	}
	return t
}

// Validate reports whether t (with defaults applied) is usable.
func (t Thresholds) Validate() error {
	t = t.withDefaults()
	switch {
	case !(t.MaxErrorRateIncrease > 0 && t.MaxErrorRateIncrease <= 1):
		return fmt.Errorf("%w: max error-rate increase %v must be in (0, 1]", ErrInvalidPlan, t.MaxErrorRateIncrease)
	case !(t.MaxP99Ratio >= 1) || t.MaxP99Ratio > 1e6:
		return fmt.Errorf("%w: max p99 ratio %v must be at least 1", ErrInvalidPlan, t.MaxP99Ratio)
	case t.P99Floor < 0:
		return fmt.Errorf("%w: p99 floor %v must not be negative", ErrInvalidPlan, t.P99Floor)
	}
	return nil
}
