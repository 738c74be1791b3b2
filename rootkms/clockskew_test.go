package rootkms_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/safety"
	"github.com/cairnkms/cairn/kms/keystore"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/regionctl/compile"
	"github.com/cairnkms/cairn/regionctl/config"
	"github.com/cairnkms/cairn/rootkms"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/rootkms/rootkmstest/live"
)

// RELIABILITY row 18: one node's clock jumps ±1 h. These tests run the
// in-process chain (three voters and a non-voter, real Raft over loopback
// TCP) with a clock offset of one replica's own on top of the chain's clock,
// and a real us-east KMS server's keystore (bundles compiled from the root
// KMS record as regionctl compiles them, built and checked by
// kms/keystore with the server's own, correct, clock).

// skewedChain is a chain whose replicas each add an offset of their own to
// the chain's clock: Advance moves every clock, jump moves one.
type skewedChain struct {
	*chain
	offsets map[string]*atomic.Int64 // by replica ID; filled before any replica starts
}

func newSkewedChain(t *testing.T) *skewedChain {
	t.Helper()
	c := newChain(t)
	sc := &skewedChain{chain: c, offsets: map[string]*atomic.Int64{}}
	for _, id := range []string{"rootkms-1", "rootkms-2", "rootkms-3", "replica-east"} {
		sc.offsets[id] = new(atomic.Int64)
	}
	c.configure = func(id string, cfg *rootkms.Config) {
		off, ok := sc.offsets[id]
		if !ok {
			t.Errorf("replica %q has no clock offset", id)
			off = new(atomic.Int64)
		}
		cfg.Now = func() time.Time { return c.now().Add(time.Duration(off.Load())) }
	}
	return sc
}

// jump moves replica id's clock by d, and only its clock.
func (sc *skewedChain) jump(id string, d time.Duration) { sc.offsets[id].Add(int64(d)) }

// leaderOf waits for a leader among rs and returns it.
func leaderOf(t *testing.T, rs []*replica) *replica {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for _, r := range rs {
			if !r.stopped && r.srv.Raft().State() == raft.Leader {
				return r
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("no leader within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// moveLeadership makes another voter than from lead, and returns it.
func moveLeadership(t *testing.T, rs []*replica, from *replica) *replica {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for attempt := 0; ; attempt++ {
		if err := from.srv.Raft().LeadershipTransfer().Error(); err != nil {
			t.Logf("leadership transfer from %s (attempt %d): %v", from.id, attempt, err)
		}
		if l := leaderOf(t, rs); l != from {
			return l
		}
		if time.Now().After(deadline) {
			t.Fatalf("leadership never left %s", from.id)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// observeUse records that every server of region serves versions (key ID
// to last use; zero: never used) of keyset name; a version's last use is
// also its last encryption.
func observeUse(t *testing.T, cl *rootkmsclient.Client, region, name string, versions map[uint32]time.Time) {
	t.Helper()
	obs := &statev1.KeysetObservation{Keyset: name}
	for id, used := range versions {
		v := &statev1.VersionObservation{KeyId: id, ServedByAll: true}
		if !used.IsZero() {
			v.LastEncrypt, v.LastUse = timestamppb.New(used), timestamppb.New(used)
		}
		obs.Versions = append(obs.Versions, v)
	}
	if err := cl.Do(bg(t), func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		_, err := c.RecordPropagation(ctx, &rootkmsv1.RecordPropagationRequest{Region: region, Keysets: []*statev1.KeysetObservation{obs}, RegionKeyVersions: []uint32{1}})
		return err
	}); err != nil {
		t.Fatalf("RecordPropagation(%s) = %v", region, err)
	}
}

// replicaKeyset is keyset name as replica r's own FSM holds it, read from a
// Raft snapshot of that replica (not through the leader), with the index
// the snapshot is at.
func replicaKeyset(t *testing.T, r *replica, name string) (*statev1.KeysetRecord, uint64) {
	t.Helper()
	f := r.srv.Raft().Snapshot()
	if err := f.Error(); err != nil {
		t.Fatalf("snapshot of %s: %v", r.id, err)
	}
	meta, rc, err := f.Open()
	if err != nil {
		t.Fatalf("opening the snapshot of %s: %v", r.id, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading the snapshot of %s: %v", r.id, err)
	}
	var snap statev1.Snapshot
	if err := proto.Unmarshal(b, &snap); err != nil {
		t.Fatalf("decoding the snapshot of %s: %v", r.id, err)
	}
	for _, k := range snap.GetKeysets() {
		if k.GetName() == name {
			return k, meta.Index
		}
	}
	t.Fatalf("%s has no keyset %q at index %d", r.id, name, meta.Index)
	return nil, 0
}

// requireSameKeysetEverywhere waits until every replica's FSM has applied
// the last command, then checks that every replica holds the same record of
// keyset name (every time in it included), and returns it. (Snapshot
// indexes may differ: Raft's own no-op and barrier entries count in them.)
func requireSameKeysetEverywhere(t *testing.T, rs []*replica, name string) *statev1.KeysetRecord {
	t.Helper()
	waitCaughtUp(t, rs)
	want, wantIndex := replicaKeyset(t, rs[0], name)
	for _, r := range rs[1:] {
		got, index := replicaKeyset(t, r, name)
		if !proto.Equal(got, want) {
			t.Fatalf("%s holds keyset %q at index %d as\n%v\nbut %s at index %d as\n%v", r.id, name, index, got, rs[0].id, wantIndex, want)
		}
	}
	return want
}

// recordTimes lists every time a keyset record holds, by a path naming it.
func recordTimes(k *statev1.KeysetRecord) map[string]time.Time {
	out := map[string]time.Time{}
	add := func(path string, ts *timestamppb.Timestamp) {
		if ts != nil {
			out[path] = ts.AsTime()
		}
	}
	add("created_at", k.GetCreatedAt())
	add("updated_at", k.GetUpdatedAt())
	for _, v := range k.GetVersions() {
		p := fmt.Sprintf("version %d ", v.GetKeyId())
		add(p+"created_at", v.GetCreatedAt())
		add(p+"primary_since", v.GetPrimarySince())
		add(p+"superseded_at", v.GetSupersededAt())
		add(p+"disabled_at", v.GetDisabledAt())
		add(p+"destroyed_at", v.GetDestroyedAt())
		for _, u := range v.GetUsage() {
			add(p+u.GetRegion()+" observed_at", u.GetObservedAt())
		}
		for _, pr := range v.GetPropagated() {
			add(p+pr.GetRegion()+" propagated", pr.GetAt())
		}
	}
	return out
}

// latestTime is the latest time a keyset record holds.
func latestTime(k *statev1.KeysetRecord) time.Time {
	var latest time.Time
	for _, at := range recordTimes(k) {
		if at.After(latest) {
			latest = at
		}
	}
	return latest
}

// regionServer is one us-east KMS server with a correct clock (the chain's):
// it serves bundles compiled from the root KMS record and applies a new one
// only if keystore.Check (ScopeLocal, its own usage) allows it.
type regionServer struct {
	sc     *skewedChain
	admin  *rootkmsclient.Client
	name   string
	ttl    time.Duration
	keys   map[uint32]tink.AEAD
	serial uint64
	cur    *keystore.Store
}

const skewRegion = "us-east"

func newRegionServer(t *testing.T, sc *skewedChain, rs []*replica, admin *rootkmsclient.Client, name string, ttl time.Duration) *regionServer {
	t.Helper()
	mat, err := sc.unwrap(kmsEast, rs[0].api, skewRegion)
	if err != nil {
		t.Fatalf("UnwrapRegionKey(%s) = %v", skewRegion, err)
	}
	return &regionServer{sc: sc, admin: admin, name: name, ttl: ttl, keys: live.AEADsOf(t, mat)}
}

// build compiles a bundle from the record as it is now and builds the store
// it makes (sharing usage counters with the served one).
func (s *regionServer) build(t *testing.T) *keystore.Store {
	t.Helper()
	ks, err := keysetCall(t, s.admin, func(ctx context.Context, cl rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return cl.GetKeyset(ctx, &rootkmsv1.GetKeysetRequest{Name: s.name, IncludeCopies: true})
	})
	if err != nil {
		t.Fatalf("GetKeyset = %v", err)
	}
	team, _, _ := strings.Cut(s.name, "/")
	s.serial++
	res, err := compile.Compile(compile.Input{
		Region: skewRegion, Serial: s.serial, CreatedBy: regionctlID, CreatedAt: s.sc.now(), Window: testWindow,
		Record: []*statev1.KeysetRecord{ks.GetRecord()},
		Teams: []*config.Team{{Name: team, Keysets: []config.Keyset{{
			Name: s.name, Team: team, Regions: ks.GetRecord().GetRegions(), Purpose: config.PurposeEnvelope,
			RotationPeriod: ks.GetRecord().GetRotationPeriod().AsDuration(), CiphertextTTL: s.ttl,
			ACL: config.ACL{Encrypt: []string{"client/us-east/app"}, Decrypt: []string{"client/us-east/app"}},
		}}}},
	})
	if err != nil || res.Bundle == nil {
		t.Fatalf("compiling the %s bundle = %v (problems %v)", skewRegion, err, res)
	}
	st, err := keystore.Build(res.Bundle, s.keys, s.cur, s.sc.now())
	if err != nil {
		t.Fatalf("building the %s bundle = %v", skewRegion, err)
	}
	return st
}

// apply serves next if the server's own Safety check allows it at its own
// (correct) clock, and returns the check's answer.
func (s *regionServer) apply(next *keystore.Store) error {
	if err := keystore.Check(skewRegion, s.cur, keystore.History{}, next, s.sc.now()); err != nil {
		return err
	}
	s.cur = next
	return nil
}

func (s *regionServer) keyset(t *testing.T) *keystore.Keyset {
	t.Helper()
	k, ok := s.cur.Keyset(s.name)
	if !ok {
		t.Fatalf("the served store has no keyset %q", s.name)
	}
	return k
}

// refused reports whether err refuses step of version keyID.
func refused(err error, keyID uint32, step safety.Step) bool {
	return refusalFor(err, keyID, step) != nil
}

// refusalFor is err's refusal of step of version keyID, nil if none.
func refusalFor(err error, keyID uint32, step safety.Step) *safety.Refusal {
	var rs safety.Refusals
	if errors.As(err, &rs) {
		for _, r := range rs {
			if r.KeyID == keyID && r.Step == step {
				return r
			}
		}
		return nil
	}
	var r *safety.Refusal
	if errors.As(err, &r) && r.KeyID == keyID && r.Step == step {
		return r
	}
	return nil
}

func destroyIn(name string, keyID uint32, delay time.Duration) func(context.Context, rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
	return func(ctx context.Context, c rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return c.UpdateKeyset(ctx, &rootkmsv1.UpdateKeysetRequest{Name: name, Step: statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY, KeyId: keyID, DestroyDelay: durationpb.New(delay)})
	}
}

// skewSetup is a keyset of us-east and eu-west (TTL 2 h) whose first
// version was primary until `second` was promoted at a correct time, with
// the us-east server having encrypted ct with first (usage reported), plus
// a version `never` that was never used and is disabled, all done by
// correct clocks.
type skewSetup struct {
	sc            *skewedChain
	rs            []*replica
	admin         *rootkmsclient.Client
	kms           *regionServer
	name          string
	ttl           time.Duration
	first, second uint32
	never         uint32
	ct            []byte
	lastUse       time.Time // the us-east server's use of first
}

var skewAD = []byte("row 18")

func newSkewSetup(t *testing.T) *skewSetup {
	t.Helper()
	sc := newSkewedChain(t)
	rs := sc.cluster()
	s := &skewSetup{sc: sc, rs: rs, admin: sc.client(regionctlID, addrs(rs)...), name: "payments/ledger", ttl: 2 * time.Hour}
	createRegion(t, s.admin, "us-east")
	createRegion(t, s.admin, "eu-west")
	ks, err := keysetCall(t, s.admin, func(ctx context.Context, cl rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return cl.CreateKeyset(ctx, &rootkmsv1.CreateKeysetRequest{Name: s.name, Regions: []string{"us-east", "eu-west"},
			CiphertextTtl: durationpb.New(s.ttl), RotationPeriod: durationpb.New(24 * time.Hour)})
	})
	if err != nil {
		t.Fatalf("CreateKeyset = %v", err)
	}
	s.first = ks.GetRecord().GetVersions()[0].GetKeyId()
	s.second = s.add(t)
	s.kms = newRegionServer(t, sc, rs, s.admin, s.name, s.ttl)
	if err := s.kms.apply(s.kms.build(t)); err != nil {
		t.Fatalf("the us-east server refused its first bundle: %v", err)
	}
	// The server encrypts with the primary (first) and reports it.
	ct, v, err := s.kms.keyset(t).Encrypt([]byte("a customer secret"), skewAD, sc.now())
	if err != nil || v.KeyID() != s.first {
		t.Fatalf("Encrypt = version %v, %v; want version %d", v, err, s.first)
	}
	s.ct, s.lastUse = ct, sc.now()
	s.observe(t, map[uint32]time.Time{s.first: s.lastUse, s.second: {}})
	sc.Advance(testWindow + time.Second)
	s.observe(t, map[uint32]time.Time{s.first: s.lastUse, s.second: {}})
	if _, err := keysetCall(t, s.admin, step(s.name, statev1.KeysetStep_KEYSET_STEP_PROMOTE, s.second)); err != nil {
		t.Fatalf("PROMOTE(second) after the window, correct clocks = %v", err)
	}
	if err := s.kms.apply(s.kms.build(t)); err != nil {
		t.Fatalf("the us-east server refused the bundle promoting second after the window: %v", err)
	}
	// A version never used: disabled at once, its destruction scheduled
	// 30 minutes ahead.
	s.never = s.add(t)
	s.observe(t, map[uint32]time.Time{s.first: s.lastUse, s.second: {}, s.never: {}})
	if _, err := keysetCall(t, s.admin, step(s.name, statev1.KeysetStep_KEYSET_STEP_DISABLE, s.never)); err != nil {
		t.Fatalf("DISABLE(a version never used) = %v", err)
	}
	return s
}

// scheduleDestroy schedules never's destruction 30 minutes ahead.
func (s *skewSetup) scheduleDestroy(t *testing.T) {
	t.Helper()
	if _, err := keysetCall(t, s.admin, destroyIn(s.name, s.never, 30*time.Minute)); err != nil {
		t.Fatalf("SCHEDULE_DESTROY(never, 30m) = %v", err)
	}
}

func (s *skewSetup) add(t *testing.T) uint32 {
	t.Helper()
	ks, err := keysetCall(t, s.admin, step(s.name, statev1.KeysetStep_KEYSET_STEP_ADD_VERSION, 0))
	if err != nil {
		t.Fatalf("ADD_VERSION = %v", err)
	}
	vs := ks.GetRecord().GetVersions()
	return vs[len(vs)-1].GetKeyId()
}

// observe records the same observation for both regions.
func (s *skewSetup) observe(t *testing.T, versions map[uint32]time.Time) {
	t.Helper()
	for _, region := range []string{"us-east", "eu-west"} {
		observeUse(t, s.admin, region, s.name, versions)
	}
}

func (s *skewSetup) get(t *testing.T) *statev1.KeysetRecord {
	t.Helper()
	ks, err := keysetCall(t, s.admin, func(ctx context.Context, cl rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return cl.GetKeyset(ctx, &rootkmsv1.GetKeysetRequest{Name: s.name})
	})
	if err != nil {
		t.Fatalf("GetKeyset = %v", err)
	}
	return ks.GetRecord()
}

func stateOf(rec *statev1.KeysetRecord, keyID uint32) statev1.KeysetVersionState {
	for _, v := range rec.GetVersions() {
		if v.GetKeyId() == keyID {
			return v.GetState()
		}
	}
	return statev1.KeysetVersionState_KEYSET_VERSION_STATE_UNSPECIFIED
}

// TestClockAheadOnLeader: the leader's clock jumps +1 h when retiring the
// old primary is safe only in 30 minutes, promoting a new version only after
// the window, and a destruction is due in 30 minutes. Asserted: with
// correct clocks the root KMS refuses all three; after the jump the leader
// counts observations recorded by the correct clock as stale (unknown
// counts as in use); after fresh observations, which would let its clock
// pass all three, the fast leader refuses each with FailedPrecondition
// because its clock is an hour ahead of the median clock of a quorum of
// voters (the clock quorum), naming itself as the clock to fix, and the
// record is unchanged on every replica (nothing was destroyed before its
// destroy_after, which no other server guards); the us-east KMS server,
// its clock correct, accepts the bundle of that record and keeps
// decrypting the old version; writes through the fast leader
// (observations) and, after a leadership change, through a correct voter
// are on every replica with identical times, and the record's times never
// go backwards; the correct leader, finding the record an hour ahead of its
// clock (the FSM clamp carries the fast clock's time), refuses steps judged
// on time and changes nothing.
func TestClockAheadOnLeader(t *testing.T) {
	s := newSkewSetup(t)
	// Retiring first is safe at superseded_at + TTL + W: 30 minutes away.
	s.sc.Advance(s.ttl + testWindow - 30*time.Minute)
	third := s.add(t)
	obs := map[uint32]time.Time{s.first: s.lastUse, s.second: {}, third: {}}
	s.observe(t, obs)
	s.scheduleDestroy(t)

	type attempt struct {
		what string
		call func(context.Context, rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error)
	}
	attempts := []attempt{
		{"DISABLE(first)", step(s.name, statev1.KeysetStep_KEYSET_STEP_DISABLE, s.first)},
		{"PROMOTE(third)", step(s.name, statev1.KeysetStep_KEYSET_STEP_PROMOTE, third)},
		{"DESTROY(never)", step(s.name, statev1.KeysetStep_KEYSET_STEP_DESTROY, s.never)},
	}
	for _, a := range attempts {
		if _, err := keysetCall(t, s.admin, a.call); status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("%s with correct clocks = %v, want FailedPrecondition", a.what, err)
		}
	}
	before := requireSameKeysetEverywhere(t, s.rs, s.name)

	fast := leaderOf(t, s.rs)
	s.sc.jump(fast.id, time.Hour)
	// What the correct clock observed moments ago is an hour old to the
	// fast leader: unknown, so in use.
	if _, err := keysetCall(t, s.admin, attempts[0].call); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "unknown") {
		t.Fatalf("DISABLE(first) by a leader 1 h ahead, on observations of the correct clock = %v, want FailedPrecondition (usage unknown)", err)
	}
	s.observe(t, obs) // regionctl observes again, through the fast leader
	observed := requireSameKeysetEverywhere(t, s.rs, s.name)
	// To the fast clock all three are due now; the clock quorum refuses
	// them before anything is proposed.
	for _, a := range attempts {
		_, err := keysetCall(t, s.admin, a.call)
		requireClockQuorumRefusal(t, a.what+" by a leader 1 h ahead", err, fast.id, "ahead of")
	}
	if got := requireSameKeysetEverywhere(t, s.rs, s.name); !proto.Equal(got, observed) {
		t.Fatalf("the fast leader's refused steps changed the record:\n%v\nwas\n%v", got, observed)
	}
	rec := s.get(t)
	for id, want := range map[uint32]statev1.KeysetVersionState{
		s.first: statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED,
		third:   statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED,
		s.never: statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROY_SCHEDULED,
	} {
		if got := stateOf(rec, id); got != want {
			t.Fatalf("version %d is %v after the fast leader's refusals, want %v", id, got, want)
		}
	}

	// The us-east server, its clock correct, accepts the bundle of that
	// record (nothing in it retires or promotes early) and still decrypts
	// first's ciphertext.
	if err := s.kms.apply(s.kms.build(t)); err != nil {
		t.Fatalf("the us-east server's check of the bundle after the fast leader's refusals = %v, want nil", err)
	}
	if pt, v, err := s.kms.keyset(t).Decrypt(s.ct, skewAD, s.sc.now()); err != nil || v.KeyID() != s.first || string(pt) != "a customer secret" {
		t.Fatalf("the us-east server decrypting first's ciphertext after the fast leader's refusals = %q, %v; want it decrypted by version %d", pt, err, s.first)
	}

	// Raft: the fast leader's writes are on every replica, identical, and
	// no time went backwards.
	afterFast := requireSameKeysetEverywhere(t, s.rs, s.name)
	requireNotBefore(t, "after the fast leader's writes", afterFast, before)

	// Leadership moves to a correct voter; the fast node follows.
	correct := moveLeadership(t, s.rs, fast)
	if correct == fast {
		t.Fatalf("leader is still %s", fast.id)
	}
	s.observe(t, obs)
	afterCorrect := requireSameKeysetEverywhere(t, s.rs, s.name)
	requireNotBefore(t, "after a correct leader's write following the fast one", afterCorrect, afterFast)
	if got, want := afterCorrect.GetUpdatedAt().AsTime(), afterFast.GetUpdatedAt().AsTime(); got.Before(want) {
		t.Fatalf("updated_at went from %v to %v under the correct leader", want, got)
	}
	// The FSM keeps state time from going back, so the fast clock's time
	// (of the observations the fast leader recorded) outlives its
	// leadership: the correct leader's write (its observation of us-east)
	// is stamped about an hour ahead of its clock. Until the clocks agree
	// again, the correct leader refuses every step judged on time (the FSM
	// would judge a destruction on that time), naming the disagreement.
	var observedAt time.Time
	for _, u := range versionRecord(afterCorrect, s.first).GetUsage() {
		if u.GetRegion() == skewRegion {
			observedAt = u.GetObservedAt().AsTime()
		}
	}
	if ahead := observedAt.Sub(s.sc.now()); ahead < 50*time.Minute {
		t.Fatalf("the correct leader's write is recorded %v ahead of its clock, want about 1h (the FSM clamp)", ahead)
	}
	for _, a := range []attempt{
		{"DISABLE(second)", step(s.name, statev1.KeysetStep_KEYSET_STEP_DISABLE, s.second)},
		{"SCHEDULE_DESTROY(first)", destroyIn(s.name, s.first, 30*time.Minute)},
	} {
		if _, err := keysetCall(t, s.admin, a.call); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "ahead of this leader's clock") {
			t.Errorf("%s by correct leader %s while the record is 1 h ahead of its clock = %v, want FailedPrecondition naming the clock disagreement", a.what, correct.id, err)
		}
	}
	if got, want := withoutCopies(s.get(t)), withoutCopies(afterCorrect); !proto.Equal(got, want) {
		t.Errorf("refused steps changed the record:\n%v\nwas\n%v", got, want)
	}
}

// requireClockQuorumRefusal checks that err is the clock quorum's refusal
// of a step by leader, whose clock is dir ("ahead of" or "behind") the
// quorum's: FailedPrecondition naming by how much (an hour), the replicas'
// offsets and the clock to fix.
func requireClockQuorumRefusal(t *testing.T, what string, err error, leader, dir string) {
	t.Helper()
	msg := status.Convert(err).Message()
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("%s = %v, want FailedPrecondition (the clock quorum)", what, err)
	}
	for _, want := range []string{"this leader's clock (" + leader + ")", "1h0m0s " + dir + " the clock of a quorum of voters", "max clock skew",
		"nothing was proposed", "fix NTP on " + leader} {
		if !strings.Contains(msg, want) {
			t.Fatalf("%s = %v, want the clock quorum's refusal saying %q", what, err, want)
		}
	}
	t.Logf("%s: refused: %s", what, msg)
}

// requireNotBefore checks that no time of before is later in after (a time
// present in both never moves back).
func requireNotBefore(t *testing.T, when string, after, before *statev1.KeysetRecord) {
	t.Helper()
	a := recordTimes(after)
	for path, b := range recordTimes(before) {
		if got, ok := a[path]; ok && got.Before(b) {
			t.Errorf("%s: %s went back from %v to %v", when, path, b, got)
		}
	}
	if latestTime(after).Before(latestTime(before)) {
		t.Errorf("%s: the record's latest time went back from %v to %v", when, latestTime(before), latestTime(after))
	}
}

// TestClockBehindOnLeader: the leader's clock jumps −1 h when retiring the
// old primary has long been safe by the record's times but the last usage
// observation is 10 minutes old (the window is 1 minute) and the us-east
// server has used the old version since. Asserted: with correct clocks the
// root KMS refuses the retirement (usage unknown); the slow leader, to
// whose clock that observation would look fresh, refuses it too because
// the record is ahead of its clock (checkClock), and the record is
// unchanged; it refuses a promotion and a destruction on the same clock
// error, and the record is unchanged on every replica; the us-east server
// keeps serving and decrypting; a destruction is never done before its
// destroy_after, by the slow leader or after; the slow leader's writes are
// on every replica with identical times, stamped no earlier than the
// record's latest time, and no recorded time goes backwards on any replica;
// a correct leader with the slow voter as a follower (one skewed follower
// of three) is not blocked: it destroys once due and disables a version.
// Then, the record two hours old (nothing ahead of the slow clock, so
// checkClock passes), the slow voter leads again: it refuses to schedule a
// destruction, which from its clock would come due an hour early, because
// its clock is an hour behind the median clock of a quorum of voters
// (FailedPrecondition, naming it as the clock to fix), and the record is
// unchanged on every replica.
func TestClockBehindOnLeader(t *testing.T) {
	s := newSkewSetup(t)
	s.sc.Advance(s.ttl + testWindow + 2*time.Hour)
	s.scheduleDestroy(t)
	obs := map[uint32]time.Time{s.first: s.lastUse, s.second: {}}
	s.observe(t, obs)
	before := requireSameKeysetEverywhere(t, s.rs, s.name)
	s.sc.Advance(10 * time.Minute)
	// The us-east server decrypts with first after the last observation.
	if _, v, err := s.kms.keyset(t).Decrypt(s.ct, skewAD, s.sc.now()); err != nil || v.KeyID() != s.first {
		t.Fatalf("the us-east server decrypting first's ciphertext = %v, %v", v, err)
	}
	disable := step(s.name, statev1.KeysetStep_KEYSET_STEP_DISABLE, s.first)
	if _, err := keysetCall(t, s.admin, disable); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "unknown") {
		t.Fatalf("DISABLE(first) with correct clocks on a 10-minute-old observation = %v, want FailedPrecondition (usage unknown)", err)
	}

	slow := leaderOf(t, s.rs)
	s.sc.jump(slow.id, -time.Hour)
	destroy := step(s.name, statev1.KeysetStep_KEYSET_STEP_DESTROY, s.never)
	if _, err := keysetCall(t, s.admin, destroy); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "ahead of this leader's clock") {
		t.Fatalf("DESTROY(never) 20 minutes before destroy_after, by a leader 1 h behind = %v, want FailedPrecondition naming the clock disagreement", err)
	}
	// To the slow clock the 10-minute-old observation would look fresh; the
	// leader sees the record ahead of its clock and refuses.
	if _, err := keysetCall(t, s.admin, disable); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "ahead of this leader's clock") {
		t.Fatalf("DISABLE(first) by a leader 1 h behind, on a 10-minute-old observation = %v, want FailedPrecondition naming the clock disagreement", err)
	}
	if _, err := keysetCall(t, s.admin, step(s.name, statev1.KeysetStep_KEYSET_STEP_PROMOTE, s.first)); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "ahead of this leader's clock") {
		t.Fatalf("PROMOTE(first) by a leader 1 h behind = %v, want FailedPrecondition naming the clock disagreement", err)
	}
	if got := requireSameKeysetEverywhere(t, s.rs, s.name); !proto.Equal(got, before) {
		t.Fatalf("the slow leader's refused steps changed the record:\n%v\nwas\n%v", got, before)
	}
	if got := s.get(t); stateOf(got, s.first) != statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED {
		t.Fatalf("first is %v after the slow leader's refusal, want ENABLED", stateOf(got, s.first))
	}
	// Whatever the root KMS did, the us-east server, its clock correct,
	// would not drop first within the window of its own last use.
	if err := s.kms.apply(s.kms.build(t)); err != nil {
		t.Fatalf("the us-east server's check of an unchanged bundle = %v", err)
	}
	if _, v, err := s.kms.keyset(t).Decrypt(s.ct, skewAD, s.sc.now()); err != nil || v.KeyID() != s.first {
		t.Fatalf("the us-east server decrypting first's ciphertext after the slow leader's steps = %v, %v; want version %d", v, err, s.first)
	}

	// The slow leader's writes are stamped no earlier than the record's
	// latest time, on every replica.
	s.observe(t, obs)
	afterSlow := requireSameKeysetEverywhere(t, s.rs, s.name)
	requireNotBefore(t, "after the slow leader's writes", afterSlow, before)
	for _, u := range versionRecord(afterSlow, s.first).GetUsage() {
		if at := u.GetObservedAt().AsTime(); at.Before(latestTime(before)) {
			t.Errorf("%s observation recorded by the slow leader at %v, before the record's latest time %v", u.GetRegion(), at, latestTime(before))
		}
	}

	// Past destroy_after by the correct clock, the slow leader still finds
	// it not due (late is safe); a correct leader destroys it.
	s.sc.Advance(30 * time.Minute)
	if _, err := keysetCall(t, s.admin, destroy); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("DESTROY(never) by the slow leader, due only by the correct clock = %v, want FailedPrecondition (never early; late is safe)", err)
	}
	correct := moveLeadership(t, s.rs, slow)
	ks, err := keysetCall(t, s.admin, destroy)
	if err != nil || stateOf(ks.GetRecord(), s.never) != statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROYED {
		t.Fatalf("DESTROY(never) once due, by correct leader %s = %v, want DESTROYED", correct.id, err)
	}
	afterCorrect := requireSameKeysetEverywhere(t, s.rs, s.name)
	requireNotBefore(t, "after the correct leader's write", afterCorrect, afterSlow)
	if d := versionRecord(afterCorrect, s.never); d.GetDestroyedAt().AsTime().Before(d.GetDestroyAfter().AsTime()) {
		t.Fatalf("version %d destroyed at %v, before its destroy_after %v", s.never, d.GetDestroyedAt().AsTime(), d.GetDestroyAfter().AsTime())
	}

	// The correct leader, the slow voter still a follower, disables a
	// version never used.
	spare := s.add(t)
	s.observe(t, map[uint32]time.Time{s.first: s.lastUse, s.second: {}, spare: {}})
	if _, err := keysetCall(t, s.admin, step(s.name, statev1.KeysetStep_KEYSET_STEP_DISABLE, spare)); err != nil {
		t.Fatalf("DISABLE(a version never used) by correct leader %s, the slow voter a follower = %v", correct.id, err)
	}
	// Two hours pass with no write: the record is an hour behind even the
	// slow clock, so checkClock finds nothing ahead of it. The slow voter
	// leads again and schedules a destruction 30 minutes ahead of its
	// clock: 30 minutes in the past by the correct clocks, so a correct
	// leader could destroy at once. The clock quorum refuses.
	s.sc.Advance(2 * time.Hour)
	moveLeadershipTo(t, s.rs, slow)
	idle := requireSameKeysetEverywhere(t, s.rs, s.name)
	_, err = keysetCall(t, s.admin, destroyIn(s.name, spare, 30*time.Minute))
	requireClockQuorumRefusal(t, "SCHEDULE_DESTROY(spare, 30m) by a leader 1 h behind, the record older than its clock", err, slow.id, "behind")
	if got := requireSameKeysetEverywhere(t, s.rs, s.name); !proto.Equal(got, idle) {
		t.Fatalf("the slow leader's refused SCHEDULE_DESTROY changed the record:\n%v\nwas\n%v", got, idle)
	}
	if got := stateOf(idle, spare); got != statev1.KeysetVersionState_KEYSET_VERSION_STATE_DISABLED {
		t.Fatalf("spare is %v after the slow leader's refusal, want DISABLED", got)
	}
}

// moveLeadershipTo makes voter to the leader of rs.
func moveLeadershipTo(t *testing.T, rs []*replica, to *replica) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for attempt := 0; ; attempt++ {
		from := leaderOf(t, rs)
		if from == to {
			return
		}
		var addr raft.ServerAddress
		if f := from.srv.Raft().GetConfiguration(); f.Error() == nil {
			for _, srv := range f.Configuration().Servers {
				if string(srv.ID) == to.id {
					addr = srv.Address
				}
			}
		}
		if err := from.srv.Raft().LeadershipTransferToServer(raft.ServerID(to.id), addr).Error(); err != nil {
			t.Logf("leadership transfer from %s to %s (attempt %d): %v", from.id, to.id, attempt, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("leadership never moved to %s", to.id)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// withoutCopies is a copy of k without its encrypted copies (GetKeyset
// leaves them out unless asked).
func withoutCopies(k *statev1.KeysetRecord) *statev1.KeysetRecord {
	k = proto.Clone(k).(*statev1.KeysetRecord)
	k.Copies = nil
	return k
}

func versionRecord(rec *statev1.KeysetRecord, keyID uint32) *statev1.KeysetVersionRecord {
	for _, v := range rec.GetVersions() {
		if v.GetKeyId() == keyID {
			return v
		}
	}
	return nil
}
