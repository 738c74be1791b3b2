package bundle

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"

	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
)

// ErrShrink is wrapped by CheckShrink's refusal: the bundle shrinks past the
// guard against the bundle served, and carries no shrink override.
var ErrShrink = errors.New("bundle: shrink guard")

// ShrinkGuard bounds how much a bundle may shrink against the bundle a
// server serves: the guard against the 2014 outage, when a truncated merged
// config was pushed everywhere at once. It is checked by regionctl before it
// signs a bundle and again by every KMS server before it applies one; a
// bundle passes it regardless only with a signed shrink override
// (Bundle.shrink_override). It is no substitute for the Safety Condition,
// which nothing overrides.
//
// Each count is judged on its own:
//   - keysets: keysets of the served bundle that the new one lacks;
//   - ACL entries: for each keyset both hold, each operation's SPIFFE ID
//     patterns the served bundle lists and the new one does not;
//   - versions: for each keyset both hold, the key IDs of the served copy
//     the new copy lacks (a dropped keyset's versions count as a dropped
//     keyset, not again here), except those the new copy names as
//     destroyed (KeysetConfig.destroyed_key_ids: retired through the
//     lifecycle under the Safety Condition, however many a lagging server
//     missed), which count neither as dropped nor among the versions;
//   - bytes: the new bundle's size against the served one's.
//
// A count may drop up to the larger of its fraction and its floor, but never
// all of what it counts (a bundle that drops every keyset, or every ACL
// entry of the keysets it keeps, is refused however small): small bundles
// need the floors (dropping 1 keyset of 3 is 33%), and the floors are what
// a routine change drops. The size check refuses a bundle smaller than
// MinSizeRatio of the served one only if it is also more than MinSizeDrop
// bytes smaller, so small bundles are judged by the counts alone.
//
// Zero fields mean the defaults.
type ShrinkGuard struct {
	// MaxKeysetDrop is the fraction of the served keysets a bundle may drop
	// (0: 0.10).
	MaxKeysetDrop float64
	// MinKeysetDrop is the number of keysets a bundle may always drop
	// (0: 1: retiring one keyset is a routine change at any size).
	MinKeysetDrop int
	// MaxACLDrop is the fraction of the ACL entries of the kept keysets a
	// bundle may drop (0: 0.10).
	MaxACLDrop float64
	// MinACLDrop is the number of ACL entries a bundle may always drop (0:
	// 4: one identity pattern revoked from all four operations of a keyset).
	MinACLDrop int
	// MaxVersionDrop is the fraction of the key versions of the kept keysets
	// a bundle may drop (0: 0.10).
	MaxVersionDrop float64
	// VersionDropPerKeyset is the number of versions per kept keyset a
	// bundle may always drop (0: 1: regionctl rotate --due retires one
	// version of every due keyset in one bundle, and keysets created
	// together fall due together).
	VersionDropPerKeyset int
	// MinSizeRatio is the fraction of the served bundle's bytes below which
	// a bundle is much smaller (0: 0.5).
	MinSizeRatio float64
	// MinSizeDrop is the number of bytes a bundle may always shrink by (0:
	// 64 KiB, a few dozen keysets).
	MinSizeDrop int
}

// Shrink guard defaults.
const (
	DefaultMaxKeysetDrop        = 0.10
	DefaultMinKeysetDrop        = 1
	DefaultMaxACLDrop           = 0.10
	DefaultMinACLDrop           = 4
	DefaultMaxVersionDrop       = 0.10
	DefaultVersionDropPerKeyset = 1
	DefaultMinSizeRatio         = 0.5
	DefaultMinSizeDrop          = 64 << 10
)

// Validate reports a guard that cannot be meant: a fraction outside [0, 1]
// or a negative floor.
func (g ShrinkGuard) Validate() error {
	var errs []error
	for _, f := range [...]struct {
		name string
		v    float64
	}{{"MaxKeysetDrop", g.MaxKeysetDrop}, {"MaxACLDrop", g.MaxACLDrop}, {"MaxVersionDrop", g.MaxVersionDrop}, {"MinSizeRatio", g.MinSizeRatio}} {
		if math.IsNaN(f.v) || f.v < 0 || f.v > 1 {
			errs = append(errs, fmt.Errorf("bundle: shrink guard: %s %v is not a fraction in [0, 1]", f.name, f.v))
		}
	}
	for _, n := range [...]struct {
		name string
		v    int
	}{{"MinKeysetDrop", g.MinKeysetDrop}, {"MinACLDrop", g.MinACLDrop}, {"VersionDropPerKeyset", g.VersionDropPerKeyset}, {"MinSizeDrop", g.MinSizeDrop}} {
		if n.v < 0 {
			errs = append(errs, fmt.Errorf("bundle: shrink guard: %s %d is negative", n.name, n.v))
		}
	}
	return errors.Join(errs...)
}

// withDefaults fills the zero fields.
func (g ShrinkGuard) withDefaults() ShrinkGuard {
	orF := func(v *float64, d float64) {
		if *v == 0 {
			*v = d
		}
	}
	orI := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	orF(&g.MaxKeysetDrop, DefaultMaxKeysetDrop)
	orI(&g.MinKeysetDrop, DefaultMinKeysetDrop)
	orF(&g.MaxACLDrop, DefaultMaxACLDrop)
	orI(&g.MinACLDrop, DefaultMinACLDrop)
	orF(&g.MaxVersionDrop, DefaultMaxVersionDrop)
	orI(&g.VersionDropPerKeyset, DefaultVersionDropPerKeyset)
	orF(&g.MinSizeRatio, DefaultMinSizeRatio)
	orI(&g.MinSizeDrop, DefaultMinSizeDrop)
	return g
}

// Drop is one count of a ShrinkReport.
type Drop struct {
	// Dropped of Of are gone; Allowed may go.
	Dropped, Of, Allowed int
	// Fraction and Floor are the guard's bounds that made Allowed; Capped
	// says Allowed is less than both allow, because never all may go.
	Fraction float64
	Floor    int
	Capped   bool
	// Names lists what was dropped, sorted: keyset names; "keyset
	// operation pattern"; "keyset key ID".
	Names []string
}

// Exceeded reports whether more was dropped than allowed.
func (d Drop) Exceeded() bool { return d.Dropped > d.Allowed }

// allow sets Allowed: the larger of Fraction of Of and Floor, but never
// all of Of.
func (d *Drop) allow() {
	if d.Of == 0 {
		return
	}
	a := max(int(math.Floor(d.Fraction*float64(d.Of)+1e-9)), d.Floor)
	d.Allowed = min(a, d.Of-1)
	d.Capped = d.Allowed < a
}

// ShrinkReport is what CheckShrink found.
type ShrinkReport struct {
	// CurSerial is the served bundle's serial (0: nothing served).
	CurSerial uint64
	Keysets   Drop
	ACL       Drop
	Versions  Drop
	// Destroyed counts the versions of the kept keysets that next lacks
	// and names among its destroyed_key_ids: retired through the version
	// lifecycle, so not in Versions.
	Destroyed int
	// CurSize and NextSize are the bundles' sizes in bytes; MinSize is the
	// size below which the new one is much smaller (0: no bound, as it is
	// at most MinSizeDrop bytes smaller); SizeRatio and SizeSlack are the
	// guard's MinSizeRatio and MinSizeDrop.
	CurSize, NextSize, MinSize int
	SizeRatio                  float64
	SizeSlack                  int
	// Override is the new bundle's shrink override, if it has one with a
	// reason.
	Override *bundlev1.ShrinkOverride
}

// SizeExceeded reports whether the new bundle is much smaller than the
// served one.
func (r *ShrinkReport) SizeExceeded() bool { return r.NextSize < r.MinSize }

// Exceeded reports whether any bound is exceeded (whether or not the
// override allows it).
func (r *ShrinkReport) Exceeded() bool {
	return r.Keysets.Exceeded() || r.ACL.Exceeded() || r.Versions.Exceeded() || r.SizeExceeded()
}

// Problems describes each exceeded bound, one line each.
func (r *ShrinkReport) Problems() []string {
	var out []string
	if d := r.Keysets; d.Exceeded() {
		out = append(out, fmt.Sprintf("drops %d of %d keysets (%s): %s", d.Dropped, d.Of, d.bound(""), names(d.Names)))
	}
	if d := r.ACL; d.Exceeded() {
		out = append(out, fmt.Sprintf("drops %d of %d ACL entries of the keysets it keeps (%s): %s", d.Dropped, d.Of, d.bound(""), names(d.Names)))
	}
	if d := r.Versions; d.Exceeded() {
		out = append(out, fmt.Sprintf("drops %d of %d key versions of the keysets it keeps (%s): %s", d.Dropped, d.Of, d.bound(" per kept keyset"), names(d.Names)))
	}
	if r.SizeExceeded() {
		out = append(out, fmt.Sprintf("is %d bytes, %s of the %d served (less than %s, and more than %d bytes smaller)",
			r.NextSize, percent(r.NextSize, r.CurSize), r.CurSize, percentF(r.SizeRatio), r.SizeSlack))
	}
	return out
}

// bound says why d exceeds its allowance.
func (d Drop) bound(floorUnit string) string {
	if d.Capped {
		return fmt.Sprintf("%s: never all of them", percent(d.Dropped, d.Of))
	}
	return fmt.Sprintf("%s, more than %s and more than %d%s", percent(d.Dropped, d.Of), percentF(d.Fraction), d.Floor, floorUnit)
}

// String summarises the report in one line.
func (r *ShrinkReport) String() string {
	if r.CurSerial == 0 && r.CurSize == 0 {
		return "nothing served: no shrink to check"
	}
	s := fmt.Sprintf("against serial %d: drops %d of %d keysets, %d of %d ACL entries and %d of %d key versions of the keysets it keeps",
		r.CurSerial, r.Keysets.Dropped, r.Keysets.Of, r.ACL.Dropped, r.ACL.Of, r.Versions.Dropped, r.Versions.Of)
	if r.Destroyed > 0 {
		s += fmt.Sprintf(" (besides %d version(s) destroyed through the lifecycle)", r.Destroyed)
	}
	s += fmt.Sprintf("; %d bytes, %s of the %d served", r.NextSize, percent(r.NextSize, r.CurSize), r.CurSize)
	switch {
	case r.Exceeded() && r.Override != nil:
		s += fmt.Sprintf("; past the guard (%s), allowed by override: %s (forced by %s)", strings.Join(r.Problems(), "; "), r.Override.GetReason(), r.Override.GetForcedBy())
	case r.Exceeded():
		s += "; REFUSED: " + strings.Join(r.Problems(), "; ")
	case r.Override != nil:
		s += fmt.Sprintf("; within the guard (the override is not needed here: %s)", r.Override.GetReason())
	default:
		s += "; within the guard"
	}
	return s
}

// CheckShrink compares next, a bundle about to be applied, with cur, the
// bundle served (nil if nothing is served: nothing shrinks). curSize and
// nextSize are their serialized sizes (SignedBundle.bundle). It returns the
// report and, if a bound is exceeded and next carries no shrink override
// with a reason, an error wrapping ErrShrink that names every exceeded
// bound with its numbers and what was dropped. It is pure.
func CheckShrink(cur, next *bundlev1.Bundle, curSize, nextSize int, g ShrinkGuard) (*ShrinkReport, error) {
	if err := g.Validate(); err != nil {
		return nil, err
	}
	g = g.withDefaults()
	r := &ShrinkReport{NextSize: nextSize}
	if o := next.GetShrinkOverride(); strings.TrimSpace(o.GetReason()) != "" {
		r.Override = o
	}
	if cur == nil {
		return r, nil
	}
	r.CurSerial, r.CurSize, r.SizeRatio, r.SizeSlack = cur.GetSerial(), curSize, g.MinSizeRatio, g.MinSizeDrop
	if curSize-nextSize > g.MinSizeDrop {
		r.MinSize = int(math.Ceil(g.MinSizeRatio * float64(curSize)))
	}

	nextKeysets := make(map[string]*bundlev1.KeysetConfig, len(next.GetKeysets()))
	for _, k := range next.GetKeysets() {
		nextKeysets[k.GetName()] = k
	}
	kept := 0
	for _, c := range cur.GetKeysets() {
		n, ok := nextKeysets[c.GetName()]
		if !ok {
			r.Keysets.Names = append(r.Keysets.Names, c.GetName())
			continue
		}
		kept++
		for _, op := range aclOps(c.GetAcl()) {
			have := map[string]bool{}
			for _, p := range aclOf(n.GetAcl(), op.name) {
				have[p] = true
			}
			seen := map[string]bool{}
			for _, p := range op.patterns {
				if seen[p] {
					continue
				}
				seen[p] = true
				r.ACL.Of++
				if !have[p] {
					r.ACL.Names = append(r.ACL.Names, fmt.Sprintf("%s %s %s", c.GetName(), op.name, p))
				}
			}
		}
		have := map[uint32]bool{}
		for _, v := range n.GetKeyset().GetVersions() {
			have[v.GetKeyId()] = true
		}
		seen := map[uint32]bool{}
		for _, v := range c.GetKeyset().GetVersions() {
			id := v.GetKeyId()
			if seen[id] {
				continue
			}
			seen[id] = true
			switch {
			case have[id]:
				r.Versions.Of++
			case slices.Contains(n.GetDestroyedKeyIds(), id):
				// Retired through the lifecycle, which the Safety Condition
				// judged: no truncation, so neither dropped nor counted.
				r.Destroyed++
			default:
				r.Versions.Of++
				r.Versions.Names = append(r.Versions.Names, fmt.Sprintf("%s key %d", c.GetName(), id))
			}
		}
	}
	r.Keysets.Of = len(cur.GetKeysets())
	for _, d := range []*Drop{&r.Keysets, &r.ACL, &r.Versions} {
		d.Dropped = len(d.Names)
		slices.Sort(d.Names)
	}
	r.Keysets.Fraction, r.Keysets.Floor = g.MaxKeysetDrop, g.MinKeysetDrop
	r.ACL.Fraction, r.ACL.Floor = g.MaxACLDrop, g.MinACLDrop
	r.Versions.Fraction, r.Versions.Floor = g.MaxVersionDrop, g.VersionDropPerKeyset*kept
	for _, d := range []*Drop{&r.Keysets, &r.ACL, &r.Versions} {
		d.allow()
	}
	if !r.Exceeded() || r.Override != nil {
		return r, nil
	}
	return r, fmt.Errorf("%w: against the served serial %d, the bundle %s", ErrShrink, r.CurSerial, strings.Join(r.Problems(), "; and "))
}

type aclOp struct {
	name     string
	patterns []string
}

func aclOps(a *bundlev1.Acl) [4]aclOp {
	return [...]aclOp{{"encrypt", a.GetEncrypt()}, {"decrypt", a.GetDecrypt()}, {"generate_data_key", a.GetGenerateDataKey()}, {"rewrap", a.GetRewrap()}}
}

func aclOf(a *bundlev1.Acl, op string) []string {
	for _, o := range aclOps(a) {
		if o.name == op {
			return o.patterns
		}
	}
	return nil
}

// maxNames bounds the names an error lists.
const maxNames = 10

func names(ns []string) string {
	if len(ns) <= maxNames {
		return strings.Join(ns, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(ns[:maxNames], ", "), len(ns)-maxNames)
}

func percent(n, of int) string {
	if of == 0 {
		return "n/a%"
	}
	return fmt.Sprintf("%.0f%%", 100*float64(n)/float64(of))
}

func percentF(f float64) string { return fmt.Sprintf("%g%%", math.Round(f*1000)/10) }

// MaxReasonLen bounds the reason of a shrink override or a partial build.
const MaxReasonLen = 1024

// checkOverrides validates shrink_override and partial: each, if set, has a
// reason (printable, at most MaxReasonLen bytes) and a valid SPIFFE ID;
// partial names at least one left-out keyset.
func checkOverrides(b *bundlev1.Bundle) error {
	if o := b.GetShrinkOverride(); o != nil {
		if err := checkReason(o.GetReason()); err != nil {
			return fmt.Errorf("shrink_override: %v", err)
		}
		if _, err := trustDomainOf(o.GetForcedBy()); err != nil {
			return fmt.Errorf("shrink_override: forced_by %q: %v", o.GetForcedBy(), err)
		}
	}
	if p := b.GetPartial(); p != nil {
		if err := checkReason(p.GetReason()); err != nil {
			return fmt.Errorf("partial: %v", err)
		}
		if _, err := trustDomainOf(p.GetBuiltBy()); err != nil {
			return fmt.Errorf("partial: built_by %q: %v", p.GetBuiltBy(), err)
		}
		if len(p.GetLeftOut()) == 0 {
			return errors.New("partial: left_out names nothing (a whole build has no partial record)")
		}
		names := make(map[string]bool, len(b.GetKeysets()))
		for _, k := range b.GetKeysets() {
			names[k.GetName()] = true
		}
		for i, l := range p.GetLeftOut() {
			name, _, _ := strings.Cut(l, ":")
			switch {
			case strings.TrimSpace(l) == "" || !utf8.ValidString(l) || strings.ContainsFunc(l, unicode.IsControl):
				return fmt.Errorf("partial: left_out[%d] is empty or not printable", i)
			case names[name]:
				return fmt.Errorf("partial: left_out[%d] names keyset %q, which the bundle holds", i, name)
			}
		}
	}
	return nil
}

func checkReason(s string) error {
	switch {
	case strings.TrimSpace(s) == "":
		return errors.New("no reason")
	case len(s) > MaxReasonLen:
		return fmt.Errorf("reason is %d bytes, more than %d", len(s), MaxReasonLen)
	case !utf8.ValidString(s) || strings.ContainsFunc(s, unicode.IsControl):
		return errors.New("reason is not printable text")
	}
	return nil
}
