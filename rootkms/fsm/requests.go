package fsm

import (
	"fmt"
	"strings"
	"sync/atomic"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
)

// MaxRequests bounds the request table: the State remembers the most recent
// MaxRequests accepted commands that carried a request ID, and forgets the
// oldest (lowest Raft index) beyond that. The bound is part of the state
// machine's behaviour (a retry is deduplicated or applied again depending on
// it), so it never changes within a FormatVersion.
const MaxRequests = 4096

// RequestRecord is the remembered outcome of one accepted command that carried
// a request ID: a later command with the same Identity and RequestID is not
// applied again (see FSM.Apply and Result.Duplicate).
type RequestRecord struct {
	// Identity and RequestID are the command's identity and request_id.
	Identity, RequestID string
	// Index is the Raft log index of the command that first carried the pair.
	Index uint64
	// Subject names what the command changed: "region/<name>" (region
	// commands and record_propagation), "keyset/<name>", "member/<id>" or
	// "rollout/<id>".
	Subject string
	// KeyID is the region key version or keyset key ID the command added or
	// changed, 0 if none.
	KeyID uint32
	// Operation names the command (see Operation).
	Operation string
}

func (r RequestRecord) key() requestKey { return requestKey{r.Identity, r.RequestID} }

// requestKey is the pair a retry is recognised by.
type requestKey struct{ identity, requestID string }

// requestIndexEvery is how many records may sit in a table's unindexed tail
// before the next append rebuilds the index. A lookup scans at most this many
// records linearly; an append costs O(1) plus, every requestIndexEvery
// appends, one O(MaxRequests) rebuild: amortized O(MaxRequests /
// requestIndexEvery) map inserts per command instead of cloning a
// MaxRequests-entry map per command.
const requestIndexEvery = 64

// requestTable is the immutable request table of one State.
//
// recs is the window, oldest first, at most MaxRequests records with strictly
// increasing Index and unique keys. Tables share recs' backing array: a table
// grows by appending after its own length, which no earlier table can see, and
// only the first table appended from a given table may do so in place (claimed
// records the claim); any other copies. Eviction reslices from the front, so
// the backing array is copied (and the evicted records freed) whenever append
// runs out of capacity.
//
// byKey indexes every record but the newest tail ones; it may also hold
// records evicted since it was built, which lookups recognise by an Index
// below the window's first. It is built once and never changed, and shared by
// every table until the next rebuild.
//
// The table's contents (recs) are a pure function of the log; byKey and tail
// are caches that change lookup cost, never lookup results.
type requestTable struct {
	recs    []RequestRecord
	byKey   map[requestKey]RequestRecord
	tail    int // recs[len(recs)-tail:] are not in byKey
	claimed atomic.Bool
}

// newRequestTable returns a table of recs (oldest first, valid) with every
// record indexed. It keeps recs.
func newRequestTable(recs []RequestRecord) *requestTable {
	t := &requestTable{recs: recs, byKey: make(map[requestKey]RequestRecord, len(recs))}
	for _, r := range recs {
		t.byKey[r.key()] = r
	}
	return t
}

// lookup returns the record of the pair, or false. t may be nil (empty).
func (t *requestTable) lookup(identity, requestID string) (RequestRecord, bool) {
	if t == nil || len(t.recs) == 0 {
		return RequestRecord{}, false
	}
	k := requestKey{identity, requestID}
	for i := len(t.recs) - 1; i >= len(t.recs)-t.tail; i-- {
		if t.recs[i].key() == k {
			return t.recs[i], true
		}
	}
	if r, ok := t.byKey[k]; ok && r.Index >= t.recs[0].Index {
		return r, true
	}
	return RequestRecord{}, false
}

// with returns a table holding t's records and r, evicting the oldest beyond
// MaxRequests. r.Index must be above every Index in t. t may be nil.
func (t *requestTable) with(r RequestRecord) *requestTable {
	if t == nil {
		return newRequestTable([]RequestRecord{r})
	}
	recs := t.recs
	if !t.claimed.CompareAndSwap(false, true) {
		// Another table already grew from t: appending in place would
		// overwrite its newest record.
		recs = recs[:len(recs):len(recs)]
	}
	recs = append(recs, r)
	if len(recs) > MaxRequests {
		recs = recs[len(recs)-MaxRequests:]
	}
	if t.tail+1 > requestIndexEvery {
		return newRequestTable(recs)
	}
	return &requestTable{recs: recs, byKey: t.byKey, tail: t.tail + 1}
}

// all returns the records, oldest first. The slice is shared: read-only.
func (t *requestTable) all() []RequestRecord {
	if t == nil {
		return nil
	}
	return t.recs
}

// Request returns the remembered outcome of the accepted command that carried
// identity and requestID, or false if the State does not remember one (never
// carried, refused, or evicted past MaxRequests). It costs O(1): a map lookup
// and a scan of at most a few dozen recent records.
func (s *State) Request(identity, requestID string) (RequestRecord, bool) {
	if requestID == "" {
		return RequestRecord{}, false
	}
	return s.requests.lookup(identity, requestID)
}

// requestSubject returns what cmd changes, for its RequestRecord: the subject
// and the key ID (see RequestRecord).
func requestSubject(cmd *statev1.Command) (string, uint32) {
	switch op := cmd.GetOp().(type) {
	case *statev1.Command_CreateRegion:
		return subjectRegion + op.CreateRegion.GetRegion(), 1
	case *statev1.Command_AddRegionKeyVersion:
		return subjectRegion + op.AddRegionKeyVersion.GetRegion(), op.AddRegionKeyVersion.GetVersion().GetVersion()
	case *statev1.Command_SetRegionKeyVersionStatus:
		return subjectRegion + op.SetRegionKeyVersionStatus.GetRegion(), op.SetRegionKeyVersionStatus.GetVersion()
	case *statev1.Command_RegisterMember:
		return subjectMember + op.RegisterMember.GetMember().GetId(), 0
	case *statev1.Command_DeregisterMember:
		return subjectMember + op.DeregisterMember.GetId(), 0
	case *statev1.Command_CreateKeyset:
		var id uint32
		if vs := op.CreateKeyset.GetKeyset().GetVersions(); len(vs) > 0 {
			id = vs[0].GetKeyId()
		}
		return subjectKeyset + op.CreateKeyset.GetKeyset().GetName(), id
	case *statev1.Command_UpdateKeyset:
		var id uint32
		if op.UpdateKeyset.GetStep() != statev1.KeysetStep_KEYSET_STEP_REWRAP {
			id = op.UpdateKeyset.GetKeyId()
		}
		return subjectKeyset + op.UpdateKeyset.GetName(), id
	case *statev1.Command_SetKeysetPolicy:
		return subjectKeyset + op.SetKeysetPolicy.GetName(), 0
	case *statev1.Command_RecordPropagation:
		return subjectRegion + op.RecordPropagation.GetRegion(), 0
	case *statev1.Command_PutRollout:
		return subjectRollout + op.PutRollout.GetRollout().GetId(), 0
	case *statev1.Command_RecordBundleSerial:
		return subjectRegion + op.RecordBundleSerial.GetRegion(), 0
	}
	return "", 0
}

// Operation names cmd's operation for RequestRecord.Operation: the name of
// its oneof field ("create_region", "set_keyset_policy", "put_rollout", ...),
// and for
// update_keyset also the step ("update_keyset/PROMOTE").
func Operation(cmd *statev1.Command) string {
	m := cmd.ProtoReflect()
	fd := m.WhichOneof(m.Descriptor().Oneofs().ByName("op"))
	if fd == nil {
		return ""
	}
	name := string(fd.Name())
	if u := cmd.GetUpdateKeyset(); u != nil {
		name += "/" + strings.TrimPrefix(u.GetStep().String(), "KEYSET_STEP_")
	}
	return name
}

// callerKeyID reports whether cmd's key ID is the caller's choice (the same
// on every attempt), rather than minted per attempt (a new key, the next
// region key version).
func callerKeyID(cmd *statev1.Command) bool {
	switch op := cmd.GetOp().(type) {
	case *statev1.Command_SetRegionKeyVersionStatus:
		return true
	case *statev1.Command_UpdateKeyset:
		return op.UpdateKeyset.GetStep() != statev1.KeysetStep_KEYSET_STEP_ADD_VERSION
	}
	return false
}

// MatchRequest reports whether cmd is a retry of the write remembered as r
// (the same identity and request ID): it must be the same operation on the
// same subject (and, where the caller chose it, the same key). Otherwise the
// request ID was reused for another write, and the error (wrapping
// ErrInvalidCommand) says so: answering it with r's result would report a
// write that never happened.
func MatchRequest(r RequestRecord, cmd *statev1.Command) error {
	subject, keyID := requestSubject(cmd)
	op := Operation(cmd)
	switch {
	case r.Subject != subject, r.Operation != "" && r.Operation != op, callerKeyID(cmd) && r.KeyID != keyID:
		return fmt.Errorf("%w: request ID %q was already used for %s of %s (key %d); %s of %s (key %d) needs its own request ID",
			ErrInvalidCommand, r.RequestID, r.Operation, r.Subject, r.KeyID, op, subject, keyID)
	}
	return nil
}

// The subject prefixes of RequestRecord.Subject.
const (
	subjectRegion  = "region/"
	subjectKeyset  = "keyset/"
	subjectMember  = "member/"
	subjectRollout = "rollout/"
)

// Duplicate returns the Result of a command already applied as r: Duplicate
// set, and the current record of its subject if it still exists.
func (s *State) Duplicate(r RequestRecord) *Result {
	res := &Result{Duplicate: true}
	switch {
	case strings.HasPrefix(r.Subject, subjectRegion):
		if reg, ok := s.Region(strings.TrimPrefix(r.Subject, subjectRegion)); ok {
			res.Region = reg
		}
	case strings.HasPrefix(r.Subject, subjectKeyset):
		if k, ok := s.Keyset(strings.TrimPrefix(r.Subject, subjectKeyset)); ok {
			res.Keyset = k
		}
	case strings.HasPrefix(r.Subject, subjectRollout):
		if ro, ok := s.Rollout(strings.TrimPrefix(r.Subject, subjectRollout)); ok {
			res.Rollout = ro
		}
	}
	return res
}

// validSubject reports whether subject is one of the forms requestSubject
// makes.
func validSubject(subject string) bool {
	for _, p := range []string{subjectRegion, subjectKeyset, subjectMember, subjectRollout} {
		if rest, ok := strings.CutPrefix(subject, p); ok {
			return rest != ""
		}
	}
	return false
}
