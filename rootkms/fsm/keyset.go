package fsm

import (
	"encoding/binary"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/keysets"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
)

// Keyset version states, for brevity.
const (
	ksEnabled          = statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED
	ksPrimary          = statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY
	ksDisabled         = statev1.KeysetVersionState_KEYSET_VERSION_STATE_DISABLED
	ksDestroyScheduled = statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROY_SCHEDULED
	ksDestroyed        = statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROYED
)

// Keyset returns the keyset called name, or false if there is none.
//
// The record is shared with the State (and with every later State that did
// not change the keyset) and must be treated as read-only, nested messages
// included: Apply never modifies a published record but replaces it with a
// new one for every change. Clone it (proto.Clone) before changing it, e.g.
// to build the copies of an update_keyset command.
func (s *State) Keyset(name string) (*statev1.KeysetRecord, bool) {
	i, ok := s.findKeyset(name)
	if !ok {
		return nil, false
	}
	return s.keysets[i], true
}

// Keysets returns every keyset, sorted by name. The slice is the caller's;
// the records are shared and read-only (see Keyset).
func (s *State) Keysets() []*statev1.KeysetRecord {
	return slices.Clone(s.keysets)
}

// NumKeysets returns the number of keysets, without copying them.
func (s *State) NumKeysets() int { return len(s.keysets) }

func (s *State) findKeyset(name string) (int, bool) {
	return slices.BinarySearchFunc(s.keysets, name, func(k *statev1.KeysetRecord, name string) int {
		return strings.Compare(k.GetName(), name)
	})
}

// withKeyset returns a copy of s holding k in place of the keyset of the same
// name, or in addition to the others if there is none. s is not changed.
func (s *State) withKeyset(k *statev1.KeysetRecord) *State {
	next := s.clone()
	next.keysets = slices.Clone(s.keysets)
	i, ok := s.findKeyset(k.GetName())
	if ok {
		next.keysets[i] = k
	} else {
		next.keysets = slices.Insert(next.keysets, i, k)
	}
	next.latest = later(s.latest, keysetLatest(k))
	return next
}

// keysetLatest is the latest of k's times that Latest counts.
func keysetLatest(k *statev1.KeysetRecord) time.Time {
	var latest time.Time
	add := func(ts *timestamppb.Timestamp) {
		if ts != nil {
			latest = later(latest, ts.AsTime())
		}
	}
	add(k.GetCreatedAt())
	add(k.GetUpdatedAt())
	for _, p := range k.GetTtlHistory() {
		add(p.GetFrom())
		add(p.GetUntil())
	}
	for _, v := range k.GetVersions() {
		add(v.GetCreatedAt())
		add(v.GetPrimarySince())
		add(v.GetSupersededAt())
		add(v.GetDisabledAt())
		add(v.GetDestroyedAt())
		for _, p := range v.GetPropagated() {
			add(p.GetAt())
		}
		for _, u := range v.GetUsage() {
			add(u.GetObservedAt())
		}
	}
	return latest
}

// copyStatus is the Tink status a version in state st has in the encrypted
// copies; false for DESTROYED (and invalid) states, which have no key there.
func copyStatus(st statev1.KeysetVersionState) (cryptov1.KeyStatus, bool) {
	switch st {
	case ksEnabled:
		return cryptov1.KeyStatus_KEY_STATUS_ENABLED, true
	case ksPrimary:
		return cryptov1.KeyStatus_KEY_STATUS_PRIMARY, true
	case ksDisabled, ksDestroyScheduled:
		return cryptov1.KeyStatus_KEY_STATUS_DISABLED, true
	}
	return 0, false
}

// checkCopies checks that copies are a valid set of encrypted copies of
// keyset name, served in regions (sorted), holding versions: exactly one per
// region, in region order, named name, under a region key version accepted by
// regionKey, each copy's public metadata listing exactly the versions not
// DESTROYED with their copy status, and the primary as primary_key_id. It
// returns a message for the caller to wrap.
func checkCopies(name string, regions []string, versions []*statev1.KeysetVersionRecord, copies []*cryptov1.EncryptedKeyset,
	regionKey func(region string, v uint32) error) error {
	if len(copies) != len(regions) {
		return fmt.Errorf("keyset %q has %d copies for %d regions, want one per region", name, len(copies), len(regions))
	}
	want := make(map[uint32]cryptov1.KeyStatus, len(versions))
	var primary uint32
	for _, v := range versions {
		if st, ok := copyStatus(v.GetState()); ok {
			want[v.GetKeyId()] = st
		}
		if v.GetState() == ksPrimary {
			primary = v.GetKeyId()
		}
	}
	for i, c := range copies {
		where := fmt.Sprintf("keyset %q copy %d", name, i)
		switch {
		case c.GetRegion() != regions[i]:
			return fmt.Errorf("%s is for region %q, want %q (one copy per region, sorted by region)", where, c.GetRegion(), regions[i])
		case c.GetName() != name:
			return fmt.Errorf("%s is named %q", where, c.GetName())
		case len(c.GetCiphertext()) == 0:
			return fmt.Errorf("%s has no ciphertext", where)
		case c.GetPrimaryKeyId() != primary:
			return fmt.Errorf("%s has primary key %d, the record %d", where, c.GetPrimaryKeyId(), primary)
		}
		if err := regionKey(c.GetRegion(), c.GetRegionKeyVersion()); err != nil {
			return fmt.Errorf("%s: %w", where, err)
		}
		if len(c.GetVersions()) != len(want) {
			return fmt.Errorf("%s lists %d keys, want the %d versions not DESTROYED", where, len(c.GetVersions()), len(want))
		}
		seen := make(map[uint32]bool, len(want))
		for _, kv := range c.GetVersions() {
			id := kv.GetKeyId()
			st, ok := want[id]
			switch {
			case !ok:
				return fmt.Errorf("%s holds key %d, which the record has not or has DESTROYED", where, id)
			case seen[id]:
				return fmt.Errorf("%s lists key %d twice", where, id)
			case kv.GetStatus() != st:
				return fmt.Errorf("%s has key %d %v, want %v", where, id, kv.GetStatus(), st)
			}
			seen[id] = true
		}
	}
	return nil
}

// MaxGoldenField bounds each field of a golden ciphertext. A golden
// ciphertext of a 32-byte plaintext is well under 100 bytes with every
// template Cairn allows; the bound keeps a record from growing by a bug.
const MaxGoldenField = 1024

// tinkPrefixSize is the size of a TINK output prefix: 0x01 and the key ID
// (big-endian).
const tinkPrefixSize = 5

// checkGolden checks the golden ciphertext of version keyID, if any: golden
// ciphertexts are optional (versions added before they existed have none),
// but one that is present has a ciphertext carrying keyID's TINK prefix (so
// a KMS routes it to that version), associated data, and a 32-byte SHA-256,
// each at most MaxGoldenField bytes. It returns a message for the caller to
// wrap.
func checkGolden(keyID uint32, g *statev1.GoldenCiphertext) error {
	if g == nil {
		return nil
	}
	ct, ad := g.GetCiphertext(), g.GetAssociatedData()
	switch {
	case len(ct) <= tinkPrefixSize || len(ct) > MaxGoldenField:
		return fmt.Errorf("golden ciphertext of %d bytes, want %d to %d", len(ct), tinkPrefixSize+1, MaxGoldenField)
	case ct[0] != 1 || binary.BigEndian.Uint32(ct[1:tinkPrefixSize]) != keyID:
		return fmt.Errorf("golden ciphertext without the TINK prefix of key %d", keyID)
	case len(ad) == 0 || len(ad) > MaxGoldenField:
		return fmt.Errorf("golden associated data of %d bytes, want 1 to %d", len(ad), MaxGoldenField)
	case len(g.GetPlaintextSha256()) != 32:
		return fmt.Errorf("golden plaintext_sha256 of %d bytes, want 32", len(g.GetPlaintextSha256()))
	}
	return nil
}

// usableRegionKey accepts a region key version of s that is PRIMARY or
// ENABLED: what a new copy may be encrypted under.
func (s *State) usableRegionKey(region string, v uint32) error {
	r, ok := s.Region(region)
	if !ok {
		return fmt.Errorf("%w: %q", ErrNoRegion, region)
	}
	rv, ok := r.Version(v)
	if !ok {
		return fmt.Errorf("region %q has no key version %d", region, v)
	}
	if rv.Status != cryptov1.KeyStatus_KEY_STATUS_PRIMARY && rv.Status != cryptov1.KeyStatus_KEY_STATUS_ENABLED {
		return fmt.Errorf("region %q key version %d is %v, want PRIMARY or ENABLED", region, v, rv.Status)
	}
	return nil
}

// invalid returns a refusal wrapping ErrInvalidCommand.
func invalid(format string, args ...any) (*State, *Result) {
	return nil, &Result{Err: fmt.Errorf("%w: %s", ErrInvalidCommand, fmt.Sprintf(format, args...))}
}

// refuse returns a refusal of err.
func refuse(err error) (*State, *Result) { return nil, &Result{Err: err} }

// validRegions checks a keyset's region list: non-empty, sorted, unique,
// valid names. It returns a message for the caller to wrap.
func validRegions(regions []string) error {
	if len(regions) == 0 {
		return fmt.Errorf("no regions")
	}
	for i, r := range regions {
		if err := ValidRegionName(r); err != nil {
			return err
		}
		if i > 0 && regions[i-1] >= r {
			return fmt.Errorf("regions %q: not sorted or duplicate", regions)
		}
	}
	return nil
}

// validDuration reports whether d is a valid duration that is positive, or
// non-negative if zeroOK.
func validDuration(d *durationpb.Duration, zeroOK bool) bool {
	if d == nil || d.CheckValid() != nil {
		return false
	}
	if zeroOK {
		return d.AsDuration() >= 0
	}
	return d.AsDuration() > 0
}

func createKeyset(s *State, c *statev1.CreateKeysetCommand, identity string, at time.Time) (*State, *Result) {
	k := c.GetKeyset()
	name := k.GetName()
	if err := keysets.ValidName(name); err != nil {
		return invalid("%v", err)
	}
	if _, ok := s.findKeyset(name); ok {
		return refuse(fmt.Errorf("%w: %q", ErrKeysetExists, name))
	}
	if err := validRegions(k.GetRegions()); err != nil {
		return invalid("keyset %q: %v", name, err)
	}
	for _, r := range k.GetRegions() {
		if _, ok := s.findRegion(r); !ok {
			return refuse(fmt.Errorf("%w: keyset %q names region %q", ErrNoRegion, name, r))
		}
	}
	if k.GetRevision() != 1 {
		return invalid("keyset %q: revision %d, want 1", name, k.GetRevision())
	}
	if k.GetRotationPeriod() != nil && !validDuration(k.GetRotationPeriod(), true) {
		return invalid("keyset %q: rotation_period invalid or negative", name)
	}
	ttls := k.GetTtlHistory()
	if len(ttls) != 1 || !validDuration(ttls[0].GetTtl(), false) || ttls[0].GetUntil() != nil {
		return invalid("keyset %q: ttl_history must be one period with a positive ttl and no until", name)
	}
	vs := k.GetVersions()
	if len(vs) != 1 || vs[0].GetState() != ksPrimary || vs[0].GetKeyId() == 0 {
		return invalid("keyset %q: want exactly one version, PRIMARY, with a key ID", name)
	}
	if err := checkGolden(vs[0].GetKeyId(), vs[0].GetGolden()); err != nil {
		return invalid("keyset %q version %d: %v", name, vs[0].GetKeyId(), err)
	}
	ts := timestamppb.New(at)
	createdBy := k.GetCreatedBy()
	if createdBy == "" {
		createdBy = identity
	}
	// Built field by field: times are the FSM's, and the proposer's lifecycle
	// fields (propagation, usage) are not taken.
	rec := &statev1.KeysetRecord{
		Name:           name,
		Regions:        slices.Clone(k.GetRegions()),
		CreatedAt:      ts,
		CreatedBy:      createdBy,
		RotationPeriod: k.GetRotationPeriod(),
		TtlHistory:     []*statev1.TtlPeriod{{Ttl: ttls[0].GetTtl(), From: ts}},
		Versions: []*statev1.KeysetVersionRecord{{
			KeyId:        vs[0].GetKeyId(),
			State:        ksPrimary,
			Template:     vs[0].GetTemplate(),
			CreatedAt:    ts,
			PrimarySince: ts,
			Golden:       vs[0].GetGolden(),
		}},
		Copies:    k.GetCopies(),
		Revision:  1,
		UpdatedAt: ts,
		Purpose:   k.GetPurpose(),
	}
	if err := checkCopies(name, rec.GetRegions(), rec.GetVersions(), rec.GetCopies(), s.usableRegionKey); err != nil {
		return invalid("%v", err)
	}
	return s.withKeyset(rec), &Result{Keyset: rec}
}

// changeKeyset returns a copy of the keyset name for a change checked against
// expectedRevision, with its revision and updated_at advanced. The copy shares
// the old record's nested messages: replace them, never modify them.
func (s *State) changeKeyset(name string, expectedRevision uint64, at time.Time) (*statev1.KeysetRecord, error) {
	old, ok := s.Keyset(name)
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNoKeyset, name)
	}
	if expectedRevision != old.GetRevision() {
		return nil, fmt.Errorf("%w: keyset %q is at revision %d, the change was made against %d", ErrStaleRevision, name, old.GetRevision(), expectedRevision)
	}
	k := shallowKeyset(old)
	k.Revision++
	k.UpdatedAt = timestamppb.New(at)
	return k, nil
}

// shallowKeyset returns a new record with k's fields: nested messages and the
// versions slice are shared.
func shallowKeyset(k *statev1.KeysetRecord) *statev1.KeysetRecord {
	return &statev1.KeysetRecord{
		Name:           k.GetName(),
		Regions:        k.GetRegions(),
		CreatedAt:      k.GetCreatedAt(),
		CreatedBy:      k.GetCreatedBy(),
		RotationPeriod: k.GetRotationPeriod(),
		TtlHistory:     k.GetTtlHistory(),
		Versions:       k.GetVersions(),
		Copies:         k.GetCopies(),
		Revision:       k.GetRevision(),
		UpdatedAt:      k.GetUpdatedAt(),
		Purpose:        k.GetPurpose(),
	}
}

// KeysetWithoutCopies returns k without its copies: a shallow copy that
// shares k's nested messages and slices, for read-only use (an answer that
// is marshalled and never modified). It is cheaper than cloning k and then
// dropping the copies, whose ciphertexts are the bulk of a record.
func KeysetWithoutCopies(k *statev1.KeysetRecord) *statev1.KeysetRecord {
	c := shallowKeyset(k)
	c.Copies = nil
	return c
}

// shallowVersion returns a new version record with v's fields: nested
// messages and slices are shared.
func shallowVersion(v *statev1.KeysetVersionRecord) *statev1.KeysetVersionRecord {
	return &statev1.KeysetVersionRecord{
		KeyId:        v.GetKeyId(),
		State:        v.GetState(),
		Template:     v.GetTemplate(),
		CreatedAt:    v.GetCreatedAt(),
		Propagated:   v.GetPropagated(),
		PrimarySince: v.GetPrimarySince(),
		SupersededAt: v.GetSupersededAt(),
		DisabledAt:   v.GetDisabledAt(),
		DestroyAfter: v.GetDestroyAfter(),
		DestroyedAt:  v.GetDestroyedAt(),
		EncryptCount: v.GetEncryptCount(),
		Usage:        v.GetUsage(),
		Golden:       v.GetGolden(),
	}
}

func updateKeyset(s *State, c *statev1.UpdateKeysetCommand, at time.Time) (*State, *Result) {
	k, err := s.changeKeyset(c.GetName(), c.GetExpectedRevision(), at)
	if err != nil {
		return refuse(err)
	}
	ts := timestamppb.New(at)
	step, id := c.GetStep(), c.GetKeyId()
	versions := slices.Clone(k.GetVersions())
	// i is the index of key id in versions, -1 if absent.
	i := slices.IndexFunc(versions, func(v *statev1.KeysetVersionRecord) bool { return v.GetKeyId() == id })
	if c.GetGolden() != nil && step != statev1.KeysetStep_KEYSET_STEP_ADD_VERSION {
		return invalid("keyset %q: %v carries a golden ciphertext; only add_version does", k.GetName(), step)
	}
	switch step {
	case statev1.KeysetStep_KEYSET_STEP_ADD_VERSION:
		if id == 0 || i >= 0 {
			return invalid("keyset %q: add_version needs a new non-zero key ID, got %d", k.GetName(), id)
		}
		if err := checkGolden(id, c.GetGolden()); err != nil {
			return invalid("keyset %q version %d: %v", k.GetName(), id, err)
		}
		versions = append(versions, &statev1.KeysetVersionRecord{KeyId: id, State: ksEnabled, Template: c.GetTemplate(), CreatedAt: ts, Golden: c.GetGolden()})
	case statev1.KeysetStep_KEYSET_STEP_REWRAP:
	case statev1.KeysetStep_KEYSET_STEP_PROMOTE, statev1.KeysetStep_KEYSET_STEP_DISABLE, statev1.KeysetStep_KEYSET_STEP_ENABLE,
		statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY, statev1.KeysetStep_KEYSET_STEP_UNDESTROY, statev1.KeysetStep_KEYSET_STEP_DESTROY:
		if i < 0 {
			return refuse(fmt.Errorf("%w: keyset %q has no version %d", ErrNoKeysetVersion, k.GetName(), id))
		}
		if err := stepVersion(k.GetName(), versions, i, c, ts, at); err != nil {
			return refuse(err)
		}
	default:
		return invalid("keyset %q: step %v", k.GetName(), step)
	}
	k.Versions = versions
	k.Copies = c.GetCopies()
	if err := checkCopies(k.GetName(), k.GetRegions(), k.GetVersions(), k.GetCopies(), s.usableRegionKey); err != nil {
		return invalid("%v", err)
	}
	return s.withKeyset(k), &Result{Keyset: k}
}

// stepVersion applies a lifecycle step to versions[i], replacing the changed
// version records (versions is the command's own slice).
func stepVersion(name string, versions []*statev1.KeysetVersionRecord, i int, c *statev1.UpdateKeysetCommand, ts *timestamppb.Timestamp, at time.Time) error {
	step := c.GetStep()
	v := shallowVersion(versions[i])
	from := v.GetState()
	bad := func(to statev1.KeysetVersionState, why string) error {
		return fmt.Errorf("%w: keyset %q: %v of version %d: %v to %v%s", ErrBadTransition, name, step, v.GetKeyId(), from, to, why)
	}
	switch step {
	case statev1.KeysetStep_KEYSET_STEP_PROMOTE:
		if from != ksEnabled {
			return bad(ksPrimary, "")
		}
		for j, o := range versions {
			if o.GetState() == ksPrimary {
				o = shallowVersion(o)
				o.State, o.SupersededAt = ksEnabled, ts
				versions[j] = o
			}
		}
		v.State, v.PrimarySince, v.SupersededAt = ksPrimary, ts, nil
	case statev1.KeysetStep_KEYSET_STEP_DISABLE:
		if from != ksEnabled {
			return bad(ksDisabled, "")
		}
		// Its propagation is over: once re-enabled, it must be served
		// everywhere for the window again before it can be promoted.
		v.State, v.DisabledAt, v.Propagated = ksDisabled, ts, nil
	case statev1.KeysetStep_KEYSET_STEP_ENABLE:
		if from != ksDisabled {
			return bad(ksEnabled, "")
		}
		v.State, v.DisabledAt = ksEnabled, nil
	case statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY:
		if from != ksDisabled {
			return bad(ksDestroyScheduled, "")
		}
		after := c.GetDestroyAfter()
		if !validTime(after) || after.AsTime().Before(at) {
			return fmt.Errorf("%w: keyset %q: schedule_destroy of version %d needs a valid destroy_after not before the command time %v",
				ErrInvalidCommand, name, v.GetKeyId(), at)
		}
		v.State, v.DestroyAfter = ksDestroyScheduled, after
	case statev1.KeysetStep_KEYSET_STEP_UNDESTROY:
		if from != ksDestroyScheduled {
			return bad(ksDisabled, "")
		}
		v.State, v.DestroyAfter = ksDisabled, nil
	case statev1.KeysetStep_KEYSET_STEP_DESTROY:
		if from != ksDestroyScheduled {
			return bad(ksDestroyed, "")
		}
		if after := v.GetDestroyAfter().AsTime(); after.After(at) {
			return bad(ksDestroyed, fmt.Sprintf(" before destroy_after %v", after))
		}
		// Its key is gone from every copy: its golden ciphertext can never
		// decrypt again, by design.
		v.State, v.DestroyedAt, v.Golden = ksDestroyed, ts, nil
	}
	versions[i] = v
	return nil
}

func setKeysetPolicy(s *State, c *statev1.SetKeysetPolicyCommand, at time.Time) (*State, *Result) {
	k, err := s.changeKeyset(c.GetName(), c.GetExpectedRevision(), at)
	if err != nil {
		return refuse(err)
	}
	if p := c.GetRotationPeriod(); p != nil {
		if !validDuration(p, true) {
			return invalid("keyset %q: rotation_period invalid or negative", k.GetName())
		}
		k.RotationPeriod = p
	}
	if ttl := c.GetCiphertextTtl(); ttl != nil {
		if !validDuration(ttl, false) {
			return invalid("keyset %q: ciphertext_ttl invalid or not positive", k.GetName())
		}
		hist := k.GetTtlHistory()
		cur := hist[len(hist)-1]
		if cur.GetTtl().AsDuration() != ttl.AsDuration() {
			ts := timestamppb.New(at)
			hist = slices.Clone(hist[:len(hist)-1])
			hist = append(hist,
				&statev1.TtlPeriod{Ttl: cur.GetTtl(), From: cur.GetFrom(), Until: ts},
				&statev1.TtlPeriod{Ttl: ttl, From: ts})
			k.TtlHistory = hist
		}
	}
	return s.withKeyset(k), &Result{Keyset: k}
}

// recordPropagation records what region's fleet serves and has used. It
// clones only the keysets it changes, and the keyset slice once.
func recordPropagation(s *State, c *statev1.RecordPropagationCommand, at time.Time) (*State, *Result) {
	old, ok := s.Region(c.GetRegion())
	if !ok {
		return refuse(fmt.Errorf("%w: %q", ErrNoRegion, c.GetRegion()))
	}
	served := slices.Compact(slices.Sorted(slices.Values(c.GetRegionKeyVersions())))
	for _, v := range served {
		if _, ok := old.Version(v); !ok {
			return refuse(fmt.Errorf("%w: region %q has no version %d, which its servers were seen to need", ErrNoVersion, old.Name, v))
		}
	}
	for _, ko := range c.GetKeysets() {
		for _, vo := range ko.GetVersions() {
			for _, t := range []*timestamppb.Timestamp{vo.GetLastEncrypt(), vo.GetLastUse()} {
				if t != nil && !validTime(t) {
					return invalid("record_propagation of %q: keyset %q version %d has an invalid time", old.Name, ko.GetKeyset(), vo.GetKeyId())
				}
			}
		}
	}
	region := old.Name
	ts := timestamppb.New(at)
	r := old.clone()
	r.ServedKeyVersions, r.ServedObservedAt = served, at
	next := s.withRegion(r)

	// changed maps the index in s.keysets of every keyset changed so far to
	// its new record, built by this command and not yet published.
	changed := map[int]*statev1.KeysetRecord{}
	for _, ko := range c.GetKeysets() {
		i, ok := s.findKeyset(ko.GetKeyset())
		if !ok || !slices.Contains(s.keysets[i].GetRegions(), region) {
			continue // made after the observation began, or not served here
		}
		k, ok := changed[i]
		if !ok {
			k = shallowKeyset(s.keysets[i])
			k.Versions = slices.Clone(k.GetVersions())
		}
		touched := false
		for j, v := range k.Versions {
			// A version the observation does not list is served by no
			// server of the region: observe(nil) drops its propagation.
			var vo *statev1.VersionObservation
			for _, o := range ko.GetVersions() {
				if o.GetKeyId() == v.GetKeyId() {
					vo = o
				}
			}
			if vo == nil && !hasPropagated(v, region) {
				continue
			}
			k.Versions[j] = observe(v, region, vo, ts)
			touched = true
		}
		if touched {
			changed[i] = k
		}
	}
	if len(changed) > 0 {
		next.keysets = slices.Clone(s.keysets)
		for i, k := range changed {
			next.keysets[i] = k // distinct indexes: the map order does not matter
		}
	}
	return next, &Result{Region: r}
}

// observe returns v with region's observation vo at ts recorded.
//
// Propagation: the first observation with every server of the region
// serving the version decrypting sets propagated[region]; one without
// (vo nil: the region's servers serve the keyset but none this version)
// drops it, so a later promotion waits for the region to serve it again for
// the whole window.
//
// Usage: last_encrypt and last_use never move back. A server replaced by a
// fresh one (a new state directory) reports none of its predecessor's use,
// and forgetting that use would let a version retire before the TTL of a
// ciphertext the predecessor made. A time after the command's is taken as
// the command's (a server's clock running ahead must not block retirement
// for as long as it is ahead). Counts never move back either, so the
// message budget does not grow when a server is replaced: they are a lower
// bound of the region's count.
func observe(v *statev1.KeysetVersionRecord, region string, vo *statev1.VersionObservation, ts *timestamppb.Timestamp) *statev1.KeysetVersionRecord {
	v = shallowVersion(v)
	cmp := func(r string) int { return strings.Compare(r, region) }
	i, found := slices.BinarySearchFunc(v.Propagated, region, func(p *statev1.RegionTime, r string) int { return cmp(p.GetRegion()) })
	switch {
	case vo.GetServedByAll() && !found:
		v.Propagated = slices.Insert(slices.Clone(v.Propagated), i, &statev1.RegionTime{Region: region, At: ts})
	case !vo.GetServedByAll() && found:
		v.Propagated = slices.Delete(slices.Clone(v.Propagated), i, i+1)
	}
	if vo == nil {
		return v
	}
	usage := slices.Clone(v.Usage)
	j, found := slices.BinarySearchFunc(usage, region, func(p *statev1.RegionUsage, r string) int { return cmp(p.GetRegion()) })
	var prev *statev1.RegionUsage
	if found {
		prev = usage[j]
	}
	u := &statev1.RegionUsage{
		Region:       region,
		ObservedAt:   ts,
		LastEncrypt:  laterStamp(prev.GetLastEncrypt(), notAfter(vo.GetLastEncrypt(), ts)),
		LastUse:      laterStamp(prev.GetLastUse(), notAfter(vo.GetLastUse(), ts)),
		EncryptCount: max(prev.GetEncryptCount(), vo.GetEncryptCount()),
		DecryptCount: max(prev.GetDecryptCount(), vo.GetDecryptCount()),
		// What the region serves now, unlike the usage above: a region
		// rolled back to the version makes it primary again.
		ServedAsPrimary: vo.GetServedAsPrimary(),
	}
	if found {
		usage[j] = u
	} else {
		usage = slices.Insert(usage, j, u)
	}
	v.Usage = usage
	v.EncryptCount = encryptSum(usage)
	return v
}

// notAfter is t, or limit if t is later (nil stays nil).
func notAfter(t, limit *timestamppb.Timestamp) *timestamppb.Timestamp {
	if t != nil && t.AsTime().After(limit.AsTime()) {
		return limit
	}
	return t
}

// laterStamp is the later of two optional times (nil is unset).
func laterStamp(a, b *timestamppb.Timestamp) *timestamppb.Timestamp {
	switch {
	case a == nil:
		return b
	case b == nil:
		return a
	case b.AsTime().After(a.AsTime()):
		return b
	}
	return a
}

func hasPropagated(v *statev1.KeysetVersionRecord, region string) bool {
	return slices.ContainsFunc(v.GetPropagated(), func(p *statev1.RegionTime) bool { return p.GetRegion() == region })
}

// encryptSum is the fleet-wide encrypt count of a version: the sum of its
// regions' counts, saturating at the largest uint64.
func encryptSum(usage []*statev1.RegionUsage) uint64 {
	var sum uint64
	for _, u := range usage {
		n := u.GetEncryptCount()
		if sum > math.MaxUint64-n {
			return math.MaxUint64
		}
		sum += n
	}
	return sum
}
