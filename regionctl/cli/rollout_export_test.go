package cli

import (
	"context"
	"maps"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/regionctl/rollout"
)

// MemRollouts is an in-memory rolloutStore with the root KMS's contract
// (PutRollout's fencing by revision, epoch and owner, its refusal of a
// second rollout in flight for a region, also when a finished rollout goes
// back in flight to be rolled back; not its eviction of finished
// rollouts), for tests that do not need the root KMS's.
type MemRollouts struct {
	mu   sync.Mutex
	now  func() time.Time
	recs map[string]*statev1.RolloutRecord
	// failPut, if set, makes Put fail for the records it returns true for
	// (FailPut).
	failPut func(rollout.Record) bool
}

// FailPut makes Put refuse with codes.Unavailable, storing nothing, every
// record fail returns true for: the root KMS briefly unreachable when the
// controller stores a transition.
func (s *MemRollouts) FailPut(fail func(rollout.Record) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failPut = fail
}

// NewMemRollouts returns an empty store stamping records with now.
func NewMemRollouts(now func() time.Time) *MemRollouts {
	return &MemRollouts{now: now, recs: map[string]*statev1.RolloutRecord{}}
}

// WithRollouts makes regionctl rollout use s instead of the root KMS.
func WithRollouts(ctx context.Context, s *MemRollouts) context.Context {
	return context.WithValue(ctx, rolloutStoreKey{}, rolloutStore(s))
}

// Record returns rollout id's record as stored (decoded) and its revision.
func (s *MemRollouts) Record(id string) (rollout.Record, uint64, error) {
	p, err := s.Get(context.Background(), id)
	if err != nil {
		return rollout.Record{}, 0, err
	}
	rec, err := decodeRollout(p)
	return rec, p.GetRevision(), err
}

func (s *MemRollouts) Put(_ context.Context, rec *statev1.RolloutRecord, expected uint64) (*statev1.RolloutRecord, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failPut != nil {
		if r, err := decodeRollout(rec); err == nil && s.failPut(r) {
			return nil, status.Errorf(codes.Unavailable, "rollout %s: the root KMS is unavailable (test)", rec.GetId())
		}
	}
	cur, ok := s.recs[rec.GetId()]
	switch {
	case expected == 0 && ok:
		return nil, status.Errorf(codes.AlreadyExists, "rollout %s exists", rec.GetId())
	case expected == 0:
		for _, id := range slices.Sorted(maps.Keys(s.recs)) {
			o := s.recs[id]
			for _, r := range rec.GetRegions() {
				if o.GetInFlight() && slices.Contains(o.GetRegions(), r) {
					return nil, status.Errorf(codes.FailedPrecondition, "region %s has rollout %s in flight", r, id)
				}
			}
		}
	case !ok:
		return nil, status.Errorf(codes.NotFound, "no rollout %s", rec.GetId())
	case cur.GetRevision() != expected:
		return nil, status.Errorf(codes.Aborted, "rollout %s is at revision %d, not %d", rec.GetId(), cur.GetRevision(), expected)
	case rec.GetEpoch() < cur.GetEpoch() || rec.GetEpoch() == cur.GetEpoch() && rec.GetOwner() != cur.GetOwner():
		return nil, status.Errorf(codes.Aborted, "rollout %s is at epoch %d held by %s, the write has %d by %s", rec.GetId(), cur.GetEpoch(), cur.GetOwner(), rec.GetEpoch(), rec.GetOwner())
	}
	// A finished rollout goes back in flight (a rollback) only while none of
	// its regions is in another rollout in flight, as a create.
	if ok && rec.GetInFlight() && !cur.GetInFlight() {
		for _, id := range slices.Sorted(maps.Keys(s.recs)) {
			o := s.recs[id]
			for _, r := range cur.GetRegions() {
				if id != rec.GetId() && o.GetInFlight() && slices.Contains(o.GetRegions(), r) {
					return nil, status.Errorf(codes.FailedPrecondition, "region %s has rollout %s in flight", r, id)
				}
			}
		}
	}
	next := proto.Clone(rec).(*statev1.RolloutRecord)
	now := timestamppb.New(s.now())
	next.Revision, next.UpdatedAt, next.CreatedAt = expected+1, now, now
	if ok {
		next.CreatedAt = cur.GetCreatedAt()
	}
	s.recs[rec.GetId()] = next
	return proto.Clone(next).(*statev1.RolloutRecord), nil
}

func (s *MemRollouts) Get(_ context.Context, id string) (*statev1.RolloutRecord, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.recs[id]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "no rollout %s", id)
	}
	return proto.Clone(r).(*statev1.RolloutRecord), nil
}

func (s *MemRollouts) List(_ context.Context, inFlightOnly bool) ([]*statev1.RolloutRecord, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*statev1.RolloutRecord
	for _, id := range slices.Sorted(maps.Keys(s.recs)) {
		if r := s.recs[id]; !inFlightOnly || r.GetInFlight() {
			out = append(out, proto.Clone(r).(*statev1.RolloutRecord))
		}
	}
	return out, nil
}
