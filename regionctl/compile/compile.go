// Package compile turns validated team configs and the root KMS's keyset
// records into one region's config bundle (cairn.bundle.v1.Bundle). It is
// pure: it neither signs, nor reads files, nor calls anything remote.
//
// The team configs say who may use a keyset and for what; the record (the
// root KMS, the system of record) holds the encrypted copies, the TTL
// history, the rotation period and every version's lifecycle. A bundle that
// cannot hold every keyset of the region is not made: Compile reports every
// Problem instead, so that one run shows everything to fix. Only an explicit
// partial build (Input.AllowPartial) leaves keysets out, and it records them,
// with its reason, in the signed bundle.
package compile

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/bundle"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/regionctl/config"
)

// Input is what a bundle is compiled from.
type Input struct {
	Region    string
	Serial    uint64
	CreatedBy string
	CreatedAt time.Time
	// ValidFor is how long after CreatedAt the bundle may be applied (its
	// not_after; 0: bundle.DefaultValidity). At most bundle.MaxValidity.
	ValidFor time.Duration
	// Parent, if set, is the bundle the region serves now.
	Parent *bundlev1.BundleRef
	// Teams are the valid team configs (config.LoadDir's good teams). The
	// caller refuses to compile when any team file is invalid.
	Teams []*config.Team
	// Record holds the root KMS's records of the region's keysets, with
	// their copies (ListKeysets with region and include_copies).
	Record []*statev1.KeysetRecord
	// Window is the propagation window written into every keyset
	// (KeysetConfig.propagation_window); it must be positive.
	Window time.Duration
	// EncryptLimit is the AES-GCM message budget written into every keyset
	// (KeysetConfig.encrypt_limit): the encryptions a key version may make
	// fleet-wide. 0 means bundle.DefaultEncryptLimit (2^32).
	EncryptLimit uint64
	// AllowPartial lets the bundle leave out the keysets it cannot build
	// (every Problem naming a keyset) instead of not being made; they are
	// recorded in Bundle.partial with PartialReason (required with it) and
	// CreatedBy. Problems of the whole bundle still prevent it.
	AllowPartial  bool
	PartialReason string
	// Quotas and DefaultQuota are the per-caller quotas every KMS server of
	// the region enforces (Bundle.quotas, default_quota), copied as given;
	// the bundle's validation checks them. Nil: none (the servers'
	// defaults).
	Quotas       []*bundlev1.Quota
	DefaultQuota *bundlev1.Quota
}

// Problem is one reason the bundle cannot be made.
type Problem struct {
	// Keyset names the keyset concerned ("" for the whole bundle).
	Keyset string
	// Team owns it in the configs ("" if no team file lists it).
	Team   string
	Reason string
}

func (p Problem) String() string {
	switch {
	case p.Keyset == "":
		return p.Reason
	case p.Team == "":
		return fmt.Sprintf("keyset %s: %s", p.Keyset, p.Reason)
	}
	return fmt.Sprintf("keyset %s (team %s): %s", p.Keyset, p.Team, p.Reason)
}

// Result is a compiled bundle, or the problems that prevent it.
type Result struct {
	// Bundle is nil when Problems is not empty.
	Bundle   *bundlev1.Bundle
	Problems []Problem
	// LeftOut are the problems of the keysets a partial build left out
	// (Input.AllowPartial); Bundle.partial lists the same.
	LeftOut []Problem
}

// Compile builds the bundle of in.Region: every keyset that a team config
// lists for the region, sorted by name, with the record's copy for the
// region, the record's policy and lifecycle, and the message budget
// (in.EncryptLimit, and every version's recorded encrypt_count). It reports
// a Problem (and makes no bundle) for a configured keyset the record lacks
// or has without a copy for the region, a record keyset of the region that
// no team file lists, regions that differ between config and record, and a
// TTL or rotation period that differs (the record is changed with
// set-policy, then the file follows). It fails on a bundle that does not
// validate.
func Compile(in Input) (*Result, error) {
	if in.Window <= 0 {
		return nil, fmt.Errorf("compile: propagation window %v: must be positive", in.Window)
	}
	if in.AllowPartial && strings.TrimSpace(in.PartialReason) == "" {
		return nil, fmt.Errorf("compile: a partial build needs a reason")
	}
	validFor := in.ValidFor
	if validFor == 0 {
		validFor = bundle.DefaultValidity
	}
	if validFor < 0 || validFor > bundle.MaxValidity {
		return nil, fmt.Errorf("compile: validity %v: must be positive and at most %v", validFor, bundle.MaxValidity)
	}
	cfgs := map[string]config.Keyset{}
	for _, t := range in.Teams {
		for _, k := range t.Keysets {
			if slices.Contains(k.Regions, in.Region) {
				cfgs[k.Name] = k
			}
		}
	}
	records := map[string]*statev1.KeysetRecord{}
	for _, r := range in.Record {
		if slices.Contains(r.GetRegions(), in.Region) {
			records[r.GetName()] = r
		}
	}
	res := &Result{}
	for _, name := range slices.Sorted(maps.Keys(records)) {
		if _, ok := cfgs[name]; !ok {
			res.Problems = append(res.Problems, Problem{Keyset: name,
				Reason: fmt.Sprintf("the record serves it in %s, but no valid team file lists it for %s (a keyset is never silently dropped)", in.Region, in.Region)})
		}
	}
	b := &bundlev1.Bundle{
		FormatVersion: bundle.FormatVersion,
		Region:        in.Region,
		Serial:        in.Serial,
		CreatedAt:     timestamppb.New(in.CreatedAt),
		NotAfter:      timestamppb.New(in.CreatedAt.Add(validFor)),
		CreatedBy:     in.CreatedBy,
		Parent:        proto.CloneOf(in.Parent),
		DefaultQuota:  proto.CloneOf(in.DefaultQuota),
	}
	for _, q := range in.Quotas {
		b.Quotas = append(b.Quotas, proto.CloneOf(q))
	}
	limit := in.EncryptLimit
	if limit == 0 {
		limit = bundle.DefaultEncryptLimit
	}
	versions := map[uint32]bool{}
	for _, name := range slices.Sorted(maps.Keys(cfgs)) {
		k := cfgs[name]
		rec, ok := records[name]
		if !ok {
			res.Problems = append(res.Problems, Problem{Keyset: name, Team: k.Team, Reason: "not in the root KMS record for " + in.Region + " (run regionctl keyset create)"})
			continue
		}
		var bad []string
		if !sameSet(k.Regions, rec.GetRegions()) {
			bad = append(bad, fmt.Sprintf("configured for %v but the record has %v; changing a keyset's regions is not supported", sorted(k.Regions), rec.GetRegions()))
		}
		ttl := TTLInForce(rec)
		if ttl != k.CiphertextTTL {
			bad = append(bad, fmt.Sprintf("ciphertext_ttl is %s in the team file but %s in the record; run regionctl keyset set-policy %s --ttl %s (or fix the file)", k.CiphertextTTL, ttl, name, k.CiphertextTTL))
		}
		if rp := rec.GetRotationPeriod().AsDuration(); rp != k.RotationPeriod {
			bad = append(bad, fmt.Sprintf("rotation_period is %s in the team file but %s in the record; run regionctl keyset set-policy %s --rotation-period %s (or fix the file)", k.RotationPeriod, rp, name, k.RotationPeriod))
		}
		c := CopyFor(rec, in.Region)
		if c == nil {
			bad = append(bad, "the record holds no copy for "+in.Region)
		}
		for _, why := range bad {
			res.Problems = append(res.Problems, Problem{Keyset: name, Team: k.Team, Reason: why})
		}
		if len(bad) > 0 {
			continue
		}
		versions[c.GetRegionKeyVersion()] = true
		b.Keysets = append(b.Keysets, &bundlev1.KeysetConfig{
			Name:      k.Name,
			OwnerTeam: k.Team,
			Purpose:   bundlev1.Purpose_PURPOSE_ENVELOPE,
			Keyset:    proto.CloneOf(c),
			Acl: &bundlev1.Acl{
				Encrypt:         slices.Clone(k.ACL.Encrypt),
				Decrypt:         slices.Clone(k.ACL.Decrypt),
				GenerateDataKey: slices.Clone(k.ACL.GenerateDataKey),
				Rewrap:          slices.Clone(k.ACL.Rewrap),
			},
			RotationPeriod:    durationpb.New(rec.GetRotationPeriod().AsDuration()),
			CiphertextTtl:     durationpb.New(ttl),
			Regions:           slices.Clone(rec.GetRegions()),
			TtlHistory:        ttlHistory(rec),
			Lifecycle:         Lifecycle(rec, c),
			DestroyedKeyIds:   Destroyed(rec, c, in.CreatedAt),
			PropagationWindow: durationpb.New(in.Window),
			EncryptLimit:      limit,
		})
	}
	if in.AllowPartial {
		res.Problems, res.LeftOut = partition(res.Problems)
		if len(res.LeftOut) > 0 {
			b.Partial = &bundlev1.PartialBuild{Reason: in.PartialReason, BuiltBy: in.CreatedBy, LeftOut: leftOut(res.LeftOut)}
		}
	}
	if len(res.Problems) > 0 {
		return res, nil
	}
	for v := range versions {
		b.RegionKeyVersions = append(b.RegionKeyVersions, v)
	}
	slices.Sort(b.RegionKeyVersions)
	if err := bundle.Validate(b); err != nil {
		return nil, fmt.Errorf("compile: %w", err)
	}
	res.Bundle = b
	return res, nil
}

// partition splits problems into those of the whole bundle and those of a
// keyset.
func partition(ps []Problem) (whole, keysets []Problem) {
	for _, p := range ps {
		if p.Keyset == "" {
			whole = append(whole, p)
		} else {
			keysets = append(keysets, p)
		}
	}
	return whole, keysets
}

// leftOut is the partial-build record of the keyset problems: one entry per
// keyset, "name: why; why", sorted by name.
func leftOut(ps []Problem) []string {
	why := map[string][]string{}
	for _, p := range ps {
		r := p.Reason
		if p.Team != "" {
			r = fmt.Sprintf("(team %s) %s", p.Team, r)
		}
		why[p.Keyset] = append(why[p.Keyset], r)
	}
	var out []string
	for _, name := range slices.Sorted(maps.Keys(why)) {
		out = append(out, name+": "+strings.Join(why[name], "; "))
	}
	return out
}

// TTLInForce is the ciphertext TTL of the record's open period (the last
// one); 0 if the record has no history.
func TTLInForce(rec *statev1.KeysetRecord) time.Duration {
	h := rec.GetTtlHistory()
	if len(h) == 0 {
		return 0
	}
	return h[len(h)-1].GetTtl().AsDuration()
}

func ttlHistory(rec *statev1.KeysetRecord) []*bundlev1.TtlPeriod {
	var out []*bundlev1.TtlPeriod
	for _, p := range rec.GetTtlHistory() {
		out = append(out, &bundlev1.TtlPeriod{Ttl: proto.CloneOf(p.GetTtl()), From: proto.CloneOf(p.GetFrom()), Until: proto.CloneOf(p.GetUntil())})
	}
	return out
}

// Lifecycle is the bundle's view of the lifecycle of every version the copy
// holds, in record order. propagated_everywhere is the latest of the
// version's per-region propagation times, set only when every region of the
// keyset has one; encrypt_count is the record's fleet-wide count.
func Lifecycle(rec *statev1.KeysetRecord, c *cryptov1.EncryptedKeyset) []*bundlev1.VersionLifecycle {
	held := map[uint32]bool{}
	for _, v := range c.GetVersions() {
		held[v.GetKeyId()] = true
	}
	var out []*bundlev1.VersionLifecycle
	for _, v := range rec.GetVersions() {
		if !held[v.GetKeyId()] {
			continue
		}
		l := &bundlev1.VersionLifecycle{KeyId: v.GetKeyId(), PrimarySince: proto.CloneOf(v.GetPrimarySince()), SupersededAt: proto.CloneOf(v.GetSupersededAt()),
			EncryptCount: v.GetEncryptCount()}
		if t, ok := PropagatedEverywhere(rec, v); ok {
			l.PropagatedEverywhere = timestamppb.New(t)
		}
		out = append(out, l)
	}
	return out
}

// Destroyed lists, sorted, the key IDs of rec's versions destroyed at most
// bundle.DestroyedRetention before at (the bundle's created_at), so a
// server that still holds one drops it without tripping the shrink guard.
// A version the copy c still holds is left out: the record and the copy
// disagree, and the bundle serves what the copy holds.
func Destroyed(rec *statev1.KeysetRecord, c *cryptov1.EncryptedKeyset, at time.Time) []uint32 {
	var out []uint32
	since := at.Add(-bundle.DestroyedRetention)
	for _, v := range rec.GetVersions() {
		if v.GetState() != statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROYED || v.GetDestroyedAt() == nil ||
			v.GetDestroyedAt().AsTime().Before(since) ||
			slices.ContainsFunc(c.GetVersions(), func(h *cryptov1.KeyVersionInfo) bool { return h.GetKeyId() == v.GetKeyId() }) {
			continue
		}
		out = append(out, v.GetKeyId())
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// PropagatedEverywhere is the latest of v's per-region propagation times if
// every region of rec has one.
func PropagatedEverywhere(rec *statev1.KeysetRecord, v *statev1.KeysetVersionRecord) (time.Time, bool) {
	var latest time.Time
	for _, r := range rec.GetRegions() {
		i := slices.IndexFunc(v.GetPropagated(), func(t *statev1.RegionTime) bool { return t.GetRegion() == r })
		if i < 0 || v.GetPropagated()[i].GetAt() == nil {
			return time.Time{}, false
		}
		if t := v.GetPropagated()[i].GetAt().AsTime(); t.After(latest) {
			latest = t
		}
	}
	return latest, len(rec.GetRegions()) > 0
}

// CopyFor is the record's copy of the keyset for region, nil if it has none.
func CopyFor(rec *statev1.KeysetRecord, region string) *cryptov1.EncryptedKeyset {
	for _, c := range rec.GetCopies() {
		if c.GetRegion() == region {
			return c
		}
	}
	return nil
}

func sorted(s []string) []string {
	out := slices.Clone(s)
	slices.Sort(out)
	return out
}

func sameSet(a, b []string) bool { return slices.Equal(sorted(a), sorted(b)) }
