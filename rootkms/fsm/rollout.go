package fsm

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
)

// The rollout record: the durable, fenced state of regionctl's staged
// rollouts. The FSM keeps each record and does not interpret its body; it
// enforces what a controller crashing or racing another must not break:
//
//   - a region has at most one rollout in flight;
//   - writes are fenced by epoch: a write carries the record's epoch or a
//     higher one (a takeover, which may change the owner); a lower one is
//     refused, so a stale controller cannot overwrite a newer one's progress;
//   - writes are ordered by revision: a write names the revision it read;
//   - a rollout's regions, start and reason never change;
//   - a finished rollout runs again only to be rolled back (regionctl rollout
//     rollback of a completed or aborted rollout), and only while none of its
//     regions is in another rollout in flight, the rule a create follows.
//     The FSM does not read the body, so it does not judge the transition
//     itself (the controller's state machine does); it keeps the regions
//     exclusive. A finished rollout may have been evicted (below): rolling
//     it back is then ErrNoRollout (NotFound), like any unknown ID.
//
// The record is bounded: every rollout in flight is kept, and at most
// MaxFinishedRollouts finished ones, the least recently updated evicted
// first; all bodies together are at most MaxRolloutBodies bytes.

// Rollout record bounds. They are part of the state machine's behaviour, so
// they never change within a FormatVersion.
const (
	// MaxFinishedRollouts bounds the finished rollouts the state keeps.
	MaxFinishedRollouts = 64
	// MaxRolloutBody bounds one rollout's body: 1 MiB.
	MaxRolloutBody = 1 << 20
	// MaxRolloutBodies bounds the bodies of all the rollouts kept, 8 MiB,
	// so that the rollouts never crowd a snapshot toward MaxSnapshotSize and
	// a list of them all fits one 16 MiB API message: finished rollouts are
	// evicted to fit it, and a write that would exceed it with the rollouts
	// in flight alone is refused.
	MaxRolloutBodies = 8 << 20
	// MaxRolloutField bounds each of owner, started_by, reason and
	// body_format, in bytes.
	MaxRolloutField = 1024
)

// rolloutID is the form of a rollout ID.
var rolloutID = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// ValidRolloutID reports whether id is a valid rollout ID: 1 to 63 of
// [a-z0-9._-], starting with a letter or digit. The error wraps
// ErrInvalidCommand.
func ValidRolloutID(id string) error {
	if !rolloutID.MatchString(id) {
		return fmt.Errorf("%w: rollout ID %q does not match %s", ErrInvalidCommand, id, rolloutID)
	}
	return nil
}

// Rollout returns the rollout with ID id, or false if the state has none
// (never written, or a finished one evicted).
//
// The record is shared with the State and must be treated as read-only:
// Apply never modifies a published record but replaces it.
func (s *State) Rollout(id string) (*statev1.RolloutRecord, bool) {
	i, ok := s.findRollout(id)
	if !ok {
		return nil, false
	}
	return s.rollouts[i], true
}

// Rollouts returns every rollout kept, sorted by ID. The slice is the
// caller's; the records are shared and read-only (see Rollout).
func (s *State) Rollouts() []*statev1.RolloutRecord {
	return slices.Clone(s.rollouts)
}

func (s *State) findRollout(id string) (int, bool) {
	return slices.BinarySearchFunc(s.rollouts, id, func(r *statev1.RolloutRecord, id string) int {
		return strings.Compare(r.GetId(), id)
	})
}

// busyRegion returns the in-flight rollout other than id that holds one of
// regions, and that region; ok is false if there is none.
func (s *State) busyRegion(id string, regions []string) (other *statev1.RolloutRecord, region string, ok bool) {
	for _, r := range s.rollouts {
		if !r.GetInFlight() || r.GetId() == id {
			continue
		}
		for _, reg := range regions {
			if _, found := slices.BinarySearch(r.GetRegions(), reg); found {
				return r, reg, true
			}
		}
	}
	return nil, "", false
}

// olderRollout orders finished rollouts for eviction: least recently updated
// first, then by ID.
func olderRollout(a, b *statev1.RolloutRecord) int {
	if c := a.GetUpdatedAt().AsTime().Compare(b.GetUpdatedAt().AsTime()); c != 0 {
		return c
	}
	return strings.Compare(a.GetId(), b.GetId())
}

// rolloutBodies is the total body size of rs.
func rolloutBodies(rs []*statev1.RolloutRecord) int {
	n := 0
	for _, r := range rs {
		n += len(r.GetBody())
	}
	return n
}

// withRollout returns a copy of s holding r in place of the rollout of the
// same ID, or in addition to the others, with finished rollouts other than r
// evicted, oldest first (olderRollout), until at most MaxFinishedRollouts are
// finished and the bodies fit MaxRolloutBodies. It fails if they cannot fit
// (the rollouts in flight and r alone are too large). s is not changed.
func (s *State) withRollout(r *statev1.RolloutRecord) (*State, error) {
	rs := slices.Clone(s.rollouts)
	i, ok := s.findRollout(r.GetId())
	if ok {
		rs[i] = r
	} else {
		rs = slices.Insert(rs, i, r)
	}
	var finished []*statev1.RolloutRecord // eviction candidates
	nFinished := 0
	for _, x := range rs {
		if !x.GetInFlight() {
			nFinished++
			if x != r {
				finished = append(finished, x)
			}
		}
	}
	slices.SortFunc(finished, olderRollout)
	bodies := rolloutBodies(rs)
	evict := map[string]bool{}
	for _, x := range finished {
		if nFinished <= MaxFinishedRollouts && bodies <= MaxRolloutBodies {
			break
		}
		evict[x.GetId()] = true
		nFinished--
		bodies -= len(x.GetBody())
	}
	if bodies > MaxRolloutBodies {
		return nil, fmt.Errorf("%w: rollout %q: the rollouts in flight and this one have %d bytes of body, above %d", ErrInvalidCommand, r.GetId(), bodies, MaxRolloutBodies)
	}
	if len(evict) > 0 {
		rs = slices.DeleteFunc(rs, func(x *statev1.RolloutRecord) bool { return evict[x.GetId()] })
	}
	next := s.clone()
	next.rollouts = rs
	// Eviction never lowers what a restored State computes as Latest: r
	// carries the command's time, not before any time in s.
	next.latest = later(s.latest, rolloutLatest(r))
	return next, nil
}

// rolloutLatest is the latest of r's times that Latest counts.
func rolloutLatest(r *statev1.RolloutRecord) time.Time {
	return later(r.GetCreatedAt().AsTime(), r.GetUpdatedAt().AsTime())
}

// checkRolloutFields checks what every rollout record needs, in a command or
// a snapshot: a valid ID, regions sorted, unique, valid and existing in s,
// an epoch, an owner, a body format, and fields within their bounds. The
// error wraps ErrNoRegion for a missing region; otherwise it is a message
// for the caller to wrap.
func checkRolloutFields(s *State, r *statev1.RolloutRecord) error {
	id := r.GetId()
	if !rolloutID.MatchString(id) {
		return fmt.Errorf("rollout ID %q does not match %s", id, rolloutID)
	}
	if err := validRegions(r.GetRegions()); err != nil {
		return fmt.Errorf("rollout %q: %v", id, err)
	}
	for _, reg := range r.GetRegions() {
		if _, ok := s.findRegion(reg); !ok {
			return fmt.Errorf("%w: rollout %q names region %q", ErrNoRegion, id, reg)
		}
	}
	switch {
	case r.GetEpoch() == 0:
		return fmt.Errorf("rollout %q: epoch 0; epochs start at 1", id)
	case r.GetOwner() == "":
		return fmt.Errorf("rollout %q: no owner", id)
	case r.GetBodyFormat() == "":
		return fmt.Errorf("rollout %q: no body_format", id)
	case len(r.GetBody()) > MaxRolloutBody:
		return fmt.Errorf("rollout %q: body of %d bytes, above %d", id, len(r.GetBody()), MaxRolloutBody)
	}
	for _, f := range []struct{ name, v string }{
		{"owner", r.GetOwner()}, {"started_by", r.GetStartedBy()}, {"reason", r.GetReason()}, {"body_format", r.GetBodyFormat()},
	} {
		if len(f.v) > MaxRolloutField {
			return fmt.Errorf("rollout %q: %s of %d bytes, above %d", id, f.name, len(f.v), MaxRolloutField)
		}
	}
	return nil
}

// putRollout creates (expected_revision 0) or updates a rollout record.
//
// A create needs an ID not in the state, regions sorted, unique and
// existing (ErrNoRegion), none held by another rollout in flight (ErrRegionBusy) if this
// one is in flight, an epoch of at least 1, an owner and a body format; it
// gets revision 1 and the command's time as created_at and updated_at, and
// started_by defaults to the command's identity. The proposer's revision
// and times are not taken.
//
// An update names the revision it read (ErrStaleRevision otherwise) and an
// epoch of at least the record's (ErrStaleEpoch otherwise); at the record's
// epoch the owner may not change (a takeover raises the epoch). Regions,
// started_by, reason and created_at may be left unset, meaning unchanged;
// set, they must equal the record's. A finished rollout (in_flight false)
// may become in flight again (a rollback of a completed or aborted rollout)
// if none of its regions is held by another rollout in flight
// (ErrRegionBusy otherwise, as for a create); one already evicted is
// ErrNoRollout. The revision advances and updated_at is the command's time.
func putRollout(s *State, c *statev1.PutRolloutCommand, identity string, at time.Time) (*State, *Result) {
	in := c.GetRollout()
	id := in.GetId()
	if err := ValidRolloutID(id); err != nil {
		return refuse(err)
	}
	old, exists := s.Rollout(id)
	rev := c.GetExpectedRevision()
	ts := timestamppb.New(at)
	var rec *statev1.RolloutRecord
	switch {
	case rev == 0 && exists:
		return refuse(fmt.Errorf("%w: %q (revision %d)", ErrRolloutExists, id, old.GetRevision()))
	case rev == 0:
		startedBy := in.GetStartedBy()
		if startedBy == "" {
			startedBy = identity
		}
		rec = &statev1.RolloutRecord{
			Id:         id,
			Regions:    slices.Clone(in.GetRegions()),
			InFlight:   in.GetInFlight(),
			Epoch:      in.GetEpoch(),
			Owner:      in.GetOwner(),
			Revision:   1,
			CreatedAt:  ts,
			UpdatedAt:  ts,
			StartedBy:  startedBy,
			Reason:     in.GetReason(),
			BodyFormat: in.GetBodyFormat(),
			Body:       in.GetBody(),
		}
	case !exists:
		return refuse(fmt.Errorf("%w: %q", ErrNoRollout, id))
	default:
		if rev != old.GetRevision() {
			return refuse(fmt.Errorf("%w: rollout %q is at revision %d, the write was made against %d", ErrStaleRevision, id, old.GetRevision(), rev))
		}
		switch e := in.GetEpoch(); {
		case e < old.GetEpoch():
			return refuse(fmt.Errorf("%w: rollout %q is at epoch %d (owner %q); the write carries epoch %d", ErrStaleEpoch, id, old.GetEpoch(), old.GetOwner(), e))
		case e == old.GetEpoch() && in.GetOwner() != old.GetOwner():
			return refuse(fmt.Errorf("%w: rollout %q epoch %d is held by %q, not %q; a takeover raises the epoch", ErrStaleEpoch, id, e, old.GetOwner(), in.GetOwner()))
		}
		if rs := in.GetRegions(); len(rs) > 0 && !slices.Equal(rs, old.GetRegions()) {
			return invalid("rollout %q: regions %q cannot change to %q", id, old.GetRegions(), rs)
		}
		for _, f := range []struct{ name, got, want string }{
			{"started_by", in.GetStartedBy(), old.GetStartedBy()},
			{"reason", in.GetReason(), old.GetReason()},
		} {
			if f.got != "" && f.got != f.want {
				return invalid("rollout %q: %s %q cannot change to %q", id, f.name, f.want, f.got)
			}
		}
		if ca := in.GetCreatedAt(); ca != nil && !ca.AsTime().Equal(old.GetCreatedAt().AsTime()) {
			return invalid("rollout %q: created_at %v cannot change to %v", id, old.GetCreatedAt().AsTime(), ca.AsTime())
		}
		// A finished rollout back in flight (a rollback) is judged below,
		// with every write in flight: its regions must be free.
		rec = &statev1.RolloutRecord{
			Id:         id,
			Regions:    old.GetRegions(),
			InFlight:   in.GetInFlight(),
			Epoch:      in.GetEpoch(),
			Owner:      in.GetOwner(),
			Revision:   old.GetRevision() + 1,
			CreatedAt:  old.GetCreatedAt(),
			UpdatedAt:  ts,
			StartedBy:  old.GetStartedBy(),
			Reason:     old.GetReason(),
			BodyFormat: in.GetBodyFormat(),
			Body:       in.GetBody(),
		}
	}
	if err := checkRolloutFields(s, rec); err != nil {
		if errors.Is(err, ErrNoRegion) {
			return refuse(err)
		}
		return invalid("%v", err)
	}
	if rec.GetInFlight() {
		if other, region, busy := s.busyRegion(id, rec.GetRegions()); busy {
			return refuse(fmt.Errorf("%w: region %q is in rollout %q (owner %q, epoch %d), in flight; rollout %q must wait for it to finish",
				ErrRegionBusy, region, other.GetId(), other.GetOwner(), other.GetEpoch(), id))
		}
	}
	next, err := s.withRollout(rec)
	if err != nil {
		return refuse(err)
	}
	return next, &Result{Rollout: rec}
}

// checkRollouts checks a restored state's rollouts (s holds its regions):
// each as checkRolloutFields describes, with a revision of at least 1 and
// valid times, updated_at not before created_at; IDs sorted and unique; at
// most one rollout in flight per region; at most MaxFinishedRollouts
// finished; bodies within MaxRolloutBodies. It returns a message for the
// caller to wrap.
func checkRollouts(s *State, rs []*statev1.RolloutRecord) error {
	holder := map[string]string{} // region -> the in-flight rollout holding it
	finished := 0
	for i, r := range rs {
		if err := checkRolloutFields(s, r); err != nil {
			return err
		}
		id := r.GetId()
		switch {
		case i > 0 && strings.Compare(rs[i-1].GetId(), id) >= 0:
			return fmt.Errorf("rollout %q after %q: not sorted or duplicate", id, rs[i-1].GetId())
		case r.GetRevision() == 0:
			return fmt.Errorf("rollout %q: revision 0", id)
		case !validTime(r.GetCreatedAt()) || !validTime(r.GetUpdatedAt()):
			return fmt.Errorf("rollout %q: created_at or updated_at missing or invalid", id)
		case r.GetUpdatedAt().AsTime().Before(r.GetCreatedAt().AsTime()):
			return fmt.Errorf("rollout %q: updated_at before created_at", id)
		}
		if !r.GetInFlight() {
			finished++
			continue
		}
		for _, reg := range r.GetRegions() {
			if other, ok := holder[reg]; ok {
				return fmt.Errorf("region %q is in rollouts %q and %q, both in flight", reg, other, id)
			}
			holder[reg] = id
		}
	}
	if finished > MaxFinishedRollouts {
		return fmt.Errorf("%d finished rollouts, at most %d", finished, MaxFinishedRollouts)
	}
	if n := rolloutBodies(rs); n > MaxRolloutBodies {
		return fmt.Errorf("rollout bodies total %d bytes, above %d", n, MaxRolloutBodies)
	}
	return nil
}
