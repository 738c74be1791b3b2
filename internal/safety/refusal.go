package safety

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Step is the lifecycle step a Refusal refuses.
type Step uint8

const (
	// StepPromote makes a version primary (record or bundle).
	StepPromote Step = iota + 1
	// StepRetire takes a version out of the decrypt set: disable, schedule
	// destroy, drop from a bundle, or drop the keyset.
	StepRetire
)

// String returns the step as the verb phrase refusals use.
func (s Step) String() string {
	switch s {
	case StepPromote:
		return "become primary"
	case StepRetire:
		return "leave the decrypt set"
	}
	return fmt.Sprintf("step(%d)", uint8(s))
}

// Blocker is one reason a step is refused.
type Blocker struct {
	// Region and Server name what blocks: both empty for the record itself,
	// Server empty for a whole region.
	Region, Server string
	// Reason says why, in words, e.g. "used it at 2026-03-01T10:00:00Z".
	Reason string
	// Earliest is when this blocker lifts, if nothing else changes; zero when
	// it depends on something unknown or never lifts by itself.
	Earliest time.Time
}

// String returns "region R server S <reason>", "region R <reason>" or the
// bare reason.
func (b Blocker) String() string {
	switch {
	case b.Server != "":
		return fmt.Sprintf("region %s server %s %s", b.Region, b.Server, b.Reason)
	case b.Region != "":
		return fmt.Sprintf("region %s %s", b.Region, b.Reason)
	}
	return b.Reason
}

// Refusal is the Safety Condition refusing one step for one version. It
// matches ErrUnsafe.
type Refusal struct {
	// Keyset and KeyID name the version.
	Keyset string
	KeyID  uint32
	// Step is the refused step.
	Step Step
	// Blockers are every reason found, the record's first, then sorted by
	// region, server and reason.
	Blockers []Blocker
	// Earliest is the earliest time the step may be safe if nothing else
	// changes (the latest of the blockers'); zero when any blocker has none.
	Earliest time.Time
}

// maxListed bounds the blockers and refusals an error message lists; the
// slices always hold all of them.
const maxListed = 5

// Error names the version, the blockers (at most maxListed) and the earliest
// safe time in RFC 3339 UTC, e.g.
//
//	safety: keyset "demo/notes" version 3 cannot leave the decrypt set: region us-east server kms-2 used it at 2026-03-01T10:00:00Z; earliest safe time 2026-03-01T10:10:00Z
func (r *Refusal) Error() string { return "safety: " + r.text() }

// Unwrap returns ErrUnsafe.
func (r *Refusal) Unwrap() error { return ErrUnsafe }

// Regions returns the regions named by the blockers, sorted, without
// duplicates.
func (r *Refusal) Regions() []string {
	var out []string
	for _, b := range r.Blockers {
		if b.Region != "" {
			out = append(out, b.Region)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Servers returns the servers named by the blockers as "region/server",
// sorted, without duplicates.
func (r *Refusal) Servers() []string {
	var out []string
	for _, b := range r.Blockers {
		if b.Server != "" {
			out = append(out, b.Region+"/"+b.Server)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func (r *Refusal) text() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "keyset %q version %d cannot %s: ", r.Keyset, r.KeyID, r.Step)
	for i, b := range r.Blockers {
		if i == maxListed {
			fmt.Fprintf(&sb, "; and %d more", len(r.Blockers)-maxListed)
			break
		}
		if i > 0 {
			sb.WriteString("; ")
		}
		sb.WriteString(b.String())
	}
	if r.Earliest.IsZero() {
		sb.WriteString("; earliest safe time unknown")
	} else {
		sb.WriteString("; earliest safe time " + stampCeil(r.Earliest))
	}
	return sb.String()
}

// add records a blocker.
func (r *Refusal) add(region, server, reason string, earliest time.Time) {
	r.Blockers = append(r.Blockers, Blocker{Region: region, Server: server, Reason: reason, Earliest: earliest})
}

// done sorts the blockers, computes Earliest and returns r, or nil when
// nothing blocks.
func (r *Refusal) done() *Refusal {
	if len(r.Blockers) == 0 {
		return nil
	}
	slices.SortStableFunc(r.Blockers, func(a, b Blocker) int {
		return cmp.Or(cmp.Compare(a.Region, b.Region), cmp.Compare(a.Server, b.Server), cmp.Compare(a.Reason, b.Reason))
	})
	r.Earliest = time.Time{}
	for i, b := range r.Blockers {
		if b.Earliest.IsZero() {
			r.Earliest = time.Time{}
			break
		}
		if i == 0 || b.Earliest.After(r.Earliest) {
			r.Earliest = b.Earliest
		}
	}
	return r
}

// Refusals is several refusals (CheckBundle), in keyset, key ID and step
// order. It matches ErrUnsafe and, through Unwrap, each *Refusal
// (errors.As finds the first).
type Refusals []*Refusal

// Error lists at most maxListed refusals.
func (rs Refusals) Error() string {
	if len(rs) == 1 {
		return rs[0].Error()
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "safety: %d refusals: ", len(rs))
	for i, r := range rs {
		if i == maxListed {
			fmt.Fprintf(&sb, " | and %d more", len(rs)-maxListed)
			break
		}
		if i > 0 {
			sb.WriteString(" | ")
		}
		sb.WriteString(r.text())
	}
	return sb.String()
}

// Unwrap returns every refusal.
func (rs Refusals) Unwrap() []error {
	out := make([]error, len(rs))
	for i, r := range rs {
		out[i] = r
	}
	return out
}

// stamp formats t as RFC 3339 UTC, truncated to the second.
func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339) }

// stampCeil formats t as RFC 3339 UTC rounded up to the second, so that a
// printed earliest safe time is never before the real one.
func stampCeil(t time.Time) string {
	if tr := t.Truncate(time.Second); tr.Before(t) {
		t = tr.Add(time.Second)
	}
	return stamp(t)
}
