package raftnode_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cairnkms/cairn/rootkms/raftnode"
)

// recordingStable is a stable store that records every term and vote
// write Raft makes through it before passing it on.
type recordingStable struct {
	raft.StableStore

	mu     sync.Mutex
	uint64 map[string]uint64
	bytes  map[string]string
}

func (s *recordingStable) Set(k, v []byte) error {
	s.mu.Lock()
	s.bytes[string(k)] = string(v)
	s.mu.Unlock()
	return s.StableStore.Set(k, v)
}

func (s *recordingStable) SetUint64(k []byte, v uint64) error {
	s.mu.Lock()
	s.uint64[string(k)] = v
	s.mu.Unlock()
	return s.StableStore.SetUint64(k, v)
}

// TestWrapStableStore: Raft writes its current term and its vote through
// the store WrapStableStore returns (so a test can lose or fail those
// writes), and the writes reach the bolt file: reopened without the hook,
// the node starts in the term the wrapper saw written.
func TestWrapStableStore(t *testing.T) {
	dir := t.TempDir()
	rec := &recordingStable{uint64: map[string]uint64{}, bytes: map[string]string{}}
	_, trans := raft.NewInmemTransport("")
	n, err := raftnode.Open(raftnode.Config{ID: "n1", Dir: dir, FSM: nopFSM{}, Transport: trans, Bootstrap: true,
		HeartbeatTimeout: 50 * time.Millisecond, ElectionTimeout: 50 * time.Millisecond, LeaderLeaseTimeout: 50 * time.Millisecond,
		WrapStableStore: func(s raft.StableStore) raft.StableStore { rec.StableStore = s; return rec }})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for n.Raft.State() != raft.Leader {
		if time.Now().After(deadline) {
			n.Close()
			t.Fatal("the single node never became leader")
		}
		time.Sleep(10 * time.Millisecond)
	}
	term := n.Raft.CurrentTerm()
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	rec.mu.Lock()
	gotTerm, gotVoteTerm, gotCand := rec.uint64["CurrentTerm"], rec.uint64["LastVoteTerm"], rec.bytes["LastVoteCand"]
	rec.mu.Unlock()
	if gotTerm != term || gotVoteTerm != term || gotCand == "" {
		t.Fatalf("through the wrapper: CurrentTerm %d, LastVoteTerm %d, LastVoteCand %q; want term %d written, and a vote in it", gotTerm, gotVoteTerm, gotCand, term)
	}

	n, err = open(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if got := n.Raft.CurrentTerm(); got < term {
		t.Errorf("reopened without the hook, the node is in term %d, below the term %d written through the wrapper", got, term)
	}
}

// failingTermStore fails every write of the current term once armed, as a
// full disk would.
type failingTermStore struct {
	raft.StableStore
	armed *atomic.Bool
}

func (s failingTermStore) SetUint64(k []byte, v uint64) error {
	if string(k) == "CurrentTerm" && s.armed.Load() {
		return &os.PathError{Op: "write", Path: "raft.db", Err: syscall.ENOSPC}
	}
	return s.StableStore.SetUint64(k, v)
}

// TestTermWriteErrorStopsProcess: when the stable store cannot persist a
// new term (a full disk), hashicorp/raft panics ("failed to save current
// term") in the election that needs the new term, and the process dies,
// rather than go on in a term it has not persisted: fail-stop, the node
// restarts from its disk. The node runs in a child process (this test
// binary again), since the panic ends it; the panic must come from raft's
// own goroutine, not the test's.
func TestTermWriteErrorStopsProcess(t *testing.T) {
	if os.Getenv("CAIRN_RAFTNODE_TERM_WRITE_CHILD") == "1" {
		// Armed once the node runs (NewRaft writes the term it starts in,
		// and would panic the same way at start), before its first
		// election (a second away).
		var armed atomic.Bool
		_, trans := raft.NewInmemTransport("")
		n, err := raftnode.Open(raftnode.Config{ID: "n1", Dir: t.TempDir(), FSM: nopFSM{}, Transport: trans, Bootstrap: true,
			HeartbeatTimeout: time.Second, ElectionTimeout: time.Second, LeaderLeaseTimeout: 500 * time.Millisecond,
			WrapStableStore: func(s raft.StableStore) raft.StableStore { return failingTermStore{s, &armed} }})
		if err != nil {
			t.Fatal(err)
		}
		armed.Store(true)
		// The first election writes a new term; the child should die
		// there. If it has not within 20s, it says so and exits 0.
		time.Sleep(20 * time.Second)
		n.Close()
		t.Log("CHILD SURVIVED")
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestTermWriteErrorStopsProcess$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), "CAIRN_RAFTNODE_TERM_WRITE_CHILD=1", "GOTRACEBACK=single")
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || strings.Contains(string(out), "CHILD SURVIVED") {
		t.Fatalf("a node whose term write fails: child exit %v; want it to die. Output:\n%s", err, out)
	}
	if !strings.Contains(string(out), "failed to save current term") || !strings.Contains(string(out), "no space left on device") ||
		!strings.Contains(string(out), "raft.(*Raft).run(") {
		t.Errorf("the child died (%v), but not of the failed term write on raft's goroutine. Output:\n%s", err, out)
	}
}

// TestTermWriteErrorAtStartIsAnError: a node whose disk cannot take the
// term write NewRaft makes at start (a full disk) fails to open with an
// error that says so, instead of panicking the process.
func TestTermWriteErrorAtStartIsAnError(t *testing.T) {
	var armed atomic.Bool
	armed.Store(true)
	_, trans := raft.NewInmemTransport("")
	n, err := raftnode.Open(raftnode.Config{ID: "n1", Dir: t.TempDir(), FSM: nopFSM{}, Transport: trans, Bootstrap: true,
		HeartbeatTimeout: time.Second, ElectionTimeout: time.Second, LeaderLeaseTimeout: 500 * time.Millisecond,
		WrapStableStore: func(s raft.StableStore) raft.StableStore { return failingTermStore{s, &armed} }})
	if err == nil {
		n.Close()
		t.Fatal("Open with a failing term write = nil error, want one")
	}
	for _, want := range []string{"full or failing", "failed to save current term", "no space left on device"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Open error %q does not contain %q", err, want)
		}
	}
}
