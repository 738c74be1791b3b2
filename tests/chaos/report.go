package chaos

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
)

// OpKind is a kind of client operation.
type OpKind string

// The operations of the workload and of the end-of-run replay.
const (
	// Encrypt is an envelope encryption (one KMS Encrypt of the DEK).
	Encrypt OpKind = "encrypt"
	// Decrypt is an envelope decryption of a ciphertext from the ledger,
	// during the run (one KMS Decrypt).
	Decrypt OpKind = "decrypt"
	// Replay is the end-of-run decryption of a ledger entry in one region
	// of its keyset, with no fallback.
	Replay OpKind = "replay"
)

// Op is one client operation as the client saw it.
type Op struct {
	Client int
	// Region is the region the client called first; Keyset the keyset.
	Region, Keyset string
	Kind           OpKind
	Start, End     time.Time
	// Code is "OK" or the gRPC code name of the error.
	Code string
	// Fallback is set on a decrypt that may go on in another region when
	// every server of Region fails.
	Fallback bool
}

// OK reports whether the operation succeeded.
func (o Op) OK() bool { return o.Code == "OK" }

// Window is when one step's faults were in force: from the first injection
// until every component served again.
type Window struct {
	Step       Step
	Start, End time.Time
}

func (w Window) overlaps(o Op) bool { return !o.End.Before(w.Start) && !o.Start.After(w.End) }

// NoFault labels errors outside every window.
const NoFault = "no fault"

// maxListed bounds the violations listed one by one.
const maxListed = 20

// Analysis is what the clients saw, set against the fault windows.
type Analysis struct {
	OpsByKind map[OpKind]int
	// ErrorsByCode counts failed operations by gRPC code; ErrorsByWindow
	// by the label of the first window they overlap (NoFault: none).
	ErrorsByCode, ErrorsByWindow map[string]int
	// LongestUnavailable is, per region, the longest time a client of that
	// region went from the start of a failed operation to the end of its
	// next success.
	LongestUnavailable map[string]time.Duration
	// Excused counts errors the faults allow: an encrypt, or a decrypt
	// with no fallback, overlapping a window that took down every KMS
	// server of the client's region.
	Excused int
	// Tail counts the excused errors that started after their window
	// ended, within the reconnect grace; LongestTail is the latest such
	// error's end after its window's.
	Tail        int
	LongestTail time.Duration
	// RootTierErrors counts the errors no region-down excuses that
	// overlap a root-tier-down window (target 0: a KMS server with a
	// bundle serves without the root tier); each is also a violation.
	RootTierErrors int
	// Violations are the errors no fault excuses: a region with a KMS
	// server up must answer every call (and a decrypt with a fallback
	// region must be answered while its own region is down).
	Violations []string
}

// Analyze sets ops against windows. An error of a region that a window took
// down is excused during the window. An error of a region where a window
// killed any KMS server is excused until grace after the window ended: a
// client reconnects to a server that came back only when its connection
// backoff expires (kmsclient caps it at 5s), so if the region's other
// server then dies, the client fails fast although a server serves. Such
// errors are counted under the window's label with " (reconnect tail)" and
// in Analysis.Tail.
func Analyze(ops []Op, windows []Window, grace time.Duration) Analysis {
	a := Analysis{OpsByKind: map[OpKind]int{}, ErrorsByCode: map[string]int{}, ErrorsByWindow: map[string]int{}, LongestUnavailable: map[string]time.Duration{}}
	unexcused := 0
	byClient := map[int][]Op{}
	for _, o := range ops {
		a.OpsByKind[o.Kind]++
		byClient[o.Client] = append(byClient[o.Client], o)
		if o.OK() {
			continue
		}
		a.ErrorsByCode[o.Code]++
		label, inWindow, inTail, tailLabel, rootTier := NoFault, false, false, "", false
		var tailEnd time.Time
		for _, w := range windows {
			needed := o.Kind == Encrypt || !o.Fallback // no other region to answer
			down := needed && slices.Contains(w.Step.DownRegions(), o.Region)
			hit := needed && slices.Contains(w.Step.HitRegions(), o.Region)
			switch {
			case w.overlaps(o):
				if label == NoFault {
					label = w.Step.Label()
				}
				inWindow = inWindow || down
				rootTier = rootTier || (w.Step.has(RootTierDown) && !down)
			case hit && o.Start.After(w.End) && !o.Start.After(w.End.Add(grace)):
				inTail, tailLabel, tailEnd = true, w.Step.Label()+" (reconnect tail)", w.End
			}
		}
		if inTail && !inWindow {
			label = tailLabel
		}
		a.ErrorsByWindow[label]++
		if rootTier && !inWindow && !inTail {
			a.RootTierErrors++
		}
		if inWindow || inTail {
			a.Excused++
			if !inWindow {
				a.Tail++
				a.LongestTail = max(a.LongestTail, o.End.Sub(tailEnd))
			}
			continue
		}
		unexcused++
		if unexcused <= maxListed {
			a.Violations = append(a.Violations, fmt.Sprintf("client %d: %s of %s in %s failed with %s at %s (+%s), in %s",
				o.Client, o.Kind, o.Keyset, o.Region, o.Code, o.Start.Format("15:04:05.000"), o.End.Sub(o.Start).Round(time.Millisecond), label))
		}
	}
	if unexcused > maxListed {
		a.Violations = append(a.Violations, fmt.Sprintf("... and %d more client errors no fault excuses", unexcused-maxListed))
	}
	for _, cops := range byClient {
		slices.SortFunc(cops, func(x, y Op) int { return x.Start.Compare(y.Start) })
		var since time.Time // start of the current failure streak
		for _, o := range cops {
			switch {
			case !o.OK() && since.IsZero():
				since = o.Start
			case o.OK() && !since.IsZero():
				a.LongestUnavailable[o.Region] = max(a.LongestUnavailable[o.Region], o.End.Sub(since))
				since = time.Time{}
			}
		}
		if !since.IsZero() {
			last := cops[len(cops)-1]
			a.LongestUnavailable[last.Region] = max(a.LongestUnavailable[last.Region], last.End.Sub(since))
		}
	}
	return a
}

// StepResult is one step as it ran.
type StepResult struct {
	Step Step
	// Recovery is how long the chain took, after the heal, until every
	// component served again.
	Recovery time.Duration
}

// Report is the soak's closing report.
type Report struct {
	Seed            uint64
	Planned, Took   time.Duration
	Steps           []StepResult
	Analysis        Analysis
	Ledger          int // acknowledged ciphertexts
	Replayed        int // ledger decryptions at the end (entries × regions)
	AuditChecked    int // successes matched to an audit record
	AuditDuplicates int // successes with an ok record on more than one server
	// KnownDefects are logged, not failed (e.g. a deposed leader that
	// hangs on SIGTERM: hashicorp/raft, see tests/rootkms_faults_test.go).
	KnownDefects []string
	// Violations are every invariant broken: the analysis's, and the
	// ledger's, the audit's and the processes' (must be none).
	Violations []string
}

// FaultsByKind counts the injected faults by kind.
func (r *Report) FaultsByKind() map[Kind]int {
	out := map[Kind]int{}
	for _, s := range r.Steps {
		for _, a := range s.Step.Actions {
			out[a.Kind]++
		}
	}
	return out
}

func (r *Report) String() string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	p("chaos soak report: seed %d (replay: -chaos.seed=%d), planned %s, took %s, %d steps", r.Seed, r.Seed, r.Planned, r.Took.Round(time.Second), len(r.Steps))
	p("faults injected by kind:")
	fk := r.FaultsByKind()
	for _, k := range Kinds {
		p("  %-18s %d", k, fk[k])
	}
	var longest time.Duration
	for _, s := range r.Steps {
		longest = max(longest, s.Recovery)
	}
	p("longest recovery after a heal: %s", longest.Round(time.Millisecond))
	p("operations by kind:")
	for _, k := range []OpKind{Encrypt, Decrypt, Replay} {
		p("  %-18s %d", k, r.Analysis.OpsByKind[k])
	}
	p("client errors by code:%s", counts(r.Analysis.ErrorsByCode))
	p("client errors by fault window:%s", counts(r.Analysis.ErrorsByWindow))
	p("client errors excused: %d (%d of them in a reconnect tail after a KMS server served again, ending at most %s after its window)",
		r.Analysis.Excused, r.Analysis.Tail, r.Analysis.LongestTail.Round(time.Millisecond))
	p("client errors while the root tier was down, in regions with KMS servers up: %d (target 0)", r.Analysis.RootTierErrors)
	p("longest unavailability seen by a client, per region:")
	for _, region := range slices.Sorted(maps.Keys(r.Analysis.LongestUnavailable)) {
		p("  %-18s %s", region, r.Analysis.LongestUnavailable[region].Round(time.Millisecond))
	}
	p("ledger: %d acknowledged ciphertexts, %d decryptions replayed at the end", r.Ledger, r.Replayed)
	p("audit: %d successes matched to an ok record by request ID (%d on more than one server)", r.AuditChecked, r.AuditDuplicates)
	if len(r.KnownDefects) > 0 {
		p("known defects (logged, not failed):")
		for _, d := range r.KnownDefects {
			p("  %s", d)
		}
	}
	p("invariant violations: %d", len(r.Violations))
	for _, v := range r.Violations {
		p("  %s", v)
	}
	return b.String()
}

func counts(m map[string]int) string {
	if len(m) == 0 {
		return " none"
	}
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(m)) {
		fmt.Fprintf(&b, "\n  %-40s %d", k, m[k])
	}
	return b.String()
}
