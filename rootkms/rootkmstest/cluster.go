package rootkmstest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
)

// WaitTimeout bounds every wait of the harness (for a leader, for replication,
// for a raft future).
const WaitTimeout = 10 * time.Second

// Option configures a Cluster.
type Option func(*options)

type options struct {
	logOutput io.Writer
	logLevel  hclog.Level
	genesisID string
	kcv       []byte
	config    func(*raft.Config)
}

// WithLogOutput sends raft's logs to w (io.Discard to drop them) instead of
// the test's output.
func WithLogOutput(w io.Writer) Option { return func(o *options) { o.logOutput = w } }

// WithLogLevel sets raft's log level; the default is hclog.Warn.
func WithLogLevel(l hclog.Level) Option { return func(o *options) { o.logLevel = l } }

// WithLineage makes every node's FSM of RMK lineage genesisID and kcv instead
// of GenesisID and KCV().
func WithLineage(genesisID string, kcv []byte) Option {
	return func(o *options) { o.genesisID, o.kcv = genesisID, bytes.Clone(kcv) }
}

// WithConfig lets f adjust every node's raft.Config after the harness's
// defaults (fast timeouts) are set.
func WithConfig(f func(*raft.Config)) Option { return func(o *options) { o.config = f } }

// Cluster is an in-memory hashicorp/raft cluster of fsm.FSMs, connected by
// raft.InmemTransports, with in-memory log, stable and snapshot stores. Its
// methods must be called from the test's goroutine; they fail the test (with
// t.Fatal) when something does not happen within WaitTimeout.
type Cluster struct {
	opts   options
	logger hclog.Logger

	mu    sync.Mutex
	nodes []*Node // current members, in creation order
	all   []*Node // every node ever started, for shutdown
}

// Node is one replica of a Cluster.
type Node struct {
	// ID is the node's Raft server ID ("node-1", ... for the initial voters).
	ID string
	// Addr is its InmemTransport address.
	Addr raft.ServerAddress
	// Raft is the running raft instance.
	Raft *raft.Raft
	// FSM is the node's state machine.
	FSM *fsm.FSM
	// Transport, Logs (log and stable store) and Snapshots are the node's
	// raft plumbing, for tests that inspect it.
	Transport *raft.InmemTransport
	Logs      *raft.InmemStore
	Snapshots *raft.InmemSnapshotStore

	connected bool // guarded by Cluster.mu
}

// NewCluster starts a cluster of voters voting nodes (node-1..node-N), all
// bootstrapped with the same configuration, and waits for a leader. t.Cleanup
// shuts every node down (including nodes added later).
func NewCluster(t testing.TB, voters int, opts ...Option) *Cluster {
	t.Helper()
	if voters < 1 {
		t.Fatalf("NewCluster(%d voters): want at least 1", voters)
	}
	c := &Cluster{opts: options{logLevel: hclog.Warn, genesisID: GenesisID, kcv: KCV()}}
	for _, o := range opts {
		o(&c.opts)
	}
	out := c.opts.logOutput
	if out == nil {
		// Registered before the shutdown cleanup, so it runs after it: raft
		// logs while it shuts down, and t's output is gone after the test.
		w := &testWriter{w: t.Output()}
		t.Cleanup(w.stop)
		out = w
	}
	c.logger = hclog.New(&hclog.LoggerOptions{Name: "raft", Output: out, Level: c.opts.logLevel})
	t.Cleanup(func() { c.shutdown(t) })

	var cfg raft.Configuration
	for i := range voters {
		n := c.newNode(fmt.Sprintf("node-%d", i+1))
		cfg.Servers = append(cfg.Servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(n.ID), Address: n.Addr})
	}
	for _, n := range c.nodes {
		c.connect(n)
		if err := raft.BootstrapCluster(c.config(n.ID), n.Logs, n.Logs, n.Snapshots, n.Transport, cfg.Clone()); err != nil {
			t.Fatalf("BootstrapCluster(%s) = %v", n.ID, err)
		}
		c.start(t, n)
	}
	c.Leader(t)
	return c
}

// config is the raft.Config of node id: fast timeouts for tests, then the
// WithConfig adjustments.
func (c *Cluster) config(id string) *raft.Config {
	cfg := raft.DefaultConfig()
	cfg.LocalID = raft.ServerID(id)
	cfg.HeartbeatTimeout = 50 * time.Millisecond
	cfg.ElectionTimeout = 50 * time.Millisecond
	cfg.LeaderLeaseTimeout = 50 * time.Millisecond
	cfg.CommitTimeout = 5 * time.Millisecond
	cfg.Logger = c.logger.Named(id)
	if c.opts.config != nil {
		c.opts.config(cfg)
	}
	return cfg
}

// newNode makes node id's FSM, stores and transport and adds it to the
// members; it is neither connected nor started.
func (c *Cluster) newNode(id string) *Node {
	addr, trans := raft.NewInmemTransport(raft.ServerAddress(id))
	n := &Node{
		ID:        id,
		Addr:      addr,
		FSM:       fsm.New(c.opts.genesisID, c.opts.kcv),
		Transport: trans,
		Logs:      raft.NewInmemStore(),
		Snapshots: raft.NewInmemSnapshotStore(),
	}
	c.mu.Lock()
	c.nodes = append(c.nodes, n)
	c.mu.Unlock()
	return n
}

// start runs raft on n.
func (c *Cluster) start(t testing.TB, n *Node) {
	t.Helper()
	r, err := raft.NewRaft(c.config(n.ID), n.FSM, n.Logs, n.Logs, n.Snapshots, n.Transport)
	if err != nil {
		t.Fatalf("NewRaft(%s) = %v", n.ID, err)
	}
	n.Raft = r
	c.mu.Lock()
	c.all = append(c.all, n)
	c.mu.Unlock()
}

// connect routes n to and from every connected member.
func (c *Cluster) connect(n *Node) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, o := range c.nodes {
		if o != n && o.connected {
			n.Transport.Connect(o.Addr, o.Transport)
			o.Transport.Connect(n.Addr, n.Transport)
		}
	}
	n.connected = true
}

// Nodes returns the current members (removed nodes excluded), in creation
// order.
func (c *Cluster) Nodes() []*Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.nodes)
}

// Node returns member id, failing t if there is none.
func (c *Cluster) Node(t testing.TB, id string) *Node {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range c.nodes {
		if n.ID == id {
			return n
		}
	}
	t.Fatalf("Node(%q): no such member", id)
	return nil
}

func (c *Cluster) connected() []*Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*Node
	for _, n := range c.nodes {
		if n.connected {
			out = append(out, n)
		}
	}
	return out
}

// Leader waits until exactly one connected member is leader and confirms it
// with VerifyLeader, and returns it.
func (c *Cluster) Leader(t testing.TB) *Node {
	t.Helper()
	deadline := time.Now().Add(WaitTimeout)
	for {
		var leaders []*Node
		for _, n := range c.connected() {
			if n.Raft.State() == raft.Leader {
				leaders = append(leaders, n)
			}
		}
		if len(leaders) == 1 && leaders[0].Raft.VerifyLeader().Error() == nil {
			return leaders[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("Leader: %d leaders among connected members after %v", len(leaders), WaitTimeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// onLeader runs op on the leader until it succeeds, retrying while leadership
// moves, and fails t on any other error.
func (c *Cluster) onLeader(t testing.TB, what string, op func(*Node) error) {
	t.Helper()
	deadline := time.Now().Add(WaitTimeout)
	for {
		l := c.Leader(t)
		err := op(l)
		switch {
		case err == nil:
			return
		case !errors.Is(err, raft.ErrNotLeader) && !errors.Is(err, raft.ErrLeadershipLost):
			t.Fatalf("%s on leader %s = %v", what, l.ID, err)
		case time.Now().After(deadline):
			t.Fatalf("%s: leadership kept moving for %v: %v", what, WaitTimeout, err)
		}
	}
}

// AddNonvoter starts node id and adds it to the cluster as a non-voter.
func (c *Cluster) AddNonvoter(t testing.TB, id string) *Node {
	t.Helper()
	return c.add(t, id, false)
}

// AddVoter starts node id and adds it to the cluster as a voter.
func (c *Cluster) AddVoter(t testing.TB, id string) *Node {
	t.Helper()
	return c.add(t, id, true)
}

func (c *Cluster) add(t testing.TB, id string, voter bool) *Node {
	t.Helper()
	n := c.newNode(id)
	c.connect(n)
	c.start(t, n)
	c.onLeader(t, "add "+id, func(l *Node) error {
		if voter {
			return l.Raft.AddVoter(raft.ServerID(id), n.Addr, 0, WaitTimeout).Error()
		}
		return l.Raft.AddNonvoter(raft.ServerID(id), n.Addr, 0, WaitTimeout).Error()
	})
	return n
}

// Remove removes member id from the cluster configuration (through the
// leader, which may be id itself), then shuts it down and disconnects it.
func (c *Cluster) Remove(t testing.TB, id string) {
	t.Helper()
	n := c.Node(t, id)
	c.onLeader(t, "remove "+id, func(l *Node) error {
		return l.Raft.RemoveServer(raft.ServerID(id), 0, WaitTimeout).Error()
	})
	c.Disconnect(id)
	if err := n.Raft.Shutdown().Error(); err != nil {
		t.Fatalf("%s: Shutdown() = %v", id, err)
	}
	c.mu.Lock()
	c.nodes = slices.DeleteFunc(c.nodes, func(o *Node) bool { return o == n })
	c.mu.Unlock()
}

// Disconnect partitions member id from every other node, both ways.
func (c *Cluster) Disconnect(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	i := slices.IndexFunc(c.nodes, func(n *Node) bool { return n.ID == id })
	if i < 0 {
		return
	}
	target := c.nodes[i]
	target.Transport.DisconnectAll()
	target.connected = false
	for _, n := range c.nodes {
		if n != target {
			n.Transport.Disconnect(target.Addr)
		}
	}
}

// Reconnect ends the partition of member id: it routes it to and from every
// connected member again.
func (c *Cluster) Reconnect(id string) {
	c.mu.Lock()
	var n *Node
	if i := slices.IndexFunc(c.nodes, func(n *Node) bool { return n.ID == id }); i >= 0 {
		n = c.nodes[i]
	}
	c.mu.Unlock()
	if n != nil {
		c.connect(n)
	}
}

// WaitApplied waits until the FSM of every connected member has applied the
// log entry at index (fsm.FSM.AppliedIndex >= index). A node brought up to
// date by InstallSnapshot reports its index only once it applies a later
// command (snapshots do not carry their index), so apply one before waiting.
func (c *Cluster) WaitApplied(t testing.TB, index uint64) {
	t.Helper()
	deadline := time.Now().Add(WaitTimeout)
	for {
		var behind []string
		for _, n := range c.connected() {
			if got := n.FSM.AppliedIndex(); got < index {
				behind = append(behind, fmt.Sprintf("%s at %d", n.ID, got))
			}
		}
		if len(behind) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("WaitApplied(%d): after %v, %v", index, WaitTimeout, behind)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// Apply proposes cmd on n (fsm.EncodeCommand, then Raft.Apply) and returns the
// FSM's Result. It fails t if the command does not encode or raft does not
// commit it (n not leader, leadership lost, timeout); a command the FSM
// refuses is a Result with Err, not a failure.
func (n *Node) Apply(t testing.TB, cmd *statev1.Command) *fsm.Result {
	t.Helper()
	b, err := fsm.EncodeCommand(cmd)
	if err != nil {
		t.Fatalf("EncodeCommand(%v) = %v", cmd, err)
	}
	f := n.Raft.Apply(b, WaitTimeout)
	if err := f.Error(); err != nil {
		t.Fatalf("%s: Raft.Apply(%v) = %v", n.ID, cmd, err)
	}
	res, ok := f.Response().(*fsm.Result)
	if !ok {
		t.Fatalf("%s: Raft.Apply(%v).Response() = %T, want *fsm.Result", n.ID, cmd, f.Response())
	}
	return res
}

// shutdown stops every node ever started: partitions all first (so that no
// node waits on a peer that is going away), then shuts raft down.
func (c *Cluster) shutdown(t testing.TB) {
	c.mu.Lock()
	all := slices.Clone(c.all)
	c.mu.Unlock()
	for _, n := range all {
		n.Transport.DisconnectAll()
	}
	for _, n := range all {
		if err := n.Raft.Shutdown().Error(); err != nil {
			t.Errorf("%s: Shutdown() = %v", n.ID, err)
		}
	}
}

// testWriter forwards to the test's output until stop, then drops writes.
type testWriter struct {
	mu      sync.Mutex
	w       io.Writer
	stopped bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return len(p), nil
	}
	return w.w.Write(p)
}

func (w *testWriter) stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stopped = true
}
