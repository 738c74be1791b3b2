package framework

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// op builds one operation on region "a" from call to ret (ret < 0: unknown
// outcome, returning at the end of the history).
func op(client int, o RegionOp, call, ret int64, out Outcome, v uint32) porcupine.Operation {
	return porcupine.Operation{ClientId: client, Input: RegionInput{Op: o, Region: "a"}, Call: call, Return: ret, Output: RegionOutput{Outcome: out, Version: v}}
}

// end is the return time of operations of unknown outcome in these tests.
const end = 1000

// TestRegionModel: the model accepts what a linearizable root KMS may
// answer and refuses stale reads, lost acknowledged writes and double
// applications, with operations of unknown outcome allowed either way.
func TestRegionModel(t *testing.T) {
	tests := []struct {
		name string
		ops  []porcupine.Operation
		want bool
	}{
		{"sequential", []porcupine.Operation{
			op(0, OpGet, 0, 1, OutcomeNotFound, 0),
			op(0, OpCreate, 2, 3, OutcomeOK, 1),
			op(0, OpCreate, 4, 5, OutcomeExists, 0),
			op(0, OpRotate, 6, 7, OutcomeOK, 2),
			op(0, OpGet, 8, 9, OutcomeOK, 2),
		}, true},
		{"concurrent read sees either", []porcupine.Operation{
			op(0, OpCreate, 0, 1, OutcomeOK, 1),
			op(0, OpRotate, 2, 10, OutcomeOK, 2),
			op(1, OpGet, 3, 4, OutcomeOK, 1),
			op(2, OpGet, 5, 6, OutcomeOK, 2),
		}, true},
		{"stale read after an acknowledged rotation", []porcupine.Operation{
			op(0, OpCreate, 0, 1, OutcomeOK, 1),
			op(0, OpRotate, 2, 3, OutcomeOK, 2),
			op(1, OpGet, 4, 5, OutcomeOK, 1),
		}, false},
		{"acknowledged create lost", []porcupine.Operation{
			op(0, OpCreate, 0, 1, OutcomeOK, 1),
			op(1, OpGet, 2, 3, OutcomeNotFound, 0),
		}, false},
		{"two creates acknowledged", []porcupine.Operation{
			op(0, OpCreate, 0, 5, OutcomeOK, 1),
			op(1, OpCreate, 1, 6, OutcomeOK, 1),
		}, false},
		{"a rotation applied twice", []porcupine.Operation{
			op(0, OpCreate, 0, 1, OutcomeOK, 1),
			op(0, OpRotate, 2, 3, OutcomeOK, 3),
		}, false},
		{"exists without a create", []porcupine.Operation{
			op(0, OpCreate, 0, 1, OutcomeExists, 0),
		}, false},
		{"exists after a create of unknown outcome", []porcupine.Operation{
			op(0, OpCreate, 0, end, OutcomeUnknown, 0),
			op(1, OpCreate, 2, 3, OutcomeExists, 0),
		}, true},
		{"unknown rotation that took effect", []porcupine.Operation{
			op(0, OpCreate, 0, 1, OutcomeOK, 1),
			op(0, OpRotate, 2, end, OutcomeUnknown, 0),
			op(1, OpGet, 5, 6, OutcomeOK, 2),
			op(1, OpRotate, 7, 8, OutcomeOK, 3),
		}, true},
		{"unknown rotation that did not", []porcupine.Operation{
			op(0, OpCreate, 0, 1, OutcomeOK, 1),
			op(0, OpRotate, 2, end, OutcomeUnknown, 0),
			op(1, OpGet, 5, 6, OutcomeOK, 1),
			op(1, OpRotate, 7, 8, OutcomeOK, 2),
		}, true},
		{"unknown rotation seen, then unseen", []porcupine.Operation{
			op(0, OpCreate, 0, 1, OutcomeOK, 1),
			op(0, OpRotate, 2, end, OutcomeUnknown, 0),
			op(1, OpGet, 5, 6, OutcomeOK, 2),
			op(1, OpGet, 7, 8, OutcomeOK, 1),
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := porcupine.CheckOperations(regionModel, tc.ops); got != tc.want {
				t.Errorf("CheckOperations = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestRegionModelPartitions: regions are checked independently, so a
// violation in one is found among many linearizable ones.
func TestRegionModelPartitions(t *testing.T) {
	var ops []porcupine.Operation
	for i, r := range []string{"a", "b", "c"} {
		at := int64(10 * i)
		ops = append(ops,
			porcupine.Operation{Input: RegionInput{Op: OpCreate, Region: r}, Call: at, Return: at + 1, Output: RegionOutput{Outcome: OutcomeOK, Version: 1}},
			porcupine.Operation{Input: RegionInput{Op: OpGet, Region: r}, Call: at + 2, Return: at + 3, Output: RegionOutput{Outcome: OutcomeOK, Version: 1}})
	}
	if !porcupine.CheckOperations(regionModel, ops) {
		t.Fatal("CheckOperations(three regions) = false, want true")
	}
	ops = append(ops, porcupine.Operation{Input: RegionInput{Op: OpGet, Region: "b"}, Call: 100, Return: 101, Output: RegionOutput{Outcome: OutcomeNotFound}})
	res, info := porcupine.CheckOperationsVerbose(regionModel, ops, time.Minute)
	if res != porcupine.Illegal {
		t.Fatalf("CheckOperationsVerbose(b lost) = %v, want Illegal", res)
	}
	// The visualization of a failure is written (it is what a failing test
	// points to).
	path := filepath.Join(t.TempDir(), "linearizability.html")
	if err := porcupine.VisualizePath(regionModel, info, path); err != nil {
		t.Fatalf("VisualizePath = %v", err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Size() == 0 {
		t.Fatalf("visualization %s: %v, %v", path, fi, err)
	}
}

func TestClassify(t *testing.T) {
	notLeader := status.Error(codes.FailedPrecondition, "rootkms: not the leader")
	tests := []struct {
		op    RegionOp
		reply *rootkmsv1.Region
		err   error
		want  Outcome
	}{
		{OpCreate, &rootkmsv1.Region{PrimaryVersion: 1}, nil, OutcomeOK},
		{OpCreate, nil, status.Error(codes.AlreadyExists, "exists"), OutcomeExists},
		{OpCreate, nil, status.Error(codes.NotFound, "?"), OutcomeUnknown},
		{OpCreate, nil, notLeader, OutcomeUnknown},
		{OpRotate, nil, status.Error(codes.NotFound, "no region"), OutcomeNotFound},
		{OpRotate, nil, status.Error(codes.Unavailable, "down"), OutcomeUnknown},
		{OpRotate, nil, status.Error(codes.DeadlineExceeded, "slow"), OutcomeUnknown},
		{OpRotate, nil, errors.New("not a status"), OutcomeUnknown},
		{OpGet, &rootkmsv1.Region{PrimaryVersion: 4}, nil, OutcomeOK},
		{OpGet, nil, status.Error(codes.NotFound, "no region"), OutcomeNotFound},
		{OpGet, nil, notLeader, OutcomeUnknown},
	}
	for _, tc := range tests {
		if got := Classify(tc.op, tc.reply, tc.err); got.Outcome != tc.want {
			t.Errorf("Classify(%v, %v, %v) = %v, want %v", tc.op, tc.reply, tc.err, got.Outcome, tc.want)
		}
	}
}

// TestHistory: failed reads are left out, writes of unknown outcome return
// after everything else.
func TestHistory(t *testing.T) {
	h := NewHistory()
	c := h.Begin(0, RegionInput{Op: OpCreate, Region: "a"})
	c.End(&rootkmsv1.Region{PrimaryVersion: 1}, nil)
	u := h.Begin(1, RegionInput{Op: OpRotate, Region: "a"})
	u.End(nil, status.Error(codes.Unavailable, "down"))
	g := h.Begin(2, RegionInput{Op: OpGet, Region: "a"})
	g.End(nil, status.Error(codes.Unavailable, "down"))
	late := h.Begin(0, RegionInput{Op: OpGet, Region: "a"})
	late.End(&rootkmsv1.Region{PrimaryVersion: 1}, nil)

	ops := h.Operations()
	if len(ops) != 3 {
		t.Fatalf("Operations() has %d operations, want 3 (the failed read left out)", len(ops))
	}
	var last int64
	for _, o := range ops {
		if o.Input.(RegionInput).Op != OpRotate {
			last = max(last, o.Return)
		}
	}
	for _, o := range ops {
		if o.Input.(RegionInput).Op == OpRotate && o.Return <= last {
			t.Errorf("unknown rotation returns at %d, want after every other operation (%d)", o.Return, last)
		}
	}
	// A create of unknown outcome called after the region was seen had no
	// effect: it is not checked.
	noop := h.Begin(1, RegionInput{Op: OpCreate, Region: "a"})
	noop.End(nil, status.Error(codes.DeadlineExceeded, "slow"))
	if ops, pruned, never := h.Checked(); len(ops) != 3 || pruned != 1 || never != 0 {
		t.Errorf("Checked() = %d operations, %d pruned, %d never committed; want 3, 1, 0", len(ops), pruned, never)
	}
	st := h.Stats()
	if st.Ops != 3 || st.DroppedReads != 1 || st.PrunedCreates != 1 || st.ByOutcome["rotate unknown"] != 1 {
		t.Errorf("Stats() = %s", st)
	}
	// The log shows the writes of unknown outcome were never committed:
	// they are left out. Had one been, it would stay of unknown outcome.
	h.Resolve(map[string]bool{})
	if ops, _, never := h.Checked(); len(ops) != 2 || never != 2 {
		t.Errorf("Checked() after Resolve(none committed) = %d operations, %d never committed; want 2, 2", len(ops), never)
	}
	h.Resolve(map[string]bool{u.RequestID(): true})
	if ops, _, never := h.Checked(); len(ops) != 3 || never != 1 {
		t.Errorf("Checked() after Resolve(rotation committed) = %d operations, %d never committed; want 3, 1", len(ops), never)
	}
	if c.RequestID() == u.RequestID() || !strings.HasPrefix(c.RequestID(), "history-") {
		t.Errorf("request IDs %q and %q, want distinct history-... IDs", c.RequestID(), u.RequestID())
	}
	if got := h.LastAcked()["a"]; got != 1 {
		t.Errorf("LastAcked()[a] = %d, want 1", got)
	}
}
