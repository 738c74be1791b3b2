package framework

import (
	"fmt"
	"slices"

	"github.com/anishathalye/porcupine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// KeysetOp is an operation on one keyset of the root KMS, as the
// linearizability model sees it.
type KeysetOp int

// The operations of the keyset model.
const (
	// KeysetCreate is CreateKeyset: from no keyset to revision 1 with one
	// version.
	KeysetCreate KeysetOp = iota
	// KeysetAddVersion is UpdateKeyset with step ADD_VERSION: one more
	// version, one more revision.
	KeysetAddVersion
	// KeysetRewrap is UpdateKeyset with step REWRAP: the copies are
	// encrypted again, one more revision, the same versions.
	KeysetRewrap
	// KeysetGet is GetKeyset: it returns the revision and the versions.
	KeysetGet
)

func (o KeysetOp) String() string {
	switch o {
	case KeysetCreate:
		return "keyset create"
	case KeysetAddVersion:
		return "keyset add-version"
	case KeysetRewrap:
		return "keyset rewrap"
	case KeysetGet:
		return "keyset get"
	}
	return fmt.Sprintf("KeysetOp(%d)", int(o))
}

// KeysetInput is what a keyset operation asked for.
type KeysetInput struct {
	Op     KeysetOp
	Keyset string
	// ExpectedRevision, for an update, is UpdateKeysetRequest's
	// expected_revision: 0 applies the step to whatever revision the keyset
	// is at, any other value only to that revision (Aborted otherwise).
	ExpectedRevision uint64
}

// KeysetOutput is what a keyset operation returned.
type KeysetOutput struct {
	Outcome Outcome
	// Revision and Versions are the record's revision and number of
	// versions in a successful reply.
	Revision uint64
	Versions int
	// Retried: the write took more than one attempt (see
	// RegionOutput.Retried): its reply may show the keyset as a later write
	// left it.
	Retried bool
	// Err is the error's text, for the visualization.
	Err string
}

// keysetState is one keyset as the model sees it; the zero value is no
// keyset. The load never promotes, disables or destroys a version, so the
// number of versions only grows.
type keysetState struct {
	Revision uint64
	Versions int
}

// keysetModel is a per-keyset register of (revision, number of versions).
// Operations are calls as in regionModel: one request ID for all attempts,
// writes of unknown outcome given the effect they would have had (and
// ordered last when they had none). The root KMS bumps a keyset's revision
// by exactly one on every change, so a revision that skips or repeats, a
// read that misses an acknowledged update, or an expected revision honoured
// against another revision is caught.
var keysetModel = porcupine.Model{
	Partition: partitionBySubject,
	Init:      func() any { return keysetState{} },
	Step: func(state, input, output any) (bool, any) {
		return keysetStep(state.(keysetState), input.(KeysetInput), output.(KeysetOutput))
	},
	DescribeOperation: func(input, output any) string {
		return describeKeysetOp(input.(KeysetInput), output.(KeysetOutput))
	},
	DescribeOperationMetadata: describeMetadata,
	DescribeState:             func(state any) string { return describeKeysetState(state.(keysetState)) },
}

func keysetStep(s keysetState, in KeysetInput, out KeysetOutput) (bool, keysetState) {
	exists := s.Revision != 0
	switch in.Op {
	case KeysetCreate:
		next := keysetState{Revision: 1, Versions: 1}
		switch out.Outcome {
		case OutcomeOK:
			return !exists && replyShows(out, next), next
		case OutcomeExists:
			return exists, s
		case OutcomeUnknown:
			if !exists {
				return true, next
			}
			return true, s
		}
	case KeysetAddVersion, KeysetRewrap:
		applies := exists && (in.ExpectedRevision == 0 || in.ExpectedRevision == s.Revision)
		next := keysetState{Revision: s.Revision + 1, Versions: s.Versions}
		if in.Op == KeysetAddVersion {
			next.Versions++
		}
		switch out.Outcome {
		case OutcomeOK:
			return applies && replyShows(out, next), next
		case OutcomeNotFound:
			return !exists, s
		case OutcomeAborted:
			return exists && in.ExpectedRevision != 0 && in.ExpectedRevision != s.Revision, s
		case OutcomeUnknown:
			if applies {
				return true, next
			}
			return true, s
		}
	case KeysetGet:
		switch out.Outcome {
		case OutcomeOK:
			return exists && out.Revision == s.Revision && out.Versions == s.Versions, s
		case OutcomeNotFound:
			return !exists, s
		}
	}
	return false, s
}

// replyShows reports whether a write's successful reply fits the state it
// made, next: exactly next, or for a retried write (answered from the
// keyset as it is at the retry) a later revision with at least next's
// versions.
func replyShows(out KeysetOutput, next keysetState) bool {
	if out.Revision == next.Revision && out.Versions == next.Versions {
		return true
	}
	return out.Retried && out.Revision > next.Revision && out.Versions >= next.Versions
}

func describeKeysetOp(in KeysetInput, out KeysetOutput) string {
	call := fmt.Sprintf("%s(%s)", in.Op, in.Keyset)
	if in.ExpectedRevision != 0 {
		call = fmt.Sprintf("%s(%s, at r%d)", in.Op, in.Keyset, in.ExpectedRevision)
	}
	switch out.Outcome {
	case OutcomeOK:
		if out.Retried {
			return fmt.Sprintf("%s -> r%d, %d versions (retried)", call, out.Revision, out.Versions)
		}
		return fmt.Sprintf("%s -> r%d, %d versions", call, out.Revision, out.Versions)
	case OutcomeUnknown:
		return fmt.Sprintf("%s -> unknown (%s)", call, out.Err)
	}
	return fmt.Sprintf("%s -> %s", call, out.Outcome)
}

func describeKeysetState(s keysetState) string {
	if s.Revision == 0 {
		return "absent"
	}
	return fmt.Sprintf("revision %d, %d versions", s.Revision, s.Versions)
}

func describeMetadata(info any) string {
	id, _ := info.(string)
	return "request " + id
}

// historyModel checks a history of region and keyset operations: each
// region and each keyset is a partition of its own, checked by
// regionModel or keysetModel. A partition's state starts as nil, which
// each model's step reads as its initial state (porcupine has one Init for
// every partition).
var historyModel = porcupine.Model{
	Partition: partitionBySubject,
	Init:      func() any { return nil },
	Step: func(state, input, output any) (bool, any) {
		switch input.(type) {
		case KeysetInput:
			if state == nil {
				state = keysetModel.Init()
			}
			return keysetModel.Step(state, input, output)
		default:
			if state == nil {
				state = regionModel.Init()
			}
			return regionModel.Step(state, input, output)
		}
	},
	DescribeOperation: func(input, output any) string {
		if _, ok := input.(KeysetInput); ok {
			return keysetModel.DescribeOperation(input, output)
		}
		return regionModel.DescribeOperation(input, output)
	},
	DescribeOperationMetadata: describeMetadata,
	DescribeState: func(state any) string {
		switch s := state.(type) {
		case nil:
			return "absent"
		case keysetState:
			return describeKeysetState(s)
		}
		return regionModel.DescribeState(state)
	},
}

// partitionBySubject splits a history into one partition per region and
// per keyset, in the order of their names.
func partitionBySubject(history []porcupine.Operation) [][]porcupine.Operation {
	bySubject := map[string][]porcupine.Operation{}
	var names []string
	for _, op := range history {
		s := viewOf(op).subject
		if _, ok := bySubject[s]; !ok {
			names = append(names, s)
		}
		bySubject[s] = append(bySubject[s], op)
	}
	slices.Sort(names)
	out := make([][]porcupine.Operation, 0, len(names))
	for _, n := range names {
		out = append(out, bySubject[n])
	}
	return out
}

// opView is what the history's bookkeeping needs of an operation of either
// kind.
type opView struct {
	// subject is "region/<name>" or "keyset/<name>".
	subject string
	keyset  bool
	// op names the operation for the statistics, e.g. "rotate" or "keyset
	// add-version".
	op      string
	create  bool
	outcome Outcome
	retried bool
}

// sawIt reports whether the operation's answer implies its subject existed.
func (v opView) sawIt() bool {
	return v.outcome == OutcomeOK || v.outcome == OutcomeExists || v.outcome == OutcomeAborted
}

func viewOf(op porcupine.Operation) opView {
	switch in := op.Input.(type) {
	case KeysetInput:
		out := op.Output.(KeysetOutput)
		return opView{subject: "keyset/" + in.Keyset, keyset: true, op: in.Op.String(), create: in.Op == KeysetCreate, outcome: out.Outcome, retried: out.Retried}
	case RegionInput:
		out := op.Output.(RegionOutput)
		return opView{subject: "region/" + in.Region, op: in.Op.String(), create: in.Op == OpCreate, outcome: out.Outcome, retried: out.Retried}
	}
	panic(fmt.Sprintf("framework: a history operation of input %T", op.Input))
}

// KeysetCall is one keyset operation in progress, as Call is for regions.
type KeysetCall struct {
	call
	in KeysetInput
}

// BeginKeyset records the invocation of a keyset operation by client, as
// Begin does for regions: send RequestID with every attempt, call Attempt
// in each, and End with the result.
func (h *History) BeginKeyset(client int, in KeysetInput) *KeysetCall {
	return &KeysetCall{call: h.begin(client), in: in}
}

// End records how the call ended: reply is the Keyset a successful call
// returned, err the call's error. It returns the output recorded.
func (c *KeysetCall) End(reply *rootkmsv1.Keyset, err error) KeysetOutput {
	out := ClassifyKeyset(c.in, reply, err)
	out.Retried = c.in.Op != KeysetGet && c.attempts.Load() > 1
	c.end(c.in, out, c.in.Op == KeysetGet, out.Outcome == OutcomeUnknown)
	return out
}

// ClassifyKeyset turns a keyset reply or error into the model's output.
// Definite answers: success, AlreadyExists for a create, NotFound for an
// update or a read (the load's updates name no version, so NotFound can
// only mean no keyset), and Aborted for an update that named an expected
// revision. Everything else of a write is of unknown outcome, as in
// Classify; so is an Aborted update that named none (the root KMS then
// picked the revision itself, and a refusal says nothing about the
// caller's request).
func ClassifyKeyset(in KeysetInput, reply *rootkmsv1.Keyset, err error) KeysetOutput {
	if err == nil {
		return KeysetOutput{Outcome: OutcomeOK, Revision: reply.GetRecord().GetRevision(), Versions: len(reply.GetRecord().GetVersions())}
	}
	st := status.Convert(err)
	switch {
	case in.Op == KeysetCreate && st.Code() == codes.AlreadyExists:
		return KeysetOutput{Outcome: OutcomeExists}
	case in.Op != KeysetCreate && st.Code() == codes.NotFound:
		return KeysetOutput{Outcome: OutcomeNotFound}
	case in.Op != KeysetCreate && in.Op != KeysetGet && in.ExpectedRevision != 0 && st.Code() == codes.Aborted:
		return KeysetOutput{Outcome: OutcomeAborted}
	}
	return KeysetOutput{Outcome: OutcomeUnknown, Err: st.Code().String()}
}

// KeysetAck is the most a history's successful keyset operations showed of
// one keyset.
type KeysetAck struct {
	Revision uint64
	Versions int
}

// LastAckedKeysets returns, for each keyset, the highest revision and the
// most versions a successful operation of the history returned.
func (h *History) LastAckedKeysets() map[string]KeysetAck {
	out := map[string]KeysetAck{}
	for _, op := range h.Operations() {
		in, isKeyset := op.Input.(KeysetInput)
		if o, _ := op.Output.(KeysetOutput); isKeyset && o.Outcome == OutcomeOK {
			a := out[in.Keyset]
			out[in.Keyset] = KeysetAck{Revision: max(a.Revision, o.Revision), Versions: max(a.Versions, o.Versions)}
		}
	}
	return out
}

// AckedWrites returns the request IDs of the writes (of regions and
// keysets) the history saw succeed: each was committed, so every replica's
// log must hold it.
func (h *History) AckedWrites() []string {
	var out []string
	for _, op := range h.Operations() {
		v := viewOf(op)
		read := v.op == OpGet.String() || v.op == KeysetGet.String()
		if id, _ := op.Metadata.(string); v.outcome == OutcomeOK && !read && id != "" {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}
