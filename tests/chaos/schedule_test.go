package chaos

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func testTopology() Topology {
	return Topology{
		KMS:          map[string][]string{"eu-west": {"kms-1", "kms-2"}, "us-east": {"kms-1", "kms-2"}},
		Voters:       []string{"rootkms-1", "rootkms-2", "rootkms-3"},
		Distributors: []string{"distributor-1", "distributor-2", "distributor-3"},
	}
}

func steps(t *testing.T, seed uint64, n int) []Step {
	t.Helper()
	s, err := NewSchedule(seed, testTopology())
	if err != nil {
		t.Fatal(err)
	}
	var out []Step
	for range n {
		out = append(out, s.Next())
	}
	return out
}

// A seed replays: the same steps in the same order.
func TestScheduleReplaysBySeed(t *testing.T) {
	a, b := steps(t, 42, 200), steps(t, 42, 200)
	if diff := cmp.Diff(a, b); diff != "" {
		t.Errorf("two schedules of seed 42 differ (-first +second):\n%s", diff)
	}
	if c := steps(t, 43, 200); cmp.Equal(a, c) {
		t.Errorf("seeds 42 and 43 gave the same 200 steps")
	}
}

// Every step of many seeds keeps the rules, the first round meets every
// kind, and over a long schedule every kind, secondary faults and early
// restarts all occur.
func TestScheduleKeepsTheRules(t *testing.T) {
	topo := testTopology()
	seen := map[Kind]int{}
	secondaries, early := 0, 0
	for seed := uint64(1); seed <= 50; seed++ {
		ss := steps(t, seed, 300)
		var first []Kind
		for _, s := range ss[:len(Kinds)] {
			first = append(first, s.Actions[0].Kind)
		}
		slices.Sort(first)
		want := slices.Clone(Kinds)
		slices.Sort(want)
		if !slices.Equal(first, want) {
			t.Errorf("seed %d: first round's kinds %v, want each of %v once", seed, first, want)
		}
		for _, s := range ss {
			if err := s.Validate(topo); err != nil {
				t.Errorf("seed %d: %v", seed, err)
			}
			if s.Hold < 1500*time.Millisecond || s.Hold > 3500*time.Millisecond {
				t.Errorf("seed %d: %s: hold %s, want within [1.5s, 3.5s]", seed, s, s.Hold)
			}
			if len(s.Actions) > 1 {
				secondaries++
			}
			for _, a := range s.Actions {
				seen[a.Kind]++
				if a.Early {
					early++
				}
			}
		}
	}
	for _, k := range Kinds {
		if seen[k] == 0 {
			t.Errorf("kind %s never scheduled", k)
		}
	}
	if secondaries == 0 || early == 0 {
		t.Errorf("%d steps with a second fault and %d early restarts, want some of each", secondaries, early)
	}
}

// Validate refuses what the soak must never do by accident.
func TestStepValidateRefuses(t *testing.T) {
	topo := testTopology()
	for _, tc := range []struct {
		name    string
		actions []Action
		want    string
	}{
		{"two voters down", []Action{{Kind: KillVoter, Target: "rootkms-1"}, {Kind: PauseVoter, Target: "rootkms-2"}}, "2 voters faulted"},
		{"a voter down and another deaf", []Action{{Kind: KillVoter, Target: "rootkms-1"}, {Kind: VoterDeaf, Target: "rootkms-2"}}, "2 voters faulted"},
		{"a slow voter also paused", []Action{{Kind: VoterSlow, Target: "rootkms-1"}, {Kind: PauseVoter, Target: "rootkms-1"}}, "faulted twice"},
		{"a server killed and its audit sink failing", []Action{{Kind: AuditSinkFail, Target: "us-east/kms-1"}, {Kind: KillKMS, Target: "us-east/kms-1"}}, "faulted twice"},
		{"a region's every server refusing or killed", []Action{{Kind: AuditSinkFail, Target: "us-east/kms-1"}, {Kind: KillKMS, Target: "us-east/kms-2"}}, "every KMS server"},
		{"a region down and its audit sink failing", []Action{{Kind: RegionDown, Target: "us-east"}, {Kind: AuditSinkFail, Target: "us-east/kms-2"}}, "another fault"},
		{"root unreachable and a voter", []Action{{Kind: RootUnreachable}, {Kind: VoterSlow, Target: LeaderTarget}}, "root-unreachable"},
		{"root unreachable and the root tier", []Action{{Kind: RootUnreachable}, {Kind: RootTierDown}}, "two quorum-loss faults"},
		{"both regions down", []Action{{Kind: RegionDown, Target: "us-east"}, {Kind: RegionDown, Target: "eu-west"}}, "down together"},
		{"a region's every server killed", []Action{{Kind: KillKMS, Target: "us-east/kms-1"}, {Kind: KillKMS, Target: "us-east/kms-2"}}, "every KMS server"},
		{"root tier and a voter", []Action{{Kind: RootTierDown}, {Kind: KillVoter, Target: LeaderTarget}}, "root-tier-down"},
		{"root tier and a distributor", []Action{{Kind: RootTierDown}, {Kind: KillDistributor, Target: "distributor-1"}}, "root-tier-down"},
		{"two distributors", []Action{{Kind: KillDistributor, Target: "distributor-1"}, {Kind: KillDistributor, Target: "distributor-2"}}, "distributors down"},
		{"early outside root tier", []Action{{Kind: KillKMS, Target: "us-east/kms-1", Early: true}}, "early restart"},
		{"unknown server", []Action{{Kind: KillKMS, Target: "us-east/kms-9"}}, "unknown KMS server"},
		{"region down and a server in it", []Action{{Kind: RegionDown, Target: "us-east"}, {Kind: KillKMS, Target: "us-east/kms-1"}}, "another fault"},
		{"isolated leader and a voter", []Action{{Kind: IsolateLeader}, {Kind: PauseVoter, Target: "rootkms-1"}}, "isolate-leader"},
		{"isolated leader and a distributor", []Action{{Kind: IsolateLeader}, {Kind: KillDistributor, Target: "distributor-1"}}, "isolate-leader"},
		{"isolated leader and the root tier", []Action{{Kind: IsolateLeader}, {Kind: RootTierDown}}, "two quorum-loss faults"},
		{"early in an isolated-leader step", []Action{{Kind: IsolateLeader}, {Kind: KillKMS, Target: "us-east/kms-1", Early: true}}, "early restart"},
	} {
		err := Step{N: 1, Actions: tc.actions}.Validate(topo)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Validate = %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
	ok := Step{N: 1, Actions: []Action{{Kind: RootTierDown}, {Kind: KillKMS, Target: "eu-west/kms-2", Early: true}}}
	if err := ok.Validate(topo); err != nil {
		t.Errorf("root tier down with an early KMS restart: Validate = %v, want nil", err)
	}
	isolated := Step{N: 1, Actions: []Action{{Kind: IsolateLeader}, {Kind: RegionDown, Target: "us-east"}}}
	if err := isolated.Validate(topo); err != nil {
		t.Errorf("an isolated leader with a region down: Validate = %v, want nil", err)
	}
	cut := Step{N: 1, Actions: []Action{{Kind: RootUnreachable}, {Kind: KillKMS, Target: "us-east/kms-1", Early: true}}}
	if err := cut.Validate(topo); err != nil {
		t.Errorf("the root unreachable with an early KMS restart: Validate = %v, want nil", err)
	}
	sinkAndDeaf := Step{N: 1, Actions: []Action{{Kind: AuditSinkFail, Target: "eu-west/kms-1"}, {Kind: VoterDeaf, Target: LeaderTarget}}}
	if err := sinkAndDeaf.Validate(topo); err != nil {
		t.Errorf("an audit sink failing with a deaf leader: Validate = %v, want nil", err)
	}
}

// Analyze excuses only errors a region-down window explains (during the
// window, no grace after it), allows a refusal of a ciphertext whose
// version no longer decrypts only past its TTL and after the version's
// retirement, which came no earlier than the TTL's end, and measures
// unavailability from a failure's start to the next success's end.
func TestAnalyze(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	down := Window{Step: Step{N: 1, Actions: []Action{{Kind: RegionDown, Target: "us-east"}}}, Start: at(10), End: at(14)}
	root := Window{Step: Step{N: 2, Actions: []Action{{Kind: RootTierDown}}}, Start: at(20), End: at(24)}
	kill := Window{Step: Step{N: 3, Actions: []Action{{Kind: KillKMS, Target: "us-east/kms-2"}}}, Start: at(50), End: at(53)}
	other := Window{Step: Step{N: 4, Actions: []Action{{Kind: KillKMS, Target: "us-east/kms-1"}}}, Start: at(54), End: at(64)}
	ops := []Op{
		{Client: 1, Region: "us-east", Kind: Encrypt, Start: at(9), End: at(9.1), Code: "OK"},
		{Client: 1, Region: "us-east", Kind: Encrypt, Start: at(11), End: at(16), Code: "Unavailable"}, // excused
		{Client: 1, Region: "us-east", Kind: Decrypt, Start: at(16.5), End: at(16.6), Code: "OK"},
		{Client: 1, Region: "us-east", Kind: Decrypt, Start: at(12), End: at(12.1), Code: "Unavailable", Fallback: true}, // not excused: falls back
		// Past its TTL, its version (6) retired at 11: the fallback region
		// may refuse it, so only the client's own region must answer.
		{Client: 1, Region: "us-east", Keyset: "ks", Kind: Decrypt, Start: at(12), End: at(12.1), Code: "Unavailable", Fallback: true, Made: at(1), KeyID: 6}, // excused
		{Client: 2, Region: "eu-west", Kind: Encrypt, Start: at(12), End: at(12.1), Code: "Unavailable"},                                                      // not excused: other region
		{Client: 2, Region: "eu-west", Kind: Encrypt, Start: at(21), End: at(21.2), Code: "DeadlineExceeded"},                                                 // root tier: not excused
		{Client: 2, Region: "eu-west", Kind: Encrypt, Start: at(30), End: at(30.1), Code: "OK"},
		{Client: 2, Region: "eu-west", Kind: Encrypt, Start: at(40), End: at(40.1), Code: "Internal"}, // no fault
		{Client: 2, Region: "eu-west", Kind: Encrypt, Start: at(41), End: at(41.1), Code: "OK"},
		{Client: 3, Region: "us-east", Kind: Encrypt, Start: at(17), End: at(17.1), Code: "Unavailable"}, // after the window: no grace
		{Client: 3, Region: "us-east", Kind: Encrypt, Start: at(19.5), End: at(19.6), Code: "Unavailable"},
		{Client: 3, Region: "us-east", Kind: Encrypt, Start: at(30), End: at(30.1), Code: "OK"},
		// One KMS server of the region down: its peer must answer.
		{Client: 4, Region: "us-east", Kind: Encrypt, Start: at(54.5), End: at(54.6), Code: "Unavailable"},
		{Client: 4, Region: "us-east", Kind: Encrypt, Start: at(58.5), End: at(58.6), Code: "Unavailable"},
		{Client: 4, Region: "us-east", Kind: Encrypt, Start: at(59), End: at(59.1), Code: "OK"},
		// Version 7 of ks was retired at 110, version 8 at 105; the TTL is 8 s.
		{Client: 5, Region: "ap-south", Keyset: "ks", Kind: Decrypt, Start: at(110.5), End: at(111), Code: "NotFound", Made: at(100), KeyID: 7}, // allowed
		{Client: 5, Region: "ap-south", Keyset: "ks", Kind: Decrypt, Start: at(104.9), End: at(105), Code: "NotFound", Made: at(100), KeyID: 7}, // before the retirement
		{Client: 5, Region: "ap-south", Keyset: "ks", Kind: Decrypt, Start: at(119.9), End: at(120), Code: "NotFound", Made: at(100), KeyID: 8}, // retired within the TTL
		{Client: 5, Region: "ap-south", Keyset: "ks", Kind: Replay, Start: at(121), End: at(121.1), Code: "NotFound", Made: at(100), KeyID: 9},  // never retired
		{Client: 5, Region: "ap-south", Keyset: "ks", Kind: Decrypt, Start: at(130), End: at(130.1), Code: "OK", Made: at(125), KeyID: 10},
	}
	exp := Expiry{TTL: map[string]time.Duration{"ks": 8 * time.Second}, Retired: map[string]map[uint32]time.Time{"ks": {6: at(11), 7: at(110), 8: at(105)}}}
	a := Analyze(ops, []Window{down, root, kill, other}, exp)
	if a.Excused != 2 || a.RootTierErrors != 1 || len(a.Violations) != 11 || a.Expired != 1 || a.MinRetireMargin != 2*time.Second {
		t.Errorf("Analyze: %d excused, %d in root-tier windows, %d refusals allowed past the TTL (margin %s), violations %q; want 2 excused, 1 in a root-tier window, 1 allowed (margin 2s) and 11 violations",
			a.Excused, a.RootTierErrors, a.Expired, a.MinRetireMargin, a.Violations)
	}
	if !a.FirstViolation.Equal(at(12)) {
		t.Errorf("FirstViolation = %v, want %v (the earliest violating operation's start)", a.FirstViolation, at(12))
	}
	wantByWindow := map[string]int{"region-down": 4, "root-tier-down": 1, NoFault: 3, "kill-kms": 2, "version gone": 3}
	if diff := cmp.Diff(wantByWindow, a.ErrorsByWindow); diff != "" {
		t.Errorf("errors by window (-want +got):\n%s", diff)
	}
	wantByCode := map[string]int{"Unavailable": 8, "DeadlineExceeded": 1, "Internal": 1, "NotFound": 3}
	if diff := cmp.Diff(wantByCode, a.ErrorsByCode); diff != "" {
		t.Errorf("errors by code (-want +got):\n%s", diff)
	}
	// us-east: client 1 from 11 (first failure) to 16.6 (the next
	// success's end), client 3 from 17 to 30.1 (client 4's are shorter);
	// eu-west: from 12 to 30.1; ap-south: from 104.9 to 130.1 (the allowed
	// refusal is no failure).
	wantLongest := map[string]time.Duration{"us-east": 13100 * time.Millisecond, "eu-west": 18100 * time.Millisecond, "ap-south": 25200 * time.Millisecond}
	if diff := cmp.Diff(wantLongest, a.LongestUnavailable); diff != "" {
		t.Errorf("longest unavailability (-want +got):\n%s", diff)
	}
}

// TestLatencyClasses: a region's calls count as "no fault" only outside
// every window, and as "another region down" only in a window that took
// another region down and faulted none of this region's servers.
func TestLatencyClasses(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	westDown := Window{Step: Step{Actions: []Action{{Kind: RegionDown, Target: "eu-west"}}}, Start: at(10), End: at(14)}
	westDownEastKill := Window{Step: Step{Actions: []Action{{Kind: RegionDown, Target: "eu-west"}, {Kind: KillKMS, Target: "us-east/kms-1"}}}, Start: at(20), End: at(24)}
	voter := Window{Step: Step{Actions: []Action{{Kind: KillVoter, Target: LeaderTarget}}}, Start: at(30), End: at(34)}
	ws := []Window{westDown, westDownEastKill, voter}
	for _, c := range []struct {
		region string
		start  float64
		want   string
	}{
		{"us-east", 5, "none"},
		{"us-east", 11, "other"},
		{"eu-west", 11, ""}, // its own region is down
		{"us-east", 21, ""}, // one of its servers is down
		{"us-east", 31, ""}, // another fault, no region down
		{"us-east", 40, "none"},
	} {
		o := Op{Region: c.region, Start: at(c.start), End: at(c.start + 0.1), Code: "OK"}
		if got := latencyClass(o, ws); got != c.want {
			t.Errorf("latencyClass(%s at %v) = %q, want %q", c.region, c.start, got, c.want)
		}
	}
	ds := make([]time.Duration, 100)
	for i := range ds {
		ds[i] = time.Duration(100-i) * time.Millisecond
	}
	if got, want := percentiles(ds), (Percentiles{N: 100, P50: 51 * time.Millisecond, P99: 100 * time.Millisecond}); got != want {
		t.Errorf("percentiles = %+v, want %+v", got, want)
	}
}
