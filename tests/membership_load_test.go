package tests

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/cairnkms/cairn/internal/audit"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/tests/framework"
)

// The schedule of TestRootKMSMembershipChangeUnderLoad, in time since the
// load started. Each change waits for the one before it to be done (and
// for writes to succeed again), so a slow step delays the next.
const (
	memberLoadDuration = 12 * time.Second
	addVoterAt         = 2 * time.Second
	removeFollowerAt   = 4500 * time.Millisecond
	removeLeaderAt     = 7 * time.Second
	// minLoadAfterChange is how long the load must still run after a
	// change is made, for the check that writes resume to see writes at
	// all; a schedule that slipped past it fails the test as such.
	minLoadAfterChange = 3 * time.Second
	// resumeWait bounds the wait for a successful write after a change. It
	// is a bound on liveness, not a goal of speed: the times are logged.
	resumeWait = 10 * time.Second
	// minProgressAfterRemoval is how many log entries the cluster must
	// commit after a replica's removal for the check that the removed
	// replica no longer receives the log to mean something.
	minProgressAfterRemoval = 50
)

// fourthVoter is the replica the operator adds under load: it is started
// without --bootstrap or --join and waits until it is added.
var fourthVoter = framework.Voter(4)

// TestRootKMSMembershipChangeUnderLoad: three voters and a non-voter, as
// real processes, under the recorded load of TestRootKMSLeaderKillUnderLoad.
// During the load an operator, through `regionctl cluster add|remove`
// (the Join and Remove RPCs, as operator/global/operator), adds a fourth
// voter (a replica process waiting to be added), removes a follower, then
// removes the leader. Asserted:
//   - each change is answered with the configuration it asked for, is
//     audited as the operator's, and writes succeed again after it; after
//     the leader's removal another voter leads (the time is logged);
//   - the added voter catches up and serves;
//   - a removed replica, once it has stopped leading, never reports being
//     leader again, never applies the log past the commit index the
//     removal answered with while the cluster commits on, and refuses
//     writes and linearizable reads sent straight to it, none of which is
//     applied: UNAVAILABLE once it knows it is no member (its Raft shut
//     down, or its configuration does not name it), so that callers go on
//     to the other replicas rather than wait on it for an election;
//   - every current member's configuration is the final one;
//   - every acknowledged write is served by every current member from its
//     own state, the recorded history is linearizable, and nothing on disk
//     or in any log holds key material.
func TestRootKMSMembershipChangeUnderLoad(t *testing.T) {
	e := newRootKMSEnv(t, true)
	nv := e.replicas[3]
	e.w.Mint(operator, fourthVoter.Identity)
	r4 := e.w.RootKMSReplica(framework.FastRaft(e.w.ManifestPath(), e.d.Addr), fourthVoter)
	r4.Start()
	r4.WaitStatus("holding the root key, waiting to be added", func(st *rootkmsv1.ClusterStatus) bool {
		return st.GetHasRootKey() && !slices.ContainsFunc(st.GetMembers(), func(m *rootkmsv1.Member) bool { return m.GetId() == r4.ID })
	})
	all := append(slices.Clone(e.replicas), r4)

	regions := regionNames[:20]
	// probes are regions that only the writes sent straight to removed
	// replicas name: two per removed replica (one at its removal, one after
	// the load).
	probes := regionNames[36:40]
	h := framework.NewHistory()
	var clients []*rootkmsclient.Client
	for range loadClients {
		clients = append(clients, e.w.RootKMSClient(framework.Regionctl, e.voters...))
	}
	voters := slices.Clone(e.voters)
	leader, _, _ := framework.WaitLeader(voters...)

	l := startLoad(t, h, clients, regions, memberLoadDuration, loadMaxOps)
	changeAt := func(name string, at time.Duration) {
		t.Helper()
		sleepUntil(l.start.Add(at))
		if late := time.Since(l.start); late > memberLoadDuration-minLoadAfterChange {
			t.Fatalf("%s: the schedule slipped to %s into a %s load (CPU starved?): too late to see writes resume", name, late.Round(time.Millisecond), memberLoadDuration)
		}
	}
	// resumed waits for a write called after a change to succeed, and
	// returns how long after the change the first one did. When every
	// client had one is logged after the load (waiting for it here would
	// delay the next change).
	var changes []string
	var changedAt []time.Time
	resumed := func(what string, after time.Time) time.Duration {
		t.Helper()
		changes, changedAt = append(changes, what), append(changedAt, after)
		first, ok := l.waitOKWrites(after, 1, resumeWait)
		if !ok {
			t.Fatalf("no write called after %s succeeded within %s:%s", what, resumeWait, l.summary(after))
		}
		return first.Sub(after)
	}

	// 1. Add a fourth voter.
	changeAt("add "+r4.ID, addVoterAt)
	began := time.Now()
	phases := []time.Time{l.start, began}
	st := operatorCluster(t, e.w, voters, "add", "--id", r4.ID, "--address", r4.RaftAddr, "--api-address", r4.API)
	added := time.Now()
	voters = append(voters, r4)
	requireMembers(t, "the answer to cluster add", st, append(slices.Clone(voters), nv))
	r4.WaitServing()
	caughtUp := r4.WaitApplied(st.GetCommitIndex())
	t.Logf("operator added %s as a voter in %s (commit index %d); it applied that index %s later; first successful write called after the add %s after it",
		r4.ID, added.Sub(began).Round(time.Millisecond), st.GetCommitIndex(), caughtUp.Round(time.Millisecond), resumed("the add", added).Round(time.Millisecond))

	// 2. Remove a follower: an original voter, so that the new one stays.
	changeAt("remove a follower", removeFollowerAt)
	leader, _, _ = framework.WaitLeader(voters...)
	var follower *framework.Replica
	for _, r := range e.voters {
		if r != leader {
			follower = r
			break
		}
	}
	began = time.Now()
	phases = append(phases, began)
	st = operatorCluster(t, e.w, voters, "remove", "--id", follower.ID)
	removed := time.Now()
	voters = slices.DeleteFunc(voters, func(r *framework.Replica) bool { return r == follower })
	requireMembers(t, "the answer to cluster remove "+follower.ID, st, append(slices.Clone(voters), nv))
	watches := []*removedWatch{watchRemoved(t, follower, st.GetCommitIndex())}
	t.Logf("operator removed follower %s in %s (commit index %d); first successful write called after the removal %s after it",
		follower.ID, removed.Sub(began).Round(time.Millisecond), st.GetCommitIndex(), resumed("the follower's removal", removed).Round(time.Millisecond))
	watches[0].waitSettled(t)
	requireRefusesWrites(t, follower, probes[0], regions[0])

	// 3. Remove the leader.
	changeAt("remove the leader", removeLeaderAt)
	oldLeader, _, _ := framework.WaitLeader(voters...)
	began = time.Now()
	phases = append(phases, began)
	st = operatorCluster(t, e.w, voters, "remove", "--id", oldLeader.ID)
	removed = time.Now()
	voters = slices.DeleteFunc(voters, func(r *framework.Replica) bool { return r == oldLeader })
	watches = append(watches, watchRemoved(t, oldLeader, st.GetCommitIndex()))
	newLeader, _, _ := framework.WaitLeader(voters...)
	elected := time.Since(removed)
	t.Logf("operator removed leader %s: the call took %s (commit index %d); %s leads %s after the call began, %s after it returned; first successful write called after the removal %s after it returned",
		oldLeader.ID, removed.Sub(began).Round(time.Millisecond), st.GetCommitIndex(), newLeader.ID, (elected + removed.Sub(began)).Round(time.Millisecond),
		elected.Round(time.Millisecond), resumed("the leader's removal", removed).Round(time.Millisecond))
	watches[1].waitSettled(t)
	requireRefusesWrites(t, oldLeader, probes[1], regions[1])

	l.wait()
	loadEnd := time.Now()
	total, answered := l.count()
	rate, answeredRate := l.rate(l.start, loadEnd)
	phases = append(phases, loadEnd)
	var perPhase []string
	for i, name := range []string{"before the add", "to the follower's removal", "to the leader's removal", "after it"} {
		total, answered := l.rate(phases[i], phases[i+1])
		perPhase = append(perPhase, fmt.Sprintf("%s %.0f (%.0f answered)", name, total, answered))
	}
	t.Logf("load: %d clients, %d operations in %s (%d answered, the rest failed): %.0f ops/s (%.0f answered); ops/s %s",
		loadClients, total, loadEnd.Sub(l.start).Round(time.Millisecond), answered, rate, answeredRate, strings.Join(perPhase, ", "))
	for i, what := range changes {
		firsts := l.firstOKWrite(changedAt[i])
		var last time.Time
		for _, f := range firsts {
			if f.After(last) {
				last = f
			}
		}
		t.Logf("after %s, %d of %d clients had a write succeed; the last of them %s after it", what, len(firsts), loadClients, last.Sub(changedAt[i]).Round(time.Millisecond))
	}
	t.Logf("after %s:%s", changes[len(changes)-1], l.summary(changedAt[len(changedAt)-1]))

	// The removed replicas, after the load: still refusing, never led
	// again, never given more of the log.
	requireRefusesWrites(t, follower, probes[2], regions[2])
	requireRefusesWrites(t, oldLeader, probes[3], regions[3])
	current := append(slices.Clone(voters), nv)
	leader, st, _ = framework.WaitLeader(voters...)
	for _, w := range watches {
		w.finish(t, st.GetCommitIndex())
	}
	for _, r := range current {
		rst, _ := r.WaitStatus("in the final configuration", func(s *rootkmsv1.ClusterStatus) bool { return len(s.GetMembers()) == len(current) })
		requireMembers(t, r.ID+"'s configuration after the load", rst, current)
	}
	follower.Stop()
	oldLeader.Stop()

	// The final state, read through the current members (the client
	// configuration an operator would now use) and recorded with the rest.
	final := finalReads(t, e.w.RootKMSClient(framework.Regionctl, current...), h, loadClients, regions)
	leader, st, _ = framework.WaitLeader(voters...)
	for _, r := range current {
		r.WaitApplied(st.GetCommitIndex())
	}
	acked := h.LastAcked()
	for _, region := range regions {
		if final[region] < acked[region] {
			t.Errorf("region %s: final primary version %d, but version %d was acknowledged", region, final[region], acked[region])
		}
	}
	want := maps.Clone(final)
	for _, p := range probes {
		want[p] = 0 // only ever written to removed replicas, which refused
	}
	keys := requireReplicaState(t, current, want)
	t.Logf("final state (leader %s, commit index %d, members %s): %v", leader.ID, st.GetCommitIndex(), ids(current), final)

	for _, r := range current {
		snapshot(t, e.w, r)
	}
	checkHistory(t, h, leader, st.GetCommitIndex(), all...)
	requireOperatorAudited(t, all, "Join", r4.ID)
	requireOperatorAudited(t, all, "Remove", follower.ID)
	requireOperatorAudited(t, all, "Remove", oldLeader.ID)

	e.d.Stop()
	for _, r := range current {
		for _, f := range []string{"raft.db", "audit.log", "snapshots"} {
			if _, err := os.Stat(filepath.Join(r.DataDir, f)); err != nil {
				t.Errorf("%s: %v (the secret scan must read it)", r.ID, err)
			}
		}
	}
	requireNoSecrets(t, e.w, e.m, e.safes, nil, regionKeySecrets(t, keys))
}

// operatorCluster runs `regionctl cluster <args> --json` as the operator
// against the replicas rs, fails the test unless it succeeds, and returns
// the cluster status it printed (the serving leader's, after the change).
func operatorCluster(t *testing.T, w *framework.World, rs []*framework.Replica, args ...string) *rootkmsv1.ClusterStatus {
	t.Helper()
	args = append(append([]string{"cluster"}, args...), "--json", "--rootkms", strings.Join(framework.Addrs(rs...), ","))
	res := w.RegionctlOK(append(args, w.IDFlags(operator)...)...)
	var st rootkmsv1.ClusterStatus
	if err := protojson.Unmarshal([]byte(res.Stdout), &st); err != nil {
		t.Fatalf("regionctl %s printed no cluster status (%v):\n%s", strings.Join(args[:2], " "), err, res)
	}
	return &st
}

// requireMembers checks that st names exactly the replicas want, each with
// its suffrage, Raft address and registered API address (which redirects
// to it, if it leads, need).
func requireMembers(t *testing.T, what string, st *rootkmsv1.ClusterStatus, want []*framework.Replica) {
	t.Helper()
	got, wantM := map[string]string{}, map[string]string{}
	for _, m := range st.GetMembers() {
		got[m.GetId()] = fmt.Sprintf("%s raft %s api %s", strings.TrimPrefix(m.GetSuffrage().String(), "SUFFRAGE_"), m.GetAddress(), m.GetApiAddress())
	}
	for _, r := range want {
		suffrage := "VOTER"
		if r.NonVoter {
			suffrage = "NONVOTER"
		}
		wantM[r.ID] = fmt.Sprintf("%s raft %s api %s", suffrage, r.RaftAddr, r.API)
	}
	if !maps.Equal(got, wantM) {
		t.Errorf("%s: members %v, want %v", what, got, wantM)
	}
}

// requireRefusesWrites sends a create of probe, a rotation of region and a
// linearizable read of region straight to the removed replica r, as
// regionctl, and checks that each is refused as by a replica that does not
// lead. Once r knows it is no member (its Raft has shut down, or its own
// configuration does not name it) each must be UNAVAILABLE: a NOT_LEADER
// answer that knows no leader makes callers wait on r for an election it
// takes no part in. That no probe was applied anywhere is checked at the
// end.
func requireRefusesWrites(t *testing.T, r *framework.Replica, probe, region string) {
	t.Helper()
	st, err := r.Status()
	if err != nil {
		t.Fatalf("GetClusterStatus(removed %s) = %v", r.ID, err)
	}
	noMember := st.GetState() == rootkmsv1.ReplicaState_REPLICA_STATE_SHUTDOWN ||
		!slices.ContainsFunc(st.GetMembers(), func(m *rootkmsv1.Member) bool { return m.GetId() == r.ID })
	c := r.Client(framework.Regionctl)
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	var got []string
	check := func(what string, err error) {
		t.Helper()
		what += " on removed " + r.ID
		got = append(got, status.Code(err).String())
		if noMember && status.Code(err) != codes.Unavailable {
			t.Errorf("%s (%s, its configuration %v) = %v, want UNAVAILABLE: it is no member", what, st.GetState(), st.GetMembers(), err)
			return
		}
		requireRefusedByNonLeader(t, what, err)
	}
	_, err = c.CreateRegion(ctx, &rootkmsv1.CreateRegionRequest{Region: probe})
	check("CreateRegion("+probe+")", err)
	_, err = c.RotateRegionKey(ctx, &rootkmsv1.RotateRegionKeyRequest{Region: region})
	check("RotateRegionKey("+region+")", err)
	_, err = c.GetRegion(ctx, &rootkmsv1.GetRegionRequest{Region: region})
	check("GetRegion("+region+")", err)
	t.Logf("removed %s (%s, knows it is no member: %t) refused a create, a rotation and a read: %v", r.ID, st.GetState(), noMember, got)
}

// requireOperatorAudited checks that some replica audited method (Join or
// Remove) of member as a success of the operator's.
func requireOperatorAudited(t *testing.T, rs []*framework.Replica, method, member string) {
	t.Helper()
	op := "/cairn.rootkms.v1.RootKMS/" + method
	for _, r := range rs {
		for _, rec := range r.Audit() {
			if rec.Identity == framework.SPIFFEID(operator) && rec.Operation == op && rec.Outcome == audit.OutcomeOK && rec.Target.Resource == "member/"+member {
				return
			}
		}
	}
	t.Errorf("no replica audited %s of member/%s by %s as ok", method, member, operator)
}

func ids(rs []*framework.Replica) string {
	var out []string
	for _, r := range rs {
		out = append(out, r.ID)
	}
	return strings.Join(out, ",")
}

// removedWatch polls a removed replica's status until finish: whether it
// reported leading once it had reported not leading (settled), and the
// highest index it reported applying.
type removedWatch struct {
	r *framework.Replica
	// bound is the commit index the removal was answered with: the
	// replica must never apply past it.
	bound      uint64
	stop, done chan struct{}

	mu           sync.Mutex
	settled      bool
	polls        int
	ledAgain     []string
	maxApplied   uint64
	states       map[string]int
	lastErr      error
	settledCh    chan struct{}
	settledAfter time.Duration
}

// watchRemoved starts watching r, just removed with the answer's commit
// index bound. The watch ends at finish or when the test ends.
func watchRemoved(t *testing.T, r *framework.Replica, bound uint64) *removedWatch {
	t.Helper()
	// The first poll makes the connection, which may fail the test: not
	// from the watch's goroutine.
	st, err := r.Status()
	w := &removedWatch{r: r, bound: bound, stop: make(chan struct{}), done: make(chan struct{}), states: map[string]int{}, settledCh: make(chan struct{})}
	start := time.Now()
	w.observe(st, err, start)
	go func() {
		defer close(w.done)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-w.stop:
				return
			case <-tick.C:
				st, err := r.Status()
				w.observe(st, err, start)
			}
		}
	}()
	t.Cleanup(w.end)
	return w
}

func (w *removedWatch) observe(st *rootkmsv1.ClusterStatus, err error, start time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.polls++
	if err != nil {
		w.lastErr = err
		return
	}
	state := strings.TrimPrefix(st.GetState().String(), "REPLICA_STATE_")
	w.states[state]++
	w.maxApplied = max(w.maxApplied, st.GetAppliedIndex())
	leads := st.GetState() == rootkmsv1.ReplicaState_REPLICA_STATE_LEADER
	switch {
	case !w.settled && !leads:
		w.settled = true
		w.settledAfter = time.Since(start)
		close(w.settledCh)
	case w.settled && leads:
		w.ledAgain = append(w.ledAgain, fmt.Sprintf("term %d at %s", st.GetTerm(), time.Since(start).Round(time.Millisecond)))
	}
}

func (w *removedWatch) end() {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	<-w.done
}

// waitSettled waits until the removed replica has reported not leading.
func (w *removedWatch) waitSettled(t *testing.T) {
	t.Helper()
	select {
	case <-w.settledCh:
	case <-time.After(framework.WaitTimeout):
		w.mu.Lock()
		defer w.mu.Unlock()
		t.Fatalf("removed %s still reports leading %s after its removal (states %v, last error %v)", w.r.ID, framework.WaitTimeout, w.states, w.lastErr)
	}
}

// finish ends the watch and checks it, given the cluster's commit index now.
func (w *removedWatch) finish(t *testing.T, commitIndex uint64) {
	t.Helper()
	w.end()
	w.mu.Lock()
	defer w.mu.Unlock()
	t.Logf("removed %s: %d status polls; states %v (not leading %s after the removal); applied at most index %d, the removal answered commit index %d, the cluster is at %d",
		w.r.ID, w.polls, w.states, w.settledAfter.Round(time.Millisecond), w.maxApplied, w.bound, commitIndex)
	if len(w.ledAgain) > 0 {
		t.Errorf("removed %s reported leading again after it had stopped: %v", w.r.ID, w.ledAgain)
	}
	if w.maxApplied > w.bound {
		t.Errorf("removed %s applied up to index %d, past the commit index %d its removal was answered with: it was still given the log", w.r.ID, w.maxApplied, w.bound)
	}
	if commitIndex < w.bound+minProgressAfterRemoval {
		t.Errorf("the cluster committed only %d entries after %s's removal (index %d to %d), want at least %d for the check that it no longer gets the log to mean something",
			commitIndex-min(commitIndex, w.bound), w.r.ID, w.bound, commitIndex, minProgressAfterRemoval)
	}
}
