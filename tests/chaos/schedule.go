// Package chaos is the chaos soak of the whole chain (issue 16): real
// binaries under tests/framework, a continuous Tink envelope workload in two
// regions with a ledger of every acknowledged ciphertext, and faults from a
// seeded schedule. This file and report.go are its pure core: the schedule
// (which faults, on what, for how long, from a seed) and the analysis of
// what the clients saw (errors by code and fault window, unavailability,
// violations). They import no gRPC and start no process; chaos_test.go runs
// them against the chain.
package chaos

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"time"
)

// Kind is a kind of fault.
type Kind string

// The kinds of fault the schedule injects.
const (
	// KillKMS is kill -9 of one KMS server, restarted when the step heals.
	KillKMS Kind = "kill-kms"
	// RegionDown is kill -9 of every KMS server of one region at once;
	// the other region must keep serving.
	RegionDown Kind = "region-down"
	// KillVoter is kill -9 of one root KMS voter (Target LeaderTarget: the
	// leader at the time), restarted when the step heals.
	KillVoter Kind = "kill-voter"
	// PauseVoter is SIGSTOP of one voter (usually the leader) for longer
	// than the election timeout, then SIGCONT.
	PauseVoter Kind = "pause-voter"
	// KillDistributor is kill -9 of one distributor; restarted, it must
	// unseal from its peers.
	KillDistributor Kind = "kill-distributor"
	// RootTierDown is the whole root tier faulted at once, on purpose past
	// quorum: every voter killed with kill -9 and every distributor paused
	// (SIGSTOP keeps the root key in their RAM). KMS servers that hold a
	// bundle must keep serving.
	RootTierDown Kind = "root-tier-down"
	// IsolateLeader is every voter but the leader paused (SIGSTOP) at
	// once: a leader cut off from its quorum, still running. A write sent
	// straight to it at once, while it may still think it leads, must not
	// be acknowledged (nothing commits without a quorum); it is resolved
	// after the heal like any write of unknown outcome.
	IsolateLeader Kind = "isolate-leader"
	// AuditSinkFail makes one KMS server's audit log refuse every write
	// (RLIMIT_FSIZE at its size: EFBIG): the server refuses every call
	// that would go unaudited (Unavailable, fail-closed), its clients fail
	// over to the region's other server, and it serves again once the
	// writes succeed, with no restart.
	AuditSinkFail Kind = "audit-sink-fail"
	// VoterDeaf is a one-way network partition through the voter's Raft
	// fault proxy: nothing sent to it arrives (a silent blackhole, not a
	// refusal), while what it sends does. A deaf follower stops hearing
	// the leader and campaigns (pre-vote keeps it from deposing anyone); a
	// deaf leader still reaches its followers on the connections it opens.
	VoterDeaf Kind = "voter-deaf"
	// VoterSlow delays everything sent to one voter over Raft by 100 ms
	// plus up to 100 ms of jitter (TCP turns a lossy link into a slow one),
	// about the fast Raft's heartbeat timeout a round trip.
	VoterSlow Kind = "voter-slow"
	// RootUnreachable silently blackholes every KMS server's connections to
	// the root KMS API (through the fault proxies they are given instead
	// of the replicas' addresses) while the root tier itself is healthy: a
	// network partition between the tiers, where calls hang instead of
	// being refused. KMS servers that hold a bundle must keep serving.
	RootUnreachable Kind = "root-unreachable"
)

// Kinds are every kind, in the order the report lists them.
var Kinds = []Kind{KillKMS, RegionDown, KillVoter, PauseVoter, KillDistributor, RootTierDown, IsolateLeader,
	AuditSinkFail, VoterDeaf, VoterSlow, RootUnreachable}

// LeaderTarget is the Target of a voter fault aimed at whichever voter leads
// when the step starts.
const LeaderTarget = "leader"

// Topology names what the schedule may fault.
type Topology struct {
	// KMS lists each region's KMS servers by name ("kms-1").
	KMS map[string][]string
	// Voters are the root KMS voters' Raft IDs; Distributors the
	// distributors' names ("distributor-1").
	Voters, Distributors []string
}

// Validate checks that the topology can take every kind of fault without
// losing what the soak must keep: two regions of at least two KMS servers
// (a region down leaves the other; one server down leaves its peer), at
// least three voters and two distributors (one down leaves a quorum and a
// peer holding the root key).
func (t Topology) Validate() error {
	if len(t.KMS) < 2 {
		return fmt.Errorf("chaos: %d region(s), want at least 2", len(t.KMS))
	}
	for r, ks := range t.KMS {
		if len(ks) < 2 {
			return fmt.Errorf("chaos: region %s has %d KMS server(s), want at least 2", r, len(ks))
		}
	}
	if len(t.Voters) < 3 {
		return fmt.Errorf("chaos: %d voter(s), want at least 3", len(t.Voters))
	}
	if len(t.Distributors) < 2 {
		return fmt.Errorf("chaos: %d distributor(s), want at least 2", len(t.Distributors))
	}
	return nil
}

func (t Topology) regions() []string {
	var out []string
	for r := range t.KMS {
		out = append(out, r)
	}
	slices.Sort(out)
	return out
}

// Action is one fault of a step.
type Action struct {
	Kind Kind
	// Target is what is faulted: "<region>/<kms name>" (KillKMS,
	// AuditSinkFail), a region (RegionDown), a voter ID or LeaderTarget
	// (KillVoter, PauseVoter, VoterDeaf, VoterSlow), a distributor name
	// (KillDistributor); empty for RootTierDown, IsolateLeader and
	// RootUnreachable.
	Target string
	// Early heals the action halfway through the hold instead of at its
	// end: a KMS server restarted while the root tier is still down or
	// unreachable (it must stay not ready, and serve once the root tier is
	// back).
	Early bool
}

func (a Action) String() string {
	s := string(a.Kind)
	if a.Target != "" {
		s += " " + a.Target
	}
	if a.Early {
		s += " (restarted mid-hold)"
	}
	return s
}

// Step is one entry of the schedule: its actions are injected together,
// held for Hold, healed together, and the chain is waited for until every
// component serves again; then the schedule rests for Gap.
type Step struct {
	N       int
	Actions []Action
	Hold    time.Duration
	Gap     time.Duration
}

// Label names the step's kinds, e.g. "root-tier-down+kill-kms".
func (s Step) Label() string {
	var ks []string
	for _, a := range s.Actions {
		ks = append(ks, string(a.Kind))
	}
	return strings.Join(ks, "+")
}

func (s Step) String() string {
	var as []string
	for _, a := range s.Actions {
		as = append(as, a.String())
	}
	return fmt.Sprintf("step %d: %s; hold %s", s.N, strings.Join(as, " + "), s.Hold)
}

// has reports whether the step has an action of kind k.
func (s Step) has(k Kind) bool {
	return slices.ContainsFunc(s.Actions, func(a Action) bool { return a.Kind == k })
}

// DownRegions are the regions whose every KMS server the step takes down.
func (s Step) DownRegions() []string {
	var out []string
	for _, a := range s.Actions {
		if a.Kind == RegionDown {
			out = append(out, a.Target)
		}
	}
	return out
}

// Validate checks the rules every step keeps, whatever the seed:
//   - at most one voter faulted (killed, paused, deaf or slow), unless the
//     step is a deliberate RootTierDown, IsolateLeader or RootUnreachable,
//     which takes no other voter or distributor action;
//   - never every distributor down: at most one killed (a RootTierDown
//     only pauses them, which keeps the root key);
//   - at most one region down, and no other KMS fault in that region; in
//     every other region at least one KMS server stays up (a server whose
//     audit sink fails refuses every call, so it counts as down);
//   - no target faulted twice; Early only on a KillKMS of a RootTierDown
//     or RootUnreachable step.
func (s Step) Validate(t Topology) error {
	voters, dists, root := 0, 0, false
	seen := map[string]bool{}
	downKMS := map[string]int{} // by region
	var downRegions []string
	for _, a := range s.Actions {
		key := string(a.Kind) + ":" + a.Target
		switch a.Kind {
		case KillVoter, PauseVoter, VoterDeaf, VoterSlow:
			key = "voter:" + a.Target
			if a.Target != LeaderTarget && !slices.Contains(t.Voters, a.Target) {
				return fmt.Errorf("chaos: %s: unknown voter %q", s, a.Target)
			}
			voters++
		case KillDistributor:
			if !slices.Contains(t.Distributors, a.Target) {
				return fmt.Errorf("chaos: %s: unknown distributor %q", s, a.Target)
			}
			dists++
		case RootTierDown, IsolateLeader, RootUnreachable:
			if root {
				return fmt.Errorf("chaos: %s: two quorum-loss faults in one step", s)
			}
			root = true
		case RegionDown:
			if _, ok := t.KMS[a.Target]; !ok {
				return fmt.Errorf("chaos: %s: unknown region %q", s, a.Target)
			}
			downRegions = append(downRegions, a.Target)
			downKMS[a.Target] += len(t.KMS[a.Target])
		case KillKMS, AuditSinkFail:
			key = "kms:" + a.Target
			region, name, _ := strings.Cut(a.Target, "/")
			if !slices.Contains(t.KMS[region], name) {
				return fmt.Errorf("chaos: %s: unknown KMS server %q", s, a.Target)
			}
			downKMS[region]++
		default:
			return fmt.Errorf("chaos: %s: unknown kind %q", s, a.Kind)
		}
		if seen[key] {
			return fmt.Errorf("chaos: %s: %s faulted twice", s, a.Target)
		}
		seen[key] = true
		if a.Early && a.Kind != KillKMS {
			return fmt.Errorf("chaos: %s: only a KMS kill may heal early", s)
		}
	}
	if root && (voters > 0 || dists > 0) {
		return fmt.Errorf("chaos: %s: a root-tier-down, isolate-leader or root-unreachable step takes no other voter or distributor fault", s)
	}
	if voters > 1 {
		return fmt.Errorf("chaos: %s: %d voters faulted, at most 1 outside a root-tier-down step", s, voters)
	}
	if dists >= len(t.Distributors) || dists > 1 {
		return fmt.Errorf("chaos: %s: %d distributors down, at most 1", s, dists)
	}
	if len(downRegions) > 1 {
		return fmt.Errorf("chaos: %s: regions %v down together, at most 1", s, downRegions)
	}
	for region, n := range downKMS {
		if slices.Contains(downRegions, region) {
			if n != len(t.KMS[region]) {
				return fmt.Errorf("chaos: %s: region %s down and another fault in it", s, region)
			}
			continue
		}
		if n >= len(t.KMS[region]) {
			return fmt.Errorf("chaos: %s: every KMS server of %s down outside a region-down action", s, region)
		}
	}
	for _, a := range s.Actions {
		if a.Early && !s.has(RootTierDown) && !s.has(RootUnreachable) {
			return fmt.Errorf("chaos: %s: an early restart outside a root-tier-down or root-unreachable step", s)
		}
	}
	return nil
}

// Schedule makes the steps of a seed. The same seed and topology always give
// the same steps in the same order, so a failing run replays with its seed
// (how many steps run depends on the run's duration, not their content).
//
// The first len(Kinds) steps have one primary kind each, in an order drawn
// from the seed, so that even a short run meets every kind; after that the
// primary kind is drawn by weight. A step gets a second, compatible fault
// with probability 2/5: a KMS server of another region (or, in a
// root-tier-down step, one restarted while the root tier is down), a
// distributor, or a paused voter.
type Schedule struct {
	rng   *rand.Rand
	topo  Topology
	first []Kind
	n     int
}

// NewSchedule returns the schedule of seed over t, which must be valid.
func NewSchedule(seed uint64, t Topology) (*Schedule, error) {
	if err := t.Validate(); err != nil {
		return nil, err
	}
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	first := slices.Clone(Kinds)
	rng.Shuffle(len(first), func(i, j int) { first[i], first[j] = first[j], first[i] })
	return &Schedule{rng: rng, topo: t, first: first}, nil
}

// weights are how often each primary kind is drawn after the first round.
var weights = map[Kind]int{KillKMS: 25, RegionDown: 10, KillVoter: 20, PauseVoter: 15, KillDistributor: 15, RootTierDown: 15, IsolateLeader: 10,
	AuditSinkFail: 10, VoterDeaf: 10, VoterSlow: 10, RootUnreachable: 10}

// Next returns the next step.
func (s *Schedule) Next() Step {
	s.n++
	var primary Kind
	if s.n <= len(s.first) {
		primary = s.first[s.n-1]
	} else {
		total := 0
		for _, k := range Kinds {
			total += weights[k]
		}
		x := s.rng.IntN(total)
		for _, k := range Kinds {
			if x < weights[k] {
				primary = k
				break
			}
			x -= weights[k]
		}
	}
	st := Step{N: s.n, Actions: []Action{s.action(primary, nil)}}
	// Holds: long enough for a paused voter to miss several election
	// timeouts and for clients to meet the fault many times.
	st.Hold = time.Duration(1500+s.rng.IntN(2000)) * time.Millisecond
	st.Gap = time.Duration(300+s.rng.IntN(900)) * time.Millisecond
	if s.rng.IntN(5) < 2 {
		if second, ok := s.secondary(st); ok {
			st.Actions = append(st.Actions, second)
		}
	}
	return st
}

// action draws a target for a fault of kind k; avoid are regions it must
// not touch.
func (s *Schedule) action(k Kind, avoid []string) Action {
	pick := func(xs []string) string { return xs[s.rng.IntN(len(xs))] }
	var regions []string
	for _, r := range s.topo.regions() {
		if !slices.Contains(avoid, r) {
			regions = append(regions, r)
		}
	}
	switch k {
	case KillKMS, AuditSinkFail:
		r := pick(regions)
		return Action{Kind: k, Target: r + "/" + pick(s.topo.KMS[r])}
	case RegionDown:
		return Action{Kind: k, Target: pick(regions)}
	case KillVoter, VoterDeaf, VoterSlow:
		if s.rng.IntN(2) == 0 {
			return Action{Kind: k, Target: LeaderTarget}
		}
		return Action{Kind: k, Target: pick(s.topo.Voters)}
	case PauseVoter:
		if s.rng.IntN(4) < 3 {
			return Action{Kind: k, Target: LeaderTarget}
		}
		return Action{Kind: k, Target: pick(s.topo.Voters)}
	case KillDistributor:
		return Action{Kind: k, Target: pick(s.topo.Distributors)}
	case IsolateLeader, RootUnreachable:
		return Action{Kind: k}
	}
	return Action{Kind: RootTierDown}
}

// secondary draws a second fault compatible with st's first, if there is
// one.
func (s *Schedule) secondary(st Step) (Action, bool) {
	first := st.Actions[0]
	var choices []Kind
	switch first.Kind {
	case RootTierDown, RootUnreachable:
		a := s.action(KillKMS, nil)
		a.Early = true
		return a, true
	case RegionDown:
		choices = []Kind{KillKMS, AuditSinkFail, KillVoter, PauseVoter, VoterDeaf, VoterSlow, KillDistributor}
	case IsolateLeader:
		choices = []Kind{KillKMS, AuditSinkFail, RegionDown}
	case KillVoter, PauseVoter, VoterDeaf, VoterSlow:
		choices = []Kind{KillKMS, AuditSinkFail, RegionDown, KillDistributor}
	case KillDistributor:
		choices = []Kind{KillKMS, AuditSinkFail, RegionDown, KillVoter, PauseVoter, VoterDeaf, VoterSlow}
	case KillKMS, AuditSinkFail:
		choices = []Kind{KillVoter, PauseVoter, VoterDeaf, VoterSlow, KillDistributor}
	}
	k := choices[s.rng.IntN(len(choices))]
	a := s.action(k, st.DownRegions())
	next := Step{N: st.N, Actions: append(slices.Clone(st.Actions), a), Hold: st.Hold}
	if next.Validate(s.topo) != nil {
		return Action{}, false
	}
	return a, true
}
