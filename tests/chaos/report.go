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
	// Code is "OK" or the gRPC code name of the error; Err the error's
	// message (empty on success).
	Code, Err string
	// Fallback is set on a decrypt that may go on in another region when
	// every server of Region fails.
	Fallback bool
	// Made, KeyID and Ref describe the ciphertext a decrypt or replay
	// opened: when its encryption started, the keyset version that made
	// it, and its encryption's request ID.
	Made  time.Time
	KeyID uint32
	Ref   string
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
	// Expired counts decrypts refused because their key version no longer
	// decrypts, that the TTL allows: past the ciphertext's TTL, after the
	// record retired its version, which it did no earlier than the TTL
	// ended (those are neither errors nor unavailability).
	// MinRetireMargin is the smallest time from a TTL's end to its
	// version's retirement among them (the Safety Condition keeps it at
	// least the propagation window).
	Expired         int
	MinRetireMargin time.Duration
	// RootTierErrors counts the errors no region-down excuses that
	// overlap a root-tier-down, isolate-leader or root-unreachable window
	// (target 0: a KMS server with a bundle serves without the root tier);
	// each is also a violation.
	RootTierErrors int
	// Violations are the errors no fault excuses: a region with a KMS
	// server up must answer every call (and a decrypt with a fallback
	// region must be answered while its own region is down).
	Violations []string
	// FirstViolation is when the earliest of those operations started
	// (zero: none).
	FirstViolation time.Time
	// Latency is, per region, the latency of its clients' successful
	// encrypts and decrypts with no fault at all, and while another
	// region was down with no fault on this region's own servers
	// (reliability row 25: a region keeps its latency while another is
	// down).
	Latency map[string]RegionLatency
}

// RegionLatency is one region's latency with no fault and while another
// region was down.
type RegionLatency struct {
	NoFault, OtherDown Percentiles
}

// Percentiles sums up N latencies.
type Percentiles struct {
	N        int
	P50, P99 time.Duration
}

func percentiles(ds []time.Duration) Percentiles {
	if len(ds) == 0 {
		return Percentiles{}
	}
	slices.Sort(ds)
	at := func(q float64) time.Duration { return ds[min(len(ds)-1, int(q*float64(len(ds))))] }
	return Percentiles{N: len(ds), P50: at(0.50), P99: at(0.99)}
}

// touches reports whether the step faults a KMS server of region.
func (s Step) touches(region string) bool {
	for _, a := range s.Actions {
		if (a.Kind == RegionDown && a.Target == region) || (a.Kind == KillKMS && strings.HasPrefix(a.Target, region+"/")) {
			return true
		}
	}
	return false
}

// latencyClass returns "none" for an operation no window overlaps, "other"
// for one that overlaps a region-down window of another region and no
// window faulting its own region's servers, and "" otherwise.
func latencyClass(o Op, windows []Window) string {
	class := "none"
	for _, w := range windows {
		if !w.overlaps(o) {
			continue
		}
		if w.Step.touches(o.Region) {
			return ""
		}
		if len(w.Step.DownRegions()) > 0 {
			class = "other"
		} else if class == "none" {
			class = ""
		}
	}
	return class
}

// Expiry is what decides whether a decrypt refused because its key version
// no longer decrypts ("NotFound") was allowed: the keysets' ciphertext TTLs
// and, from the record at the end, when each retired version left the
// decrypt set.
type Expiry struct {
	TTL     map[string]time.Duration
	Retired map[string]map[uint32]time.Time
}

// allowed reports whether o is a refusal the TTL allows, and the time from
// the ciphertext's TTL end to its version's retirement: the Safety
// Condition promises that every ciphertext decrypts within its TTL, so a
// version may leave the decrypt set only after the TTL of every ciphertext
// it made, and is refused only after it left.
func (e Expiry) allowed(o Op) (time.Duration, bool) {
	if o.OK() || o.Code != "NotFound" {
		return 0, false
	}
	return e.expired(o)
}

// expired reports whether the ciphertext a decrypt or replay opened is one
// the TTL no longer covers: its version left the decrypt set no earlier
// than the TTL ended and before the operation ended. It returns the margin
// from the TTL's end to the retirement.
func (e Expiry) expired(o Op) (time.Duration, bool) {
	if o.Kind != Decrypt && o.Kind != Replay {
		return 0, false
	}
	ttl, ok := e.TTL[o.Keyset]
	retired, gone := e.Retired[o.Keyset][o.KeyID]
	due := o.Made.Add(ttl)
	if !ok || !gone || retired.Before(due) || o.End.Before(retired) {
		return 0, false
	}
	return retired.Sub(due), true
}

// Analyze sets ops against windows. An error of a region that a window took
// down is excused during the window (there is no grace after it: kmsclient
// resets a failed endpoint's reconnect backoff, so a server that is back is
// used at once). A decrypt refused because its version no longer decrypts
// is allowed only as exp says (Analysis.Expired); otherwise it is a
// violation whatever the faults.
func Analyze(ops []Op, windows []Window, exp Expiry) Analysis {
	a := Analysis{OpsByKind: map[OpKind]int{}, ErrorsByCode: map[string]int{}, ErrorsByWindow: map[string]int{}, LongestUnavailable: map[string]time.Duration{}}
	unexcused := 0
	byClient := map[int][]Op{}
	violation := func(o Op, v string) {
		unexcused++
		if a.FirstViolation.IsZero() || o.Start.Before(a.FirstViolation) {
			a.FirstViolation = o.Start
		}
		if unexcused <= maxListed {
			a.Violations = append(a.Violations, v)
		}
	}
	for _, o := range ops {
		a.OpsByKind[o.Kind]++
		if margin, ok := exp.allowed(o); ok {
			if a.Expired == 0 || margin < a.MinRetireMargin {
				a.MinRetireMargin = margin
			}
			a.Expired++
			continue
		}
		byClient[o.Client] = append(byClient[o.Client], o)
		if o.OK() {
			continue
		}
		a.ErrorsByCode[o.Code]++
		if (o.Kind == Decrypt || o.Kind == Replay) && o.Code == "NotFound" {
			a.ErrorsByWindow["version gone"]++
			retired, gone := exp.Retired[o.Keyset][o.KeyID]
			when := "never retired"
			if gone {
				when = "retired " + retired.Format("15:04:05.000")
			}
			violation(o, fmt.Sprintf("client %d: %s of %s in %s refused at %s: version %d no longer decrypts; the ciphertext %s was made at %s, TTL %s, its version %s",
				o.Client, o.Kind, o.Keyset, o.Region, o.End.Format("15:04:05.000"), o.KeyID, o.Ref, o.Made.Format("15:04:05.000"), exp.TTL[o.Keyset], when))
			continue
		}
		// No other region is bound to answer an encrypt, a decrypt with no
		// fallback, or a decrypt of a ciphertext past its TTL whose version
		// was retired (the other region may have applied the retirement
		// already and refuse it: kmsclient then answers with the outage of
		// the client's own region, which may not have).
		_, expired := exp.expired(o)
		needed := o.Kind == Encrypt || !o.Fallback || expired
		label, inWindow, rootTier := NoFault, false, false
		for _, w := range windows {
			down := needed && slices.Contains(w.Step.DownRegions(), o.Region)
			if w.overlaps(o) {
				if label == NoFault {
					label = w.Step.Label()
				}
				inWindow = inWindow || down
				rootTier = rootTier || ((w.Step.has(RootTierDown) || w.Step.has(IsolateLeader) || w.Step.has(RootUnreachable)) && !down)
			}
		}
		a.ErrorsByWindow[label]++
		if rootTier && !inWindow {
			a.RootTierErrors++
		}
		if inWindow {
			a.Excused++
			continue
		}
		violation(o, fmt.Sprintf("client %d: %s of %s in %s failed with %s at %s (+%s), in %s: %s",
			o.Client, o.Kind, o.Keyset, o.Region, o.Code, o.Start.Format("15:04:05.000"), o.End.Sub(o.Start).Round(time.Millisecond), label, o.Err))
	}
	if unexcused > maxListed {
		a.Violations = append(a.Violations, fmt.Sprintf("... and %d more client errors no fault excuses", unexcused-maxListed))
	}
	a.Latency = map[string]RegionLatency{}
	lat := map[string]map[string][]time.Duration{}
	for _, o := range ops {
		if !o.OK() || o.Kind == Replay {
			continue
		}
		if c := latencyClass(o, windows); c != "" {
			if lat[o.Region] == nil {
				lat[o.Region] = map[string][]time.Duration{}
			}
			lat[o.Region][c] = append(lat[o.Region][c], o.End.Sub(o.Start))
		}
	}
	for r, m := range lat {
		a.Latency[r] = RegionLatency{NoFault: percentiles(m["none"]), OtherDown: percentiles(m["other"])}
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
	// Failover is, for a step that killed or paused the leader, how long
	// until another voter led (0: not such a step).
	Failover time.Duration
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
	// Driver and Lifecycle are the SRE driver's work: its runs and the
	// steps regionctl acknowledged, and what the record shows at the end.
	Driver    DriverStats
	Lifecycle Lifecycle
	// RegionKeyRotations are the region key rotations the driver asked
	// for; Root the verdict on its recorded root KMS operations.
	RegionKeyRotations int
	Root               RootWrites
	// KnownDefects are logged, not failed (e.g. a deposed leader that
	// hangs on SIGTERM: hashicorp/raft, see tests/rootkms_faults_test.go).
	KnownDefects []string
	// Violations are every invariant broken: the analysis's, and the
	// ledger's, the audit's and the processes' (must be none).
	Violations []string
	// Began is when the faults began; FirstViolation when the earliest
	// operation found to break an invariant (a client's error, a refusal
	// within the TTL, a success with no audit record) or the step whose
	// check found one started (zero: none of those; a violation found only
	// by an end-of-run check has no time).
	Began, FirstViolation time.Time
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
	p("client errors excused (a region-down window, no grace after it): %d", r.Analysis.Excused)
	p("decrypts refused past their TTL, after their version's retirement (allowed): %d; smallest TTL end to retirement: %s",
		r.Analysis.Expired, r.Analysis.MinRetireMargin.Round(time.Millisecond))
	p("client errors while the root tier was down, cut off or without a quorum, in regions with KMS servers up: %d (target 0)", r.Analysis.RootTierErrors)
	p("longest unavailability seen by a client, per region:")
	for _, region := range slices.Sorted(maps.Keys(r.Analysis.LongestUnavailable)) {
		p("  %-18s %s", region, r.Analysis.LongestUnavailable[region].Round(time.Millisecond))
	}
	p("latency of a region's successful calls, no fault vs another region down (its own servers untouched; row 25 asks p99 within 1.5x):")
	for _, region := range slices.Sorted(maps.Keys(r.Analysis.Latency)) {
		l := r.Analysis.Latency[region]
		verdict := "no region-down window of another region"
		if l.OtherDown.N > 0 && l.NoFault.N > 0 {
			ratio := float64(l.OtherDown.P99) / float64(l.NoFault.P99)
			verdict = fmt.Sprintf("p99 ratio %.2f: within 1.5x", ratio)
			if ratio > 1.5 {
				verdict = fmt.Sprintf("p99 ratio %.2f: ABOVE 1.5x", ratio)
			}
		}
		p("  %-18s no fault: %d calls, p50 %s, p99 %s; another region down: %d calls, p50 %s, p99 %s; %s", region,
			l.NoFault.N, l.NoFault.P50.Round(10*time.Microsecond), l.NoFault.P99.Round(10*time.Microsecond),
			l.OtherDown.N, l.OtherDown.P50.Round(10*time.Microsecond), l.OtherDown.P99.Round(10*time.Microsecond), verdict)
	}
	var failovers []time.Duration
	for _, s := range r.Steps {
		if s.Failover > 0 {
			failovers = append(failovers, s.Failover)
		}
	}
	if len(failovers) > 0 {
		longest := slices.Max(failovers)
		verdict := "met"
		if longest > 2*time.Second {
			verdict = "NOT met"
		}
		p("leader failovers (the leader killed or paused): %d, time to a new leader p50 %s, max %s (row 15 asks at most 2s: %s)",
			len(failovers), percentiles(failovers).P50.Round(time.Millisecond), longest.Round(time.Millisecond), verdict)
	}
	p("ledger: %d acknowledged ciphertexts, %d decryptions replayed at the end", r.Ledger, r.Replayed)
	d := r.Driver
	p("SRE driver: %d rounds; rotate --due %d runs (%d failed, retried); bundle build+push %d (%d failed, retried)",
		d.Rounds, d.RotateRuns, d.RotateFailed, d.Pushes, d.PushFailed)
	p("  steps regionctl acknowledged: add %d, promote %d, disable %d, schedule destroy %d, destroy %d",
		d.Steps["add"], d.Steps["promote"], d.Steps["disable"], d.Steps["schedule-destroy"], d.Steps["destroy"])
	p("  failed regionctl runs by reason:%s", counts(d.Failures))
	for _, why := range slices.Sorted(maps.Keys(d.Samples)) {
		p("  first %q: %s", why, strings.ReplaceAll(d.Samples[why], "\n", " | "))
	}
	l := r.Lifecycle
	p("  completed, per the record: rotations %d, promotions %d, retirements %d, destructions %d", l.Rotations, l.Promotions, l.Retirements, l.Destructions)
	verdict := "NOT linearizable"
	if r.Root.Linearizable {
		verdict = "linearizable"
	}
	p("root KMS writes (region key rotations %d asked; %d of unknown outcome settled by sending them again with their request ID; %d answered ones sent again on purpose, as after a lost reply): %s; %s",
		r.RegionKeyRotations, d.Resolved, d.Resent, verdict, r.Root.Stats)
	p("  root KMS writes by outcome:%s", counts(r.Root.Stats.ByOutcome))
	p("  every voter serves region key versions %v (1..N, N primary, same keys)", r.Root.Versions)
	p("audit: %d successes matched to an ok record by request ID (%d on more than one server)", r.AuditChecked, r.AuditDuplicates)
	if len(r.KnownDefects) > 0 {
		p("known defects (logged, not failed):")
		for _, d := range r.KnownDefects {
			p("  %s", d)
		}
	}
	p("invariant violations: %d", len(r.Violations))
	if !r.FirstViolation.IsZero() {
		p("  the earliest operation (or fault step) that broke one started %s after the faults began", r.FirstViolation.Sub(r.Began).Round(time.Millisecond))
	}
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
