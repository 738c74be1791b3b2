package bundle

import (
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/cairnkms/cairn/internal/identity"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
)

// MaxQuotas bounds a bundle's quotas: each call's caller is matched against
// them (once per caller, not per call), first match wins.
const MaxQuotas = 1000

// checkQuotas checks b's per-caller quotas: each names a SPIFFE ID pattern
// that parses in td, once; a burst needs a rate; the default quota names no
// pattern.
func checkQuotas(b *bundlev1.Bundle, td spiffeid.TrustDomain) error {
	qs := b.GetQuotas()
	if len(qs) > MaxQuotas {
		return fmt.Errorf("%d quotas, more than %d", len(qs), MaxQuotas)
	}
	seen := make(map[identity.Pattern]int, len(qs))
	for i, q := range qs {
		if q.GetPattern() == "" {
			return fmt.Errorf("quota %d: no pattern (a quota for every caller is default_quota)", i)
		}
		p, err := identity.ParsePattern(q.GetPattern(), td)
		if err != nil {
			return fmt.Errorf("quota %d: %v", i, err)
		}
		if j, dup := seen[p]; dup {
			return fmt.Errorf("quota %d: pattern %q is quota %d's already (the first match wins, so it would never apply)", i, q.GetPattern(), j)
		}
		seen[p] = i
		if err := checkQuota(q); err != nil {
			return fmt.Errorf("quota %d (%q): %v", i, q.GetPattern(), err)
		}
	}
	if d := b.GetDefaultQuota(); d != nil {
		if d.GetPattern() != "" {
			return fmt.Errorf("default_quota: has pattern %q; it applies to every caller no quota matches", d.GetPattern())
		}
		if err := checkQuota(d); err != nil {
			return fmt.Errorf("default_quota: %v", err)
		}
	}
	return nil
}

func checkQuota(q *bundlev1.Quota) error {
	if q.GetBurst() > 0 && q.GetRequestsPerSecond() == 0 {
		return errors.New("burst without requests_per_second")
	}
	return nil
}
