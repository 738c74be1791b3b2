package rootkms

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"

	"github.com/hashicorp/raft"
	"github.com/tink-crypto/tink-go/v2/keyset"
	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/internal/secret"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
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

// notLeader is the error a follower answers a write or gating read with: it
// names the leader's API address so the caller can retry there.
func (s *Server) notLeader() error {
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

// raftError maps a raft error. ErrNotLeader and a leadership transfer are
// definite refusals (nothing was appended): the caller is redirected.
// Anything after the entry was appended (leadership lost, timeouts) leaves
// the outcome unknown: the caller must read before retrying, and the client
// does not retry on its own.
func (s *Server) raftError(err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return s.notLeader()
	case errors.Is(err, raft.ErrRaftShutdown):
		return status.Error(codes.Unavailable, "rootkms: shutting down")
	default:
		st := status.Newf(codes.Unavailable, "rootkms: raft: %v (the write may or may not have been applied; read before retrying)", err)
		if d, derr := st.WithDetails(&errdetails.ErrorInfo{Reason: rootkmsclient.ReasonOutcomeUnknown, Domain: rootkmsclient.ErrorDomain}); derr == nil {
			st = d
		}
		return st.Err()
	}
}

// applyLocal proposes a command through this replica's Raft (it must lead).
func (s *Server) applyLocal(ctx context.Context, cmd *rootkmsv1.Command) (*fsm.Result, error) {
	caller, _ := identity.FromContext(ctx)
	cmd.FormatVersion = 1
	cmd.Time = timestamppb.New(s.cfg.Now())
	cmd.RequestId = audit.RequestID(ctx)
	cmd.Identity = caller.String()
	b, err := fsm.EncodeCommand(cmd)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "rootkms: encoding command: %v", err)
	}
	f := s.node.Raft.Apply(b, s.cfg.ApplyTimeout)
	if err := f.Error(); err != nil {
		return nil, s.raftError(err)
	}
	res, ok := f.Response().(*fsm.Result)
	if !ok {
		return nil, status.Errorf(codes.Internal, "rootkms: unexpected apply result %T", f.Response())
	}
	if res.Err != nil {
		return nil, toStatus(res.Err)
	}
	return res, nil
}

// toStatus is the one table from domain errors to gRPC codes.
func toStatus(err error) error {
	code := codes.Internal
	switch {
	case errors.Is(err, fsm.ErrRegionExists):
		code = codes.AlreadyExists
	case errors.Is(err, fsm.ErrNoRegion), errors.Is(err, fsm.ErrNoVersion):
		code = codes.NotFound
	case errors.Is(err, fsm.ErrInvalidName), errors.Is(err, fsm.ErrInvalidCommand):
		code = codes.InvalidArgument
	case errors.Is(err, fsm.ErrBadVersion), errors.Is(err, fsm.ErrBadTransition):
		code = codes.FailedPrecondition
	case errors.Is(err, fsm.ErrWrongRMK), errors.Is(err, rootkey.ErrUnwrap):
		code = codes.Internal
	case errors.Is(err, keysets.ErrDecrypt):
		code = codes.InvalidArgument
	}
	return status.Error(code, err.Error())
}

func regionProto(r *fsm.Region, index uint64) *rootkmsv1.Region {
	out := &rootkmsv1.Region{Name: r.Name, Versions: r.Info(), CreatedAt: timestamppb.New(r.CreatedAt), CommitIndex: index}
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
	if err := s.linearize(); err != nil {
		return nil, err
	}
	if _, ok := s.fsm.State().Region(req.GetRegion()); ok {
		return nil, status.Errorf(codes.AlreadyExists, "rootkms: region %q exists", req.GetRegion())
	}
	w, err := s.newRegionKeyVersion(key, req.GetRegion(), 1)
	if err != nil {
		return nil, err
	}
	res, err := s.applyLocal(ctx, &rootkmsv1.Command{Op: &rootkmsv1.Command_CreateRegion{CreateRegion: &rootkmsv1.CreateRegionCommand{Region: req.GetRegion(), FirstVersion: w}}})
	if err != nil {
		return nil, err
	}
	audit.AddTarget(ctx, audit.Target{KeyVersion: 1})
	return regionProto(res.Region, s.fsm.State().Index()), nil
}

func (s *Server) newRegionKeyVersion(key *rootkey.Key, region string, version uint32) (*rootkmsv1.WrappedRegionKeyVersion, error) {
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
	if err := s.linearize(); err != nil {
		return nil, err
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
	res, err := s.applyLocal(ctx, &rootkmsv1.Command{Op: &rootkmsv1.Command_AddRegionKeyVersion{
		AddRegionKeyVersion: &rootkmsv1.AddRegionKeyVersionCommand{Region: r.Name, Version: w, MakePrimary: true}}})
	if err != nil {
		return nil, err
	}
	audit.AddTarget(ctx, audit.Target{KeyVersion: next})
	return regionProto(res.Region, s.fsm.State().Index()), nil
}

// regionAEAD unwraps one region key version into an AEAD. The caller must
// not keep it beyond the request.
func (s *Server) regionAEAD(key *rootkey.Key, st *fsm.State, region string, version uint32) (tink.AEAD, error) {
	r, ok := st.Region(region)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: no region %q", region)
	}
	v, ok := r.Version(version)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: region %q has no key version %d", region, version)
	}
	if v.Status != cryptov1.KeyStatus_KEY_STATUS_PRIMARY && v.Status != cryptov1.KeyStatus_KEY_STATUS_ENABLED {
		return nil, status.Errorf(codes.FailedPrecondition, "rootkms: region %q key version %d is %s", region, version, v.Status)
	}
	m, err := key.Unwrap(region, v.Key)
	if err != nil {
		return nil, toStatus(err)
	}
	defer m.Wipe()
	a, err := keysets.RegionAEAD(m)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return a, nil
}

// GenerateKeyset implements RootKMS: the keyset is made here and leaves only
// encrypted under each region's primary key.
func (s *Server) GenerateKeyset(ctx context.Context, req *rootkmsv1.GenerateKeysetRequest) (*rootkmsv1.KeysetResponse, error) {
	key, err := s.rootKey()
	if err != nil {
		return nil, err
	}
	if err := keysets.ValidName(req.GetName()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if len(req.GetRegions()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "rootkms: a keyset needs at least one region")
	}
	if seen := slices.Clone(req.GetRegions()); len(slices.Compact(sortStrings(seen))) != len(req.GetRegions()) {
		return nil, status.Error(codes.InvalidArgument, "rootkms: a region is listed twice")
	}
	audit.AddTarget(ctx, audit.Target{Keyset: req.GetName()})
	h, err := keysets.Generate(req.GetTemplate())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := s.linearize(); err != nil {
		return nil, err
	}
	st := s.fsm.State()
	out := &rootkmsv1.KeysetResponse{}
	for _, region := range req.GetRegions() {
		r, ok := st.Region(region)
		if !ok {
			return nil, status.Errorf(codes.NotFound, "rootkms: no region %q", region)
		}
		p, ok := r.Primary()
		if !ok {
			return nil, status.Errorf(codes.FailedPrecondition, "rootkms: region %q has no primary key version", region)
		}
		ek, err := s.encryptFor(key, st, h, req.GetName(), region, p.Version)
		if err != nil {
			return nil, err
		}
		out.Keysets = append(out.Keysets, ek)
	}
	return out, nil
}

func sortStrings(s []string) []string { slices.Sort(s); return s }

func (s *Server) encryptFor(key *rootkey.Key, st *fsm.State, h *keyset.Handle, name, region string, version uint32) (*cryptov1.EncryptedKeyset, error) {
	a, err := s.regionAEAD(key, st, region, version)
	if err != nil {
		return nil, err
	}
	ek, err := keysets.Encrypt(h, name, region, version, a)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return ek, nil
}

// openCopies decrypts every region copy of one keyset and checks that they
// hold the same keys. It returns the first copy's handle.
func (s *Server) openCopies(key *rootkey.Key, st *fsm.State, copies []*cryptov1.EncryptedKeyset) (*keyset.Handle, error) {
	if len(copies) == 0 {
		return nil, status.Error(codes.InvalidArgument, "rootkms: no keyset copies given")
	}
	name := copies[0].GetName()
	if err := keysets.ValidName(name); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	var first *keyset.Handle
	var firstPrint secret.Bytes
	defer firstPrint.Wipe()
	regions := map[string]bool{}
	for _, c := range copies {
		if c.GetName() != name {
			return nil, status.Errorf(codes.InvalidArgument, "rootkms: copies of different keysets (%q and %q)", name, c.GetName())
		}
		if regions[c.GetRegion()] {
			return nil, status.Errorf(codes.InvalidArgument, "rootkms: two copies for region %q", c.GetRegion())
		}
		regions[c.GetRegion()] = true
		a, err := s.regionAEAD(key, st, c.GetRegion(), c.GetRegionKeyVersion())
		if err != nil {
			return nil, err
		}
		h, err := keysets.Decrypt(c, a)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "rootkms: keyset %s for %s: %v", name, c.GetRegion(), err)
		}
		fp, err := keysets.Fingerprint(h)
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		if first == nil {
			first, firstPrint = h, fp
			continue
		}
		same := fp.Equal(firstPrint)
		fp.Wipe()
		if !same {
			return nil, status.Errorf(codes.InvalidArgument, "rootkms: the copies of keyset %s for %s and %s hold different keys", name, copies[0].GetRegion(), c.GetRegion())
		}
	}
	return first, nil
}

// rewrite re-encrypts h for every copy's region, under version(copy).
func (s *Server) rewrite(key *rootkey.Key, st *fsm.State, h *keyset.Handle, copies []*cryptov1.EncryptedKeyset, version func(*cryptov1.EncryptedKeyset) (uint32, error)) (*rootkmsv1.KeysetResponse, error) {
	out := &rootkmsv1.KeysetResponse{}
	for _, c := range copies {
		v, err := version(c)
		if err != nil {
			return nil, err
		}
		ek, err := s.encryptFor(key, st, h, c.GetName(), c.GetRegion(), v)
		if err != nil {
			return nil, err
		}
		out.Keysets = append(out.Keysets, ek)
	}
	return out, nil
}

// changeKeyset runs one keyset operation: with the root key, on the leader
// after a barrier, it opens and cross-checks every region copy, lets change
// derive the new keyset (and audit what it did), and re-encrypts the result
// for every copy's region under the version version picks.
func (s *Server) changeKeyset(ctx context.Context, copies []*cryptov1.EncryptedKeyset,
	change func(h *keyset.Handle) (*keyset.Handle, error),
	version func(st *fsm.State, c *cryptov1.EncryptedKeyset) (uint32, error)) (*rootkmsv1.KeysetResponse, error) {
	key, err := s.rootKey()
	if err != nil {
		return nil, err
	}
	if err := s.linearize(); err != nil {
		return nil, err
	}
	st := s.fsm.State()
	h, err := s.openCopies(key, st, copies)
	if err != nil {
		return nil, err
	}
	audit.AddTarget(ctx, audit.Target{Keyset: copies[0].GetName()})
	nh, err := change(h)
	if err != nil {
		return nil, err
	}
	return s.rewrite(key, st, nh, copies, func(c *cryptov1.EncryptedKeyset) (uint32, error) { return version(st, c) })
}

func sameVersion(_ *fsm.State, c *cryptov1.EncryptedKeyset) (uint32, error) {
	return c.GetRegionKeyVersion(), nil
}

func primaryVersion(st *fsm.State, c *cryptov1.EncryptedKeyset) (uint32, error) {
	r, ok := st.Region(c.GetRegion())
	if !ok {
		return 0, status.Errorf(codes.NotFound, "rootkms: no region %q", c.GetRegion())
	}
	p, ok := r.Primary()
	if !ok {
		return 0, status.Errorf(codes.FailedPrecondition, "rootkms: region %q has no primary key version", c.GetRegion())
	}
	return p.Version, nil
}

// AddKeysetVersion implements RootKMS: one new enabled, non-primary key in
// every copy.
func (s *Server) AddKeysetVersion(ctx context.Context, req *rootkmsv1.AddKeysetVersionRequest) (*rootkmsv1.KeysetResponse, error) {
	tmpl, err := keysets.Template(req.GetTemplate())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return s.changeKeyset(ctx, req.GetKeysets(), func(h *keyset.Handle) (*keyset.Handle, error) {
		m := keyset.NewManagerFromHandle(h)
		id, err := m.Add(tmpl)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "rootkms: adding a key: %v", err)
		}
		audit.AddTarget(ctx, audit.Target{KeyVersion: id})
		return managerHandle(m)
	}, sameVersion)
}

// SetKeysetVersionStatus implements RootKMS.
func (s *Server) SetKeysetVersionStatus(ctx context.Context, req *rootkmsv1.SetKeysetVersionStatusRequest) (*rootkmsv1.KeysetResponse, error) {
	return s.changeKeyset(ctx, req.GetKeysets(), func(h *keyset.Handle) (*keyset.Handle, error) {
		audit.AddTarget(ctx, audit.Target{KeyVersion: req.GetKeyId()})
		m := keyset.NewManagerFromHandle(h)
		var err error
		switch req.GetStatus() {
		case cryptov1.KeyStatus_KEY_STATUS_PRIMARY:
			err = m.SetPrimary(req.GetKeyId())
		case cryptov1.KeyStatus_KEY_STATUS_ENABLED:
			err = m.Enable(req.GetKeyId())
		case cryptov1.KeyStatus_KEY_STATUS_DISABLED:
			err = m.Disable(req.GetKeyId())
		case cryptov1.KeyStatus_KEY_STATUS_DESTROYED:
			err = m.Delete(req.GetKeyId())
		default:
			return nil, status.Errorf(codes.InvalidArgument, "rootkms: unknown key status %v", req.GetStatus())
		}
		if err != nil {
			return nil, status.Errorf(codes.FailedPrecondition, "rootkms: key %d cannot become %s: %v", req.GetKeyId(), req.GetStatus(), err)
		}
		return managerHandle(m)
	}, sameVersion)
}

// RewrapKeyset implements RootKMS: every copy re-encrypted under its region's
// primary key version; the keys inside are unchanged.
func (s *Server) RewrapKeyset(ctx context.Context, req *rootkmsv1.RewrapKeysetRequest) (*rootkmsv1.KeysetResponse, error) {
	unchanged := func(h *keyset.Handle) (*keyset.Handle, error) { return h, nil }
	return s.changeKeyset(ctx, req.GetKeysets(), unchanged, primaryVersion)
}

func managerHandle(m *keyset.Manager) (*keyset.Handle, error) {
	h, err := m.Handle()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "rootkms: %v", err)
	}
	return h, nil
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
	if !out.HasRootKey {
		out.NotReadyReason = fmt.Sprint(s.keyStatus.Load())
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

// Join implements RootKMS: adds a replica (leader only). A replica may only
// join itself; operators may add anyone.
func (s *Server) Join(ctx context.Context, req *rootkmsv1.JoinRequest) (*rootkmsv1.ClusterStatus, error) {
	caller, _ := identity.FromContext(ctx)
	if !s.cfg.Operators.Allows(caller) && caller.Name() != req.GetId() {
		return nil, status.Errorf(codes.PermissionDenied, "rootkms: %s may only join itself, not %q", caller, req.GetId())
	}
	if req.GetId() == "" || req.GetAddress() == "" || req.GetApiAddress() == "" {
		return nil, status.Error(codes.InvalidArgument, "rootkms: join needs id, address and api_address")
	}
	audit.AddTarget(ctx, audit.Target{Resource: "member/" + req.GetId()})
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if err := s.linearize(); err != nil {
		return nil, err
	}
	var f raft.IndexFuture
	switch req.GetSuffrage() {
	case rootkmsv1.Suffrage_SUFFRAGE_VOTER:
		f = s.node.Raft.AddVoter(raft.ServerID(req.GetId()), raft.ServerAddress(req.GetAddress()), 0, s.cfg.ApplyTimeout)
	case rootkmsv1.Suffrage_SUFFRAGE_NONVOTER:
		f = s.node.Raft.AddNonvoter(raft.ServerID(req.GetId()), raft.ServerAddress(req.GetAddress()), 0, s.cfg.ApplyTimeout)
	default:
		return nil, status.Error(codes.InvalidArgument, "rootkms: join needs a suffrage (voter or non-voter)")
	}
	if err := f.Error(); err != nil {
		return nil, s.raftError(err)
	}
	if _, err := s.applyLocal(ctx, &rootkmsv1.Command{Op: &rootkmsv1.Command_RegisterMember{
		RegisterMember: &rootkmsv1.RegisterMemberCommand{Member: &rootkmsv1.MemberRecord{Id: req.GetId(), ApiAddress: req.GetApiAddress()}}}}); err != nil {
		return nil, err
	}
	return s.GetClusterStatus(ctx, nil)
}

// Remove implements RootKMS (leader only).
func (s *Server) Remove(ctx context.Context, req *rootkmsv1.RemoveRequest) (*rootkmsv1.ClusterStatus, error) {
	if req.GetId() == "" {
		return nil, status.Error(codes.InvalidArgument, "rootkms: remove needs an id")
	}
	audit.AddTarget(ctx, audit.Target{Resource: "member/" + req.GetId()})
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if err := s.linearize(); err != nil {
		return nil, err
	}
	if err := s.node.Raft.RemoveServer(raft.ServerID(req.GetId()), 0, s.cfg.ApplyTimeout).Error(); err != nil {
		return nil, s.raftError(err)
	}
	if req.GetId() != s.cfg.ID {
		if _, err := s.applyLocal(ctx, &rootkmsv1.Command{Op: &rootkmsv1.Command_DeregisterMember{DeregisterMember: &rootkmsv1.DeregisterMemberCommand{Id: req.GetId()}}}); err != nil {
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
