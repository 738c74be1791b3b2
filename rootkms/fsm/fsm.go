// Package fsm is the Raft state machine of the root KMS: the region master
// keys, each version wrapped (encrypted) by the root master key (RMK), the
// customer keysets (the system of record: policy, version lifecycle, and one
// copy per region encrypted under the region key), the replicas' API
// addresses, the staged rollouts' durable records, and the request table
// that makes writes idempotent.
//
// The FSM never sees plaintext keys and imports no gRPC. It follows
// hashicorp/raft's contract: Apply is deterministic (it uses only the command's
// bytes, never the clock, randomness or map order), Snapshot only captures a
// pointer to the immutable current State, and Persist does the IO.
//
// Commands and snapshots are the statev1.Command and statev1.Snapshot
// messages of proto/cairn/rootkms/state/v1/state.proto, format version 1.
package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/region"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
)

// FormatVersion is the Command and Snapshot format this package writes and
// understands.
const FormatVersion = 1

// Errors returned in Result.Err (and by Restore, EncodeCommand and
// ValidRegionName), wrapped with detail; branch on them with errors.Is.
var (
	// ErrRegionExists: create_region names a region that exists.
	ErrRegionExists = errors.New("fsm: region exists")
	// ErrNoRegion: the command names a region that does not exist.
	ErrNoRegion = errors.New("fsm: no such region")
	// ErrNoVersion: set_region_key_version_status names a version the region
	// does not have.
	ErrNoVersion = errors.New("fsm: no such region key version")
	// ErrBadVersion: a new version is not the region's highest + 1 (1 for a
	// new region), or it has no wrapped key.
	ErrBadVersion = errors.New("fsm: bad region key version")
	// ErrBadTransition: the requested status change is not allowed.
	ErrBadTransition = errors.New("fsm: status transition not allowed")
	// ErrWrongRMK: wrapped material is under another RMK than this cluster's,
	// or a snapshot belongs to another genesis or RMK.
	ErrWrongRMK = errors.New("fsm: wrong root master key")
	// ErrInvalidName: a region name does not match ^[a-z][a-z0-9-]{0,62}$.
	ErrInvalidName = region.ErrInvalidName
	// ErrInvalidCommand: the command is malformed (undecodable bytes, format
	// version 0, no operation, missing time, empty member fields, an invalid
	// keyset name, record, step, policy or observation, or keyset copies that
	// do not match the keyset's regions and version states).
	ErrInvalidCommand = errors.New("fsm: invalid command")
	// ErrInvalidSnapshot: Restore refused a snapshot (too large, undecodable,
	// unknown format or inconsistent state).
	ErrInvalidSnapshot = errors.New("fsm: invalid snapshot")
	// ErrKeysetExists: create_keyset names a keyset that exists. Keysets are
	// never deleted, so a name is never reused.
	ErrKeysetExists = errors.New("fsm: keyset exists")
	// ErrNoKeyset: the command names a keyset that does not exist.
	ErrNoKeyset = errors.New("fsm: no such keyset")
	// ErrNoKeysetVersion: update_keyset names a key ID the keyset does not
	// have.
	ErrNoKeysetVersion = errors.New("fsm: no such keyset version")
	// ErrStaleRevision: a keyset or rollout change was made against another
	// revision than the record's (another change came first); read the
	// record again and redo the change.
	ErrStaleRevision = errors.New("fsm: stale revision")
	// ErrRolloutExists: put_rollout creates a rollout whose ID the state
	// holds.
	ErrRolloutExists = errors.New("fsm: rollout exists")
	// ErrNoRollout: put_rollout updates a rollout the state does not hold
	// (never created, or finished and evicted).
	ErrNoRollout = errors.New("fsm: no such rollout")
	// ErrRegionBusy: put_rollout would put a region in flight in two
	// rollouts; the message names the other rollout and the region.
	ErrRegionBusy = errors.New("fsm: region busy with another rollout")
	// ErrStaleEpoch: a rollout write carries a lower epoch than the
	// record's, or the record's epoch with another owner: another controller
	// took the rollout over.
	ErrStaleEpoch = errors.New("fsm: stale rollout epoch")
	// ErrUnsupportedCommand is what Apply panics with (wrapped) when a log
	// entry was written by a newer binary: a format version above
	// FormatVersion, or an operation this binary does not know.
	ErrUnsupportedCommand = errors.New("fsm: command needs a newer binary")
)

// Result is what Apply returns for a LogCommand entry; the proposer gets it
// from raft.ApplyFuture.Response().
type Result struct {
	// Region is the region after the change, for accepted region commands
	// and record_propagation; nil otherwise. It is shared with the published
	// State: read-only.
	Region *Region
	// Keyset is the keyset record after the change, for accepted keyset
	// commands (create_keyset, update_keyset, set_keyset_policy); nil
	// otherwise. It is shared with the published State: read-only.
	Keyset *statev1.KeysetRecord
	// Rollout is the rollout record after the change, for an accepted
	// put_rollout; nil otherwise. It is shared with the published State:
	// read-only.
	Rollout *statev1.RolloutRecord
	// Duplicate is true if the command was not applied because the State
	// remembers an accepted command with the same identity and request_id
	// (State.Request). Err is then nil, the State is unchanged, and Region, Keyset
	// or Rollout is the current record of the remembered command's subject,
	// if it is a region, keyset or rollout still held (it may have changed
	// since).
	Duplicate bool
	// Err is nil if the command was applied (or is a Duplicate). Otherwise it
	// wraps one of the package's sentinel errors and the state did not
	// change; a refused command is not remembered in the request table.
	Err error
}

// FSM is the root KMS state machine. It implements raft.FSM. Apply, Snapshot
// and Restore are called by one goroutine (raft's); State and AppliedIndex may
// be called from any goroutine at any time.
type FSM struct {
	genesisID string
	kcv       []byte
	state     atomic.Pointer[State]
	applied   atomic.Uint64
}

var _ raft.FSM = (*FSM)(nil)

// New returns an empty FSM of the RMK lineage genesisID and rmkKCV (the RMK's
// key check value); both are public values from the genesis manifest. The FSM
// accepts only wrapped keys whose rmk_kcv equals rmkKCV, and restores only
// snapshots of the same genesisID and rmkKCV.
//
// New panics if genesisID or rmkKCV is empty: such an FSM could not tell its
// lineage from another.
func New(genesisID string, rmkKCV []byte) *FSM {
	if genesisID == "" || len(rmkKCV) == 0 {
		panic("fsm: New needs a genesis ID and an RMK key check value")
	}
	f := &FSM{genesisID: genesisID, kcv: bytes.Clone(rmkKCV)}
	f.state.Store(&State{})
	return f
}

// State returns the current State. It does not lock and does not copy: the
// State is immutable.
func (f *FSM) State() *State { return f.state.Load() }

// AppliedIndex returns the Raft index of the last LogCommand entry Apply
// processed, accepted or refused; 0 before the first. Restore leaves it
// unchanged (a snapshot does not record its index), so after a restore it is a
// lower bound until the next entry is applied. Unlike raft.Raft.AppliedIndex,
// which runs ahead of the FSM, it moves only after the entry's effect is
// visible through State.
func (f *FSM) AppliedIndex() uint64 { return f.applied.Load() }

// Apply applies one committed log entry and, for a LogCommand entry, returns a
// *Result. hashicorp/raft passes only LogCommand entries to Apply; Apply
// returns nil and does nothing for any other type.
//
// Apply is deterministic: the outcome depends only on the current State and
// the entry's bytes (times come from Command.time, the proposer's clock). A
// refused command returns Result.Err, leaves the State untouched (the same
// pointer) and is identical on every replica. An accepted command publishes a
// new State with Index l.Index.
//
// Apply panics with an error wrapping ErrUnsupportedCommand if the entry has a
// format_version above FormatVersion, or no operation this binary knows
// together with unknown fields (an operation added by a newer binary). Such an
// entry was written by a newer leader; skipping it would let this replica
// silently diverge from upgraded ones, so the node halts instead and must be
// upgraded before it applies this log. Malformed entries that no binary could
// apply (undecodable, format_version 0, no operation at all) are refused with
// ErrInvalidCommand rather than halting every replica on every replay.
//
// An accepted command with a request_id is remembered in the State's request
// table (see RequestRecord and MaxRequests). A later well-formed command with
// the same identity and request_id is not applied: if it is the same
// operation on the same subject (MatchRequest), Apply returns a Result with
// Duplicate set; otherwise the request ID was reused and it is refused. Both
// leave the State untouched.
func (f *FSM) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	res := f.applyCommand(l)
	// Not deferred: an entry Apply panics on was not applied.
	f.applied.Store(l.Index)
	return res
}

func (f *FSM) applyCommand(l *raft.Log) *Result {
	var cmd statev1.Command
	if err := proto.Unmarshal(l.Data, &cmd); err != nil {
		// The proto error text is not stable across binaries; leave it out
		// so that the result is the same on every replica.
		return &Result{Err: fmt.Errorf("%w: log entry %d does not decode", ErrInvalidCommand, l.Index)}
	}
	if err := checkFormat(l.Index, &cmd); err != nil {
		return &Result{Err: err}
	}
	if !validTime(cmd.GetTime()) {
		return &Result{Err: fmt.Errorf("%w: log entry %d: time missing, invalid or not after 1970", ErrInvalidCommand, l.Index)}
	}
	// Time never goes backwards in the state, whatever the proposer's clock.
	prev := f.state.Load()
	at := cmd.GetTime().AsTime()
	if latest := prev.Latest(); at.Before(latest) {
		at = latest
	}
	if id := cmd.GetRequestId(); id != "" {
		if r, ok := prev.requests.lookup(cmd.GetIdentity(), id); ok {
			if err := MatchRequest(r, &cmd); err != nil {
				return &Result{Err: err}
			}
			return prev.Duplicate(r)
		}
	}
	next, res := f.apply(prev, &cmd, at)
	if res.Err == nil {
		next.index = l.Index
		if id := cmd.GetRequestId(); id != "" {
			subject, keyID := requestSubject(&cmd)
			next.requests = prev.requests.with(RequestRecord{
				Identity: cmd.GetIdentity(), RequestID: id, Index: l.Index, Subject: subject, KeyID: keyID, Operation: Operation(&cmd),
			})
		}
		f.state.Store(next)
	}
	return res
}

// checkFormat refuses malformed commands and panics on commands of a newer
// binary (see Apply).
func checkFormat(index uint64, cmd *statev1.Command) error {
	switch v := cmd.GetFormatVersion(); {
	case v > FormatVersion:
		panic(fmt.Errorf("%w: log entry %d has command format version %d; this binary understands %d: upgrade it before it applies this log",
			ErrUnsupportedCommand, index, v, FormatVersion))
	case v == 0:
		return fmt.Errorf("%w: log entry %d has no format version", ErrInvalidCommand, index)
	}
	if cmd.GetOp() == nil {
		if unknown := cmd.ProtoReflect().GetUnknown(); len(unknown) > 0 {
			panic(fmt.Errorf("%w: log entry %d has a command with an operation this binary does not know (unknown fields %v); this binary understands format %d: upgrade it before it applies this log",
				ErrUnsupportedCommand, index, unknownFields(unknown), FormatVersion))
		}
		return fmt.Errorf("%w: log entry %d has no operation", ErrInvalidCommand, index)
	}
	return nil
}

// unknownFields lists the field numbers in unknown, for the panic message.
func unknownFields(b []byte) []protowire.Number {
	var out []protowire.Number
	for len(b) > 0 {
		num, _, n := protowire.ConsumeField(b)
		if n < 0 {
			break
		}
		if !slices.Contains(out, num) {
			out = append(out, num)
		}
		b = b[n:]
	}
	return out
}

// apply computes the State after cmd. On refusal it returns (nil, Result with
// Err) and builds nothing that escapes.
func (f *FSM) apply(s *State, cmd *statev1.Command, at time.Time) (*State, *Result) {
	switch op := cmd.GetOp().(type) {
	case *statev1.Command_CreateRegion:
		return f.createRegion(s, op.CreateRegion, at)
	case *statev1.Command_AddRegionKeyVersion:
		return f.addVersion(s, op.AddRegionKeyVersion, at)
	case *statev1.Command_SetRegionKeyVersionStatus:
		return setStatus(s, op.SetRegionKeyVersionStatus, at)
	case *statev1.Command_RegisterMember:
		m := op.RegisterMember.GetMember()
		if err := validMember(m); err != nil {
			return nil, &Result{Err: err}
		}
		return s.withMember(Member{ID: m.GetId(), APIAddress: m.GetApiAddress()}), &Result{}
	case *statev1.Command_DeregisterMember:
		if op.DeregisterMember.GetId() == "" {
			return nil, &Result{Err: fmt.Errorf("%w: deregister_member without id", ErrInvalidCommand)}
		}
		return s.withoutMember(op.DeregisterMember.GetId()), &Result{}
	case *statev1.Command_CreateKeyset:
		return createKeyset(s, op.CreateKeyset, cmd.GetIdentity(), at)
	case *statev1.Command_UpdateKeyset:
		return updateKeyset(s, op.UpdateKeyset, at)
	case *statev1.Command_SetKeysetPolicy:
		return setKeysetPolicy(s, op.SetKeysetPolicy, at)
	case *statev1.Command_RecordPropagation:
		return recordPropagation(s, op.RecordPropagation, at)
	case *statev1.Command_PutRollout:
		return putRollout(s, op.PutRollout, cmd.GetIdentity(), at)
	case *statev1.Command_RecordBundleSerial:
		return recordBundleSerial(s, op.RecordBundleSerial)
	default:
		// A oneof case the generated code knows but this switch does not:
		// a programming error in this package, caught by the tests.
		panic(fmt.Sprintf("fsm: unhandled command operation %T", op))
	}
}

// recordBundleSerial raises the region's bundle serial floor to c's serial;
// a serial at or below it changes nothing (the floor never decreases, so a
// late or repeated record cannot lower it).
func recordBundleSerial(s *State, c *statev1.RecordBundleSerialCommand) (*State, *Result) {
	old, ok := s.Region(c.GetRegion())
	if !ok {
		return refuse(fmt.Errorf("%w: %q", ErrNoRegion, c.GetRegion()))
	}
	if c.GetSerial() == 0 {
		return invalid("record_bundle_serial of %q: serial 0; serials start at 1", old.Name)
	}
	if c.GetSerial() <= old.BundleSerialFloor {
		return s.clone(), &Result{Region: old} // accepted (a new index), nothing changed
	}
	r := old.clone()
	r.BundleSerialFloor = c.GetSerial()
	return s.withRegion(r), &Result{Region: r}
}

func validMember(m *statev1.MemberRecord) error {
	if m.GetId() == "" || m.GetApiAddress() == "" {
		return fmt.Errorf("%w: member needs an id and an api_address", ErrInvalidCommand)
	}
	return nil
}

// checkKey checks a new version's wrapped material: number want, non-empty,
// under this FSM's RMK.
func (f *FSM) checkKey(k *statev1.WrappedRegionKeyVersion, region string, want uint32) error {
	if k.GetVersion() != want {
		return fmt.Errorf("%w: region %q: got version %d, want %d", ErrBadVersion, region, k.GetVersion(), want)
	}
	if len(k.GetWrappedKey()) == 0 {
		return fmt.Errorf("%w: region %q version %d has no wrapped key", ErrBadVersion, region, want)
	}
	if !bytes.Equal(k.GetRmkKcv(), f.kcv) {
		return fmt.Errorf("%w: region %q version %d is wrapped under RMK %x, this cluster's is %x", ErrWrongRMK, region, want, k.GetRmkKcv(), f.kcv)
	}
	return nil
}

func (f *FSM) createRegion(s *State, c *statev1.CreateRegionCommand, at time.Time) (*State, *Result) {
	name := c.GetRegion()
	if err := ValidRegionName(name); err != nil {
		return nil, &Result{Err: err}
	}
	if _, ok := s.findRegion(name); ok {
		return nil, &Result{Err: fmt.Errorf("%w: %q", ErrRegionExists, name)}
	}
	if err := f.checkKey(c.GetFirstVersion(), name, 1); err != nil {
		return nil, &Result{Err: err}
	}
	r := &Region{Name: name, CreatedAt: at, Versions: []Version{{
		Version:      1,
		Key:          c.GetFirstVersion(),
		Status:       cryptov1.KeyStatus_KEY_STATUS_PRIMARY,
		CreatedAt:    at,
		PrimarySince: at,
	}}}
	return s.withRegion(r), &Result{Region: r}
}

func (f *FSM) addVersion(s *State, c *statev1.AddRegionKeyVersionCommand, at time.Time) (*State, *Result) {
	old, ok := s.Region(c.GetRegion())
	if !ok {
		return nil, &Result{Err: fmt.Errorf("%w: %q", ErrNoRegion, c.GetRegion())}
	}
	n := uint32(len(old.Versions)) + 1
	if err := f.checkKey(c.GetVersion(), old.Name, n); err != nil {
		return nil, &Result{Err: err}
	}
	r := old.clone()
	v := Version{Version: n, Key: c.GetVersion(), Status: cryptov1.KeyStatus_KEY_STATUS_ENABLED, CreatedAt: at}
	if c.GetMakePrimary() {
		r.demotePrimary(at)
		v.Status = cryptov1.KeyStatus_KEY_STATUS_PRIMARY
		v.PrimarySince = at
	}
	r.Versions = append(r.Versions, v)
	return s.withRegion(r), &Result{Region: r}
}

func setStatus(s *State, c *statev1.SetRegionKeyVersionStatusCommand, at time.Time) (*State, *Result) {
	old, ok := s.Region(c.GetRegion())
	if !ok {
		return nil, &Result{Err: fmt.Errorf("%w: %q", ErrNoRegion, c.GetRegion())}
	}
	cur, ok := old.Version(c.GetVersion())
	if !ok {
		return nil, &Result{Err: fmt.Errorf("%w: region %q has no version %d", ErrNoVersion, old.Name, c.GetVersion())}
	}
	const (
		enabled   = cryptov1.KeyStatus_KEY_STATUS_ENABLED
		primary   = cryptov1.KeyStatus_KEY_STATUS_PRIMARY
		disabled  = cryptov1.KeyStatus_KEY_STATUS_DISABLED
		destroyed = cryptov1.KeyStatus_KEY_STATUS_DESTROYED
	)
	to := c.GetStatus()
	r := old.clone()
	v := &r.Versions[c.GetVersion()-1]
	switch {
	case cur.Status == enabled && to == primary:
		r.demotePrimary(at)
		v.PrimarySince = at
		v.SupersededAt = time.Time{}
	case cur.Status == disabled && to == enabled,
		cur.Status == enabled && to == disabled:
	case cur.Status == disabled && to == destroyed:
		v.Key = nil
		v.RetiredAt = at
	default:
		return nil, &Result{Err: fmt.Errorf("%w: region %q version %d: %v to %v", ErrBadTransition, old.Name, cur.Version, cur.Status, to)}
	}
	v.Status = to
	return s.withRegion(r), &Result{Region: r}
}

// clone returns a copy of r with its own Versions array, for copy-on-write.
func (r *Region) clone() *Region {
	c := *r
	c.Versions = slices.Clip(slices.Clone(r.Versions))
	return &c
}

// demotePrimary makes r's primary ENABLED, superseded at at. r must be a
// clone, not a published Region.
func (r *Region) demotePrimary(at time.Time) {
	for i := range r.Versions {
		if v := &r.Versions[i]; v.Status == cryptov1.KeyStatus_KEY_STATUS_PRIMARY {
			v.Status = cryptov1.KeyStatus_KEY_STATUS_ENABLED
			v.SupersededAt = at
		}
	}
}

// EncodeCommand returns the bytes a proposer passes to raft.Raft.Apply for c:
// its deterministic proto encoding. It refuses (ErrInvalidCommand) a command
// without format_version FormatVersion, an operation or a valid time, which
// Apply would refuse or halt on; it does not check the operation against any
// State, which only Apply can do.
func EncodeCommand(c *statev1.Command) ([]byte, error) {
	if c.GetFormatVersion() != FormatVersion {
		return nil, fmt.Errorf("%w: format version %d, want %d", ErrInvalidCommand, c.GetFormatVersion(), FormatVersion)
	}
	if c.GetOp() == nil {
		return nil, fmt.Errorf("%w: no operation", ErrInvalidCommand)
	}
	if !validTime(c.GetTime()) {
		return nil, fmt.Errorf("%w: time missing, invalid or not after 1970", ErrInvalidCommand)
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidCommand, err)
	}
	return b, nil
}

// ValidRegionName is region.ValidName: the error wraps ErrInvalidName.
func ValidRegionName(name string) error { return region.ValidName(name) }

// validTime reports whether ts is a usable command or snapshot time: valid and
// after the Unix epoch (so that no recorded time is the zero time.Time, which
// means unset).
func validTime(ts *timestamppb.Timestamp) bool {
	return ts != nil && ts.CheckValid() == nil && ts.GetSeconds() > 0
}
