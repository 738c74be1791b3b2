package framework

import (
	"cmp"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// RegionOp is an operation on one region of the root KMS, as the
// linearizability model sees it.
type RegionOp int

// The operations of the region model.
const (
	// OpCreate is CreateRegion: a compare-and-set of the primary version
	// from 0 (no region) to 1.
	OpCreate RegionOp = iota
	// OpRotate is RotateRegionKey: the primary version goes from v > 0 to
	// v+1.
	OpRotate
	// OpGet is GetRegion: it returns the primary version, 0 if none.
	OpGet
)

func (o RegionOp) String() string {
	switch o {
	case OpCreate:
		return "create"
	case OpRotate:
		return "rotate"
	case OpGet:
		return "get"
	}
	return fmt.Sprintf("RegionOp(%d)", int(o))
}

// RegionInput is what an operation asked for.
type RegionInput struct {
	Op     RegionOp
	Region string
}

// Outcome is how an operation ended.
type Outcome int

// The outcomes an operation may have.
const (
	// OutcomeOK: the call succeeded; Version is the region's primary
	// version in the reply.
	OutcomeOK Outcome = iota
	// OutcomeExists: CreateRegion answered AlreadyExists.
	OutcomeExists
	// OutcomeNotFound: RotateRegionKey or GetRegion answered NotFound.
	OutcomeNotFound
	// OutcomeUnknown: a write failed in a way that does not say whether it
	// took effect (Unavailable, DeadlineExceeded, a NOT_LEADER that a
	// leader losing its leadership during the write also answers).
	OutcomeUnknown
	// OutcomeAborted: a keyset update that named an expected revision was
	// refused because the keyset is at another one (Aborted).
	OutcomeAborted
)

func (r Outcome) String() string {
	return [...]string{"ok", "exists", "not found", "unknown", "aborted"}[r]
}

// RegionOutput is what an operation returned.
type RegionOutput struct {
	Outcome Outcome
	Version uint32
	// Retried: the write took more than one attempt (one request ID). Its
	// success may then be the answer to a retry of a write an earlier
	// attempt applied, which the root KMS gives from the region as it is at
	// the retry: Version is that of the write or a later one.
	Retried bool
	// Err is the error's text, for the visualization.
	Err string
}

// regionModel is a per-region register of the primary version (0: the
// region does not exist). An operation is one call through
// rootkmsclient.Do, all its attempts with one request ID, from the first
// attempt's call to Do's return: the root KMS applies it at most once. An
// operation of unknown outcome is given the effect it would have had if it
// took effect; since it is given the end of the history as its return time,
// the checker may also order it after every other operation, which is the
// same as it never having happened. A retried write that succeeded took
// effect once, and its reply may show a later version (RegionOutput.Retried).
var regionModel = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byRegion := map[string][]porcupine.Operation{}
		var names []string
		for _, op := range history {
			r := op.Input.(RegionInput).Region
			if _, ok := byRegion[r]; !ok {
				names = append(names, r)
			}
			byRegion[r] = append(byRegion[r], op)
		}
		slices.Sort(names)
		var out [][]porcupine.Operation
		for _, n := range names {
			out = append(out, byRegion[n])
		}
		return out
	},
	Init: func() any { return uint32(0) },
	Step: func(state, input, output any) (bool, any) {
		v := state.(uint32)
		in, out := input.(RegionInput), output.(RegionOutput)
		switch in.Op {
		case OpCreate:
			switch out.Outcome {
			case OutcomeOK:
				return v == 0 && (out.Version == 1 || out.Retried && out.Version > 1), uint32(1)
			case OutcomeExists:
				return v != 0, v
			case OutcomeUnknown:
				if v == 0 {
					return true, uint32(1)
				}
				return true, v
			}
		case OpRotate:
			switch out.Outcome {
			case OutcomeOK:
				return v != 0 && (out.Version == v+1 || out.Retried && out.Version > v+1), v + 1
			case OutcomeNotFound:
				return v == 0, v
			case OutcomeUnknown:
				if v == 0 {
					return true, v
				}
				return true, v + 1
			}
		case OpGet:
			switch out.Outcome {
			case OutcomeOK:
				return v != 0 && out.Version == v, v
			case OutcomeNotFound:
				return v == 0, v
			}
		}
		return false, v
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(RegionInput), output.(RegionOutput)
		switch out.Outcome {
		case OutcomeOK:
			if out.Retried {
				return fmt.Sprintf("%s(%s) -> v%d (retried)", in.Op, in.Region, out.Version)
			}
			return fmt.Sprintf("%s(%s) -> v%d", in.Op, in.Region, out.Version)
		case OutcomeUnknown:
			return fmt.Sprintf("%s(%s) -> unknown (%s)", in.Op, in.Region, out.Err)
		}
		return fmt.Sprintf("%s(%s) -> %s", in.Op, in.Region, out.Outcome)
	},
	DescribeOperationMetadata: func(info any) string {
		id, _ := info.(string)
		return "request " + id
	},
	DescribeState: func(state any) string {
		if v := state.(uint32); v != 0 {
			return fmt.Sprintf("primary v%d", v)
		}
		return "absent"
	},
}

// History records operations on regions from many goroutines, with their
// invoke and return times, for a linearizability check.
type History struct {
	start time.Time

	mu  sync.Mutex
	seq int
	ops []porcupine.Operation
	// dropped counts failed reads: they have no effect, so they are left
	// out of the history.
	dropped int
	// committed, once Resolve set it, holds the request IDs of the writes
	// the cluster's log committed.
	committed map[string]bool
}

// NewHistory starts an empty history; times are measured from now.
func NewHistory() *History { return &History{start: time.Now()} }

// call is what a region call and a keyset call share: who made it, its
// request ID, when it was invoked and how many attempts it made.
type call struct {
	h        *History
	client   int
	id       string
	at       int64
	attempts atomic.Int32
}

// Call is one operation in progress: one call through rootkmsclient.Do,
// however many attempts it makes.
type Call struct {
	call
	in RegionInput
}

// begin starts a call of client: a fresh request ID, the invocation time.
func (h *History) begin(client int) call {
	h.mu.Lock()
	h.seq++
	id := fmt.Sprintf("history-%d-%d", client, h.seq)
	h.mu.Unlock()
	return call{h: h, client: client, id: id, at: int64(time.Since(h.start))}
}

// Begin records the invocation of in by client (a small integer naming
// the caller, for the visualization): call it once before Do, Attempt in
// each attempt, and End with Do's result.
func (h *History) Begin(client int, in RegionInput) *Call {
	return &Call{call: h.begin(client), in: in}
}

// RequestID is the call's own request ID. Send it as the x-request-id
// (audit.RequestIDHeader) of every attempt: rootkmsclient.WithRequestID on
// the context given to Do, or the metadata of a single direct call. The root
// KMS applies a write at most once per request ID and puts the ID in the
// write's Raft command, which is how Resolve finds out whether a write of
// unknown outcome was committed.
func (c *call) RequestID() string { return c.id }

// Attempt records that the call makes one more attempt.
func (c *call) Attempt() { c.attempts.Add(1) }

// end records the call's operation: a read of unknown outcome (it failed)
// is counted and left out, a write of unknown outcome returns at the end of
// the history.
func (c *call) end(in, out any, read, unknown bool) {
	ret := int64(time.Since(c.h.start))
	c.h.mu.Lock()
	defer c.h.mu.Unlock()
	if unknown && read {
		c.h.dropped++
		return
	}
	if unknown {
		ret = -1 // the end of the history; set by Operations
	}
	c.h.ops = append(c.h.ops, porcupine.Operation{ClientId: c.client, Input: in, Call: c.at, Output: out, Return: ret, Metadata: c.id})
}

// End records how the call ended: reply is the Region a successful call
// returned, err the call's error. It returns the output recorded.
func (c *Call) End(reply *rootkmsv1.Region, err error) RegionOutput {
	out := Classify(c.in.Op, reply, err)
	out.Retried = c.in.Op != OpGet && c.attempts.Load() > 1
	c.end(c.in, out, c.in.Op == OpGet, out.Outcome == OutcomeUnknown)
	return out
}

// Resolve tells the history which writes the cluster committed: the
// request IDs of every write command in the log of a replica that holds
// every committed entry (the last leader, stopped after the last write).
// A write of unknown outcome whose ID is not among them never took effect
// anywhere and is left out of the check; one that was committed stays of
// unknown outcome, and the checker decides where it took effect. Leaving
// out what never happened is exact, and stricter than keeping it: a
// replica that applied a write the cluster never committed would show an
// effect with no cause.
func (h *History) Resolve(committed map[string]bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.committed = committed
}

// Classify turns a reply or an error into the model's output. Only answers
// that say what happened are definite: success, AlreadyExists for a create,
// NotFound for a rotate or a read. Every other error of a write is of
// unknown outcome: a follower's NOT_LEADER is a definite refusal, but a
// leader that loses its leadership while its write is in flight answers the
// same NOT_LEADER although the write may still commit.
func Classify(op RegionOp, reply *rootkmsv1.Region, err error) RegionOutput {
	if err == nil {
		return RegionOutput{Outcome: OutcomeOK, Version: reply.GetPrimaryVersion()}
	}
	st := status.Convert(err)
	switch {
	case op == OpCreate && st.Code() == codes.AlreadyExists:
		return RegionOutput{Outcome: OutcomeExists}
	case op != OpCreate && st.Code() == codes.NotFound:
		return RegionOutput{Outcome: OutcomeNotFound}
	}
	return RegionOutput{Outcome: OutcomeUnknown, Err: st.Code().String()}
}

// Operations returns a copy of the history, with the operations of unknown
// outcome returning after every other operation.
func (h *History) Operations() []porcupine.Operation {
	h.mu.Lock()
	defer h.mu.Unlock()
	end := int64(time.Since(h.start))
	for _, op := range h.ops {
		end = max(end, op.Return+1)
	}
	out := slices.Clone(h.ops)
	for i := range out {
		if out[i].Return < 0 {
			out[i].Return = end
		}
	}
	slices.SortFunc(out, func(a, b porcupine.Operation) int { return cmp.Compare(a.Call, b.Call) })
	return out
}

// Checked returns the operations to check: Operations without the writes
// of unknown outcome that Resolve found were never committed, and without
// the creates of unknown outcome (of a region or a keyset) that were called
// after their subject was known to exist (an operation that implies it
// returned before they were called). Regions and keysets are never deleted
// and their names never reused, so such a create found its subject in every
// linearization and had no effect; left in, each one could be ordered
// anywhere after its call, and a few dozen of them make the check
// exponentially slower without it checking anything more.
func (h *History) Checked() (ops []porcupine.Operation, pruned, neverCommitted int) {
	all := h.Operations()
	h.mu.Lock()
	committed := h.committed
	h.mu.Unlock()
	existsBy := map[string]int64{} // the earliest return of an operation that saw the subject
	for _, op := range all {
		v := viewOf(op)
		if at, ok := existsBy[v.subject]; v.sawIt() && (!ok || op.Return < at) {
			existsBy[v.subject] = op.Return
		}
	}
	for _, op := range all {
		v := viewOf(op)
		if id, _ := op.Metadata.(string); v.outcome == OutcomeUnknown && committed != nil && !committed[id] {
			neverCommitted++
			continue
		}
		if at, ok := existsBy[v.subject]; ok && v.create && v.outcome == OutcomeUnknown && op.Call > at {
			pruned++
			continue
		}
		ops = append(ops, op)
	}
	return ops, pruned, neverCommitted
}

// HistoryStats counts a history's operations.
type HistoryStats struct {
	// Ops is the number of operations checked; Regions and Keysets the
	// partitions.
	Ops, Regions, Keysets int
	// ByOutcome counts operations by "op result", e.g. "rotate ok" or
	// "keyset add-version aborted".
	ByOutcome map[string]int
	// DroppedReads are failed reads left out; NeverCommitted writes of
	// unknown outcome that the log shows never took effect, PrunedCreates
	// creates of unknown outcome that could have had none (see Checked).
	DroppedReads, NeverCommitted, PrunedCreates int
	// Retried counts the writes that took more than one attempt.
	Retried int
	// Resolved tells whether Resolve was called.
	Resolved bool
}

func (s HistoryStats) String() string {
	keys := make([]string, 0, len(s.ByOutcome))
	for k := range s.ByOutcome {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	out := fmt.Sprintf("%d operations on %d regions (", s.Ops, s.Regions)
	if s.Keysets > 0 {
		out = fmt.Sprintf("%d operations on %d regions and %d keysets (", s.Ops, s.Regions, s.Keysets)
	}
	for i, k := range keys {
		if i > 0 {
			out += ", "
		}
		out += fmt.Sprintf("%s %d", k, s.ByOutcome[k])
	}
	out += fmt.Sprintf("; %d writes retried; left out: %d failed reads, ", s.Retried, s.DroppedReads)
	if s.Resolved {
		out += fmt.Sprintf("%d writes of unknown outcome never committed, ", s.NeverCommitted)
	}
	return out + fmt.Sprintf("%d creates of unknown outcome after the region or keyset existed)", s.PrunedCreates)
}

// Stats counts the operations Checked returns.
func (h *History) Stats() HistoryStats {
	ops, pruned, never := h.Checked()
	h.mu.Lock()
	dropped, resolved := h.dropped, h.committed != nil
	h.mu.Unlock()
	s := HistoryStats{Ops: len(ops), ByOutcome: map[string]int{}, DroppedReads: dropped, NeverCommitted: never, PrunedCreates: pruned, Resolved: resolved}
	subjects := map[string]bool{}
	for _, op := range ops {
		v := viewOf(op)
		if !subjects[v.subject] {
			subjects[v.subject] = true
			if v.keyset {
				s.Keysets++
			} else {
				s.Regions++
			}
		}
		s.ByOutcome[v.op+" "+v.outcome.String()]++
		if v.retried {
			s.Retried++
		}
	}
	return s
}

// checkTimeout bounds the linearizability check; a check that times out
// fails (an Unknown result proves nothing).
const checkTimeout = 60 * time.Second

// CheckLinearizable checks the history against the region and keyset
// models (historyModel) with porcupine. If it is not linearizable (or the check times out), it fails
// the test and writes porcupine's visualization (an HTML page) into a new
// temporary directory, naming the file. That directory is kept: the test's
// own (t.TempDir) is removed when the test ends, failed or not.
func CheckLinearizable(t testing.TB, h *History) HistoryStats {
	t.Helper()
	ops, _, _ := h.Checked()
	stats := h.Stats()
	start := time.Now()
	res, info := porcupine.CheckOperationsVerbose(historyModel, ops, checkTimeout)
	took := time.Since(start)
	if res == porcupine.Ok {
		t.Logf("porcupine: history linearizable (checked in %s): %s", took.Round(time.Millisecond), stats)
		return stats
	}
	dir, err := os.MkdirTemp("", "cairn-linearizability-")
	if err != nil {
		t.Errorf("porcupine: history is %s, and no directory for its visualization: %v", res, err)
		return stats
	}
	path := filepath.Join(dir, "linearizability.html")
	if err := porcupine.VisualizePath(historyModel, info, path); err != nil {
		t.Errorf("porcupine.VisualizePath(%s) = %v", path, err)
	}
	t.Errorf("porcupine: history is %s (after %s, timeout %s): %s\nvisualization: %s", res, took.Round(time.Millisecond), checkTimeout, stats, path)
	return stats
}

// LastAcked returns, for each region, the highest primary version a
// successful write or read of the history returned (0: none).
func (h *History) LastAcked() map[string]uint32 {
	out := map[string]uint32{}
	for _, op := range h.Operations() {
		in, isRegion := op.Input.(RegionInput)
		if o, _ := op.Output.(RegionOutput); isRegion && o.Outcome == OutcomeOK {
			out[in.Region] = max(out[in.Region], o.Version)
		}
	}
	return out
}
