// Package identity is Cairn's workload identity layer: SPIFFE IDs carried in
// X.509 URI SANs, TLS 1.3 mutual-TLS configurations built on go-spiffe, gRPC
// credentials and interceptors that put the verified peer identity in the
// request context, and authorizers over exact IDs and "*" patterns.
//
// Every Cairn identity has the shape
//
//	spiffe://<trust-domain>/<tier>/<region>/<name>
//
// with exactly three path segments, each of lowercase letters, digits, '-',
// '_' and '.'. Components not bound to a region use the region "global".
package identity

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Tiers used by Cairn's components. Parse accepts any well-formed tier so
// new kinds of callers need no code change; these name the ones Cairn knows.
const (
	TierDistributor = "distributor"
	TierRootKMS     = "rootkms"
	TierKMS         = "kms"
	TierOfficer     = "officer"
	TierRegionctl   = "regionctl"
	TierClient      = "client"

	// RegionGlobal is the region segment of components not bound to a region.
	RegionGlobal = "global"
)

// ErrInvalidID is wrapped by every error about a malformed ID or pattern.
var ErrInvalidID = errors.New("identity: invalid SPIFFE ID")

// ID is a validated Cairn identity. The zero value is "no identity"; every
// non-zero ID was built by Parse, New or FromSPIFFEID and is well-formed.
type ID struct {
	id                 spiffeid.ID
	tier, region, name string
}

// Parse parses s as a Cairn SPIFFE ID.
func Parse(s string) (ID, error) {
	sid, err := spiffeid.FromString(s)
	if err != nil {
		return ID{}, fmt.Errorf("%w %q: %v", ErrInvalidID, s, err)
	}
	return FromSPIFFEID(sid)
}

// New builds the ID spiffe://<td>/<tier>/<region>/<name>.
func New(td spiffeid.TrustDomain, tier, region, name string) (ID, error) {
	if td.IsZero() {
		return ID{}, fmt.Errorf("%w: empty trust domain", ErrInvalidID)
	}
	for _, seg := range []string{tier, region, name} {
		if err := checkSegment(seg); err != nil {
			return ID{}, fmt.Errorf("%w %s/%s/%s: %v", ErrInvalidID, tier, region, name, err)
		}
	}
	sid, err := spiffeid.FromSegments(td, tier, region, name)
	if err != nil {
		return ID{}, fmt.Errorf("%w: %v", ErrInvalidID, err)
	}
	return ID{id: sid, tier: tier, region: region, name: name}, nil
}

// MustParse is Parse for constants in tests and examples; it panics on error.
func MustParse(s string) ID {
	id, err := Parse(s)
	if err != nil {
		panic(err)
	}
	return id
}

// FromSPIFFEID checks that a SPIFFE ID has Cairn's shape.
func FromSPIFFEID(sid spiffeid.ID) (ID, error) {
	if sid.IsZero() {
		return ID{}, fmt.Errorf("%w: empty", ErrInvalidID)
	}
	segs := strings.Split(strings.TrimPrefix(sid.Path(), "/"), "/")
	if len(segs) != 3 {
		return ID{}, fmt.Errorf("%w %q: want spiffe://<trust-domain>/<tier>/<region>/<name>, got %d path segments", ErrInvalidID, sid.String(), len(segs))
	}
	for _, seg := range segs {
		if err := checkSegment(seg); err != nil {
			return ID{}, fmt.Errorf("%w %q: %v", ErrInvalidID, sid.String(), err)
		}
	}
	return ID{id: sid, tier: segs[0], region: segs[1], name: segs[2]}, nil
}

// checkSegment accepts [a-z0-9._-]+ that is not "." or "..". Uppercase is
// refused so that two IDs never differ only by case.
func checkSegment(seg string) error {
	if seg == "" {
		return errors.New("empty path segment")
	}
	if seg == "." || seg == ".." {
		return fmt.Errorf("path segment %q is not allowed", seg)
	}
	for i := 0; i < len(seg); i++ {
		c := seg[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("path segment %q: character %q not allowed (use a-z, 0-9, '-', '_', '.')", seg, c)
		}
	}
	return nil
}

// String returns the ID in URI form, or "" for the zero ID.
func (id ID) String() string {
	if id.IsZero() {
		return ""
	}
	return id.id.String()
}

// IsZero reports whether id is the zero ID.
func (id ID) IsZero() bool { return id.id.IsZero() }

// SPIFFEID returns the underlying go-spiffe ID.
func (id ID) SPIFFEID() spiffeid.ID { return id.id }

// TrustDomain returns the ID's trust domain.
func (id ID) TrustDomain() spiffeid.TrustDomain { return id.id.TrustDomain() }

// Tier returns the first path segment, e.g. "kms".
func (id ID) Tier() string { return id.tier }

// Region returns the second path segment, e.g. "us-east" or "global".
func (id ID) Region() string { return id.region }

// Name returns the third path segment, e.g. "kms-1".
func (id ID) Name() string { return id.name }
