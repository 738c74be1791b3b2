package identity

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ErrPermissionDenied is wrapped by every authorizer refusal.
var ErrPermissionDenied = errors.New("identity: permission denied")

// Pattern matches Cairn IDs. It has the ID's shape, and each of the three
// path segments is either a literal that must match exactly (case-sensitive)
// or "*", which matches any one whole segment. There are no partial
// wildcards ("kms-*"), no multi-segment wildcards, and no wildcard trust
// domain: a pattern names exactly one trust domain.
type Pattern struct {
	td   spiffeid.TrustDomain
	segs [3]string
}

// Wildcard is the pattern segment that matches any one segment.
const Wildcard = "*"

// ParsePattern parses a pattern written either as a full URI
// ("spiffe://cairn.test/kms/us-east/*") or relative to the trust domain td
// ("kms/us-east/*"). A relative pattern with a zero td is an error.
func ParsePattern(s string, td spiffeid.TrustDomain) (Pattern, error) {
	const form = "want spiffe://<trust-domain>/<tier>/<region>/<name> or <tier>/<region>/<name>, each segment a literal or *"
	path := s
	if rest, ok := strings.CutPrefix(s, "spiffe://"); ok {
		tdName, p, found := strings.Cut(rest, "/")
		if !found {
			return Pattern{}, fmt.Errorf("%w pattern %q: no path; %s", ErrInvalidID, s, form)
		}
		parsed, err := spiffeid.TrustDomainFromString(tdName)
		if err != nil {
			return Pattern{}, fmt.Errorf("%w pattern %q: trust domain: %v", ErrInvalidID, s, err)
		}
		if parsed.Name() != tdName {
			// TrustDomainFromString accepts a URI and lowercases nothing; be
			// explicit that the pattern must name the domain exactly.
			return Pattern{}, fmt.Errorf("%w pattern %q: trust domain %q is not canonical", ErrInvalidID, s, tdName)
		}
		td, path = parsed, p
	} else if td.IsZero() {
		return Pattern{}, fmt.Errorf("%w pattern %q: relative pattern without a trust domain", ErrInvalidID, s)
	}
	segs := strings.Split(path, "/")
	if len(segs) != 3 {
		return Pattern{}, fmt.Errorf("%w pattern %q: %d path segments; %s", ErrInvalidID, s, len(segs), form)
	}
	var p Pattern
	p.td = td
	for i, seg := range segs {
		if seg != Wildcard {
			if strings.Contains(seg, Wildcard) {
				return Pattern{}, fmt.Errorf("%w pattern %q: segment %q: * must be a whole segment", ErrInvalidID, s, seg)
			}
			if err := checkSegment(seg); err != nil {
				return Pattern{}, fmt.Errorf("%w pattern %q: %v", ErrInvalidID, s, err)
			}
		}
		p.segs[i] = seg
	}
	return p, nil
}

// MustParsePattern is ParsePattern for constants; it panics on error.
func MustParsePattern(s string, td spiffeid.TrustDomain) Pattern {
	p, err := ParsePattern(s, td)
	if err != nil {
		panic(err)
	}
	return p
}

// Exact returns the pattern that matches only id.
func Exact(id ID) Pattern {
	return Pattern{td: id.TrustDomain(), segs: [3]string{id.tier, id.region, id.name}}
}

// Match reports whether id matches the pattern. The zero ID matches nothing.
func (p Pattern) Match(id ID) bool {
	if id.IsZero() || p.td.IsZero() || id.TrustDomain() != p.td {
		return false
	}
	got := [3]string{id.tier, id.region, id.name}
	for i, want := range p.segs {
		if want != Wildcard && want != got[i] {
			return false
		}
	}
	return true
}

// String returns the pattern in full URI form.
func (p Pattern) String() string {
	if p.td.IsZero() {
		return ""
	}
	return "spiffe://" + p.td.Name() + "/" + strings.Join(p.segs[:], "/")
}

// Authorizer decides whether an identity may do something. It returns nil to
// allow and an error wrapping ErrPermissionDenied to refuse.
type Authorizer func(ID) error

// Allowlist is a set of patterns; an ID is allowed if any pattern matches.
// The zero Allowlist allows nobody (default deny).
type Allowlist struct {
	patterns []Pattern
}

// NewAllowlist returns an allowlist of the given patterns.
func NewAllowlist(patterns ...Pattern) Allowlist {
	return Allowlist{patterns: append([]Pattern(nil), patterns...)}
}

// ParseAllowlist parses each pattern with ParsePattern against td.
func ParseAllowlist(td spiffeid.TrustDomain, patterns ...string) (Allowlist, error) {
	var a Allowlist
	for _, s := range patterns {
		p, err := ParsePattern(s, td)
		if err != nil {
			return Allowlist{}, err
		}
		a.patterns = append(a.patterns, p)
	}
	return a, nil
}

// Allows reports whether id matches one of the patterns.
func (a Allowlist) Allows(id ID) bool {
	for _, p := range a.patterns {
		if p.Match(id) {
			return true
		}
	}
	return false
}

// Patterns returns a copy of the allowlist's patterns.
func (a Allowlist) Patterns() []Pattern { return append([]Pattern(nil), a.patterns...) }

// Authorize is the allowlist as an Authorizer.
func (a Allowlist) Authorize(id ID) error {
	if a.Allows(id) {
		return nil
	}
	if id.IsZero() {
		return fmt.Errorf("%w: no identity", ErrPermissionDenied)
	}
	return fmt.Errorf("%w: %s is not on the allowlist", ErrPermissionDenied, id)
}

// AllowAny returns an Authorizer that allows every identity (of the trust
// domains the TLS layer already accepts). Use it only for harmless methods
// such as status.
func AllowAny() Authorizer {
	return func(id ID) error {
		if id.IsZero() {
			return fmt.Errorf("%w: no identity", ErrPermissionDenied)
		}
		return nil
	}
}

// MemberOf returns an Authorizer that allows any identity of trust domain td.
func MemberOf(td spiffeid.TrustDomain) Authorizer {
	return func(id ID) error {
		if id.IsZero() || id.TrustDomain() != td {
			return fmt.Errorf("%w: %s is not a member of trust domain %q", ErrPermissionDenied, id, td.Name())
		}
		return nil
	}
}
