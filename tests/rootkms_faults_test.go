package tests

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/cairnkms/cairn/internal/audit"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/tests/framework"
)

// TestRootKMSNonVoterServesWithVotersDown: a non-voting replica that has a
// region keeps serving its key from its own state when every voter is
// killed, with the same key bytes, and refuses what needs a leader. No
// file holds the RMK, a share, a passphrase or the region's key.
func TestRootKMSNonVoterServesWithVotersDown(t *testing.T) {
	e := newRootKMSEnv(t, true)
	nv := e.replicas[3]
	c := e.w.RootKMSClient(framework.Regionctl, e.voters...)
	const region = "r05"
	writeOK(t, c, nil, 0, framework.OpCreate, region)
	if r := writeOK(t, c, nil, 0, framework.OpRotate, region); r.GetPrimaryVersion() != 2 {
		t.Fatalf("RotateRegionKey(%s) = primary v%d, want v2", region, r.GetPrimaryVersion())
	}
	before, problem := waitRegionState(nv, region, 2)
	if problem != "" {
		t.Fatalf("%s before the voters die: %s", nv.ID, problem)
	}
	defer clearKeys(before)

	for _, v := range e.voters {
		v.Kill()
	}
	// Served at once, and still once the non-voter knows it has no leader.
	requireSameKeys(t, nv, region, before, "right after the voters died")
	st, took := nv.WaitStatus("without a leader", func(st *rootkmsv1.ClusterStatus) bool { return st.GetLeaderId() == "" })
	t.Logf("%s: no leader %s after the voters died (term %d, applied index %d)", nv.ID, took.Round(time.Millisecond), st.GetTerm(), st.GetAppliedIndex())
	if !st.GetHasRootKey() || st.GetState() == rootkmsv1.ReplicaState_REPLICA_STATE_LEADER {
		t.Errorf("%s status %v: want a follower that still holds the root key", nv.ID, st)
	}
	requireSameKeys(t, nv, region, before, "without a leader")

	// What needs a leader fails, and says so.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	raw := nv.Client(framework.Regionctl)
	_, err := raw.GetRegion(ctx, &rootkmsv1.GetRegionRequest{Region: region})
	requireRefusedByNonLeader(t, "GetRegion on the non-voter", err)
	_, err = raw.RotateRegionKey(ctx, &rootkmsv1.RotateRegionKeyRequest{Region: region})
	requireRefusedByNonLeader(t, "RotateRegionKey on the non-voter", err)
	requireSameKeys(t, nv, region, before, "after the refused writes")
	nv.Stop()
	e.requireNoSecrets(t, map[string]regionKeys{region: before})
}

// requireSameKeys checks that r serves region with exactly the versions and
// key bytes of want.
func requireSameKeys(t *testing.T, r *framework.Replica, region string, want regionKeys, when string) {
	t.Helper()
	got, problem := regionState(r, region, uint32(len(want)))
	if problem != "" {
		t.Errorf("%s %s: region %s: %s", r.ID, when, region, problem)
		return
	}
	defer clearKeys(got)
	for v, k := range want {
		if !bytes.Equal(got[v], k) {
			t.Errorf("%s %s: region %s version %d: other key bytes than before", r.ID, when, region, v)
		}
	}
}

func clearKeys(k regionKeys) {
	for _, b := range k {
		clear(b)
	}
}

// requireRefusedByNonLeader checks that err is what a replica that does not
// lead answers: FAILED_PRECONDITION with a NOT_LEADER ErrorInfo, or
// UNAVAILABLE.
func requireRefusedByNonLeader(t *testing.T, what string, err error) {
	t.Helper()
	st := status.Convert(err)
	switch st.Code() {
	case codes.Unavailable:
	case codes.FailedPrecondition:
		if !isNotLeader(st) {
			t.Errorf("%s = %v, want a NOT_LEADER ErrorInfo with FAILED_PRECONDITION", what, err)
		}
	default:
		t.Errorf("%s = %v, want FAILED_PRECONDITION (NOT_LEADER) or UNAVAILABLE", what, err)
	}
}

func isNotLeader(st *status.Status) bool {
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetReason() == "NOT_LEADER" {
			return true
		}
	}
	return false
}

// The pause of TestRootKMSPausedLeader.
const (
	pausedLoadDuration = 8 * time.Second
	pauseAfter         = 1500 * time.Millisecond
	// minPause is several election timeouts (300ms).
	minPause = 2 * time.Second
	// directTimeout bounds the calls to the paused leader: long enough that
	// they are answered after it resumes, not cut off by the caller.
	directTimeout = 15 * time.Second
)

// directCall is one call made straight to the paused leader.
type directCall struct {
	in    framework.RegionInput
	reply *rootkmsv1.Region
	err   error
	// after is how long after the resume the answer came.
	after time.Duration
}

// TestRootKMSPausedLeader: the leader is stopped with SIGSTOP for several
// election timeouts while two clients keep writing through the other
// voters. Writes and a read sent straight to the paused leader, after a
// newer leader acknowledged a rotation, are answered only once it resumes,
// and only with errors: never an acknowledged write that is lost, never a
// stale read. The recorded history, those calls included, is
// linearizable, and no file holds a root secret or a region key.
func TestRootKMSPausedLeader(t *testing.T) {
	e := newRootKMSEnv(t, false)
	regions := regionNames[20:28]
	const absent = "r28" // only the paused leader is asked to create it
	h := framework.NewHistory()
	setup := e.w.RootKMSClient(framework.Regionctl, e.voters...)
	for _, r := range regions {
		writeOK(t, setup, h, 9, framework.OpCreate, r)
	}
	clients := []*rootkmsclient.Client{
		e.w.RootKMSClient(framework.Regionctl, e.voters...),
		e.w.RootKMSClient(framework.Regionctl, e.voters...),
	}
	l := startLoad(t, h, clients, regions, pausedLoadDuration, loadMaxOps)

	sleepUntil(l.start.Add(pauseAfter))
	old, _, _ := framework.WaitLeader(e.voters...)
	raw := old.Client(framework.Regionctl)
	warm, cancelWarm := context.WithTimeout(context.Background(), 5*time.Second)
	_, err := raw.GetClusterStatus(warm, &rootkmsv1.GetClusterStatusRequest{}) // connected before the pause
	cancelWarm()
	if err != nil {
		t.Fatalf("GetClusterStatus(%s) = %v", old.ID, err)
	}
	pausedAt := time.Now()
	old.Pause()
	var others []*framework.Replica
	for _, r := range e.voters {
		if r != old {
			others = append(others, r)
		}
	}
	newLeader, _, _ := framework.WaitLeader(others...)
	t.Logf("SIGSTOP of leader %s: %s leads %s later", old.ID, newLeader.ID, time.Since(pausedAt).Round(time.Millisecond))
	// A rotation acknowledged by the new leader makes the paused leader's
	// view of regions[0] provably stale before it is asked for it.
	stale := writeOK(t, setup, h, 9, framework.OpRotate, regions[0])

	direct := []*directCall{
		{in: framework.RegionInput{Op: framework.OpGet, Region: regions[0]}},
		{in: framework.RegionInput{Op: framework.OpRotate, Region: regions[1]}},
		{in: framework.RegionInput{Op: framework.OpCreate, Region: absent}},
	}
	var resumedAt atomic.Pointer[time.Time]
	var wg sync.WaitGroup
	// If the test fails first, the calls are cut short before the paused
	// process is killed.
	directCtx, cancelDirect := context.WithCancel(context.Background())
	t.Cleanup(func() { cancelDirect(); wg.Wait() })
	for i, d := range direct {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(directCtx, directTimeout)
			defer cancel()
			call := h.Begin(10+i, d.in)
			ctx = metadata.AppendToOutgoingContext(ctx, audit.RequestIDHeader, call.RequestID())
			switch d.in.Op {
			case framework.OpGet:
				d.reply, d.err = raw.GetRegion(ctx, &rootkmsv1.GetRegionRequest{Region: d.in.Region})
			case framework.OpRotate:
				d.reply, d.err = raw.RotateRegionKey(ctx, &rootkmsv1.RotateRegionKeyRequest{Region: d.in.Region})
			case framework.OpCreate:
				d.reply, d.err = raw.CreateRegion(ctx, &rootkmsv1.CreateRegionRequest{Region: d.in.Region})
			}
			call.End(d.reply, d.err)
			if at := resumedAt.Load(); at != nil {
				d.after = time.Since(*at)
			} else {
				d.after = -1 // answered while paused: impossible
			}
		}()
	}
	sentAt := time.Now()

	// Writes go on through the others while the leader is paused. (Not
	// necessarily from every client: rootkmsclient.Client keeps trying the
	// leader it last saw succeed first, so a client whose calls keep ending
	// in AlreadyExists can spend an attempt timeout per call on the paused
	// leader.)
	if _, ok := l.waitOKWrites(pausedAt, 1, 10*time.Second); !ok {
		t.Errorf("no load client had a write succeed through the other voters while %s was paused:%s", old.ID, l.summary(pausedAt))
	}
	sleepUntil(pausedAt.Add(minPause))
	sleepUntil(sentAt.Add(300 * time.Millisecond)) // the calls are on their way
	now := time.Now()
	resumedAt.Store(&now)
	old.Resume()
	t.Logf("SIGCONT of %s after %s paused; the load meanwhile:%s", old.ID, now.Sub(pausedAt).Round(time.Millisecond), l.summary(pausedAt))
	wg.Wait()

	for _, d := range direct {
		what := d.in.Op.String() + "(" + d.in.Region + ") sent to the paused leader " + old.ID
		t.Logf("%s: answered %s after the resume: %v", what, d.after.Round(time.Millisecond), d.err)
		if d.err == nil {
			t.Errorf("%s = OK (primary v%d), want an error: a deposed leader answered (stale version: v%d)", what, d.reply.GetPrimaryVersion(), stale.GetPrimaryVersion()-1)
			continue
		}
		requireRefusedByNonLeader(t, what, d.err)
		if d.after < 0 {
			t.Errorf("%s was answered while the process was stopped", what)
		}
	}
	// The old leader follows and catches up; asked again, it redirects.
	st, _ := old.WaitStatus("a follower with a leader", func(st *rootkmsv1.ClusterStatus) bool {
		return st.GetState() == rootkmsv1.ReplicaState_REPLICA_STATE_FOLLOWER && st.GetLeaderApiAddress() != ""
	})
	t.Logf("%s: follower of %s %s after the resume (term %d)", old.ID, st.GetLeaderId(), time.Since(now).Round(time.Millisecond), st.GetTerm())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	call := h.Begin(13, framework.RegionInput{Op: framework.OpGet, Region: regions[0]})
	r, err := raw.GetRegion(metadata.AppendToOutgoingContext(ctx, audit.RequestIDHeader, call.RequestID()), &rootkmsv1.GetRegionRequest{Region: regions[0]})
	call.End(r, err)
	if err != nil {
		requireRefusedByNonLeader(t, "GetRegion on the resumed old leader", err)
	}

	l.wait()
	total, answered := l.count()
	t.Logf("load: %d clients, %d operations (%d answered)", len(clients), total, answered)
	final := finalReads(t, setup, h, 9, append(slices.Clone(regions), absent))
	if final[absent] != 0 {
		t.Errorf("region %s exists (v%d); only the paused leader was asked to create it", absent, final[absent])
	}
	leader, lst, _ := framework.WaitLeader(e.voters...)
	for _, r := range e.voters {
		r.WaitApplied(lst.GetCommitIndex())
	}
	keys := requireReplicaState(t, e.voters, final)
	stopDeposedLeader(t, old)
	checkHistory(t, h, leader, lst.GetCommitIndex(), e.voters...)
	e.requireNoSecrets(t, keys)
}

// stopDeposedLeader stops a leader that was paused and deposed. It may hang
// on SIGTERM: when it resumes, its pipelined replication to a peer that
// answers with a newer term can deadlock inside hashicorp/raft v1.8.0
// (pipelineDecode returns and leaves doneCh unread while pipelineReplicate
// waits to send one more AppendEntries; see grafana/pyroscope#5518), and
// Raft.Shutdown then waits for that goroutine forever. About one run in
// fifteen does. That is a defect of the binary (reported), outside what this
// test checks; it is logged, with where the goroutine dump went, not failed.
func stopDeposedLeader(t *testing.T, r *framework.Replica) {
	t.Helper()
	if err := r.Terminate(); err != nil {
		t.Logf("KNOWN DEFECT, not a failure of this test: the deposed leader did not stop cleanly: %v", err)
	}
}

// TestRootKMSCorruptStateRefusesToStart: a follower whose raft.db is
// garbage, whose raft.db is truncated, or whose newest snapshot is truncated
// exits non-zero at start, naming the file, without ever answering a
// request. With its files restored it starts, rejoins and catches up. No
// file (the corrupted ones' copies included) holds a root secret or a
// region key.
func TestRootKMSCorruptStateRefusesToStart(t *testing.T) {
	e := newRootKMSEnv(t, false)
	c := e.w.RootKMSClient(framework.Regionctl, e.voters...)
	regions := regionNames[30:35]
	want := map[string]uint32{}
	for _, r := range regions[:4] {
		writeOK(t, c, nil, 0, framework.OpCreate, r)
		want[r] = 1
	}
	leader, _, _ := framework.WaitLeader(e.voters...)
	var f *framework.Replica
	for _, r := range e.voters {
		if r != leader {
			f = r
			break
		}
	}
	// A snapshot on the follower, then more log after it.
	snap := snapshot(t, e.w, f)
	t.Logf("%s: snapshot at index %d (term %d)", f.ID, snap.GetIndex(), snap.GetTerm())
	writeOK(t, c, nil, 0, framework.OpCreate, regions[4])
	want[regions[4]] = 1
	writeOK(t, c, nil, 0, framework.OpRotate, regions[0])
	want[regions[0]] = 2
	st, err := leader.Status()
	if err != nil {
		t.Fatal(err)
	}
	f.WaitApplied(st.GetCommitIndex())
	f.Stop()

	db := filepath.Join(f.DataDir, "raft.db")
	snaps := filepath.Join(f.DataDir, "snapshots")
	entries, err := os.ReadDir(snaps)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, en := range entries {
		if en.IsDir() {
			names = append(names, en.Name())
		}
	}
	if len(names) != 1 {
		t.Fatalf("%s holds snapshots %v, want exactly one", snaps, names)
	}
	stateBin := filepath.Join(snaps, names[len(names)-1], "state.bin")
	saved := map[string][]byte{}
	for _, p := range []string{db, stateBin} {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		saved[p] = b
	}
	restore := func() {
		t.Helper()
		for p, b := range saved {
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	cases := []struct {
		name    string
		corrupt func() error
		// file is what stderr must name.
		file string
	}{
		{"raft.db overwritten with garbage", func() error {
			garbage := make([]byte, len(saved[db]))
			_, _ = rand.Read(garbage)
			return os.WriteFile(db, garbage, 0o600)
		}, "raft.db"},
		{"raft.db truncated to a third", func() error { return os.Truncate(db, int64(len(saved[db])/3)) }, "raft.db"},
		{"newest snapshot's state.bin truncated to half", func() error { return os.Truncate(stateBin, int64(len(saved[stateBin])/2)) }, "snapshot"},
	}
	for _, tc := range cases {
		restore()
		if err := tc.corrupt(); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		requireRefusesToStart(t, f, tc.name, tc.file)
	}

	// Repaired, it rejoins and catches up, and takes new writes.
	restore()
	f.Restart()
	f.WaitServing()
	writeOK(t, c, nil, 0, framework.OpRotate, regions[1])
	want[regions[1]] = 2
	leader, st, _ = framework.WaitLeader(e.voters...)
	f.WaitApplied(st.GetCommitIndex())
	keys := requireReplicaState(t, e.voters, want)
	t.Logf("%s: repaired, rejoined (leader %s) and caught up to index %d", f.ID, leader.ID, st.GetCommitIndex())
	e.requireNoSecrets(t, keys)
}

// startRefusalTimeout is how soon a replica with corrupt state must exit.
const startRefusalTimeout = 5 * time.Second

// requireRefusesToStart starts r and checks that it exits non-zero within
// startRefusalTimeout with an error naming file on stderr, and that no
// request to its API was answered meanwhile.
func requireRefusesToStart(t *testing.T, r *framework.Replica, what, file string) {
	t.Helper()
	stop := make(chan struct{})
	var answered, probes atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	client := r.Client(framework.Observer)
	go func() {
		defer wg.Done()
		// Bounded: at most one probe per 10ms until the process exits.
		for range int(2 * startRefusalTimeout / (10 * time.Millisecond)) {
			select {
			case <-stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			if _, err := client.GetClusterStatus(ctx, &rootkmsv1.GetClusterStatusRequest{}); err == nil {
				answered.Add(1)
			}
			cancel()
			probes.Add(1)
			time.Sleep(10 * time.Millisecond)
		}
	}()
	start := time.Now()
	r.Restart()
	exited, code := r.WaitExit(startRefusalTimeout)
	took := time.Since(start)
	close(stop)
	wg.Wait()
	if !exited {
		r.Kill()
		t.Fatalf("%s: %s still runs %s after start, want it to refuse to start", what, r.ID, startRefusalTimeout)
	}
	stderr := r.Stderr()
	var errLines []string
	for _, line := range strings.Split(stderr, "\n") {
		if strings.Contains(line, "level=ERROR") {
			errLines = append(errLines, line)
		}
	}
	var errLine string // the last: why the process gave up
	if len(errLines) > 0 {
		errLine = errLines[len(errLines)-1]
	}
	t.Logf("%s: %s exited %d after %s (%d probes of its API meanwhile); its errors:\n%s", what, r.ID, code, took.Round(time.Millisecond), probes.Load(), strings.Join(errLines, "\n"))
	if code == 0 {
		t.Errorf("%s: %s exited 0, want a failure", what, r.ID)
	}
	if errLine == "" || !strings.Contains(errLine, file) {
		t.Errorf("%s: stderr has no error naming %s:\n%s", what, file, stderr)
	}
	if n := answered.Load(); n > 0 {
		t.Errorf("%s: %s answered %d requests before it exited", what, r.ID, n)
	}
	if strings.Contains(stderr, "rootkms: started") {
		t.Errorf("%s: %s logged that it started serving", what, r.ID)
	}
}

// TestRootKMSAccessControl: across processes, a KMS of another region may
// not unwrap a region's key and a KMS may not create keysets; each refusal
// is in the replica's audit log with the caller's identity. No file holds a
// root secret or the region's key.
func TestRootKMSAccessControl(t *testing.T) {
	e := newRootKMSEnv(t, false)
	c := e.w.RootKMSClient(framework.Regionctl, e.voters...)
	const region = "r00"
	writeOK(t, c, nil, 0, framework.OpCreate, region)
	leader, st, _ := framework.WaitLeader(e.voters...)
	for _, r := range e.voters {
		r.WaitApplied(st.GetCommitIndex())
	}
	other := kmsOf("r01")
	for _, r := range e.voters {
		// The region's own KMS is served, from any replica.
		m, _, err := r.UnwrapRegionKey(kmsOf(region), region)
		if err != nil || len(m.GetVersions()) != 1 {
			t.Fatalf("UnwrapRegionKey(%s as %s on %s) = %v, %v; want version 1", region, kmsOf(region), r.ID, m, err)
		}
		clear(m.GetVersions()[0].GetKey())

		m, meta, err := r.UnwrapRegionKey(other, region)
		if status.Code(err) != codes.PermissionDenied || m != nil || meta != nil {
			t.Errorf("UnwrapRegionKey(%s as %s on %s) = %v, %v; want PermissionDenied and nothing else", region, other, r.ID, meta, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		ks, err := r.Client(kmsOf(region)).CreateKeyset(ctx, createKeysetRequest(region))
		cancel()
		if status.Code(err) != codes.PermissionDenied || ks != nil {
			t.Errorf("CreateKeyset(as %s on %s) = %v, %v; want PermissionDenied", kmsOf(region), r.ID, ks, err)
		}

		recs := r.Audit()
		for _, want := range []struct {
			as, op string
		}{
			{other, "/cairn.rootkms.v1.RootKMS/UnwrapRegionKey"},
			{kmsOf(region), "/cairn.rootkms.v1.RootKMS/CreateKeyset"},
		} {
			i := slices.IndexFunc(recs, func(rec audit.Record) bool {
				return rec.Identity == framework.SPIFFEID(want.as) && rec.Operation == want.op && rec.Outcome == audit.OutcomeDenied
			})
			if i < 0 {
				t.Errorf("audit log of %s: no denied record of %s calling %s", r.ID, want.as, want.op)
				continue
			}
			if recs[i].Code != codes.PermissionDenied.String() {
				t.Errorf("audit log of %s: %+v has code %q, want %q", r.ID, recs[i], recs[i].Code, codes.PermissionDenied.String())
			}
		}
	}
	// regionctl may create keysets (through the leader).
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := leader.Client(framework.Regionctl).CreateKeyset(ctx, createKeysetRequest(region)); err != nil {
		t.Errorf("CreateKeyset(as %s on the leader %s) = %v", framework.Regionctl, leader.ID, err)
	}
	keys, problem := regionState(leader, region, 1)
	if problem != "" {
		t.Fatalf("%s: region %s for the secret scan: %s", leader.ID, region, problem)
	}
	e.requireNoSecrets(t, map[string]regionKeys{region: keys})
}

func createKeysetRequest(region string) *rootkmsv1.CreateKeysetRequest {
	return &rootkmsv1.CreateKeysetRequest{Name: "payments/ledger", Regions: []string{region}, CiphertextTtl: durationpb.New(24 * time.Hour)}
}
