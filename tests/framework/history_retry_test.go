package framework

import (
	"testing"

	"github.com/anishathalye/porcupine"

	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// retried is op for a write that took more than one attempt.
func retried(client int, o RegionOp, call, ret int64, v uint32) porcupine.Operation {
	p := op(client, o, call, ret, OutcomeOK, v)
	p.Output = RegionOutput{Outcome: OutcomeOK, Version: v, Retried: true}
	return p
}

// TestRegionModelRetried: a write retried with one request ID is one
// operation that took effect once; its reply (the answer to a retry of a
// write already applied) may show a later version, but a second
// application is still caught.
func TestRegionModelRetried(t *testing.T) {
	tests := []struct {
		name string
		ops  []porcupine.Operation
		want bool
	}{
		{"retried rotation answered after another rotation", []porcupine.Operation{
			op(0, OpCreate, 0, 1, OutcomeOK, 1),
			retried(0, OpRotate, 2, 10, 3),
			op(1, OpRotate, 3, 4, OutcomeOK, 3),
		}, true},
		{"the same without the retry", []porcupine.Operation{
			op(0, OpCreate, 0, 1, OutcomeOK, 1),
			op(0, OpRotate, 2, 10, OutcomeOK, 3),
			op(1, OpRotate, 3, 4, OutcomeOK, 3),
		}, false},
		{"retried create answered after a rotation", []porcupine.Operation{
			retried(0, OpCreate, 0, 10, 2),
			op(1, OpRotate, 2, 3, OutcomeOK, 2),
		}, true},
		{"retried rotation applied twice", []porcupine.Operation{
			op(0, OpCreate, 0, 1, OutcomeOK, 1),
			retried(0, OpRotate, 2, 10, 3),
			op(1, OpGet, 11, 12, OutcomeOK, 3),
		}, false},
		{"retried rotation answered with an older version", []porcupine.Operation{
			op(0, OpCreate, 0, 1, OutcomeOK, 1),
			retried(0, OpRotate, 2, 10, 1),
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

// TestCallAttempts: a call is one operation however many attempts it made;
// a write with more than one is marked Retried, a read never is.
func TestCallAttempts(t *testing.T) {
	h := NewHistory()
	w := h.Begin(0, RegionInput{Op: OpRotate, Region: "a"})
	id := w.RequestID()
	w.Attempt()
	w.Attempt()
	if got := w.RequestID(); got != id {
		t.Errorf("RequestID() = %q after attempts, want %q", got, id)
	}
	if out := w.End(&rootkmsv1.Region{PrimaryVersion: 2}, nil); !out.Retried {
		t.Errorf("End of a write after two attempts = %+v, want Retried", out)
	}
	once := h.Begin(0, RegionInput{Op: OpRotate, Region: "a"})
	once.Attempt()
	if out := once.End(&rootkmsv1.Region{PrimaryVersion: 3}, nil); out.Retried {
		t.Errorf("End of a write after one attempt = %+v, want not Retried", out)
	}
	g := h.Begin(1, RegionInput{Op: OpGet, Region: "a"})
	g.Attempt()
	g.Attempt()
	if out := g.End(&rootkmsv1.Region{PrimaryVersion: 3}, nil); out.Retried {
		t.Errorf("End of a read after two attempts = %+v, want not Retried", out)
	}
	if n := len(h.Operations()); n != 3 {
		t.Errorf("Operations() = %d, want 3 (one per call)", n)
	}
}
