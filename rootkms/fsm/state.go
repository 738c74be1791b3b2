package fsm

import (
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
)

// TypeURL is the Tink key type of every region master key version, reported in
// KeyVersionInfo.type_url.
const TypeURL = "type.googleapis.com/google.crypto.tink.AesGcmKey"

// Version is one version of a region master key as the FSM holds it.
//
// A Version reached through a published State is read-only: it shares Key with
// every later State that did not change it.
type Version struct {
	// Version is the region key version, 1..n in the region's order.
	Version uint32
	// Key is the version's material wrapped by the RMK. It is nil once the
	// version is DESTROYED: the FSM forgets the wrapped material then, so no
	// later snapshot carries it.
	Key *statev1.WrappedRegionKeyVersion
	// Status is ENABLED, PRIMARY, DISABLED or DESTROYED.
	Status cryptov1.KeyStatus
	// CreatedAt is when the version was added. The times below are zero while
	// unset; all are proposer times carried in the commands, in UTC.
	CreatedAt time.Time
	// PrimarySince is when the version last became PRIMARY.
	PrimarySince time.Time
	// SupersededAt is when another version last replaced it as PRIMARY; it is
	// cleared when the version becomes PRIMARY again. The Safety Condition
	// counts ciphertext TTL from this instant.
	SupersededAt time.Time
	// RetiredAt is when the version was DESTROYED.
	RetiredAt time.Time
}

// info is v's public metadata.
func (v *Version) info() *cryptov1.KeyVersionInfo {
	return &cryptov1.KeyVersionInfo{
		KeyId:        v.Version,
		Status:       v.Status,
		TypeUrl:      TypeURL,
		CreatedAt:    timestamp(v.CreatedAt),
		PrimarySince: timestamp(v.PrimarySince),
		SupersededAt: timestamp(v.SupersededAt),
		RetiredAt:    timestamp(v.RetiredAt),
	}
}

// Region is one region and its master key versions.
//
// A Region reached through a published State (or a Result) is read-only:
// Apply never modifies it but builds a new Region for every change, and later
// States share the Regions they did not change. Callers must not modify it
// either, Versions included.
type Region struct {
	// Name matches ValidRegionName.
	Name string
	// CreatedAt is the proposer time of the create_region command, in UTC.
	CreatedAt time.Time
	// Versions holds versions 1..n in order: Versions[i].Version == i+1.
	// Exactly one of them is PRIMARY.
	Versions []Version
	// ServedKeyVersions are the region key versions the region's KMS
	// servers' bundles were last seen to need (from record_propagation),
	// sorted and unique, at ServedObservedAt (zero: never observed). A
	// version listed here is still in use.
	ServedKeyVersions []uint32
	// ServedObservedAt is the time of the record_propagation command that
	// set ServedKeyVersions.
	ServedObservedAt time.Time
	// BundleSerialFloor is the highest bundle serial recorded as delivered
	// to the region's KMS servers (record_bundle_serial; 0: none). It never
	// decreases.
	BundleSerialFloor uint64
}

// Primary returns the region's PRIMARY version. The second result is false
// only for a Region that did not come from a State (every region in a State
// has exactly one primary).
func (r *Region) Primary() (Version, bool) {
	for _, v := range r.Versions {
		if v.Status == cryptov1.KeyStatus_KEY_STATUS_PRIMARY {
			return v, true
		}
	}
	return Version{}, false
}

// Version returns version v of the region, or false if the region has no such
// version.
func (r *Region) Version(v uint32) (Version, bool) {
	if v == 0 || uint64(v) > uint64(len(r.Versions)) {
		return Version{}, false
	}
	return r.Versions[v-1], true
}

// Info returns the public metadata of every version, in version order, for the
// API: key_id is the version, type_url is TypeURL, unset times are nil. It
// holds no key material. The result is freshly allocated and the caller's.
func (r *Region) Info() []*cryptov1.KeyVersionInfo {
	out := make([]*cryptov1.KeyVersionInfo, len(r.Versions))
	for i := range r.Versions {
		out[i] = r.Versions[i].info()
	}
	return out
}

// Member is one replica's public contact information.
type Member struct {
	// ID is the replica's Raft server ID.
	ID string
	// APIAddress is the host:port of the replica's gRPC API.
	APIAddress string
}

// State is the FSM's state at one point of the log. A State is immutable: the
// FSM publishes a new State for every accepted command and never changes one
// it has published, so a reader may keep and use a State as long as it likes.
type State struct {
	regions  []*Region                // sorted by Name, unique
	members  []Member                 // sorted by ID, unique
	keysets  []*statev1.KeysetRecord  // sorted by name, unique; never modified
	rollouts []*statev1.RolloutRecord // sorted by id, unique; never modified
	requests *requestTable            // nil when empty
	// latest is what Latest returns, kept up to date by every command
	// (computing it would scan every keyset on every Apply).
	latest time.Time
	index  uint64
}

// Latest returns the latest instant recorded anywhere in the state (zero for
// an empty state): the region and region key version times, the times
// ServedObservedAt, and every keyset time the FSM records (created_at,
// updated_at, TTL period bounds, version created_at, primary_since,
// superseded_at, disabled_at, destroyed_at, propagated and usage
// observed_at), and every rollout's created_at and updated_at. It leaves out the times that are not the FSM's clock: a
// version's destroy_after (a future instant the proposer chose) and the
// fleet's last_encrypt and last_use.
//
// Apply never records an earlier time than this: proposers' clocks may
// disagree across leader changes, and a supersession time that went
// backwards would shorten the Safety Condition's ciphertext TTL window.
// Latest is O(1).
func (s *State) Latest() time.Time { return s.latest }

// regionLatest is the latest of r's times that Latest counts.
func regionLatest(r *Region) time.Time {
	latest := r.CreatedAt
	later := func(t time.Time) {
		if t.After(latest) {
			latest = t
		}
	}
	later(r.ServedObservedAt)
	for _, v := range r.Versions {
		for _, t := range []time.Time{v.CreatedAt, v.PrimarySince, v.SupersededAt, v.RetiredAt} {
			later(t)
		}
	}
	return latest
}

// later returns the later of a and b.
func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// Region returns the region called name, or false if there is none.
func (s *State) Region(name string) (*Region, bool) {
	i, ok := s.findRegion(name)
	if !ok {
		return nil, false
	}
	return s.regions[i], true
}

// Regions returns every region, sorted by name. The slice is the caller's; the
// Regions are shared and read-only.
func (s *State) Regions() []*Region {
	return slices.Clone(s.regions)
}

// NumRegions returns the number of regions, without copying them.
func (s *State) NumRegions() int { return len(s.regions) }

// Members returns every registered member, sorted by ID. The slice is the
// caller's.
func (s *State) Members() []Member {
	return slices.Clone(s.members)
}

// Member returns the member with Raft server ID id, or false if there is none.
func (s *State) Member(id string) (Member, bool) {
	i, ok := s.findMember(id)
	if !ok {
		return Member{}, false
	}
	return s.members[i], true
}

// Index is the Raft index of the log entry whose command produced this State:
// every entry up to Index has been applied to it. It is 0 for the empty State
// of New. Refused commands produce no State, so they do not move Index (see
// FSM.AppliedIndex). A State restored from a snapshot keeps the FSM's
// AppliedIndex at the time of the restore, a lower bound, because snapshots do
// not record their Raft index.
func (s *State) Index() uint64 { return s.index }

func (s *State) findRegion(name string) (int, bool) {
	return slices.BinarySearchFunc(s.regions, name, func(r *Region, name string) int {
		return strings.Compare(r.Name, name)
	})
}

func (s *State) findMember(id string) (int, bool) {
	return slices.BinarySearchFunc(s.members, id, func(m Member, id string) int {
		return strings.Compare(m.ID, id)
	})
}

// clone returns a shallow copy of s, to be changed and published as the next
// State: its slices are s's, so replace them (never write through them).
func (s *State) clone() *State {
	c := *s
	return &c
}

// withRegion returns a copy of s holding r in place of the region of the same
// name, or in addition to the others if there is none. s is not changed.
func (s *State) withRegion(r *Region) *State {
	next := s.clone()
	next.regions = slices.Clone(s.regions)
	i, ok := s.findRegion(r.Name)
	if ok {
		next.regions[i] = r
	} else {
		next.regions = slices.Insert(next.regions, i, r)
	}
	next.latest = later(s.latest, regionLatest(r))
	return next
}

// withMember returns a copy of s holding m in place of the member of the same
// ID, or in addition to the others if there is none. s is not changed.
func (s *State) withMember(m Member) *State {
	next := s.clone()
	next.members = slices.Clone(s.members)
	i, ok := s.findMember(m.ID)
	if ok {
		next.members[i] = m
	} else {
		next.members = slices.Insert(next.members, i, m)
	}
	return next
}

// withoutMember returns a copy of s without the member id. s is not changed.
func (s *State) withoutMember(id string) *State {
	next := s.clone()
	if i, ok := s.findMember(id); ok {
		next.members = slices.Delete(slices.Clone(s.members), i, i+1)
	}
	return next
}

// timestamp converts t, zero meaning unset, to its proto form.
func timestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}
