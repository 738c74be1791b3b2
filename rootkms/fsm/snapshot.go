package fsm

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// MaxSnapshotSize bounds the snapshot Restore reads: 64 MiB, far above any
// real root KMS state (a region key version is well under 1 KiB).
const MaxSnapshotSize = 64 << 20

// Snapshot returns a raft.FSMSnapshot of the current State. It is O(1): it
// captures the immutable State pointer and nothing else; Persist encodes it,
// concurrently with later Applies, which publish new States and leave the
// captured one alone.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	return &snapshot{state: f.state.Load(), genesisID: f.genesisID, kcv: f.kcv}, nil
}

// snapshot is the FSMSnapshot of one State.
type snapshot struct {
	state     *State
	genesisID string
	kcv       []byte // never modified
}

// Persist writes one rootkmsv1.Snapshot (format version 1, this FSM's lineage,
// regions sorted by name, members sorted by ID) in deterministic proto
// encoding to sink, then closes it; on any error it cancels the sink instead.
// Equal States of the same lineage give equal bytes.
func (s *snapshot) Persist(sink raft.SnapshotSink) error {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(s.state.record(s.genesisID, s.kcv))
	if err == nil {
		_, err = sink.Write(b)
	}
	if err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("fsm: persist snapshot: %w", err)
	}
	if err := sink.Close(); err != nil {
		return fmt.Errorf("fsm: persist snapshot: %w", err)
	}
	return nil
}

// Release does nothing: the snapshot holds only a pointer to an immutable
// State.
func (s *snapshot) Release() {}

// record returns s as a Snapshot message. It shares the wrapped keys with s:
// the message must only be read.
func (s *State) record(genesisID string, kcv []byte) *rootkmsv1.Snapshot {
	out := &rootkmsv1.Snapshot{
		FormatVersion: FormatVersion,
		GenesisId:     genesisID,
		RmkKcv:        kcv,
		Regions:       make([]*rootkmsv1.RegionRecord, len(s.regions)),
		Members:       make([]*rootkmsv1.MemberRecord, len(s.members)),
	}
	for i, r := range s.regions {
		rr := &rootkmsv1.RegionRecord{
			Name:      r.Name,
			CreatedAt: timestamp(r.CreatedAt),
			Versions:  make([]*rootkmsv1.RegionKeyVersionRecord, len(r.Versions)),
		}
		for j := range r.Versions {
			rr.Versions[j] = &rootkmsv1.RegionKeyVersionRecord{Key: r.Versions[j].Key, Info: r.Versions[j].info()}
		}
		out.Regions[i] = rr
	}
	for i, m := range s.members {
		out.Members[i] = &rootkmsv1.MemberRecord{Id: m.ID, ApiAddress: m.APIAddress}
	}
	return out
}

// Restore replaces the state with the snapshot read from rc, which it closes.
// It reads at most MaxSnapshotSize bytes and refuses (ErrInvalidSnapshot) a
// snapshot that is larger, does not decode, has another format version than
// FormatVersion, or does not describe a state Apply could have built: region
// names valid, sorted and unique; versions numbered 1..n; exactly one PRIMARY
// per region; DESTROYED versions without material and the others with material
// under this FSM's RMK; members with an id and an address, sorted and unique.
// A snapshot of another genesis ID or RMK KCV, or holding a key under another
// RMK, is refused with ErrWrongRMK. On any error the state is unchanged.
//
// The restored State's Index is the FSM's AppliedIndex (a lower bound: the
// snapshot does not record its Raft index).
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer func() { _ = rc.Close() }()
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(io.LimitReader(rc, MaxSnapshotSize+1)); err != nil {
		return fmt.Errorf("fsm: restore: read snapshot: %w", err)
	}
	b := buf.Bytes()
	if len(b) > MaxSnapshotSize {
		return fmt.Errorf("%w: larger than %d bytes", ErrInvalidSnapshot, MaxSnapshotSize)
	}
	s, err := f.decodeSnapshot(b)
	if err != nil {
		return err
	}
	s.index = f.applied.Load()
	f.state.Store(s)
	return nil
}

// decodeSnapshot parses and validates a persisted snapshot.
func (f *FSM) decodeSnapshot(b []byte) (*State, error) {
	var snap rootkmsv1.Snapshot
	if err := proto.Unmarshal(b, &snap); err != nil {
		return nil, fmt.Errorf("%w: does not decode", ErrInvalidSnapshot)
	}
	if v := snap.GetFormatVersion(); v != FormatVersion {
		return nil, fmt.Errorf("%w: format version %d; this binary understands %d", ErrInvalidSnapshot, v, FormatVersion)
	}
	if snap.GetGenesisId() != f.genesisID || !bytes.Equal(snap.GetRmkKcv(), f.kcv) {
		return nil, fmt.Errorf("%w: snapshot of genesis %q, RMK %x; this cluster is genesis %q, RMK %x",
			ErrWrongRMK, snap.GetGenesisId(), snap.GetRmkKcv(), f.genesisID, f.kcv)
	}
	s := &State{
		regions: make([]*Region, len(snap.GetRegions())),
		members: make([]Member, len(snap.GetMembers())),
	}
	for i, rr := range snap.GetRegions() {
		r, err := f.decodeRegion(rr)
		if err != nil {
			return nil, err
		}
		if i > 0 && strings.Compare(s.regions[i-1].Name, r.Name) >= 0 {
			return nil, fmt.Errorf("%w: region %q after %q: not sorted or duplicate", ErrInvalidSnapshot, r.Name, s.regions[i-1].Name)
		}
		s.regions[i] = r
	}
	for i, mr := range snap.GetMembers() {
		if err := validMember(mr); err != nil {
			return nil, fmt.Errorf("%w: member %d: %w", ErrInvalidSnapshot, i, err)
		}
		m := Member{ID: mr.GetId(), APIAddress: mr.GetApiAddress()}
		if i > 0 && strings.Compare(s.members[i-1].ID, m.ID) >= 0 {
			return nil, fmt.Errorf("%w: member %q after %q: not sorted or duplicate", ErrInvalidSnapshot, m.ID, s.members[i-1].ID)
		}
		s.members[i] = m
	}
	return s, nil
}

func (f *FSM) decodeRegion(rr *rootkmsv1.RegionRecord) (*Region, error) {
	if err := ValidRegionName(rr.GetName()); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidSnapshot, err)
	}
	if !validTime(rr.GetCreatedAt()) {
		return nil, fmt.Errorf("%w: region %q: created_at missing or invalid", ErrInvalidSnapshot, rr.GetName())
	}
	r := &Region{Name: rr.GetName(), CreatedAt: rr.GetCreatedAt().AsTime(), Versions: make([]Version, len(rr.GetVersions()))}
	if len(r.Versions) == 0 {
		return nil, fmt.Errorf("%w: region %q has no versions", ErrInvalidSnapshot, r.Name)
	}
	primaries := 0
	for i, vr := range rr.GetVersions() {
		v, err := f.decodeVersion(r.Name, uint32(i+1), vr)
		if err != nil {
			return nil, err
		}
		if v.Status == cryptov1.KeyStatus_KEY_STATUS_PRIMARY {
			primaries++
		}
		r.Versions[i] = v
	}
	if primaries != 1 {
		return nil, fmt.Errorf("%w: region %q has %d primary versions, want 1", ErrInvalidSnapshot, r.Name, primaries)
	}
	return r, nil
}

func (f *FSM) decodeVersion(region string, n uint32, vr *rootkmsv1.RegionKeyVersionRecord) (Version, error) {
	bad := func(format string, args ...any) (Version, error) {
		return Version{}, fmt.Errorf("%w: region %q version %d: %s", ErrInvalidSnapshot, region, n, fmt.Sprintf(format, args...))
	}
	info := vr.GetInfo()
	if info == nil {
		return bad("no info")
	}
	if info.GetKeyId() != n {
		return bad("key_id %d: versions must be numbered 1..n in order", info.GetKeyId())
	}
	if info.GetTypeUrl() != TypeURL {
		return bad("type_url %q, want %q", info.GetTypeUrl(), TypeURL)
	}
	v := Version{Version: n, Key: vr.GetKey(), Status: info.GetStatus()}
	for _, t := range []struct {
		name     string
		ts       *timestamppb.Timestamp
		dst      *time.Time
		required bool
	}{
		{"created_at", info.GetCreatedAt(), &v.CreatedAt, true},
		{"primary_since", info.GetPrimarySince(), &v.PrimarySince, v.Status == cryptov1.KeyStatus_KEY_STATUS_PRIMARY},
		{"superseded_at", info.GetSupersededAt(), &v.SupersededAt, false},
		{"retired_at", info.GetRetiredAt(), &v.RetiredAt, v.Status == cryptov1.KeyStatus_KEY_STATUS_DESTROYED},
	} {
		switch {
		case t.ts == nil && t.required:
			return bad("%v without %s", v.Status, t.name)
		case t.ts == nil:
		case !validTime(t.ts):
			return bad("%s invalid", t.name)
		default:
			*t.dst = t.ts.AsTime()
		}
	}
	switch v.Status {
	case cryptov1.KeyStatus_KEY_STATUS_DESTROYED:
		if v.Key != nil {
			return bad("DESTROYED but still has key material")
		}
		return v, nil
	case cryptov1.KeyStatus_KEY_STATUS_ENABLED, cryptov1.KeyStatus_KEY_STATUS_PRIMARY, cryptov1.KeyStatus_KEY_STATUS_DISABLED:
	default:
		return bad("status %v", v.Status)
	}
	if err := f.checkKey(v.Key, region, n); err != nil {
		return Version{}, fmt.Errorf("%w: %w", ErrInvalidSnapshot, err)
	}
	return v, nil
}
