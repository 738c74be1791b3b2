package devca

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// globalRegion is the region segment of components not bound to a region.
const globalRegion = "global"

// Tiers: the first path segment of every Cairn SPIFFE ID
// spiffe://<trust-domain>/<tier>/<region>/<name>.
const (
	tierDistributor = "distributor"
	tierRootKMS     = "rootkms"
	tierKMS         = "kms"
	tierOfficer     = "officer"
	tierRegionctl   = "regionctl"
	tierClient      = "client"
)

// maxCount bounds every count in a Plan and the number of regions.
const maxCount = 100

// maxRegionLen keeps a region usable as a DNS label.
const maxRegionLen = 63

// Plan describes which identities a local chain holds.
type Plan struct {
	// TrustDomain is the trust domain of every identity.
	TrustDomain spiffeid.TrustDomain
	// Regions are the regions that get KMS nodes and a demo client, in
	// order. Each is a non-empty path segment of [a-z0-9-], unique, and not
	// "global".
	Regions []string
	// Distributors is the number of distributors.
	Distributors int
	// RootKMS is the number of root KMS voters.
	RootKMS int
	// KMSPerRegion is the number of KMS nodes in each region.
	KMSPerRegion int
	// Officers is the number of security officers for unseal ceremonies.
	Officers int
}

// DefaultPlan returns the default local chain in td: regions us-east and
// eu-west, 3 distributors, 3 root KMS voters, 2 KMS nodes per region and 5
// officers, plus regionctl and one demo client per region.
func DefaultPlan(td spiffeid.TrustDomain) Plan {
	return Plan{
		TrustDomain:  td,
		Regions:      []string{"us-east", "eu-west"},
		Distributors: 3,
		RootKMS:      3,
		KMSPerRegion: 2,
		Officers:     5,
	}
}

// Validate reports every problem with p, or nil if it has none. Counts must
// be between 1 and 100, as must the number of regions.
func (p Plan) Validate() error {
	var errs []error
	if p.TrustDomain.IsZero() {
		errs = append(errs, errors.New("devca: plan has no trust domain"))
	}
	switch {
	case len(p.Regions) == 0:
		errs = append(errs, errors.New("devca: plan has no regions"))
	case len(p.Regions) > maxCount:
		errs = append(errs, fmt.Errorf("devca: plan has %d regions, at most %d allowed", len(p.Regions), maxCount))
	}
	seen := make(map[string]bool, len(p.Regions))
	for _, r := range p.Regions {
		if err := validateRegion(r); err != nil {
			errs = append(errs, err)
			continue
		}
		if seen[r] {
			errs = append(errs, fmt.Errorf("devca: region %q listed twice", r))
		}
		seen[r] = true
	}
	for _, c := range []struct {
		name string
		n    int
	}{
		{"distributors", p.Distributors},
		{"root KMS voters", p.RootKMS},
		{"KMS nodes per region", p.KMSPerRegion},
		{"officers", p.Officers},
	} {
		if c.n < 1 || c.n > maxCount {
			errs = append(errs, fmt.Errorf("devca: plan has %d %s, want 1 to %d", c.n, c.name, maxCount))
		}
	}
	return errors.Join(errs...)
}

func validateRegion(r string) error {
	switch {
	case r == "":
		return errors.New("devca: empty region")
	case r == globalRegion:
		return fmt.Errorf("devca: region %q is reserved for components not bound to a region", r)
	case len(r) > maxRegionLen:
		return fmt.Errorf("devca: region %q is longer than %d characters", r, maxRegionLen)
	}
	for i := 0; i < len(r); i++ {
		c := r[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("devca: region %q has character %q; allowed are a-z, 0-9 and -", r, c)
		}
	}
	return nil
}

// IDs returns every identity of the plan, in this order: distributors, root
// KMS voters, KMS nodes region by region, officers, regionctl, and the demo
// clients region by region. It panics if p is invalid; call Validate first.
func (p Plan) IDs() []spiffeid.ID {
	if err := p.Validate(); err != nil {
		panic(err)
	}
	ids := make([]spiffeid.ID, 0, p.Distributors+p.RootKMS+len(p.Regions)*(p.KMSPerRegion+1)+p.Officers+1)
	add := func(tier, region, name string) {
		id, err := spiffeid.FromSegments(p.TrustDomain, tier, region, name)
		if err != nil {
			panic(fmt.Sprintf("devca: valid plan made invalid ID: %v", err))
		}
		ids = append(ids, id)
	}
	numbered := func(tier, region string, n int) {
		for i := 1; i <= n; i++ {
			add(tier, region, fmt.Sprintf("%s-%d", tier, i))
		}
	}
	numbered(tierDistributor, globalRegion, p.Distributors)
	numbered(tierRootKMS, globalRegion, p.RootKMS)
	for _, r := range p.Regions {
		numbered(tierKMS, r, p.KMSPerRegion)
	}
	numbered(tierOfficer, globalRegion, p.Officers)
	add(tierRegionctl, globalRegion, "regionctl")
	for _, r := range p.Regions {
		add(tierClient, r, "demo")
	}
	return ids
}

// LeafPaths returns where [WriteChain] keeps the leaf of id under dir:
// dir/<tier>/<region>/<name>/cert.pem and key.pem, one directory level per
// path segment of id. SPIFFE IDs have no "." or ".." segments, so the paths
// stay inside dir.
func LeafPaths(dir string, id spiffeid.ID) (certPath, keyPath string) {
	leafDir := filepath.Join(append([]string{dir}, strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")...)...)
	return filepath.Join(leafDir, "cert.pem"), filepath.Join(leafDir, "key.pem")
}
