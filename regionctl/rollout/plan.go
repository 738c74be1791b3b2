package rollout

import (
	"fmt"
	"slices"
	"strings"
	"time"

	regionname "github.com/cairnkms/cairn/internal/region"
)

// StageKind says which part of the rollout a stage is.
type StageKind string

const (
	// StageCanary is the first stage: Options.Canary servers of the first
	// region.
	StageCanary StageKind = "canary"
	// StageRegion is the rest of the first region.
	StageRegion StageKind = "region"
	// StageWave is up to Options.WaveSize further regions, whole.
	StageWave StageKind = "wave"
)

// Target is the servers of one region a stage covers.
type Target struct {
	Region  string   `json:"region"`
	Servers []string `json:"servers"`
}

// Stage is one step of a Plan.
type Stage struct {
	Kind    StageKind     `json:"kind"`
	Name    string        `json:"name"`
	Targets []Target      `json:"targets"`
	Bake    time.Duration `json:"bake"`
}

// Servers returns the stage's servers, in target order.
func (s Stage) Servers() []string {
	var out []string
	for _, t := range s.Targets {
		out = append(out, t.Servers...)
	}
	return out
}

// Regions returns the stage's regions, in order.
func (s Stage) Regions() []string {
	var out []string
	for _, t := range s.Targets {
		out = append(out, t.Region)
	}
	return out
}

// Plan is a validated rollout plan; build it with NewPlan. Printing it
// (String) is what `regionctl rollout start --dry-run` shows before
// anything is applied.
type Plan struct {
	Change     Change     `json:"change"`
	Regions    []string   `json:"regions"`
	Stages     []Stage    `json:"stages"`
	Thresholds Thresholds `json:"thresholds"`
}

// PlanError is NewPlan's refusal: every problem found. It matches
// ErrInvalidPlan.
type PlanError struct {
	Problems []string
}

func (e *PlanError) Error() string {
	return "rollout: invalid plan: " + strings.Join(e.Problems, "; ")
}

// Unwrap returns ErrInvalidPlan.
func (e *PlanError) Unwrap() error { return ErrInvalidPlan }

// NewPlan validates change against fleet (region → its KMS servers, in the
// order canaries are picked) and cuts it into stages: canary → rest of the
// first region → waves of the other regions. Regions of fleet that the
// change has no bundle for are not touched. It refuses (a *PlanError listing
// every problem) when: the change has no bundle, a bundle is malformed or
// duplicated, its region is invalid or has no servers, who or why is
// missing, a server name is empty or appears twice (in one region or two),
// Options.Regions is not exactly the bundles' regions, a keyset to publish
// names a region outside the plan, Canary or WaveSize or a bake is out of
// range, a threshold is invalid, or the plan would touch every region at
// once.
func NewPlan(change Change, fleet map[string][]string, opts Options) (Plan, error) {
	var problems []string
	bad := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }

	if strings.TrimSpace(change.By) == "" {
		bad("who started the rollout is missing")
	}
	if strings.TrimSpace(change.Why) == "" {
		bad("why is missing")
	}
	if len(change.Bundles) == 0 {
		bad("the change has no bundle")
	}
	bundles := map[string]bool{}
	for _, b := range change.Bundles {
		if err := regionname.ValidName(b.Region); err != nil {
			bad("bundle: %v", err)
			continue
		}
		if bundles[b.Region] {
			bad("two bundles for region %s", b.Region)
		}
		bundles[b.Region] = true
		if err := b.validate(); err != nil {
			bad("%v", err)
		}
	}

	regions := slices.Clone(opts.Regions)
	if len(regions) == 0 {
		for r := range bundles {
			regions = append(regions, r)
		}
		slices.Sort(regions)
	}
	seenRegion := map[string]bool{}
	var unique []string
	for _, r := range regions {
		switch {
		case seenRegion[r]:
			bad("region %s is listed twice in the region order", r)
			continue
		case !bundles[r]:
			bad("region %s has no bundle", r)
		}
		seenRegion[r] = true
		unique = append(unique, r)
	}
	for _, b := range change.Bundles {
		if bundles[b.Region] && !seenRegion[b.Region] {
			bad("the bundle for region %s is for a region missing from the region order", b.Region)
		}
	}

	owner := map[string]string{}
	for _, r := range unique {
		servers, ok := fleet[r]
		if !ok || len(servers) == 0 {
			bad("region %s has no servers in the fleet", r)
		}
		for _, s := range servers {
			switch {
			case strings.TrimSpace(s) == "":
				bad("region %s has a server with an empty name", r)
			case owner[s] == r:
				bad("server %s is listed twice in region %s", s, r)
			case owner[s] != "":
				bad("server %s is listed in regions %s and %s", s, owner[s], r)
			default:
				owner[s] = r
			}
		}
	}
	for _, k := range change.Keysets {
		if k.Name == "" {
			bad("a keyset to publish has no name")
		}
		if len(k.Regions) == 0 {
			bad("keyset %s to publish has no region", k.Name)
		}
		for _, r := range k.Regions {
			if !seenRegion[r] {
				bad("keyset %s to publish serves region %s, which the rollout does not cover", k.Name, r)
			}
		}
	}

	canary := opts.Canary
	if canary == 0 {
		canary = DefaultCanary
	}
	wave := opts.WaveSize
	if wave == 0 {
		wave = DefaultWaveSize
	}
	bake := func(d, def time.Duration, what string) time.Duration {
		switch {
		case d < 0:
			bad("%s bake %v is negative", what, d)
		case d == 0:
			return def
		}
		return d
	}
	canaryBake := bake(opts.CanaryBake, DefaultCanaryBake, "canary")
	regionBake := bake(opts.RegionBake, DefaultRegionBake, "region")
	waveBake := bake(opts.WaveBake, DefaultWaveBake, "wave")
	if canary < 0 {
		bad("canary count %d is negative", canary)
	}
	if wave < 0 {
		bad("wave size %d is negative", wave)
	}
	if len(regions) >= 2 && wave >= len(regions) {
		bad("wave size %d would roll out to all %d regions at once; never all regions at once", wave, len(regions))
	}
	if len(regions) > 0 {
		n := len(fleet[regions[0]])
		switch {
		case n == 1 && canary > 1:
			bad("canary count %d exceeds the %d server(s) of the first region %s", canary, n, regions[0])
		case n > 1 && canary >= n:
			bad("canary count %d would be the whole first region %s (%d servers); the canary must be smaller", canary, regions[0], n)
		}
	}
	th := opts.Thresholds.withDefaults()
	if err := th.Validate(); err != nil {
		bad("%s", strings.TrimPrefix(err.Error(), ErrInvalidPlan.Error()+": "))
	}
	if len(problems) > 0 {
		return Plan{}, &PlanError{Problems: problems}
	}

	first := regions[0]
	servers := fleet[first]
	p := Plan{Change: change, Regions: regions, Thresholds: th}
	p.Change.Bundles = slices.Clone(change.Bundles)
	p.Change.Keysets = slices.Clone(change.Keysets)
	p.Stages = append(p.Stages, Stage{Kind: StageCanary, Name: "canary", Bake: canaryBake,
		Targets: []Target{{Region: first, Servers: slices.Clone(servers[:canary])}}})
	if rest := servers[canary:]; len(rest) > 0 {
		p.Stages = append(p.Stages, Stage{Kind: StageRegion, Name: "region " + first, Bake: regionBake,
			Targets: []Target{{Region: first, Servers: slices.Clone(rest)}}})
	}
	for i, others := 0, regions[1:]; len(others) > 0; i++ {
		n := min(wave, len(others))
		st := Stage{Kind: StageWave, Name: fmt.Sprintf("wave %d", i+1), Bake: waveBake}
		for _, r := range others[:n] {
			st.Targets = append(st.Targets, Target{Region: r, Servers: slices.Clone(fleet[r])})
		}
		p.Stages = append(p.Stages, st)
		others = others[n:]
	}
	return p, nil
}

// regionOf returns the region of server, or "".
func (p Plan) regionOf(server string) string {
	for _, st := range p.Stages {
		for _, t := range st.Targets {
			if slices.Contains(t.Servers, server) {
				return t.Region
			}
		}
	}
	return ""
}

// lastStageOf returns the index of the last stage that covers region, or -1.
func (p Plan) lastStageOf(region string) int {
	last := -1
	for i, st := range p.Stages {
		if slices.Contains(st.Regions(), region) {
			last = i
		}
	}
	return last
}

// String prints the plan, one stage a line, e.g.
//
//	rollout by alice: rotate demo/notes
//	  bundles: us-east serial 7 sha256 0a0a0a0a0a0a; eu-west serial 4 sha256 0b0b0b0b0b0b
//	  stage 1/3 canary: us-east [kms-1]; bake 10m0s
//	  stage 2/3 region us-east: us-east [kms-2 kms-3]; bake 30m0s
//	  stage 3/3 wave 1: eu-west [kms-1 kms-2]; bake 1h0m0s
//	  gates: every server ready; error rate up by at most 0.001; p99 at most 1.5x max(before, 5ms); every golden probe decrypts
//	  publish after stage 3: demo/notes
func (p Plan) String() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "rollout by %s: %s\n", p.Change.By, p.Change.Why)
	var bs []string
	for _, r := range p.Regions {
		bs = append(bs, p.Change.bundle(r).String())
	}
	fmt.Fprintf(&sb, "  bundles: %s\n", strings.Join(bs, "; "))
	for i, st := range p.Stages {
		var ts []string
		for _, t := range st.Targets {
			ts = append(ts, fmt.Sprintf("%s [%s]", t.Region, strings.Join(t.Servers, " ")))
		}
		fmt.Fprintf(&sb, "  stage %d/%d %s: %s; bake %v\n", i+1, len(p.Stages), st.Name, strings.Join(ts, ", "), st.Bake)
	}
	t := p.Thresholds
	fmt.Fprintf(&sb, "  gates: every server ready; error rate up by at most %v; p99 at most %vx max(before, %v); every golden probe decrypts", t.MaxErrorRateIncrease, t.MaxP99Ratio, t.P99Floor)
	for i := range p.Stages {
		if ks := p.publishAfter(i); len(ks) > 0 {
			fmt.Fprintf(&sb, "\n  publish after stage %d: %s", i+1, strings.Join(ks, ", "))
		}
	}
	return sb.String()
}

// publishAfter returns the keysets whose regions are all covered once stage
// i has passed, and not before.
func (p Plan) publishAfter(i int) []string {
	var out []string
	for _, k := range p.Change.Keysets {
		last := -1
		for _, r := range k.Regions {
			last = max(last, p.lastStageOf(r))
		}
		if last == i {
			out = append(out, k.Name)
		}
	}
	return out
}
