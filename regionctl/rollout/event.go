package rollout

import (
	"fmt"
	"slices"
	"strings"
	"time"
)

// Event is something an adapter observed or an operator asked for. Every
// event carries the epoch of the controller that sends it; Next refuses an
// event whose epoch is not the record's (ErrStaleEpoch), except TookOver,
// which must carry a higher one.
type Event interface {
	epoch() uint64
}

// Started starts a pending rollout (the plan has been printed and stored).
type Started struct{ Epoch uint64 }

// DryRunResult is one server's answer to ApplyBundle with dry_run. Serving
// is what the server serves now (ApplyBundleResponse.previous).
type DryRunResult struct {
	Epoch   uint64
	Server  string
	OK      bool
	Reason  string
	Serving BundleRef
}

// Measured is the stage's baseline measurement, taken before it applies.
type Measured struct {
	Epoch   uint64
	Stage   int
	Metrics Metrics
}

// Applied is one server having applied the stage's bundle at Serial.
// Previous is what it served before (ApplyBundleResponse.previous): the
// content a rollback restores, unless it is the stage's bundle itself (the
// apply was repeated on a server that already served it): then the record
// keeps the content its dry run saw before the change.
type Applied struct {
	Epoch    uint64
	Server   string
	Serial   uint64
	Previous BundleRef
}

// ApplyFailed is one server's apply failing after its dry run passed.
type ApplyFailed struct {
	Epoch  uint64
	Server string
	Reason string
}

// Tick tells the machine that time passed (the Wait action's timer fired,
// or a poll): it ends a bake whose time is up.
type Tick struct{ Epoch uint64 }

// GateResult is the stage's measurement after its bake, and every golden
// probe that failed.
type GateResult struct {
	Epoch  uint64
	Stage  int
	After  Metrics
	Probes []ProbeFailure
}

// RolledBack is one server serving its last good content again, in a
// bundle at Serial (above the serial it had applied).
type RolledBack struct {
	Epoch  uint64
	Server string
	Serial uint64
}

// RollbackFailed is one server's rollback failing; the controller retries
// from Actions(rec).
type RollbackFailed struct {
	Epoch  uint64
	Server string
	Reason string
}

// Pause holds the rollout (regionctl rollout pause).
type Pause struct {
	Epoch   uint64
	By, Why string
}

// Resume lifts a Pause (regionctl rollout resume).
type Resume struct {
	Epoch uint64
	By    string
}

// Abort stops the rollout without rolling anything back (regionctl rollout
// abort).
type Abort struct {
	Epoch   uint64
	By, Why string
}

// RollbackRequested rolls back every server the rollout applied, last stage
// first (regionctl rollout rollback). It also stops the rollout.
type RollbackRequested struct {
	Epoch   uint64
	By, Why string
}

// TookOver is a new controller taking the rollout over at Epoch (higher
// than the record's): from then on events of older epochs are refused. Next
// answers with the outstanding work of the current phase (Actions).
type TookOver struct {
	Epoch uint64
	By    string
}

func (e Started) epoch() uint64           { return e.Epoch }
func (e DryRunResult) epoch() uint64      { return e.Epoch }
func (e Measured) epoch() uint64          { return e.Epoch }
func (e Applied) epoch() uint64           { return e.Epoch }
func (e ApplyFailed) epoch() uint64       { return e.Epoch }
func (e Tick) epoch() uint64              { return e.Epoch }
func (e GateResult) epoch() uint64        { return e.Epoch }
func (e RolledBack) epoch() uint64        { return e.Epoch }
func (e RollbackFailed) epoch() uint64    { return e.Epoch }
func (e Pause) epoch() uint64             { return e.Epoch }
func (e Resume) epoch() uint64            { return e.Epoch }
func (e Abort) epoch() uint64             { return e.Epoch }
func (e RollbackRequested) epoch() uint64 { return e.Epoch }
func (e TookOver) epoch() uint64          { return e.Epoch }

// Action is work Next asks the adapters to do. Every action is safe to
// repeat: a controller that crashed re-derives them from the record
// (Actions) and may ask twice for what was already done; ApplyBundle of the
// bundle a server already serves must report Applied again.
type Action interface {
	fmt.Stringer
	action()
}

// DryRunAction: call ApplyBundle(Bundle, dry_run) on Servers (all of one
// region) and report a DryRunResult for each.
type DryRunAction struct {
	Stage   int
	Region  string
	Servers []string
	Bundle  BundleRef
}

// MeasureAction: measure Servers (readiness, error rate, p99) and report
// Measured for Stage. It is the baseline the gates compare with.
type MeasureAction struct {
	Stage   int
	Servers []string
}

// ApplyAction: call ApplyBundle(Bundle) on Servers (all of one region) and
// report Applied or ApplyFailed for each.
type ApplyAction struct {
	Stage   int
	Region  string
	Servers []string
	Bundle  BundleRef
}

// WaitAction: send Tick at Until (or later).
type WaitAction struct {
	Until time.Time
}

// ProbeAction: measure Servers again, decrypt every golden probe of
// Regions on each of them, and report GateResult for Stage.
type ProbeAction struct {
	Stage   int
	Regions []string
	Servers []string
}

// RollbackAction: make Servers (all of Region) serve the content of To
// again, in a new bundle with a serial of at least MinSerial, and report
// RolledBack or RollbackFailed for each. The new bundle must still satisfy
// the Safety Condition: a version that From added and that was used in the
// meantime stays decryptable (the bundle compiler keeps it, decrypt-only;
// CheckBundle judges the result). A zero To means the server served no
// bundle before: the adapter must refuse and report RollbackFailed.
type RollbackAction struct {
	Stage     int
	Region    string
	Servers   []string
	From, To  BundleRef
	MinSerial uint64
}

// PublishAction: publish Keysets in the root KMS; the rollout has reached
// and passed the gates on every server of their regions.
type PublishAction struct {
	Keysets []string
}

// ReportAction: show Text to the operator (progress, live).
type ReportAction struct {
	Text string
}

func (DryRunAction) action()   {}
func (MeasureAction) action()  {}
func (ApplyAction) action()    {}
func (WaitAction) action()     {}
func (ProbeAction) action()    {}
func (RollbackAction) action() {}
func (PublishAction) action()  {}
func (ReportAction) action()   {}

func (a DryRunAction) String() string {
	return fmt.Sprintf("dry-run stage=%d %s [%s] bundle %s", a.Stage+1, a.Region, strings.Join(a.Servers, " "), a.Bundle)
}
func (a MeasureAction) String() string {
	return fmt.Sprintf("measure stage=%d [%s]", a.Stage+1, strings.Join(a.Servers, " "))
}
func (a ApplyAction) String() string {
	return fmt.Sprintf("apply stage=%d %s [%s] bundle %s", a.Stage+1, a.Region, strings.Join(a.Servers, " "), a.Bundle)
}
func (a WaitAction) String() string {
	return "wait until " + a.Until.UTC().Format(time.RFC3339)
}
func (a ProbeAction) String() string {
	return fmt.Sprintf("probe stage=%d regions=%s [%s]", a.Stage+1, strings.Join(a.Regions, ","), strings.Join(a.Servers, " "))
}
func (a RollbackAction) String() string {
	return fmt.Sprintf("rollback stage=%d %s [%s] from serial %d to content of %s at serial >= %d",
		a.Stage+1, a.Region, strings.Join(a.Servers, " "), a.From.Serial, a.To, a.MinSerial)
}
func (a PublishAction) String() string { return "publish " + strings.Join(a.Keysets, ", ") }
func (a ReportAction) String() string  { return "report: " + a.Text }

// byRegion groups servers (all in p) by region, in plan order.
func byRegion(p Plan, servers []string) []Target {
	var out []Target
	for _, s := range servers {
		region := p.regionOf(s)
		i := slices.IndexFunc(out, func(t Target) bool { return t.Region == region })
		if i < 0 {
			out = append(out, Target{Region: region})
			i = len(out) - 1
		}
		out[i].Servers = append(out[i].Servers, s)
	}
	return out
}
