package rootkms

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/keysets"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkey"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
)

// LeaderAddressKey is the ErrorInfo metadata key carrying the leader's API
// address in a follower's FAILED_PRECONDITION answer to a write (the error
// contract is in rootkmsclient, which reads it).
const LeaderAddressKey = rootkmsclient.LeaderAddressKey

// rootKey returns the loaded key or an Unavailable error saying why not.
func (s *Server) rootKey() (*rootkey.Key, error) {
	if k := s.key.Load(); k != nil {
		return k, nil
	}
	return nil, status.Errorf(codes.Unavailable, "rootkms: not serving yet: %s", s.keyStatus.Load())
}

// caughtUp returns nil once this replica's state is at least as new as it
// was when the replica started and as what a leader since said was
// committed, and Unavailable before: after a restart Raft restores the last
// snapshot and applies the entries after it only as a leader commits them,
// so until then the state can lack what the cluster (and this replica,
// before it stopped) already had. It latches: later, a replica's state may
// lag the leader's by what is in flight, never by what it had.
//
// "As new as it was" is the last entry of its log at start, unless the
// leader has since replaced that entry: then it was never committed (Raft
// truncates only uncommitted entries), and the replica had at most the log
// the leader left of it. Waiting for the replaced index itself could take
// for ever on a quiet cluster whose log ends before it.
func (s *Server) caughtUp() error {
	if s.synced.Load() {
		return nil
	}
	r := s.node.Raft
	applied := r.AppliedIndex()
	commit, _ := strconv.ParseUint(r.Stats()["commit_index"], 10, 64)
	_, leader := r.LeaderWithID()
	had := s.startIndex
	if applied < had {
		if term, ok, err := s.node.LogTerm(had); err == nil && (!ok || term != s.startTerm) {
			had = min(had, r.LastIndex())
		}
	}
	if leader == "" || applied < had || applied < commit {
		return status.Errorf(codes.Unavailable,
			"rootkms: this replica is still catching up with the cluster since it started (applied index %d; its log held %d at start; committed %d; leader known: %t); ask another replica or retry shortly",
			applied, had, commit, leader != "")
	}
	s.synced.Store(true)
	return nil
}

// notLeader is the error a follower answers a write or gating read with: it
// names the leader's API address so the caller can retry there.
//
// A replica that is no member is not a follower: one whose Raft has shut
// down (a leader that removed itself does) or whose own configuration does
// not name it (removed, or not added yet) learns of no leader. "No leader
// is known; retry shortly" would make callers wait on it for an election
// it takes no part in, so it answers UNAVAILABLE, like a replica that is
// down, and callers go on to the other replicas.
func (s *Server) notLeader() error {
	if s.node.Raft.State() == raft.Shutdown {
		return status.Error(codes.Unavailable, "rootkms: this replica's raft has shut down (it was removed from the cluster, or it is stopping); ask another replica")
	}
	if !s.inConfiguration() {
		return status.Error(codes.Unavailable, "rootkms: this replica is not a member of the cluster (removed, or not added yet); ask another replica")
	}
	_, leaderID := s.node.Raft.LeaderWithID()
	msg, meta := "rootkms: this replica is not the leader and no leader is known; retry shortly", map[string]string{}
	if m, ok := s.fsm.State().Member(string(leaderID)); ok && leaderID != "" && m.APIAddress != "" {
		msg = fmt.Sprintf("rootkms: not the leader; the leader (%s) serves at %s", leaderID, m.APIAddress)
		meta[LeaderAddressKey] = m.APIAddress
	}
	st := status.New(codes.FailedPrecondition, msg)
	if d, err := st.WithDetails(&errdetails.ErrorInfo{Reason: rootkmsclient.ReasonNotLeader, Domain: rootkmsclient.ErrorDomain, Metadata: meta}); err == nil {
		st = d
	}
	return st.Err()
}

// linearize makes a read or write safe to decide on: this replica must be
// the leader, and a Raft barrier must commit, proving it still leads a
// quorum and that its state machine holds every committed entry. A
// partitioned or paused old leader fails here instead of answering from
// stale state.
func (s *Server) linearize() error {
	if s.node.Raft.State() != raft.Leader {
		return s.notLeader()
	}
	if err := s.node.Raft.Barrier(s.cfg.ApplyTimeout).Error(); err != nil {
		// The caller's own command has not been proposed yet: whatever
		// became of the barrier, nothing of this call was applied, so the
		// answer is a definite refusal (never OUTCOME_UNKNOWN).
		switch {
		case errors.Is(err, raft.ErrRaftShutdown):
			return status.Error(codes.Unavailable, "rootkms: shutting down")
		case s.node.Raft.State() != raft.Leader:
			return s.notLeader()
		default:
			return status.Errorf(codes.Unavailable, "rootkms: raft barrier: %v; nothing was applied, retry", err)
		}
	}
	return nil
}

// errGaveUp is await's error when the caller's context or the server's
// shutdown ended the wait for an entry raft had taken: its outcome is
// unknown.
var errGaveUp = errors.New("stopped waiting for the entry to commit")

// await waits for f until ctx is done or the server closes. Raft resolves
// an entry it took only once it commits or this replica stops leading: a
// leader that keeps its followers but cannot commit (their log stores
// refuse, a disk fails) would otherwise hold the caller for ever, and Close
// too, which waits for its own loops' writes.
func (s *Server) await(ctx context.Context, f raft.Future) error {
	done := make(chan error, 1)
	go func() { done <- f.Error() }() // ends when raft resolves f, at the latest when it shuts down
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("%w: %w", errGaveUp, ctx.Err())
	case <-s.stop:
		return fmt.Errorf("%w: the server is closing", errGaveUp)
	}
}

// raftError maps a raft error. ErrNotLeader and a leadership transfer are
// definite refusals (nothing was appended): the caller is redirected; so is
// an enqueue timeout (Unavailable, retry).
// Anything after the entry was appended (leadership lost, timeouts) leaves
// the outcome unknown (OUTCOME_UNKNOWN): the caller retries with the same
// request ID, and the retry is answered from the first attempt's effect if
// it was applied (see duplicateOf), or applied now if it was not.
func (s *Server) raftError(err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return s.notLeader()
	case errors.Is(err, raft.ErrRaftShutdown):
		return status.Error(codes.Unavailable, "rootkms: shutting down")
	case errors.Is(err, raft.ErrEnqueueTimeout):
		// Raft never took the entry.
		return status.Errorf(codes.Unavailable, "rootkms: raft: %v; nothing was applied, retry", err)
	default:
		st := status.Newf(codes.Unavailable, "rootkms: raft: %v (the write may or may not have been applied; retry it with the same request ID)", err)
		if d, derr := st.WithDetails(&errdetails.ErrorInfo{Reason: rootkmsclient.ReasonOutcomeUnknown, Domain: rootkmsclient.ErrorDomain}); derr == nil {
			st = d
		}
		return st.Err()
	}
}

// minProposeTime is the least time a caller's deadline must leave for a
// write to be proposed: with less, the caller would most likely give up
// while the write is in flight and have to retry it.
const minProposeTime = 100 * time.Millisecond

// checkDeadline refuses a write whose caller has gone or is about to (see
// minProposeTime). It runs before anything is proposed, so its refusal is
// definite: DeadlineExceeded or Canceled, nothing applied.
func checkDeadline(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return status.FromContextError(err).Err()
	}
	if d, ok := ctx.Deadline(); ok && time.Until(d) < minProposeTime {
		return status.Errorf(codes.DeadlineExceeded, "rootkms: the caller's deadline leaves less than %s; nothing was proposed", minProposeTime)
	}
	return nil
}

// applyTimeout is how long Raft may take to accept a proposal: ApplyTimeout,
// but no later than the caller's deadline.
func (s *Server) applyTimeout(ctx context.Context) time.Duration {
	t := s.cfg.ApplyTimeout
	if d, ok := ctx.Deadline(); ok {
		t = min(t, time.Until(d))
	}
	return t
}

// beginWrite starts a write on the leader: it refuses a caller out of time
// (checkDeadline), makes the state safe to decide on (linearize), and
// recognises a retry (duplicateOf). A non-nil Result is a Duplicate: the
// handler answers with it at once, before checks that the write's own
// effect would fail ("exists") and before making key material for a write
// that will not be proposed. intent is the command the handler is about to
// propose, with at least the fields that name its operation, subject and
// key (see fsm.MatchRequest). The caller holds writeMu.
func (s *Server) beginWrite(ctx context.Context, intent *statev1.Command) (*fsm.Result, error) {
	if err := checkDeadline(ctx); err != nil {
		return nil, err
	}
	if err := s.linearize(); err != nil {
		return nil, err
	}
	return s.duplicateOf(ctx, intent)
}

// duplicateOf recognises a retried write before it is proposed (the FSM
// recognises one proposed twice). If the state remembers a write of this
// caller (identity) with this call's request ID (audit.RequestID), and it is
// the same operation on the same subject (fsm.MatchRequest), that write was
// applied: the answer is a Duplicate Result with the current record of its
// subject. A request ID reused for another write is refused
// (InvalidArgument) rather than answered with the other write's record.
// Otherwise it returns nil, nil. The state must hold every committed entry
// (after linearize): an earlier attempt still in flight is then either
// applied or never will be.
func (s *Server) duplicateOf(ctx context.Context, intent *statev1.Command) (*fsm.Result, error) {
	rid := audit.RequestID(ctx)
	if rid == "" {
		return nil, nil
	}
	caller, _ := identity.FromContext(ctx)
	st := s.fsm.State()
	rec, ok := st.Request(caller.String(), rid)
	if !ok {
		return nil, nil
	}
	if err := fsm.MatchRequest(rec, intent); err != nil {
		return nil, status.Error(codes.InvalidArgument, "rootkms: "+err.Error())
	}
	audit.AddTarget(ctx, audit.Target{KeyVersion: rec.KeyID})
	return st.Duplicate(rec), nil
}

// applyLocal proposes a command through this replica's Raft (it must lead,
// and beginWrite must have succeeded). A Duplicate Result (the FSM found the
// caller's request ID on a write already applied) is a success: nothing was
// applied again. A caller out of time is
// refused before anything is proposed.
func (s *Server) applyLocal(ctx context.Context, cmd *statev1.Command) (*fsm.Result, error) {
	if err := checkDeadline(ctx); err != nil {
		return nil, err
	}
	caller, _ := identity.FromContext(ctx)
	cmd.FormatVersion = fsm.FormatVersion
	cmd.Time = timestamppb.New(s.cfg.Now())
	cmd.RequestId = audit.RequestID(ctx)
	cmd.Identity = caller.String()
	b, err := fsm.EncodeCommand(cmd)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "rootkms: encoding command: %v", err)
	}
	start := time.Now()
	f := s.node.Raft.Apply(b, s.applyTimeout(ctx))
	if err := s.await(ctx, f); err != nil {
		return nil, s.raftError(err)
	}
	s.metrics.applied(start)
	res, ok := f.Response().(*fsm.Result)
	if !ok {
		return nil, status.Errorf(codes.Internal, "rootkms: unexpected apply result %T", f.Response())
	}
	if res.Err != nil {
		return nil, toStatus(res.Err)
	}
	return res, nil
}

// regionWriteAnswer is the answer of a region write: err, or the region
// after the write (for a Duplicate, as it is now).
func (s *Server) regionWriteAnswer(res *fsm.Result, err error) (*rootkmsv1.Region, error) {
	if err != nil {
		return nil, err
	}
	if res.Region == nil {
		return nil, status.Error(codes.Internal, "rootkms: the written region is not in the state")
	}
	return regionProto(res.Region, s.fsm.State().Index()), nil
}

// toStatus is the one table from domain errors to gRPC codes.
func toStatus(err error) error {
	code := codes.Internal
	switch {
	case errors.Is(err, fsm.ErrRegionExists), errors.Is(err, fsm.ErrKeysetExists), errors.Is(err, fsm.ErrRolloutExists):
		code = codes.AlreadyExists
	case errors.Is(err, fsm.ErrNoRegion), errors.Is(err, fsm.ErrNoVersion), errors.Is(err, fsm.ErrNoKeyset), errors.Is(err, fsm.ErrNoKeysetVersion),
		errors.Is(err, fsm.ErrNoRollout):
		code = codes.NotFound
	case errors.Is(err, fsm.ErrStaleRevision), errors.Is(err, fsm.ErrStaleEpoch):
		code = codes.Aborted
	case errors.Is(err, fsm.ErrInvalidName), errors.Is(err, fsm.ErrInvalidCommand):
		code = codes.InvalidArgument
	case errors.Is(err, fsm.ErrBadVersion), errors.Is(err, fsm.ErrBadTransition), errors.Is(err, fsm.ErrRegionBusy):
		code = codes.FailedPrecondition
	case errors.Is(err, fsm.ErrWrongRMK), errors.Is(err, rootkey.ErrUnwrap):
		code = codes.Internal
	case errors.Is(err, keysets.ErrDecrypt):
		code = codes.InvalidArgument
	}
	return status.Error(code, err.Error())
}

func regionProto(r *fsm.Region, index uint64) *rootkmsv1.Region {
	out := &rootkmsv1.Region{Name: r.Name, Versions: r.Info(), CreatedAt: timestamppb.New(r.CreatedAt), CommitIndex: index,
		BundleSerialFloor: r.BundleSerialFloor}
	if p, ok := r.Primary(); ok {
		out.PrimaryVersion = p.Version
	}
	return out
}

// UnwrapRegionKey implements RootKMS: served from local state by any
// replica, only to a KMS of the region asked for.
func (s *Server) UnwrapRegionKey(ctx context.Context, req *rootkmsv1.UnwrapRegionKeyRequest) (*rootkmsv1.UnwrapRegionKeyResponse, error) {
	caller, _ := identity.FromContext(ctx)
	if caller.Tier() != identity.TierKMS || caller.Region() != req.GetRegion() {
		return nil, status.Errorf(codes.PermissionDenied, "rootkms: %s may not unwrap the key of region %q (only KMS servers of that region may)", caller, req.GetRegion())
	}
	key, err := s.rootKey()
	if err != nil {
		return nil, err
	}
	st := s.fsm.State()
	r, ok := st.Region(req.GetRegion())
	if !ok {
		// Answered from this replica's own state: one that restarted and
		// has not caught up may lack a region that exists, and NotFound
		// would be a definite wrong answer.
		if err := s.caughtUp(); err != nil {
			return nil, err
		}
		return nil, status.Errorf(codes.NotFound, "rootkms: no region %q", req.GetRegion())
	}
	audit.AddTarget(ctx, audit.Target{Region: r.Name})
	mat := &rootkmsv1.RegionKeyMaterial{Region: r.Name}
	defer func() {
		for _, v := range mat.GetVersions() {
			clear(v.Key)
		}
	}()
	for _, v := range r.Versions {
		if v.Status != cryptov1.KeyStatus_KEY_STATUS_PRIMARY && v.Status != cryptov1.KeyStatus_KEY_STATUS_ENABLED {
			continue
		}
		k, err := key.Unwrap(r.Name, v.Key)
		if err != nil {
			return nil, toStatus(err)
		}
		mat.Versions = append(mat.Versions, &rootkmsv1.RegionKeyVersionMaterial{Version: v.Version, Status: v.Status, Key: k.Data()})
		k.Wipe()
	}
	plain, err := proto.Marshal(mat)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "rootkms: %v", err)
	}
	defer clear(plain)
	info, err := hpkeseal.Info("cairn/rootkms/v1/region-key", r.Name, caller.String())
	if err != nil {
		return nil, status.Errorf(codes.Internal, "rootkms: %v", err)
	}
	sealed, err := hpkeseal.Seal(req.GetRecipient(), info, plain)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "rootkms: bad recipient key: %v", err)
	}
	return &rootkmsv1.UnwrapRegionKeyResponse{Region: regionProto(r, st.Index()), SealedKeys: sealed}, nil
}

// GetRegion implements RootKMS (linearizable: via the leader).
func (s *Server) GetRegion(ctx context.Context, req *rootkmsv1.GetRegionRequest) (*rootkmsv1.Region, error) {
	if _, err := s.rootKey(); err != nil {
		return nil, err
	}
	if err := s.linearize(); err != nil {
		return nil, err
	}
	st := s.fsm.State()
	r, ok := st.Region(req.GetRegion())
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: no region %q", req.GetRegion())
	}
	return regionProto(r, st.Index()), nil
}

// ListRegions implements RootKMS (linearizable: via the leader).
func (s *Server) ListRegions(ctx context.Context, _ *rootkmsv1.ListRegionsRequest) (*rootkmsv1.ListRegionsResponse, error) {
	if _, err := s.rootKey(); err != nil {
		return nil, err
	}
	if err := s.linearize(); err != nil {
		return nil, err
	}
	st := s.fsm.State()
	out := &rootkmsv1.ListRegionsResponse{}
	for _, r := range st.Regions() {
		out.Regions = append(out.Regions, regionProto(r, st.Index()))
	}
	return out, nil
}

// CreateRegion implements RootKMS.
func (s *Server) CreateRegion(ctx context.Context, req *rootkmsv1.CreateRegionRequest) (*rootkmsv1.Region, error) {
	key, err := s.rootKey()
	if err != nil {
		return nil, err
	}
	if err := fsm.ValidRegionName(req.GetRegion()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	audit.AddTarget(ctx, audit.Target{Region: req.GetRegion()})
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if dup, err := s.beginWrite(ctx, &statev1.Command{Op: &statev1.Command_CreateRegion{CreateRegion: &statev1.CreateRegionCommand{Region: req.GetRegion()}}}); dup != nil || err != nil {
		return s.regionWriteAnswer(dup, err)
	}
	if _, ok := s.fsm.State().Region(req.GetRegion()); ok {
		return nil, status.Errorf(codes.AlreadyExists, "rootkms: region %q exists", req.GetRegion())
	}
	w, err := s.newRegionKeyVersion(key, req.GetRegion(), 1)
	if err != nil {
		return nil, err
	}
	res, err := s.applyLocal(ctx, &statev1.Command{Op: &statev1.Command_CreateRegion{CreateRegion: &statev1.CreateRegionCommand{Region: req.GetRegion(), FirstVersion: w}}})
	if err != nil {
		return nil, err
	}
	audit.AddTarget(ctx, audit.Target{KeyVersion: 1})
	return s.regionWriteAnswer(res, nil)
}

func (s *Server) newRegionKeyVersion(key *rootkey.Key, region string, version uint32) (*statev1.WrappedRegionKeyVersion, error) {
	m, err := keysets.NewRegionKey()
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	defer m.Wipe()
	w, err := key.Wrap(region, version, m)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return w, nil
}

// RotateRegionKey implements RootKMS: a new version becomes primary.
func (s *Server) RotateRegionKey(ctx context.Context, req *rootkmsv1.RotateRegionKeyRequest) (*rootkmsv1.Region, error) {
	key, err := s.rootKey()
	if err != nil {
		return nil, err
	}
	audit.AddTarget(ctx, audit.Target{Region: req.GetRegion()})
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if dup, err := s.beginWrite(ctx, &statev1.Command{Op: &statev1.Command_AddRegionKeyVersion{AddRegionKeyVersion: &statev1.AddRegionKeyVersionCommand{Region: req.GetRegion()}}}); dup != nil || err != nil {
		return s.regionWriteAnswer(dup, err)
	}
	r, ok := s.fsm.State().Region(req.GetRegion())
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: no region %q", req.GetRegion())
	}
	next := r.Versions[len(r.Versions)-1].Version + 1
	w, err := s.newRegionKeyVersion(key, r.Name, next)
	if err != nil {
		return nil, err
	}
	res, err := s.applyLocal(ctx, &statev1.Command{Op: &statev1.Command_AddRegionKeyVersion{
		AddRegionKeyVersion: &statev1.AddRegionKeyVersionCommand{Region: r.Name, Version: w, MakePrimary: true}}})
	if err != nil {
		return nil, err
	}
	if !res.Duplicate {
		audit.AddTarget(ctx, audit.Target{KeyVersion: next})
	}
	return s.regionWriteAnswer(res, nil)
}

// GetClusterStatus implements RootKMS: this replica's view, always served.
func (s *Server) GetClusterStatus(ctx context.Context, _ *rootkmsv1.GetClusterStatusRequest) (*rootkmsv1.ClusterStatus, error) {
	r := s.node.Raft
	leaderAddr, leaderID := r.LeaderWithID()
	stats := r.Stats()
	u := func(k string) uint64 { v, _ := strconv.ParseUint(stats[k], 10, 64); return v }
	out := &rootkmsv1.ClusterStatus{
		Id: s.cfg.ID, LeaderId: string(leaderID), LeaderAddress: string(leaderAddr),
		Term: u("term"), CommitIndex: u("commit_index"), AppliedIndex: u("applied_index"), LastSnapshotIndex: u("last_snapshot_index"),
		HasRootKey: s.HasRootKey(), GenesisId: s.cfg.Manifest.GetGenesisId(),
		Now: timestamppb.New(s.cfg.Now()), // a leader compares its clock with it (clockquorum.go)
	}
	switch r.State() {
	case raft.Leader:
		out.State = rootkmsv1.ReplicaState_REPLICA_STATE_LEADER
	case raft.Candidate:
		out.State = rootkmsv1.ReplicaState_REPLICA_STATE_CANDIDATE
	case raft.Follower:
		out.State = rootkmsv1.ReplicaState_REPLICA_STATE_FOLLOWER
	default:
		out.State = rootkmsv1.ReplicaState_REPLICA_STATE_SHUTDOWN
	}
	if ready, why := s.Readiness(); !ready {
		out.NotReadyReason = why // what health says too
	}
	st := s.fsm.State()
	if m, ok := st.Member(string(leaderID)); ok {
		out.LeaderApiAddress = m.APIAddress
	}
	if f := r.GetConfiguration(); f.Error() == nil {
		for _, srv := range f.Configuration().Servers {
			m := &rootkmsv1.Member{Id: string(srv.ID), Address: string(srv.Address), Suffrage: rootkmsv1.Suffrage_SUFFRAGE_VOTER}
			if srv.Suffrage != raft.Voter {
				m.Suffrage = rootkmsv1.Suffrage_SUFFRAGE_NONVOTER
			}
			if info, ok := st.Member(string(srv.ID)); ok {
				m.ApiAddress = info.APIAddress
			}
			out.Members = append(out.Members, m)
		}
	}
	return out, nil
}

// JoinSelfID is the only Raft server ID a caller that is not an operator
// may join as: the name (last path segment) of its SPIFFE ID, which the
// Replicas allowlist must admit as a whole (trust domain, tier, region and
// name). spiffe://<td>/rootkms/<region>/<name> may join only as <name>; it
// may not join as anyone else, nor change an existing member's address or
// suffrage (two replica identities of one name in different regions cannot
// take over each other's slot). Operators may join any ID and rewrite a
// member.
func JoinSelfID(replicas identity.Allowlist, caller identity.ID) (string, error) {
	if caller.IsZero() || !replicas.Allows(caller) {
		return "", fmt.Errorf("%w: %s is not a root KMS replica identity", identity.ErrPermissionDenied, caller)
	}
	return caller.Name(), nil
}

// Join implements RootKMS: adds a replica (leader only). A replica may only
// join itself (see JoinSelfID); operators may add anyone.
func (s *Server) Join(ctx context.Context, req *rootkmsv1.JoinRequest) (*rootkmsv1.ClusterStatus, error) {
	caller, _ := identity.FromContext(ctx)
	operator := s.cfg.Operators.Allows(caller)
	if !operator {
		self, err := JoinSelfID(s.cfg.Replicas, caller)
		if err != nil {
			return nil, status.Error(codes.PermissionDenied, "rootkms: "+err.Error())
		}
		if req.GetId() != self {
			return nil, status.Errorf(codes.PermissionDenied, "rootkms: %s may only join as server ID %q, not %q", caller, self, req.GetId())
		}
	}
	if req.GetId() == "" || req.GetAddress() == "" || req.GetApiAddress() == "" {
		return nil, status.Error(codes.InvalidArgument, "rootkms: join needs id, address and api_address")
	}
	var suffrage raft.ServerSuffrage
	switch req.GetSuffrage() {
	case rootkmsv1.Suffrage_SUFFRAGE_VOTER:
		suffrage = raft.Voter
	case rootkmsv1.Suffrage_SUFFRAGE_NONVOTER:
		suffrage = raft.Nonvoter
	default:
		return nil, status.Error(codes.InvalidArgument, "rootkms: join needs a suffrage (voter or non-voter)")
	}
	audit.AddTarget(ctx, audit.Target{Resource: "member/" + req.GetId()})
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if dup, err := s.beginWrite(ctx, &statev1.Command{Op: &statev1.Command_RegisterMember{RegisterMember: &statev1.RegisterMemberCommand{Member: &statev1.MemberRecord{Id: req.GetId()}}}}); err != nil {
		return nil, err
	} else if dup != nil {
		return s.GetClusterStatus(ctx, nil)
	}
	// A Join is two writes: the Raft configuration change, then the
	// member record with the API address. If the first committed and the
	// second did not (leadership lost, a deadline), the member is in the
	// configuration as asked with no record: the retry registers it.
	configured := false
	if cur, ok, err := s.member(req.GetId()); err != nil {
		return nil, err
	} else if ok {
		configured = cur.Address == raft.ServerAddress(req.GetAddress()) && cur.Suffrage == suffrage
		m, known := s.fsm.State().Member(req.GetId())
		switch {
		case configured && known && m.APIAddress == req.GetApiAddress():
			return s.GetClusterStatus(ctx, nil) // already a member as asked: idempotent
		case configured && !known:
			// Half joined: only the record is missing, and it replaces none.
		case !operator:
			return nil, status.Errorf(codes.PermissionDenied, "rootkms: %s is a member at %s (%s); only an operator may change its address, API address or suffrage", req.GetId(), cur.Address, cur.Suffrage)
		}
	}
	if !configured {
		var f raft.IndexFuture
		if suffrage == raft.Voter {
			f = s.node.Raft.AddVoter(raft.ServerID(req.GetId()), raft.ServerAddress(req.GetAddress()), 0, s.cfg.ApplyTimeout)
		} else {
			f = s.node.Raft.AddNonvoter(raft.ServerID(req.GetId()), raft.ServerAddress(req.GetAddress()), 0, s.cfg.ApplyTimeout)
		}
		if err := f.Error(); err != nil {
			return nil, s.raftError(err)
		}
	}
	if _, err := s.applyLocal(ctx, &statev1.Command{Op: &statev1.Command_RegisterMember{
		RegisterMember: &statev1.RegisterMemberCommand{Member: &statev1.MemberRecord{Id: req.GetId(), ApiAddress: req.GetApiAddress()}}}}); err != nil {
		return nil, err
	}
	return s.GetClusterStatus(ctx, nil)
}

// member returns server id of the latest Raft configuration, if it is in
// it.
func (s *Server) member(id string) (raft.Server, bool, error) {
	srv, ok, err := configServer(s.node.Raft, id)
	if err != nil {
		return raft.Server{}, false, status.Errorf(codes.Unavailable, "rootkms: reading the raft configuration: %v", err)
	}
	return srv, ok, nil
}

// DropRootKey implements RootKMS: the emergency seal of this replica. It
// wipes the key at once; the replica fetches it again from the
// distributors, which hand it out only once unsealed.
func (s *Server) DropRootKey(ctx context.Context, req *rootkmsv1.DropRootKeyRequest) (*rootkmsv1.DropRootKeyResponse, error) {
	if req.GetReason() == "" {
		return nil, status.Error(codes.InvalidArgument, "rootkms: DropRootKey needs a reason (it is audited)")
	}
	caller, _ := identity.FromContext(ctx)
	audit.AddTarget(ctx, audit.Target{Resource: "genesis/" + s.cfg.Manifest.GetGenesisId()})
	had := s.dropRootKey(fmt.Sprintf("by %s: %s", caller, req.GetReason()))
	return &rootkmsv1.DropRootKeyResponse{HadRootKey: had}, nil
}

// Remove implements RootKMS (leader only).
func (s *Server) Remove(ctx context.Context, req *rootkmsv1.RemoveRequest) (*rootkmsv1.ClusterStatus, error) {
	if req.GetId() == "" {
		return nil, status.Error(codes.InvalidArgument, "rootkms: remove needs an id")
	}
	audit.AddTarget(ctx, audit.Target{Resource: "member/" + req.GetId()})
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if dup, err := s.beginWrite(ctx, &statev1.Command{Op: &statev1.Command_DeregisterMember{DeregisterMember: &statev1.DeregisterMemberCommand{Id: req.GetId()}}}); err != nil {
		return nil, err
	} else if dup != nil {
		return s.GetClusterStatus(ctx, nil)
	}
	if err := s.node.Raft.RemoveServer(raft.ServerID(req.GetId()), 0, s.cfg.ApplyTimeout).Error(); err != nil {
		return nil, s.raftError(err)
	}
	if req.GetId() != s.cfg.ID {
		if _, err := s.applyLocal(ctx, &statev1.Command{Op: &statev1.Command_DeregisterMember{DeregisterMember: &statev1.DeregisterMemberCommand{Id: req.GetId()}}}); err != nil {
			return nil, err
		}
	}
	return s.GetClusterStatus(ctx, nil)
}

// Snapshot implements RootKMS: a Raft snapshot of this replica, now.
func (s *Server) Snapshot(ctx context.Context, _ *rootkmsv1.SnapshotRequest) (*rootkmsv1.SnapshotResponse, error) {
	f := s.node.Raft.Snapshot()
	if err := f.Error(); err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "rootkms: snapshot: %v", err)
	}
	meta, rc, err := f.Open()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "rootkms: snapshot: %v", err)
	}
	rc.Close()
	return &rootkmsv1.SnapshotResponse{Index: meta.Index, Term: meta.Term}, nil
}
