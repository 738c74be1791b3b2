// Package compile turns validated team configs and the stored, wrapped
// keysets into one region's config bundle (cairn.bundle.v1.Bundle). It is
// pure: it neither signs, nor reads files, nor calls anything remote.
package compile

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	"github.com/cairnkms/cairn/regionctl/bundle"
	"github.com/cairnkms/cairn/regionctl/config"
	"github.com/cairnkms/cairn/regionctl/store"
)

// Keysets gives the stored region copies of a keyset. Get returns an error
// wrapping store.ErrNotFound for a keyset that was never generated.
// *store.Store implements it.
type Keysets interface {
	Get(name string) ([]*cryptov1.EncryptedKeyset, error)
}

// Input is what a bundle is compiled from.
type Input struct {
	Region    string
	Serial    uint64
	CreatedBy string
	CreatedAt time.Time
	// Teams are the valid team configs (config.LoadDir's good teams).
	Teams []*config.Team
	// Store holds the wrapped keysets.
	Store Keysets
}

// Result is a compiled bundle and what was left out of it.
type Result struct {
	Bundle *bundlev1.Bundle
	// Missing are keysets configured for the region that the store does
	// not hold, or holds without a copy for the region: they are not in
	// the bundle.
	Missing []Missing
	// Warnings are things that did not keep a keyset out but need a look.
	Warnings []string
}

// Missing is a configured keyset left out of the bundle.
type Missing struct {
	Keyset, Team, Reason string
}

// Compile builds the bundle of in.Region: every keyset of in.Teams that lists
// the region and is in the store, sorted by name, with the store's copy for
// the region. It fails on a store it cannot read (other than a keyset that is
// not there) and on a bundle that does not validate.
func Compile(in Input) (*Result, error) {
	var cfgs []config.Keyset
	for _, t := range in.Teams {
		for _, k := range t.Keysets {
			if slices.Contains(k.Regions, in.Region) {
				cfgs = append(cfgs, k)
			}
		}
	}
	slices.SortFunc(cfgs, func(a, b config.Keyset) int { return strings.Compare(a.Name, b.Name) })
	res := &Result{}
	b := &bundlev1.Bundle{
		FormatVersion: bundle.FormatVersion,
		Region:        in.Region,
		Serial:        in.Serial,
		CreatedAt:     timestamppb.New(in.CreatedAt),
		CreatedBy:     in.CreatedBy,
	}
	versions := map[uint32]bool{}
	for _, k := range cfgs {
		copies, err := in.Store.Get(k.Name)
		if errors.Is(err, store.ErrNotFound) {
			res.Missing = append(res.Missing, Missing{Keyset: k.Name, Team: k.Team, Reason: "not in the store (run regionctl keyset create)"})
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("compile: keyset %s: %w", k.Name, err)
		}
		stored := store.Regions(copies)
		c := store.ForRegion(copies, in.Region)
		if c == nil {
			res.Missing = append(res.Missing, Missing{Keyset: k.Name, Team: k.Team,
				Reason: fmt.Sprintf("the store holds copies for %v only; adding a region to an existing keyset is not supported yet", stored)})
			continue
		}
		// regions is every region that serves or may serve the keyset: the
		// configured ones and those holding a copy. The Safety Condition
		// waits for all of them, so a region dropped from the config but
		// still serving an older bundle is not forgotten.
		regions := slices.Clone(k.Regions)
		for _, r := range stored {
			if !slices.Contains(regions, r) {
				regions = append(regions, r)
			}
		}
		slices.Sort(regions)
		if !sameSet(k.Regions, stored) {
			res.Warnings = append(res.Warnings, fmt.Sprintf("keyset %s: configured for %v but stored for %v; the bundle lists %v", k.Name, sorted(k.Regions), sorted(stored), regions))
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
			RotationPeriod: durationpb.New(k.RotationPeriod),
			CiphertextTtl:  durationpb.New(k.CiphertextTTL),
			Regions:        regions,
		})
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

func sorted(s []string) []string {
	out := slices.Clone(s)
	slices.Sort(out)
	return out
}

func sameSet(a, b []string) bool { return slices.Equal(sorted(a), sorted(b)) }
