package rootkms_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
)

// What hashicorp/raft v1.8.0 does when the leader's log store fails
// (raft.go, dispatchLogs): it answers every proposal of the batch with the
// store's error and steps down to follower in the same term, before
// replicating anything (the replicators are told of new entries only after
// StoreLogs succeeds, and the leader counts itself towards a quorum only
// then). A follower whose StoreLogs fails answers AppendEntries with
// failure and stays a follower (heartbeats still reach it), so it cannot
// help commit anything until its disk works again. A failed StableStore
// write of the current term makes raft panic ("failed to save current
// term"): the process dies, which is not tested in process.

// leaderProbe sends one RotateRegionKey straight to n (no client retries,
// no other replica), with a request ID, and returns its error.
func (cc *crashCluster) leaderProbe(n *crashNode, region, requestID string) error {
	conn, err := grpc.NewClient(n.api, grpc.WithTransportCredentials(cc.c.pki.ClientCredentials(regionctlID)))
	if err != nil {
		cc.t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = rootkmsv1.NewRootKMSClient(conn).RotateRegionKey(rootkmsclient.WithRequestID(ctx, requestID), &rootkmsv1.RotateRegionKeyRequest{Region: region})
	return err
}

func hasErrorReason(err error, reason string) bool {
	st, _ := status.FromError(err)
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetReason() == reason {
			return true
		}
	}
	return false
}

// TestLeaderDiskFaultRefusesWrites (reliability row 21): under a bounded
// load of region rotations and creations, the leader's StoreLogs starts
// failing as on a full disk (write: ENOSPC) and, in a second round on the
// next leader, as on a failing fsync (EIO). Each round asserts:
//   - the write that meets the fault is refused with UNAVAILABLE, a
//     message naming the disk error and telling the caller to retry with
//     the same request ID, and the OUTCOME_UNKNOWN reason; it is not applied
//     anywhere, and its retry (same request ID, through the client) is
//     applied exactly once, by another leader;
//   - the faulty leader steps down, and every later write sent straight to
//     it while its disk fails is refused (FAILED_PRECONDITION naming no or
//     another leader, or UNAVAILABLE): none is acknowledged;
//   - another voter leads and acknowledges writes meanwhile, while the
//     faulty node's log stays behind (it persisted nothing);
//   - once the fault clears, the node catches up.
//
// At the end every acknowledged write is on every replica, with the
// version, creation time and key its acknowledgement named (versions 1..N,
// the same on every replica), and the term and vote invariants of
// TestCrashLosesOnlyUnsyncedWrites hold.
func TestLeaderDiskFaultRefusesWrites(t *testing.T) {
	cc := newCrashCluster(t)
	l := cc.startLoad("us-east", "eu-west")
	l.waitAcks(t, 5, "before any fault")

	rounds := []struct {
		name, probe string
		fault       func(dbPath string) error
		says        string
	}{
		// bbolt's write of a page on a full disk: *os.PathError from WriteAt.
		{"disk full", "probe-a", func(db string) error { return &os.PathError{Op: "write", Path: db, Err: syscall.ENOSPC} },
			"no space left on device"},
		// bbolt's fdatasync after the pages: the bare errno.
		{"fsync error", "probe-b", func(string) error { return syscall.EIO }, "input/output error"},
	}
	for i, round := range rounds {
		createRegion(t, cc.cl, round.probe)
		// The load pauses while the fault is armed, so that the probe is
		// the first write to meet it.
		l.gate.Lock()
		// The probe goes straight to the leader armed with the fault. If
		// leadership moved before the probe arrived (an election on a
		// busy machine), the probe is refused as sent to a follower and
		// the fault never fired: disarm, and arm the new leader.
		var (
			leader *crashNode
			err    error
			rid    string
		)
		for try := 0; ; try++ {
			leader = cc.leader()
			db := filepath.Join(cc.c.dir, leader.id, "raft", "raft.db")
			leader.store.setFail(round.fault(db), hasCommand)
			rid = fmt.Sprintf("disk-fault-probe-%d-try-%d", i, try)
			err = cc.leaderProbe(leader, round.probe, rid)
			t.Logf("%s: RotateRegionKey straight to the leader %s = %v", round.name, leader.id, err)
			if status.Code(err) != codes.FailedPrecondition || leader.store.failed() != 0 || try == 4 {
				break
			}
			leader.store.setFail(nil, nil)
		}
		if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), round.says) ||
			!strings.Contains(err.Error(), "same request ID") || !hasErrorReason(err, rootkmsclient.ReasonOutcomeUnknown) {
			l.gate.Unlock()
			t.Fatalf("%s: the write meeting the fault = %v; want UNAVAILABLE, OUTCOME_UNKNOWN, naming %q and the retry with the same request ID", round.name, err, round.says)
		}
		if leader.store.failed() == 0 {
			l.gate.Unlock()
			t.Fatalf("%s: the failpoint never fired", round.name)
		}
		// The leader steps down.
		deadline := time.Now().Add(10 * time.Second)
		for leader.rep.srv.Raft().State() == raft.Leader {
			if time.Now().After(deadline) {
				l.gate.Unlock()
				t.Fatalf("%s: %s still leads 10s after its StoreLogs failed", round.name, leader.id)
			}
			time.Sleep(10 * time.Millisecond)
		}
		l.gate.Unlock()

		// Under load, another voter leads and acknowledges writes, while
		// every write sent straight to the faulty node is refused.
		next := cc.leader(leader)
		probes := map[codes.Code]int{}
		for j := range 10 {
			err := cc.leaderProbe(leader, round.probe, fmt.Sprintf("disk-fault-probe-%d-%d", i, j))
			if err == nil {
				t.Fatalf("%s: a write to %s was acknowledged while its StoreLogs fails", round.name, leader.id)
			}
			if c := status.Code(err); c != codes.FailedPrecondition && c != codes.Unavailable {
				t.Errorf("%s: a write to %s while its disk fails = %v; want FAILED_PRECONDITION (not the leader) or UNAVAILABLE", round.name, leader.id, err)
			}
			probes[status.Code(err)]++
			time.Sleep(50 * time.Millisecond)
		}
		t.Logf("%s: %s leads now; writes straight to %s while its disk fails: %v", round.name, next.id, leader.id, probes)
		l.waitAcks(t, 5, round.name+" with "+leader.id+"'s disk failing")
		ownLast, _ := leader.store.logs.LastIndex()
		nextLast, _ := next.store.logs.LastIndex()
		if ownLast >= nextLast {
			t.Errorf("%s: %s's log reaches %d while its disk fails, the leader's %d: it stored entries its failing StoreLogs refused", round.name, leader.id, ownLast, nextLast)
		}
		// The refused write was not applied; its retry with the same
		// request ID is applied once, by the new leader.
		if got := versions(t, cc.cl, round.probe); len(got) != 1 {
			t.Errorf("%s: %s has versions %v after the refused rotation, want [1]", round.name, round.probe, got)
		}
		r, _, err := regionOp(rootkmsclient.WithRequestID(bg(t), rid), cc.cl, rotateOp(round.probe))
		if err != nil || r.GetPrimaryVersion() != 2 {
			t.Errorf("%s: the refused rotation retried with its request ID = %v, %v; want version 2", round.name, r, err)
		}
		l.mu.Lock()
		if err == nil {
			l.acks = append(l.acks, ackOf(round.probe, r))
		}
		l.mu.Unlock()

		// The disk is freed: the node catches up.
		fired := leader.store.failed()
		leader.store.setFail(nil, nil)
		cc.waitConverged()
		t.Logf("%s: %s's StoreLogs failed %d times; cleared, it caught up", round.name, leader.id, fired)
	}

	l.halt()
	cc.checkAcksEverywhere(l, "us-east", "eu-west", "probe-a", "probe-b")
	cc.checkTermsAndVotes()
}
