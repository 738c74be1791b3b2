package rootkms

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	backupv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/backup/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/backup"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkey"
)

// ExportBackup implements RootKMS: the leader, after a Raft barrier (so the
// state holds every entry committed before the call), encodes its committed
// state as its Raft snapshots do and seals it in a backup file tagged under
// the RMK (package backup). The backup is as secret as the replicas' disks:
// wrapped keys, encrypted keysets and plaintext metadata.
func (s *Server) ExportBackup(ctx context.Context, _ *rootkmsv1.ExportBackupRequest) (*rootkmsv1.ExportBackupResponse, error) {
	key, err := s.rootKey()
	if err != nil {
		return nil, err
	}
	gid := s.cfg.Manifest.GetGenesisId()
	audit.AddTarget(ctx, audit.Target{Resource: "genesis/" + gid})
	term := s.node.Raft.CurrentTerm()
	if err := s.linearize(); err != nil {
		return nil, err
	}
	st := s.fsm.State()
	// The barrier committed in term, and this replica still leads in it:
	// st is the committed state as of a read in term.
	if s.node.Raft.State() != raft.Leader || s.node.Raft.CurrentTerm() != term {
		return nil, s.notLeader()
	}
	snap, err := s.fsm.Encode(st)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "rootkms: %v", err)
	}
	caller, _ := identity.FromContext(ctx)
	c := &backupv1.BackupContents{
		GenesisId: gid, RmkKcv: s.cfg.Manifest.GetKcv(), Index: st.Index(), Term: term,
		CreatedAt: timestamppb.New(s.cfg.Now()), CreatedBy: caller.String(), ReplicaId: s.cfg.ID, Snapshot: snap,
	}
	b, err := backup.Seal(c, key)
	switch {
	case errors.Is(err, backup.ErrFormat):
		return nil, status.Errorf(codes.ResourceExhausted, "rootkms: cannot export a backup: %v", err)
	case err != nil:
		return nil, status.Errorf(codes.Internal, "rootkms: %v", err)
	}
	audit.AddTarget(ctx, audit.Target{Resource: fmt.Sprintf("genesis/%s index %d term %d", gid, st.Index(), term)})
	s.log.Info("rootkms: backup exported", "by", caller.String(), "index", st.Index(), "term", term,
		"regions", st.NumRegions(), "keysets", st.NumKeysets(), "bytes", len(b))
	return &rootkmsv1.ExportBackupResponse{
		Backup: b, Index: st.Index(), Term: term, GenesisId: gid,
		Regions: uint32(st.NumRegions()), Keysets: uint32(st.NumKeysets()), Rollouts: uint32(len(st.Rollouts())),
	}, nil
}

// RestoreBackup implements RootKMS: disaster recovery into a cluster of the
// same RMK lineage (normally a fresh one). Before anything changes it checks
// the file (format, lineage, tag), that the state machine accepts the
// snapshot (fsm.Decode: Raft's restore cannot be undone once started) and
// that every wrapped region key opens under this replica's root key; then,
// on the leader and unless the cluster holds regions or keysets (without
// overwrite), it records the reason in the audit log (no record, no
// restore) and hands the snapshot to raft's Restore.
//
// Membership: Raft keeps this cluster's configuration (its servers), and
// the restored state keeps this cluster's member records (their API
// addresses); the backup's members, the old cluster's servers, are dropped.
// Everything else (regions, keysets, rollouts, the request table) is the
// backup's. Raft restores at an index above both the backup's (and every
// request it remembers) and this log's, so later commands keep the request
// table in index order.
func (s *Server) RestoreBackup(ctx context.Context, req *rootkmsv1.RestoreBackupRequest) (*rootkmsv1.RestoreBackupResponse, error) {
	if req.GetReason() == "" {
		return nil, status.Error(codes.InvalidArgument, "rootkms: RestoreBackup needs a reason (it is audited)")
	}
	key, err := s.rootKey()
	if err != nil {
		return nil, err
	}
	gid := s.cfg.Manifest.GetGenesisId()
	audit.AddTarget(ctx, audit.Target{Resource: "genesis/" + gid})
	c, err := backup.Open(req.GetBackup(), gid, s.cfg.Manifest.GetKcv(), key)
	switch {
	case errors.Is(err, backup.ErrFormat), errors.Is(err, backup.ErrLineage):
		return nil, status.Errorf(codes.InvalidArgument, "rootkms: %v; nothing was restored", err)
	case errors.Is(err, rootkey.ErrBackupTag):
		return nil, status.Errorf(codes.InvalidArgument, "rootkms: %v: it may have been edited or damaged, or made by a cluster of another root key; nothing was restored", err)
	case err != nil:
		return nil, status.Errorf(codes.Internal, "rootkms: %v", err)
	}
	audit.AddTarget(ctx, audit.Target{Resource: fmt.Sprintf("genesis/%s backup index %d term %d", gid, c.GetIndex(), c.GetTerm())})
	restored, err := s.fsm.Decode(c.GetSnapshot())
	if err != nil {
		// A tagged backup the state machine refuses: made by a binary of
		// another snapshot format, or a bug. Either way not restorable here.
		return nil, status.Errorf(codes.InvalidArgument, "rootkms: the backup's state is not restorable by this binary: %v; nothing was restored", err)
	}
	if err := openRegionKeys(key, restored); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "rootkms: %v; nothing was restored", err)
	}
	metaIndex, err := restoreIndex(c)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "rootkms: %v; nothing was restored", err)
	}

	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if err := checkDeadline(ctx); err != nil {
		return nil, err
	}
	if err := s.linearize(); err != nil {
		return nil, err
	}
	cur := s.fsm.State()
	replacedRegions, replacedKeysets := cur.NumRegions(), cur.NumKeysets()
	if (replacedRegions > 0 || replacedKeysets > 0) && !req.GetOverwrite() {
		return nil, status.Errorf(codes.FailedPrecondition,
			"rootkms: this cluster holds %d regions and %d keysets; a restore would replace them and lose everything recorded since the backup. "+
				"Restore into a fresh cluster, or set overwrite (regionctl backup restore --overwrite) to replace this state; nothing was restored",
			replacedRegions, replacedKeysets)
	}
	next, err := restored.WithMembers(cur.Members())
	if err != nil {
		return nil, status.Errorf(codes.Internal, "rootkms: this cluster's member records: %v", err)
	}
	b, err := s.fsm.Encode(next)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "rootkms: %v", err)
	}
	if _, err := s.fsm.Decode(b); err != nil {
		return nil, status.Errorf(codes.Internal, "rootkms: the state to restore does not decode: %v; nothing was restored", err)
	}
	caller, _ := identity.FromContext(ctx)
	rec := audit.Record{
		RequestID: audit.RequestID(ctx), Identity: caller.String(), Operation: svc + "RestoreBackup", Outcome: audit.OutcomeAttempt,
		Target: audit.Target{Resource: fmt.Sprintf("genesis/%s backup index %d term %d by %s at %s; replacing %d regions, %d keysets",
			gid, c.GetIndex(), c.GetTerm(), c.GetCreatedBy(), c.GetCreatedAt().AsTime().UTC().Format("2006-01-02T15:04:05Z"), replacedRegions, replacedKeysets)},
		Reason: req.GetReason(),
	}
	if err := s.cfg.Audit.Write(context.WithoutCancel(ctx), rec); err != nil {
		return nil, status.Errorf(codes.Unavailable, "rootkms: audit log unavailable, refusing to restore: %v", err)
	}
	meta := &raft.SnapshotMeta{Version: raft.SnapshotVersionMax, Index: metaIndex, Term: c.GetTerm(), Size: int64(len(b))}
	if err := s.node.Raft.Restore(meta, bytes.NewReader(b), s.cfg.ApplyTimeout); err != nil {
		return nil, s.restoreError(err)
	}
	st := s.fsm.State()
	s.log.Warn("rootkms: state restored from a backup", "by", caller.String(), "reason", req.GetReason(),
		"backup_index", c.GetIndex(), "backup_term", c.GetTerm(), "index", s.node.Raft.LastIndex(),
		"regions", st.NumRegions(), "keysets", st.NumKeysets(), "replaced_regions", replacedRegions, "replaced_keysets", replacedKeysets)
	return &rootkmsv1.RestoreBackupResponse{
		BackupIndex: c.GetIndex(), BackupTerm: c.GetTerm(), Index: s.node.Raft.LastIndex(), Term: s.node.Raft.CurrentTerm(),
		Regions: uint32(st.NumRegions()), Keysets: uint32(st.NumKeysets()), Rollouts: uint32(len(st.Rollouts())),
		ReplacedRegions: uint32(replacedRegions), ReplacedKeysets: uint32(replacedKeysets),
	}, nil
}

// openRegionKeys proves that every wrapped region key version of s opens
// under key (the tag already proves the backup was made under this RMK;
// this proves its keys are usable before they replace anything).
func openRegionKeys(key *rootkey.Key, s *fsm.State) error {
	for _, r := range s.Regions() {
		for _, v := range r.Versions {
			if v.Key == nil {
				continue // destroyed
			}
			m, err := key.Unwrap(r.Name, v.Key)
			if err != nil {
				return fmt.Errorf("region %s key version %d in the backup does not open under this cluster's root key", r.Name, v.Version)
			}
			m.Wipe()
		}
	}
	return nil
}

// restoreIndex is the index to hand Raft's Restore: the backup's index, or
// the highest index its request table remembers if that is higher. Raft
// restores above it, so every later command's index is above every
// remembered request's, as the request table requires.
func restoreIndex(c *backupv1.BackupContents) (uint64, error) {
	snap, err := backup.Snapshot(c)
	if err != nil {
		return 0, err
	}
	idx := c.GetIndex()
	for _, r := range snap.GetRequests() {
		idx = max(idx, r.GetIndex())
	}
	return idx, nil
}

// restoreError maps an error of raft's Restore. Before raft takes the
// snapshot (not the leader, a configuration change in flight, shutting
// down) nothing changed; after it, the restore may have happened and only
// the confirmation failed.
func (s *Server) restoreError(err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return s.notLeader()
	case errors.Is(err, raft.ErrRaftShutdown):
		return status.Error(codes.Unavailable, "rootkms: shutting down")
	}
	return status.Errorf(codes.Unavailable, "rootkms: raft restore: %v (the state may or may not have been restored: compare regionctl region list and keyset list with the backup before retrying; a retry into a restored cluster is refused unless overwrite is set)", err)
}
