package framework

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/anishathalye/porcupine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// kop builds one operation on keyset "k" from call to ret (ret < 0: unknown
// outcome, returning at the end of the history).
func kop(client int, o KeysetOp, expected uint64, call, ret int64, out Outcome, rev uint64, versions int) porcupine.Operation {
	return porcupine.Operation{ClientId: client, Input: KeysetInput{Op: o, Keyset: "k", ExpectedRevision: expected}, Call: call, Return: ret,
		Output: KeysetOutput{Outcome: out, Revision: rev, Versions: versions}}
}

// kretried is kop for a write that succeeded after more than one attempt.
func kretried(client int, o KeysetOp, call, ret int64, rev uint64, versions int) porcupine.Operation {
	p := kop(client, o, 0, call, ret, OutcomeOK, rev, versions)
	p.Output = KeysetOutput{Outcome: OutcomeOK, Revision: rev, Versions: versions, Retried: true}
	return p
}

// TestKeysetModel: the keyset model accepts what a linearizable root KMS may
// answer to creates, version adds, rewraps (with and without an expected
// revision) and reads, and refuses reads that miss an acknowledged update,
// lost creates, revisions applied twice or skipped, and an expected
// revision honoured against another revision.
func TestKeysetModel(t *testing.T) {
	tests := []struct {
		name string
		ops  []porcupine.Operation
		want bool
	}{
		{"sequential", []porcupine.Operation{
			kop(0, KeysetGet, 0, 0, 1, OutcomeNotFound, 0, 0),
			kop(0, KeysetAddVersion, 0, 2, 3, OutcomeNotFound, 0, 0),
			kop(0, KeysetCreate, 0, 4, 5, OutcomeOK, 1, 1),
			kop(0, KeysetCreate, 0, 6, 7, OutcomeExists, 0, 0),
			kop(0, KeysetAddVersion, 0, 8, 9, OutcomeOK, 2, 2),
			kop(0, KeysetRewrap, 0, 10, 11, OutcomeOK, 3, 2),
			kop(0, KeysetAddVersion, 3, 12, 13, OutcomeOK, 4, 3),
			kop(0, KeysetRewrap, 3, 14, 15, OutcomeAborted, 0, 0),
			kop(0, KeysetGet, 0, 16, 17, OutcomeOK, 4, 3),
		}, true},
		{"concurrent read sees either", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kop(0, KeysetAddVersion, 0, 2, 10, OutcomeOK, 2, 2),
			kop(1, KeysetGet, 0, 3, 4, OutcomeOK, 1, 1),
			kop(2, KeysetGet, 0, 5, 6, OutcomeOK, 2, 2),
		}, true},
		{"read misses an acknowledged update", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kop(0, KeysetAddVersion, 0, 2, 3, OutcomeOK, 2, 2),
			kop(1, KeysetGet, 0, 4, 5, OutcomeOK, 1, 1),
		}, false},
		{"read misses an acknowledged rewrap", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kop(0, KeysetRewrap, 0, 2, 3, OutcomeOK, 2, 1),
			kop(1, KeysetGet, 0, 4, 5, OutcomeOK, 1, 1),
		}, false},
		{"acknowledged create lost", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kop(1, KeysetGet, 0, 2, 3, OutcomeNotFound, 0, 0),
		}, false},
		{"two creates acknowledged", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 5, OutcomeOK, 1, 1),
			kop(1, KeysetCreate, 0, 1, 6, OutcomeOK, 1, 1),
		}, false},
		{"an update applied twice", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kop(0, KeysetAddVersion, 0, 2, 3, OutcomeOK, 3, 3),
		}, false},
		{"a rewrap that added a version", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kop(0, KeysetRewrap, 0, 2, 3, OutcomeOK, 2, 2),
		}, false},
		{"two updates at one expected revision both acknowledged", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kop(1, KeysetAddVersion, 1, 2, 10, OutcomeOK, 2, 2),
			kop(2, KeysetRewrap, 1, 3, 11, OutcomeOK, 3, 2),
		}, false},
		{"one of two updates at one expected revision aborted", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kop(1, KeysetAddVersion, 1, 2, 10, OutcomeOK, 2, 2),
			kop(2, KeysetRewrap, 1, 3, 11, OutcomeAborted, 0, 0),
		}, true},
		{"aborted although the revision matched", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kop(1, KeysetAddVersion, 1, 2, 3, OutcomeAborted, 0, 0),
		}, false},
		{"unknown update that took effect", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kop(0, KeysetAddVersion, 0, 2, end, OutcomeUnknown, 0, 0),
			kop(1, KeysetGet, 0, 5, 6, OutcomeOK, 2, 2),
			kop(1, KeysetRewrap, 0, 7, 8, OutcomeOK, 3, 2),
		}, true},
		{"unknown update that did not", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kop(0, KeysetAddVersion, 0, 2, end, OutcomeUnknown, 0, 0),
			kop(1, KeysetGet, 0, 5, 6, OutcomeOK, 1, 1),
			kop(1, KeysetRewrap, 0, 7, 8, OutcomeOK, 2, 1),
		}, true},
		{"unknown update seen, then unseen", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kop(0, KeysetAddVersion, 0, 2, end, OutcomeUnknown, 0, 0),
			kop(1, KeysetGet, 0, 5, 6, OutcomeOK, 2, 2),
			kop(1, KeysetGet, 0, 7, 8, OutcomeOK, 1, 1),
		}, false},
		{"unknown create, then exists", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, end, OutcomeUnknown, 0, 0),
			kop(1, KeysetCreate, 0, 2, 3, OutcomeExists, 0, 0),
			kop(1, KeysetGet, 0, 4, 5, OutcomeOK, 1, 1),
		}, true},
		{"retried update answered after another update", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kretried(0, KeysetAddVersion, 2, 10, 3, 2),
			kop(1, KeysetRewrap, 0, 3, 4, OutcomeOK, 3, 2),
		}, true},
		{"the same without the retry", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kop(0, KeysetAddVersion, 0, 2, 10, OutcomeOK, 3, 2),
			kop(1, KeysetRewrap, 0, 3, 4, OutcomeOK, 3, 2),
		}, false},
		{"retried update applied twice", []porcupine.Operation{
			kop(0, KeysetCreate, 0, 0, 1, OutcomeOK, 1, 1),
			kretried(0, KeysetAddVersion, 2, 10, 3, 3),
			kop(1, KeysetGet, 0, 11, 12, OutcomeOK, 3, 3),
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := porcupine.CheckOperations(keysetModel, tc.ops); got != tc.want {
				t.Errorf("CheckOperations(keysetModel) = %v, want %v", got, tc.want)
			}
			// historyModel, which the tests check with, agrees.
			if got := porcupine.CheckOperations(historyModel, tc.ops); got != tc.want {
				t.Errorf("CheckOperations(historyModel) = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestHistoryModelMixed: regions and keysets of the same name are separate
// partitions, and a violation in a keyset is found among linearizable
// region histories (and the other way round).
func TestHistoryModelMixed(t *testing.T) {
	region := func(o RegionOp, call, ret int64, out Outcome, v uint32) porcupine.Operation {
		return porcupine.Operation{Input: RegionInput{Op: o, Region: "k"}, Call: call, Return: ret, Output: RegionOutput{Outcome: out, Version: v}}
	}
	ops := []porcupine.Operation{
		region(OpCreate, 0, 1, OutcomeOK, 1),
		kop(0, KeysetCreate, 0, 2, 3, OutcomeOK, 1, 1),
		region(OpRotate, 4, 5, OutcomeOK, 2),
		kop(0, KeysetAddVersion, 0, 6, 7, OutcomeOK, 2, 2),
		region(OpGet, 8, 9, OutcomeOK, 2),
		kop(0, KeysetGet, 0, 10, 11, OutcomeOK, 2, 2),
	}
	if !porcupine.CheckOperations(historyModel, ops) {
		t.Fatal("CheckOperations(region and keyset k) = false, want true")
	}
	staleKeyset := append(ops[:len(ops):len(ops)], kop(1, KeysetGet, 0, 12, 13, OutcomeOK, 1, 1))
	if porcupine.CheckOperations(historyModel, staleKeyset) {
		t.Error("CheckOperations(a keyset read missing an acknowledged update) = true, want false")
	}
	staleRegion := append(ops[:len(ops):len(ops)], region(OpGet, 12, 13, OutcomeOK, 1))
	if porcupine.CheckOperations(historyModel, staleRegion) {
		t.Error("CheckOperations(a region read missing an acknowledged rotation) = true, want false")
	}
}

func TestClassifyKeyset(t *testing.T) {
	reply := &rootkmsv1.Keyset{Record: &statev1.KeysetRecord{Revision: 3, Versions: []*statev1.KeysetVersionRecord{{KeyId: 1}, {KeyId: 2}}}}
	aborted := status.Error(codes.Aborted, "rootkms: keyset is at revision 4, not 3")
	tests := []struct {
		in    KeysetInput
		reply *rootkmsv1.Keyset
		err   error
		want  KeysetOutput
	}{
		{KeysetInput{Op: KeysetCreate}, reply, nil, KeysetOutput{Outcome: OutcomeOK, Revision: 3, Versions: 2}},
		{KeysetInput{Op: KeysetCreate}, nil, status.Error(codes.AlreadyExists, "exists"), KeysetOutput{Outcome: OutcomeExists}},
		{KeysetInput{Op: KeysetCreate}, nil, status.Error(codes.NotFound, "no region"), KeysetOutput{Outcome: OutcomeUnknown, Err: "NotFound"}},
		{KeysetInput{Op: KeysetAddVersion}, nil, status.Error(codes.NotFound, "no keyset"), KeysetOutput{Outcome: OutcomeNotFound}},
		{KeysetInput{Op: KeysetAddVersion, ExpectedRevision: 3}, nil, aborted, KeysetOutput{Outcome: OutcomeAborted}},
		{KeysetInput{Op: KeysetRewrap}, nil, aborted, KeysetOutput{Outcome: OutcomeUnknown, Err: "Aborted"}},
		{KeysetInput{Op: KeysetRewrap}, nil, status.Error(codes.Unavailable, "down"), KeysetOutput{Outcome: OutcomeUnknown, Err: "Unavailable"}},
		{KeysetInput{Op: KeysetGet}, reply, nil, KeysetOutput{Outcome: OutcomeOK, Revision: 3, Versions: 2}},
		{KeysetInput{Op: KeysetGet}, nil, status.Error(codes.NotFound, "no keyset"), KeysetOutput{Outcome: OutcomeNotFound}},
	}
	for _, tc := range tests {
		if got := ClassifyKeyset(tc.in, tc.reply, tc.err); got != tc.want {
			t.Errorf("ClassifyKeyset(%+v, %v, %v) = %+v, want %+v", tc.in, tc.reply, tc.err, got, tc.want)
		}
	}
}

// TestHistoryWithKeysets: keyset calls are recorded beside region calls
// with their own request IDs; a failed keyset read is left out, a keyset
// write of unknown outcome returns last, a keyset create of unknown outcome
// after the keyset was seen is pruned; the statistics count both kinds; the
// check passes, and fails once a read misses an acknowledged keyset update.
func TestHistoryWithKeysets(t *testing.T) {
	h := NewHistory()
	rec := func(rev uint64, n int) *rootkmsv1.Keyset {
		r := &statev1.KeysetRecord{Revision: rev}
		for i := range n {
			r.Versions = append(r.Versions, &statev1.KeysetVersionRecord{KeyId: uint32(i + 1)})
		}
		return &rootkmsv1.Keyset{Record: r}
	}
	h.Begin(0, RegionInput{Op: OpCreate, Region: "a"}).End(&rootkmsv1.Region{PrimaryVersion: 1}, nil)
	h.BeginKeyset(0, KeysetInput{Op: KeysetCreate, Keyset: "k"}).End(rec(1, 1), nil)
	add := h.BeginKeyset(1, KeysetInput{Op: KeysetAddVersion, Keyset: "k"})
	add.Attempt()
	add.Attempt()
	if out := add.End(rec(2, 2), nil); !out.Retried || out.Revision != 2 {
		t.Errorf("End of an add after two attempts = %+v, want revision 2, Retried", out)
	}
	lost := h.BeginKeyset(2, KeysetInput{Op: KeysetRewrap, Keyset: "k"})
	lost.End(nil, status.Error(codes.Unavailable, "down"))
	h.BeginKeyset(2, KeysetInput{Op: KeysetGet, Keyset: "k"}).End(nil, status.Error(codes.Unavailable, "down"))
	h.BeginKeyset(1, KeysetInput{Op: KeysetCreate, Keyset: "k"}).End(nil, status.Error(codes.DeadlineExceeded, "slow"))
	h.BeginKeyset(0, KeysetInput{Op: KeysetAddVersion, Keyset: "k", ExpectedRevision: 1}).End(nil, status.Error(codes.Aborted, "at 2"))
	h.BeginKeyset(0, KeysetInput{Op: KeysetGet, Keyset: "k"}).End(rec(2, 2), nil)

	ops, pruned, _ := h.Checked()
	if len(ops) != 6 || pruned != 1 {
		t.Fatalf("Checked() = %d operations, %d pruned; want 6, 1", len(ops), pruned)
	}
	var last int64
	for _, o := range ops {
		if o.Metadata != lost.RequestID() {
			last = max(last, o.Return)
		}
	}
	for _, o := range ops {
		if o.Metadata == lost.RequestID() && o.Return <= last {
			t.Errorf("unknown rewrap returns at %d, want after every other operation (%d)", o.Return, last)
		}
	}
	st := h.Stats()
	if st.Regions != 1 || st.Keysets != 1 || st.DroppedReads != 1 || st.Retried != 1 ||
		st.ByOutcome["keyset add-version aborted"] != 1 || st.ByOutcome["keyset rewrap unknown"] != 1 || st.ByOutcome["create ok"] != 1 {
		t.Errorf("Stats() = %s", st)
	}
	if !strings.Contains(st.String(), "on 1 regions and 1 keysets") {
		t.Errorf("Stats().String() = %q, want it to count the keysets", st)
	}
	if got := h.LastAckedKeysets()["k"]; got != (KeysetAck{Revision: 2, Versions: 2}) {
		t.Errorf("LastAckedKeysets()[k] = %+v, want revision 2 with 2 versions", got)
	}
	if got := h.LastAcked(); len(got) != 1 || got["a"] != 1 {
		t.Errorf("LastAcked() = %v, want only region a at 1", got)
	}
	if got := h.AckedWrites(); len(got) != 3 {
		t.Errorf("AckedWrites() = %v, want the region create, the keyset create and the add", got)
	}

	ft := &fakeT{}
	CheckLinearizable(ft, h)
	if ft.failed {
		t.Fatalf("CheckLinearizable(a linearizable history) failed: %s", ft.msgs)
	}
	// A read that misses the acknowledged add: the check fails.
	h.BeginKeyset(1, KeysetInput{Op: KeysetGet, Keyset: "k"}).End(rec(1, 1), nil)
	ft = &fakeT{}
	CheckLinearizable(ft, h)
	if !ft.failed || !strings.Contains(ft.msgs, "Illegal") {
		t.Fatalf("CheckLinearizable(a read missing an acknowledged keyset update): failed %v, %q; want an Illegal history", ft.failed, ft.msgs)
	}
	// The visualization it points to is written; this test removes it.
	_, path, ok := strings.Cut(ft.msgs, "visualization: ")
	path = strings.TrimSpace(path)
	if fi, err := os.Stat(path); !ok || err != nil || fi.Size() == 0 {
		t.Errorf("visualization %q: %v", path, err)
	}
	if ok && strings.HasPrefix(filepath.Base(filepath.Dir(path)), "cairn-linearizability-") {
		os.RemoveAll(filepath.Dir(path))
	}
}

// fakeT records what CheckLinearizable reports, so that a test can see it
// fail.
type fakeT struct {
	testing.TB
	failed bool
	msgs   string
}

func (f *fakeT) Helper() {}
func (f *fakeT) Logf(format string, args ...any) {
	f.msgs += fmt.Sprintf(format, args...) + "\n"
}
func (f *fakeT) Errorf(format string, args ...any) {
	f.failed = true
	f.msgs += fmt.Sprintf(format, args...) + "\n"
}
