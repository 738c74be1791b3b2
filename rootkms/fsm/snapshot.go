package fsm

import (
	"bytes"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/keysets"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
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

// Persist writes one statev1.Snapshot (format version 1, this FSM's lineage,
// regions sorted by name, members sorted by ID, keysets by name, rollouts
// by ID) in deterministic proto
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

// Encode returns s as Persist would write it: the deterministic
// statev1.Snapshot encoding of s, of this FSM's lineage. A backup of the
// state is these bytes.
func (f *FSM) Encode(s *State) ([]byte, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(s.record(f.genesisID, f.kcv))
	if err != nil {
		return nil, fmt.Errorf("fsm: encode state: %w", err)
	}
	return b, nil
}

// Decode parses and checks snapshot bytes exactly as Restore does, without
// installing them: the State they describe (Index 0), or the error Restore
// would return (ErrInvalidSnapshot, ErrWrongRMK). The FSM is not changed.
// A restore that must not fail once started (hashicorp/raft's
// Raft.Restore panics if the FSM refuses the snapshot) checks with Decode
// first.
func (f *FSM) Decode(b []byte) (*State, error) {
	if len(b) > MaxSnapshotSize {
		return nil, fmt.Errorf("%w: larger than %d bytes", ErrInvalidSnapshot, MaxSnapshotSize)
	}
	return f.decodeSnapshot(b)
}

// WithMembers returns a copy of s whose member records are members (in any
// order) instead of s's. It refuses (ErrInvalidCommand) a member without an
// ID or API address, or an ID given twice. s is not changed.
func (s *State) WithMembers(members []Member) (*State, error) {
	ms := slices.Clone(members)
	slices.SortFunc(ms, func(a, b Member) int { return strings.Compare(a.ID, b.ID) })
	for i, m := range ms {
		if err := validMember(&statev1.MemberRecord{Id: m.ID, ApiAddress: m.APIAddress}); err != nil {
			return nil, err
		}
		if i > 0 && ms[i-1].ID == m.ID {
			return nil, fmt.Errorf("%w: member %q twice", ErrInvalidCommand, m.ID)
		}
	}
	next := s.clone()
	next.members = ms
	return next, nil
}

// record returns s as a Snapshot message. It shares the wrapped keys and the
// keyset and rollout records with s: the message must only be read.
func (s *State) record(genesisID string, kcv []byte) *statev1.Snapshot {
	out := &statev1.Snapshot{
		FormatVersion: FormatVersion,
		GenesisId:     genesisID,
		RmkKcv:        kcv,
		Regions:       make([]*statev1.RegionRecord, len(s.regions)),
		Members:       make([]*statev1.MemberRecord, len(s.members)),
		Keysets:       s.keysets,
		Rollouts:      s.rollouts,
	}
	for i, r := range s.regions {
		rr := &statev1.RegionRecord{
			Name:              r.Name,
			CreatedAt:         timestamp(r.CreatedAt),
			Versions:          make([]*statev1.RegionKeyVersionRecord, len(r.Versions)),
			ServedKeyVersions: r.ServedKeyVersions,
			ServedObservedAt:  timestamp(r.ServedObservedAt),
			BundleSerialFloor: r.BundleSerialFloor,
		}
		for j := range r.Versions {
			rr.Versions[j] = &statev1.RegionKeyVersionRecord{Key: r.Versions[j].Key, Info: r.Versions[j].info()}
		}
		out.Regions[i] = rr
	}
	for i, m := range s.members {
		out.Members[i] = &statev1.MemberRecord{Id: m.ID, ApiAddress: m.APIAddress}
	}
	for _, r := range s.requests.all() {
		out.Requests = append(out.Requests, &statev1.RequestRecord{
			Identity: r.Identity, RequestId: r.RequestID, Index: r.Index, Subject: r.Subject, KeyId: r.KeyID, Operation: r.Operation,
		})
	}
	return out
}

// Restore replaces the state with the snapshot read from rc, which it closes.
// It reads at most MaxSnapshotSize bytes and refuses (ErrInvalidSnapshot) a
// snapshot that is larger, does not decode, has another format version than
// FormatVersion, or does not describe a state Apply could have built: region
// names valid, sorted and unique; versions numbered 1..n; exactly one PRIMARY
// per region; DESTROYED versions without material and the others with material
// under this FSM's RMK; served region key versions sorted, unique and
// existing; members with an id and an address, sorted and unique; keysets as
// checkKeyset describes; rollouts as checkRollouts describes (sorted unique
// IDs, at most one in flight per region, at most MaxFinishedRollouts
// finished); at most MaxRequests requests, oldest first (strictly
// increasing index), with unique (identity, request_id) pairs, a request_id,
// a subject and no error (this binary remembers only accepted commands).
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
	var snap statev1.Snapshot
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
	for _, r := range s.regions {
		s.latest = later(s.latest, regionLatest(r))
	}
	s.keysets = snap.GetKeysets()
	for i, k := range s.keysets {
		if err := checkKeyset(s, k); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidSnapshot, err)
		}
		if i > 0 && strings.Compare(s.keysets[i-1].GetName(), k.GetName()) >= 0 {
			return nil, fmt.Errorf("%w: keyset %q after %q: not sorted or duplicate", ErrInvalidSnapshot, k.GetName(), s.keysets[i-1].GetName())
		}
		s.latest = later(s.latest, keysetLatest(k))
	}
	if len(s.keysets) == 0 {
		s.keysets = nil
	}
	if err := checkRollouts(s, snap.GetRollouts()); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidSnapshot, err)
	}
	if rs := snap.GetRollouts(); len(rs) > 0 {
		s.rollouts = rs
		for _, r := range rs {
			s.latest = later(s.latest, rolloutLatest(r))
		}
	}
	reqs, err := decodeRequests(snap.GetRequests())
	if err != nil {
		return nil, err
	}
	if len(reqs) > 0 {
		s.requests = newRequestTable(reqs)
	}
	return s, nil
}

// decodeRequests checks and converts a snapshot's request table.
func decodeRequests(rs []*statev1.RequestRecord) ([]RequestRecord, error) {
	if len(rs) > MaxRequests {
		return nil, fmt.Errorf("%w: %d requests, at most %d", ErrInvalidSnapshot, len(rs), MaxRequests)
	}
	out := make([]RequestRecord, len(rs))
	seen := make(map[requestKey]bool, len(rs))
	for i, rr := range rs {
		r := RequestRecord{Identity: rr.GetIdentity(), RequestID: rr.GetRequestId(), Index: rr.GetIndex(), Subject: rr.GetSubject(), KeyID: rr.GetKeyId(), Operation: rr.GetOperation()}
		bad := func(why string) ([]RequestRecord, error) {
			return nil, fmt.Errorf("%w: request %d (%q, %q): %s", ErrInvalidSnapshot, i, r.Identity, r.RequestID, why)
		}
		switch {
		case r.RequestID == "":
			return bad("no request_id")
		case r.Index == 0:
			return bad("no index")
		case i > 0 && r.Index <= out[i-1].Index:
			return bad("index not above the previous request's: not oldest first")
		case seen[r.key()]:
			return bad("pair remembered twice")
		case !validSubject(r.Subject):
			return bad(fmt.Sprintf("subject %q", r.Subject))
		case rr.GetErrorKind() != "" || rr.GetError() != "":
			return bad("a refusal; this binary remembers only accepted commands")
		}
		seen[r.key()] = true
		out[i] = r
	}
	return out, nil
}

func (f *FSM) decodeRegion(rr *statev1.RegionRecord) (*Region, error) {
	if err := ValidRegionName(rr.GetName()); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidSnapshot, err)
	}
	if !validTime(rr.GetCreatedAt()) {
		return nil, fmt.Errorf("%w: region %q: created_at missing or invalid", ErrInvalidSnapshot, rr.GetName())
	}
	r := &Region{Name: rr.GetName(), CreatedAt: rr.GetCreatedAt().AsTime(), Versions: make([]Version, len(rr.GetVersions())),
		BundleSerialFloor: rr.GetBundleSerialFloor()}
	if ts := rr.GetServedObservedAt(); ts != nil {
		if !validTime(ts) {
			return nil, fmt.Errorf("%w: region %q: served_observed_at invalid", ErrInvalidSnapshot, r.Name)
		}
		r.ServedObservedAt = ts.AsTime()
	}
	if sv := rr.GetServedKeyVersions(); len(sv) > 0 {
		if r.ServedObservedAt.IsZero() {
			return nil, fmt.Errorf("%w: region %q: served_key_versions without served_observed_at", ErrInvalidSnapshot, r.Name)
		}
		for i, v := range sv {
			if v == 0 || v > uint32(len(rr.GetVersions())) || i > 0 && sv[i-1] >= v {
				return nil, fmt.Errorf("%w: region %q: served_key_versions %v: not sorted, unique versions of the region", ErrInvalidSnapshot, r.Name, sv)
			}
		}
		r.ServedKeyVersions = sv
	}
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

func (f *FSM) decodeVersion(region string, n uint32, vr *statev1.RegionKeyVersionRecord) (Version, error) {
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

// checkKeyset checks a restored keyset record against the rest of s (its
// regions): what Apply could have built. The name is valid; regions are
// non-empty, sorted, unique and exist; created_at and updated_at are set and
// the revision is at least 1; rotation_period is unset or not negative;
// ttl_history is contiguous periods of positive TTLs, every one closed but the
// last; versions have unique non-zero key IDs, valid states, exactly one
// PRIMARY, and the times their states imply; propagated and usage are sorted
// by region, one per region of the keyset, with valid times, and encrypt_count
// is the sum of the usage counts; a golden ciphertext, where there is one,
// passes checkGolden and is on a version not DESTROYED; copies are one per
// region, named right, under an existing region key version, with public
// metadata matching the states (the region key version need not be usable
// any more: a region key may be disabled after the copies were made under
// it).
func checkKeyset(s *State, k *statev1.KeysetRecord) error {
	name := k.GetName()
	if err := keysets.ValidName(name); err != nil {
		return err
	}
	if err := validRegions(k.GetRegions()); err != nil {
		return fmt.Errorf("keyset %q: %w", name, err)
	}
	for _, r := range k.GetRegions() {
		if _, ok := s.findRegion(r); !ok {
			return fmt.Errorf("keyset %q: no region %q", name, r)
		}
	}
	if !validTime(k.GetCreatedAt()) || !validTime(k.GetUpdatedAt()) || k.GetRevision() == 0 {
		return fmt.Errorf("keyset %q: created_at, updated_at or revision missing or invalid", name)
	}
	if p := k.GetRotationPeriod(); p != nil && !validDuration(p, true) {
		return fmt.Errorf("keyset %q: rotation_period invalid or negative", name)
	}
	hist := k.GetTtlHistory()
	if len(hist) == 0 {
		return fmt.Errorf("keyset %q: no ttl_history", name)
	}
	for i, p := range hist {
		last := i == len(hist)-1
		switch {
		case !validDuration(p.GetTtl(), false) || !validTime(p.GetFrom()):
			return fmt.Errorf("keyset %q: ttl period %d: ttl or from missing or invalid", name, i)
		case last && p.GetUntil() != nil:
			return fmt.Errorf("keyset %q: the ttl period in force has an end", name)
		case !last && (!validTime(p.GetUntil()) || p.GetUntil().AsTime().Before(p.GetFrom().AsTime()) ||
			!hist[i+1].GetFrom().AsTime().Equal(p.GetUntil().AsTime())):
			return fmt.Errorf("keyset %q: ttl period %d: until missing, invalid, before from or not the next period's from", name, i)
		}
	}
	vs := k.GetVersions()
	ids := make(map[uint32]bool, len(vs))
	primaries := 0
	regionIndex := func(r string) (int, bool) { return slices.BinarySearch(k.GetRegions(), r) }
	for _, v := range vs {
		where := fmt.Sprintf("keyset %q version %d", name, v.GetKeyId())
		if v.GetKeyId() == 0 || ids[v.GetKeyId()] {
			return fmt.Errorf("%s: key ID zero or twice", where)
		}
		ids[v.GetKeyId()] = true
		st := v.GetState()
		if st == ksPrimary {
			primaries++
		}
		for _, t := range []struct {
			name     string
			ts       *timestamppb.Timestamp
			required bool
		}{
			{"created_at", v.GetCreatedAt(), true},
			{"primary_since", v.GetPrimarySince(), st == ksPrimary},
			{"superseded_at", v.GetSupersededAt(), false},
			{"disabled_at", v.GetDisabledAt(), st == ksDisabled || st == ksDestroyScheduled || st == ksDestroyed},
			{"destroy_after", v.GetDestroyAfter(), st == ksDestroyScheduled || st == ksDestroyed},
			{"destroyed_at", v.GetDestroyedAt(), st == ksDestroyed},
		} {
			if t.ts == nil && t.required || t.ts != nil && !validTime(t.ts) {
				return fmt.Errorf("%s: %v with %s missing or invalid", where, st, t.name)
			}
		}
		if st < ksEnabled || st > ksDestroyed {
			return fmt.Errorf("%s: state %v", where, st)
		}
		for i, p := range v.GetPropagated() {
			if _, ok := regionIndex(p.GetRegion()); !ok || !validTime(p.GetAt()) || i > 0 && v.GetPropagated()[i-1].GetRegion() >= p.GetRegion() {
				return fmt.Errorf("%s: propagated %d: not sorted, unique regions of the keyset with a time", where, i)
			}
		}
		for i, u := range v.GetUsage() {
			if _, ok := regionIndex(u.GetRegion()); !ok || !validTime(u.GetObservedAt()) || i > 0 && v.GetUsage()[i-1].GetRegion() >= u.GetRegion() {
				return fmt.Errorf("%s: usage %d: not sorted, unique regions of the keyset with a time", where, i)
			}
			for _, ts := range []*timestamppb.Timestamp{u.GetLastEncrypt(), u.GetLastUse()} {
				if ts != nil && !validTime(ts) {
					return fmt.Errorf("%s: usage %d: invalid time", where, i)
				}
			}
		}
		if err := checkGolden(v.GetKeyId(), v.GetGolden()); err != nil {
			return fmt.Errorf("%s: %w", where, err)
		}
		if st == ksDestroyed && v.GetGolden() != nil {
			return fmt.Errorf("%s: DESTROYED with a golden ciphertext", where)
		}
		if v.GetEncryptCount() != encryptSum(v.GetUsage()) {
			return fmt.Errorf("%s: encrypt_count %d, the usage sums to %d", where, v.GetEncryptCount(), encryptSum(v.GetUsage()))
		}
	}
	if primaries != 1 {
		return fmt.Errorf("keyset %q has %d primary versions, want 1", name, primaries)
	}
	return checkCopies(name, k.GetRegions(), vs, k.GetCopies(), func(region string, v uint32) error {
		if r, _ := s.Region(region); v == 0 || uint64(v) > uint64(len(r.Versions)) {
			return fmt.Errorf("region %q has no key version %d", region, v)
		}
		return nil
	})
}
