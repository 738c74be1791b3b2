package safety_test

import (
	"flag"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cairnkms/cairn/internal/safety"
)

var (
	seedFlag  = flag.Uint64("safety.seed", 20260301, "seed of TestPropertyRandomPlans (case i uses PCG(seed, i))")
	casesFlag = flag.Int("safety.cases", 10000, "number of random plans TestPropertyRandomPlans runs")
)

const simKeyset = "demo/notes"

// simServer is one simulated KMS server.
type simServer struct {
	region, name string
	cur          safety.Content // nil: serves nothing
	usage        map[uint32]use
	historyFrom  time.Time
	reachable    bool // regionctl can reach it
	reported     bool // it reported its usage since it last lost its history
	weight       int  // how often pushes pick it: laggards are rarely pushed
}

type use struct{ lastEncrypt, lastUse time.Time }

func (s *simServer) serving() bool {
	for _, sv := range s.cur[simKeyset] {
		if sv.Decrypts || sv.Primary {
			return true
		}
	}
	return false
}

func (s *simServer) decrypts(id uint32) bool {
	sv := s.cur[simKeyset][id]
	return sv.Decrypts || sv.Primary
}

func (s *simServer) primary() (uint32, bool) {
	for id, sv := range s.cur[simKeyset] {
		if sv.Primary {
			return id, true
		}
	}
	return 0, false
}

// event is one step of a plan, kept small so that tracing costs nothing
// until a failure prints it.
type event struct {
	at     time.Time
	kind   string
	server int
	id     uint32
	ttl    time.Duration
	ok     bool
	note   string
}

// sim is a fleet serving one keyset, a record and a fake clock. With gated
// false every Safety check is skipped (the negative control).
type sim struct {
	rng       *rand.Rand
	p         safety.Params
	gated     bool
	now       time.Time
	k         safety.Keyset
	servers   []*simServer
	liveUntil map[uint32]time.Time // version → latest t + TTL(t) of its ciphertexts
	nextID    uint32
	trace     []event
}

var (
	simSteps = []time.Duration{0, time.Second, 20 * time.Second, 3 * time.Minute, 9 * time.Minute, 12 * time.Minute, time.Hour, 6 * time.Hour, 24 * time.Hour, 72 * time.Hour}
	simTTLs  = []time.Duration{time.Second, time.Minute, 10 * time.Minute, time.Hour, 24 * time.Hour, 48 * time.Hour}
)

func newSim(rng *rand.Rand, gated bool) *sim {
	t0 := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	s := &sim{rng: rng, p: safety.Params{Window: 10 * time.Minute}, gated: gated, now: t0, liveUntil: map[uint32]time.Time{}, nextID: 2}
	start := t0.Add(-24 * time.Hour)
	s.k = safety.Keyset{Name: simKeyset, TTL: safety.WithTTL(nil, simTTLs[rng.IntN(len(simTTLs))], start)}
	v1 := safety.Version{KeyID: 1, State: safety.Primary, Created: start, PrimarySince: start, Propagated: map[string]time.Time{}}
	for r := range 1 + rng.IntN(3) {
		region := fmt.Sprintf("r%d", r)
		s.k.Regions = append(s.k.Regions, region)
		v1.Propagated[region] = start
		for n := range 1 + rng.IntN(3) {
			s.servers = append(s.servers, &simServer{
				region: region, name: fmt.Sprintf("kms-%d", n),
				cur:       safety.Content{simKeyset: {1: {Decrypts: true, Primary: true}}},
				usage:     map[uint32]use{},
				reachable: true, reported: true,
				weight: []int{1, 4, 16}[rng.IntN(3)],
			})
		}
	}
	s.k.Versions = []safety.Version{v1}
	return s
}

// content is what the record makes a server serve (nil: nothing).
func (s *sim) content() safety.Content {
	vs := map[uint32]safety.Serving{}
	for _, v := range s.k.Versions {
		if v.State.Decrypts() {
			vs[v.KeyID] = safety.Serving{Decrypts: true, Primary: v.State == safety.Primary}
		}
	}
	if len(vs) == 0 {
		return nil
	}
	return safety.Content{simKeyset: vs}
}

// report is what server i reports (known as regionctl sees it).
func (s *sim) report(i int, known bool) safety.Server {
	sv := s.servers[i]
	vs := map[uint32]safety.ServedVersion{}
	for id, u := range sv.usage {
		vs[id] = safety.ServedVersion{LastEncrypt: u.lastEncrypt, LastUse: u.lastUse}
	}
	for id, c := range sv.cur[simKeyset] {
		x := vs[id]
		x.Decrypts, x.Primary = c.Decrypts, c.Primary
		vs[id] = x
	}
	return safety.Server{Region: sv.region, Name: sv.name, Known: known, HistoryFrom: sv.historyFrom,
		Keysets: map[string]safety.ServedKeyset{simKeyset: {Versions: vs}}}
}

func (s *sim) fleet() safety.Fleet {
	f := safety.Fleet{Servers: make([]safety.Server, len(s.servers))}
	for i, sv := range s.servers {
		f.Servers[i] = s.report(i, sv.reachable && sv.reported)
	}
	return f
}

func (s *sim) record() map[string]safety.Keyset { return map[string]safety.Keyset{simKeyset: s.k} }

func (s *sim) version(id uint32) *safety.Version {
	for i := range s.k.Versions {
		if s.k.Versions[i].KeyID == id {
			return &s.k.Versions[i]
		}
	}
	return nil
}

// pick returns a random version ID of the record whose state satisfies ok.
func (s *sim) pick(ok func(safety.State) bool) (uint32, bool) {
	var ids []uint32
	for _, v := range s.k.Versions {
		if ok(v.State) {
			ids = append(ids, v.KeyID)
		}
	}
	if len(ids) == 0 {
		return 0, false
	}
	return ids[s.rng.IntN(len(ids))], true
}

// advance moves the clock and lets every serving server encrypt with its
// primary and decrypt with what it serves at random times in between.
func (s *sim) advance() error {
	prev := s.now
	dt := simSteps[s.rng.IntN(len(simSteps))]
	s.now = s.now.Add(dt)
	at := func() time.Time {
		if dt == 0 {
			return s.now
		}
		return prev.Add(time.Duration(1 + s.rng.Int64N(int64(dt))))
	}
	for _, sv := range s.servers {
		if id, ok := sv.primary(); ok && s.rng.IntN(2) == 0 {
			t := at()
			ttl, ok := safety.TTLAt(s.k.TTL, t)
			if !ok {
				return fmt.Errorf("no TTL in force at %v", t)
			}
			u := sv.usage[id]
			u.lastEncrypt, u.lastUse = later(u.lastEncrypt, t), later(u.lastUse, t)
			sv.usage[id] = u
			s.liveUntil[id] = later(s.liveUntil[id], t.Add(ttl))
		}
		if ids := slices.Collect(maps.Keys(sv.cur[simKeyset])); len(ids) > 0 && s.rng.IntN(3) == 0 {
			slices.Sort(ids)
			id := ids[s.rng.IntN(len(ids))]
			u := sv.usage[id]
			u.lastUse = later(u.lastUse, at())
			sv.usage[id] = u
		}
	}
	return s.invariant()
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// invariant: every ciphertext still within its TTL can be deciphered by
// every server that serves anything.
func (s *sim) invariant() error {
	for id, until := range s.liveUntil {
		if s.now.After(until) {
			continue
		}
		for _, sv := range s.servers {
			if sv.serving() && !sv.decrypts(id) {
				return fmt.Errorf("at %v a ciphertext of version %d is live until %v but server %s/%s serves %v",
					s.now.Format(time.RFC3339), id, until.Format(time.RFC3339), sv.region, sv.name, sv.cur)
			}
		}
	}
	return nil
}

// markPropagated sets Propagated[R] for every version every server of R now
// decrypts.
func (s *sim) markPropagated() {
	for i := range s.k.Versions {
		v := &s.k.Versions[i]
		if !v.State.Decrypts() {
			continue
		}
		for _, region := range s.k.Regions {
			if _, ok := v.Propagated[region]; ok {
				continue
			}
			all := true
			for _, sv := range s.servers {
				if sv.region == region && !sv.decrypts(v.KeyID) {
					all = false
					break
				}
			}
			if all {
				v.Propagated[region] = s.now
			}
		}
	}
}

func (s *sim) pickServer() int {
	total := 0
	for _, sv := range s.servers {
		total += sv.weight
	}
	n := s.rng.IntN(total)
	for i, sv := range s.servers {
		if n < sv.weight {
			return i
		}
		n -= sv.weight
	}
	panic("unreachable")
}

// step runs one random event and returns what it did.
func (s *sim) step() event {
	e := event{at: s.now}
	switch n := s.rng.IntN(100); {
	case n < 12:
		e.kind = "add-version"
		if len(s.k.Versions) >= 8 {
			e.note = "enough versions"
			break
		}
		e.id, e.ok = s.nextID, true
		s.nextID++
		s.k.Versions = append(s.k.Versions, safety.Version{KeyID: e.id, State: safety.Enabled, Created: s.now, Propagated: map[string]time.Time{}})
	case n < 50:
		e.kind, e.server = "push", s.pickServer()
		sv := s.servers[e.server]
		if !sv.reachable {
			e.note = "unreachable"
			break
		}
		next := s.content()
		if s.gated {
			if err := safety.CheckBundle(sv.region, sv.cur, next, s.record(), s.fleet(), safety.ScopeFleet, s.p, s.now); err != nil {
				e.note = err.Error()
				break
			}
			local := safety.Fleet{Servers: []safety.Server{s.report(e.server, true)}}
			if err := safety.CheckBundle(sv.region, sv.cur, next, s.record(), local, safety.ScopeLocal, s.p, s.now); err != nil {
				e.note = "local: " + err.Error()
				break
			}
		}
		sv.cur, e.ok = next, true
		s.markPropagated()
	case n < 65:
		e.kind = "promote"
		id, ok := s.pick(func(st safety.State) bool { return st == safety.Enabled })
		if !ok {
			break
		}
		e.id = id
		if s.gated {
			if err := safety.CheckPromote(s.k, id, s.fleet(), safety.ScopeFleet, s.p, s.now); err != nil {
				e.note = err.Error()
				break
			}
		}
		for i := range s.k.Versions {
			if v := &s.k.Versions[i]; v.State == safety.Primary {
				v.State, v.SupersededAt = safety.Enabled, s.now
			}
		}
		v := s.version(id)
		v.State, v.PrimarySince, v.SupersededAt, e.ok = safety.Primary, s.now, time.Time{}, true
	case n < 72:
		e.kind, e.ttl, e.ok = "ttl", simTTLs[s.rng.IntN(len(simTTLs))], true
		s.k.TTL = safety.WithTTL(s.k.TTL, e.ttl, s.now)
	case n < 82:
		e.kind = "retire"
		ok := safety.State.Decrypts // sometimes try the primary too
		if s.rng.IntN(5) > 0 {
			ok = func(st safety.State) bool { return st == safety.Enabled }
		}
		id, ok2 := s.pick(ok)
		if !ok2 {
			break
		}
		e.id = id
		if s.gated {
			if err := safety.CheckRetire(s.k, id, s.fleet(), safety.ScopeFleet, s.p, s.now); err != nil {
				e.note = err.Error()
				break
			}
		}
		v := s.version(id)
		v.State, v.DisabledAt, e.ok = safety.Disabled, s.now, true
	case n < 85:
		e.kind = "drop-keyset"
		if s.gated {
			f := s.fleet()
			for _, v := range s.k.Versions {
				if !v.State.Decrypts() {
					continue
				}
				if err := safety.CheckRetire(s.k, v.KeyID, f, safety.ScopeFleet, s.p, s.now); err != nil {
					e.note = err.Error()
					return e
				}
			}
		}
		for i := range s.k.Versions {
			if v := &s.k.Versions[i]; v.State.Decrypts() {
				v.State, v.DisabledAt = safety.Disabled, s.now
			}
		}
		e.ok = true
	case n < 89:
		e.kind, e.server, e.ok = "restart", s.rng.IntN(len(s.servers)), true
		sv := s.servers[e.server]
		sv.usage, sv.historyFrom, sv.reported = map[uint32]use{}, s.now, false
		if s.rng.IntN(2) == 0 {
			e.kind, sv.cur = "restart-fresh", nil
		}
	case n < 96:
		e.kind, e.server = "report", s.rng.IntN(len(s.servers))
		sv := s.servers[e.server]
		sv.reported, e.ok = sv.reachable, sv.reachable
	default:
		e.kind, e.server, e.ok = "partition", s.rng.IntN(len(s.servers)), true
		for i, sv := range s.servers {
			if !sv.reachable && s.rng.IntN(3) > 0 {
				e.server = i // mostly heal a partitioned server
				break
			}
		}
		sv := s.servers[e.server]
		sv.reachable = !sv.reachable
		if sv.reachable {
			e.kind = "heal"
		}
	}
	return e
}

func (s *sim) traceString() string {
	var sb strings.Builder
	for i, e := range s.trace {
		fmt.Fprintf(&sb, "%3d %s %-13s", i, e.at.Format(time.RFC3339), e.kind)
		switch e.kind {
		case "push", "restart", "restart-fresh", "report", "partition", "heal":
			fmt.Fprintf(&sb, " server %s/%s", s.servers[e.server].region, s.servers[e.server].name)
		case "add-version", "promote", "retire":
			fmt.Fprintf(&sb, " version %d", e.id)
		case "ttl":
			fmt.Fprintf(&sb, " %v", e.ttl)
		}
		fmt.Fprintf(&sb, " ok=%v", e.ok)
		if e.note != "" {
			fmt.Fprintf(&sb, " (%s)", e.note)
		}
		sb.WriteByte('\n')
	}
	return sb.String()
}

// runPlan runs one random plan and returns the first invariant violation.
func runPlan(seed, i uint64, gated bool) (*sim, error) {
	s := newSim(rand.New(rand.NewPCG(seed, i)), gated)
	if err := s.invariant(); err != nil {
		return s, err
	}
	for range 20 + s.rng.IntN(60) {
		if err := s.advance(); err != nil {
			return s, err
		}
		s.trace = append(s.trace, s.step())
		if err := s.invariant(); err != nil {
			return s, err
		}
	}
	return s, nil
}

// TestPropertyRandomPlans runs random plans over a simulated fleet, taking
// every lifecycle step and every push only when the Safety checks allow, and
// checks after every event that every live ciphertext can be deciphered by
// every server that serves anything.
func TestPropertyRandomPlans(t *testing.T) {
	seed, cases := *seedFlag, *casesFlag
	t.Logf("seed %d, %d cases (rerun one with -safety.seed=%d)", seed, cases, seed)
	var promoted, retired, refused int
	for i := range uint64(cases) {
		s, err := runPlan(seed, i, true)
		if err != nil {
			t.Fatalf("seed %d case %d: %v\ntrace:\n%s", seed, i, err, s.traceString())
		}
		for _, e := range s.trace {
			switch {
			case e.kind == "promote" && e.ok:
				promoted++
			case (e.kind == "retire" || e.kind == "drop-keyset") && e.ok:
				retired++
			case !e.ok && e.note != "":
				refused++
			}
		}
	}
	t.Logf("%d promotions, %d retirements, %d refusals", promoted, retired, refused)
	// The plans must exercise the gates both ways, or the property is vacuous.
	if promoted < cases/10 || retired < cases/10 || refused < cases/10 {
		t.Errorf("promotions, retirements, refusals = %d, %d, %d, want each ≥ %d", promoted, retired, refused, cases/10)
	}
}

// TestPropertyNegativeControl runs the same simulator with every gate off: it
// must find a violation quickly, which shows the property test can fail.
func TestPropertyNegativeControl(t *testing.T) {
	seed := *seedFlag
	for i := range uint64(1000) {
		if s, err := runPlan(seed, i, false); err != nil {
			t.Logf("ungated: seed %d case %d: %v\ntrace:\n%s", seed, i, err, s.traceString())
			return
		}
	}
	t.Errorf("ungated simulator found no violation in 1000 plans (seed %d), want one", seed)
}
