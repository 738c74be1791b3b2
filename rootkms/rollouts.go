package rootkms

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
)

// The rollout record: regionctl's staged rollouts keep their whole state
// here, so that a controller killed mid-stage resumes from it, a stale
// controller cannot overwrite a newer one's progress (epochs), and a region
// has at most one rollout in flight. The FSM (fsm.putRollout) decides every
// write; these handlers only authorise (server.go's policy: regionctl
// identities), audit and propose.

// PutRollout implements RootKMS: creates (expected_revision 0) or updates a
// rollout record. The root KMS sets revision, created_at and updated_at;
// an empty owner is the caller, and so is an empty started_by of a new
// rollout. A retry with the same request ID is answered with the record as
// it is now, not applied again.
func (s *Server) PutRollout(ctx context.Context, req *rootkmsv1.PutRolloutRequest) (*statev1.RolloutRecord, error) {
	in := req.GetRollout()
	if in == nil {
		return nil, status.Error(codes.InvalidArgument, "rootkms: put_rollout needs a rollout")
	}
	id := in.GetId()
	if err := fsm.ValidRolloutID(id); err != nil {
		return nil, status.Error(codes.InvalidArgument, "rootkms: "+err.Error())
	}
	audit.AddTarget(ctx, audit.Target{Resource: "rollout/" + id})
	if n := len(in.GetBody()); n > fsm.MaxRolloutBody {
		return nil, status.Errorf(codes.InvalidArgument, "rootkms: rollout %q: body of %d bytes, above %d", id, n, fsm.MaxRolloutBody)
	}
	if _, err := s.rootKey(); err != nil {
		return nil, err
	}
	caller, _ := identity.FromContext(ctx)
	rec := proto.CloneOf(in)
	rec.Revision, rec.CreatedAt, rec.UpdatedAt = 0, nil, nil
	if rec.Owner == "" {
		rec.Owner = caller.String()
	}
	if rec.StartedBy == "" && req.GetExpectedRevision() == 0 {
		rec.StartedBy = caller.String()
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if dup, err := s.beginWrite(ctx, &statev1.Command{Op: &statev1.Command_PutRollout{PutRollout: &statev1.PutRolloutCommand{
		Rollout: &statev1.RolloutRecord{Id: id}}}}); dup != nil || err != nil {
		return rolloutAnswer(id, dup, err)
	}
	res, err := s.applyLocal(ctx, &statev1.Command{Op: &statev1.Command_PutRollout{PutRollout: &statev1.PutRolloutCommand{
		Rollout: rec, ExpectedRevision: req.GetExpectedRevision()}}})
	return rolloutAnswer(id, res, err)
}

// rolloutAnswer turns an apply result (or a replayed one) into the API
// answer.
func rolloutAnswer(id string, res *fsm.Result, err error) (*statev1.RolloutRecord, error) {
	if err != nil {
		return nil, err
	}
	if res == nil || res.Rollout == nil {
		// Only a Duplicate can lack it: the write was applied, then the
		// rollout finished and was evicted by later ones.
		return nil, status.Errorf(codes.NotFound, "rootkms: rollout %q was written by this request, then finished and was evicted from the record", id)
	}
	return res.Rollout, nil
}

// GetRollout implements RootKMS (linearizable: via the leader).
func (s *Server) GetRollout(ctx context.Context, req *rootkmsv1.GetRolloutRequest) (*statev1.RolloutRecord, error) {
	audit.AddTarget(ctx, audit.Target{Resource: "rollout/" + req.GetId()})
	if err := s.linearize(); err != nil {
		return nil, err
	}
	r, ok := s.fsm.State().Rollout(req.GetId())
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: no rollout %q", req.GetId())
	}
	return r, nil
}

// ListRollouts implements RootKMS (linearizable: via the leader): every
// rollout the record keeps, or only those in flight, sorted by ID.
func (s *Server) ListRollouts(ctx context.Context, req *rootkmsv1.ListRolloutsRequest) (*rootkmsv1.ListRolloutsResponse, error) {
	if err := s.linearize(); err != nil {
		return nil, err
	}
	out := &rootkmsv1.ListRolloutsResponse{}
	for _, r := range s.fsm.State().Rollouts() {
		if req.GetInFlightOnly() && !r.GetInFlight() {
			continue
		}
		out.Rollouts = append(out.Rollouts, r)
	}
	return out, nil
}
