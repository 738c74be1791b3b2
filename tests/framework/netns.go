package framework

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// netnsPrefix starts the name of every network namespace a Network makes:
// cairn-e2e-<pid of the test process>-<host>.
const netnsPrefix = "cairn-e2e-"

// NetnsEnv set to "off" makes NewNetwork use the loopback fallback even
// where it could make namespaces (to run the fallback on purpose).
const NetnsEnv = "CAIRN_E2E_NETNS"

// ipTimeout bounds one `ip` command.
const ipTimeout = 10 * time.Second

// Network is a set of hosts, each with its own IP address, for tests that
// run every component on a host of its own.
//
// As root, where `ip netns add` works, each host is a Linux network
// namespace with one veth link into a bridge that lives in a "switch"
// namespace of its own: the hosts reach each other through the bridge and
// nothing else, and the test process (in the root namespace) reaches them
// only through a host's Dial. Partition downs the host's port on the
// bridge: its packets are dropped, its connections hang, as on a real
// network. Namespace names start with cairn-e2e-<pid>-, the subnet
// 10.<a>.<b>.0/24 is made of the test process's PID, and every namespace
// is deleted when the test ends.
//
// Otherwise (not root, or namespaces refused) the hosts are distinct
// loopback addresses 127.<a>.<b>.N of the one namespace, Isolated is false
// and Fallback says why; Partition then stops the host's processes with
// SIGSTOP (their sockets stay open, nobody answers) until Heal.
type Network struct {
	t testing.TB
	// Isolated reports whether the hosts are network namespaces.
	Isolated bool
	// Fallback says why they are not (empty when Isolated).
	Fallback string

	ip     string // path of the ip command
	prefix string // namespace name prefix of this network
	sw     string // the switch namespace
	a, b   int    // the subnet's second and third octets

	mu    sync.Mutex
	hosts []*Host
}

// Host is one host of a Network.
type Host struct {
	n *Network
	// Name names the host (letters, digits and '-').
	Name string
	// IP is its address.
	IP string

	ns   string   // its namespace ("" in the fallback)
	port string   // its veth end on the bridge, in the switch namespace
	nsFD *os.File // /run/netns/<ns>, for Dial

	mu    sync.Mutex
	procs []*Process
}

// NewNetwork makes an empty network, isolated if this process may make
// network namespaces. It logs which kind it made, and why if it fell back.
// Namespaces of earlier runs whose test process is gone are deleted first.
func NewNetwork(t testing.TB) *Network {
	t.Helper()
	pid := os.Getpid()
	n := &Network{t: t, prefix: fmt.Sprintf("%s%d-", netnsPrefix, pid), a: 64 + (pid>>8)%128, b: pid % 256}
	ip, err := exec.LookPath("ip")
	switch {
	case os.Getenv(NetnsEnv) == "off":
		n.Fallback = NetnsEnv + "=off"
	case os.Geteuid() != 0:
		n.Fallback = fmt.Sprintf("not root (euid %d): network namespaces need CAP_SYS_ADMIN", os.Geteuid())
	case err != nil:
		n.Fallback = fmt.Sprintf("no ip command (iproute2): %v", err)
	default:
		n.ip = ip
		sweepNamespaces(t, ip)
		n.sw = n.prefix + "switch"
		if out, err := n.run("netns", "add", n.sw); err != nil {
			n.Fallback = fmt.Sprintf("ip netns add refused: %v: %s", err, strings.TrimSpace(out))
			break
		}
		if err := n.setUpSwitch(); err != nil {
			n.deleteNamespace(n.sw)
			n.Fallback = err.Error()
			break
		}
		t.Cleanup(func() { n.deleteNamespace(n.sw) })
		n.Isolated = true
	}
	if n.Isolated {
		t.Logf("network: isolated hosts, one network namespace each (%s*), bridged in %s, subnet 10.%d.%d.0/24", n.prefix, n.sw, n.a, n.b)
	} else {
		t.Logf("network: FALLBACK to distinct loopback addresses 127.%d.%d.N in one namespace (%s); a partition is simulated by SIGSTOP of the host's processes", n.a, n.b, n.Fallback)
	}
	return n
}

// setUpSwitch makes the bridge in the switch namespace and checks that
// everything a host needs works there: a veth pair, and `ip netns exec`
// (which needs to mount /sys).
func (n *Network) setUpSwitch() error {
	for _, args := range [][]string{
		{"-n", n.sw, "link", "add", "br0", "type", "bridge"},
		{"-n", n.sw, "link", "set", "br0", "up"},
		{"-n", n.sw, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"},
		{"-n", n.sw, "link", "del", "probe0"},
		{"netns", "exec", n.sw, "true"},
	} {
		if out, err := n.run(args...); err != nil {
			return fmt.Errorf("ip %s refused: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(out))
		}
	}
	return nil
}

// sweepNamespaces deletes the namespaces that earlier test processes made
// and did not delete (they were killed): those named cairn-e2e-<pid>- of a
// pid that no longer runs.
func sweepNamespaces(t testing.TB, ip string) {
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		return
	}
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), netnsPrefix)
		if !ok {
			continue
		}
		pidText, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidText)
		if err != nil || pid == os.Getpid() || Alive(pid) {
			continue
		}
		if out, err := exec.Command(ip, "netns", "del", e.Name()).CombinedOutput(); err != nil {
			t.Logf("network: deleting the stale namespace %s: %v: %s", e.Name(), err, out)
		}
	}
}

// run runs ip with args and returns its combined output.
func (n *Network) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), ipTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, n.ip, args...).CombinedOutput()
	return string(out), err
}

// must runs ip with args and fails the test if it fails.
func (n *Network) must(args ...string) {
	n.t.Helper()
	if out, err := n.run(args...); err != nil {
		n.t.Fatalf("network: ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func (n *Network) deleteNamespace(ns string) {
	if out, err := n.run("netns", "del", ns); err != nil {
		n.t.Errorf("network: ip netns del %s: %v: %s", ns, err, out)
	}
}

// AddHost adds a host named name: a namespace with its own address on the
// bridge (or, in the fallback, a loopback address).
func (n *Network) AddHost(name string) *Host {
	n.t.Helper()
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-') {
			n.t.Fatalf("network: host name %q: only a-z, 0-9 and '-'", name)
		}
	}
	n.mu.Lock()
	i := len(n.hosts)
	n.mu.Unlock()
	if i >= 200 {
		n.t.Fatalf("network: at most 200 hosts")
	}
	h := &Host{n: n, Name: name}
	if !n.Isolated {
		h.IP = fmt.Sprintf("127.%d.%d.%d", n.a, n.b, 10+i)
	} else {
		h.IP = fmt.Sprintf("10.%d.%d.%d", n.a, n.b, 10+i)
		h.ns, h.port = n.prefix+name, fmt.Sprintf("p%d", i)
		n.must("netns", "add", h.ns)
		n.t.Cleanup(func() { n.deleteNamespace(h.ns) })
		n.must("-n", n.sw, "link", "add", h.port, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
		n.must("-n", n.sw, "link", "set", h.port, "master", "br0")
		n.must("-n", n.sw, "link", "set", h.port, "up")
		n.must("-n", h.ns, "link", "set", "lo", "up")
		n.must("-n", h.ns, "addr", "add", h.IP+"/24", "dev", "eth0")
		n.must("-n", h.ns, "link", "set", "eth0", "up")
		f, err := os.Open(filepath.Join("/run/netns", h.ns))
		if err != nil {
			n.t.Fatalf("network: %v", err)
		}
		h.nsFD = f
		n.t.Cleanup(func() { f.Close() })
	}
	n.mu.Lock()
	n.hosts = append(n.hosts, h)
	n.mu.Unlock()
	return h
}

// Addr is the host's address with port.
func (h *Host) Addr(port int) string { return net.JoinHostPort(h.IP, strconv.Itoa(port)) }

// Any is the address that binds every interface of the host: 0.0.0.0 in
// its namespace, its own loopback address in the fallback (where 0.0.0.0
// would be every host's).
func (h *Host) Any() string {
	if h.n.Isolated {
		return "0.0.0.0"
	}
	return h.IP
}

// Namespace is the host's network namespace ("" in the fallback).
func (h *Host) Namespace() string { return h.ns }

// Command returns the command line that runs path with args on the host:
// `ip netns exec <ns> path args...` (ip execs path, so the process keeps
// its PID), or path itself in the fallback.
func (h *Host) Command(path string, args ...string) (string, []string) {
	if !h.n.Isolated {
		return path, args
	}
	return h.n.ip, append([]string{"netns", "exec", h.ns, path}, args...)
}

// NewProcess describes a long-running process on the host (see
// NewProcess): Partition in the fallback stops it.
func (h *Host) NewProcess(name, logDir, path string, args []string, env ...string) *Process {
	h.n.t.Helper()
	cmd, cmdArgs := h.Command(path, args...)
	p := NewProcess(h.n.t, name, logDir, cmd, cmdArgs, env...)
	h.mu.Lock()
	h.procs = append(h.procs, p)
	h.mu.Unlock()
	return p
}

// Run runs a one-shot command on the host (see Run).
func (h *Host) Run(name, logDir, path string, args ...string) Result {
	h.n.t.Helper()
	cmd, cmdArgs := h.Command(path, args...)
	return Run(h.n.t, name, logDir, cmd, cmdArgs)
}

// Dial opens a TCP connection to addr from the host: the socket is made in
// the host's namespace, or, in the fallback, bound to the host's address. It
// fits grpc.WithContextDialer.
//
// The socket is made by a goroutine locked to its thread, which enters the
// host's namespace, dials, and goes back to its own namespace before it
// unlocks. The thread must not end instead: processes started with
// Pdeathsig (every Process) are killed when the thread that forked them
// ends, and this thread may be one of those. Only if it cannot go back is it
// left to end with the goroutine, never to run another goroutine in the
// wrong namespace.
func (h *Host) Dial(ctx context.Context, addr string) (net.Conn, error) {
	if !h.n.Isolated {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(h.IP)}}
		return d.DialContext(ctx, "tcp", addr)
	}
	type result struct {
		c   net.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		home, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("network: this thread's namespace: %w", err)}
			return
		}
		defer home.Close()
		if err := unix.Setns(int(h.nsFD.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("network: setns into %s: %w", h.ns, err)}
			return
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if unix.Setns(int(home.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		done <- result{c, err}
	}()
	r := <-done
	return r.c, r.err
}

// Partition cuts the host off the network until Heal: its port on the
// bridge goes down (in the fallback, its running processes are stopped).
func (h *Host) Partition() {
	h.n.t.Helper()
	if h.n.Isolated {
		h.n.must("-n", h.n.sw, "link", "set", h.port, "down")
		return
	}
	for _, p := range h.processes() {
		if p.Running() {
			p.Pause()
		}
	}
}

// Heal undoes Partition.
func (h *Host) Heal() {
	h.n.t.Helper()
	if h.n.Isolated {
		h.n.must("-n", h.n.sw, "link", "set", h.port, "up")
		return
	}
	for _, p := range h.processes() {
		if p.Running() {
			p.Resume()
		}
	}
}

func (h *Host) processes() []*Process {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]*Process(nil), h.procs...)
}

// splitBridge is the second bridge of the switch namespace that a Split
// moves one side's ports to.
const splitBridge = "br-split"

// Split cuts the network in two until the returned rejoin is called: the
// hosts of side keep reaching each other and nothing else, and the other
// hosts keep reaching each other. Unlike a Partition of each host, the
// side stays a network of its own, as when the link between two racks
// fails: a leader cut off with one follower still hears that follower, and
// a client host on the side can still call the side's servers.
//
// The side's ports move, in one `ip -batch`, from the bridge to a second
// bridge made for the split (deleted by rejoin), so both directions drop
// at once and established connections hang. In the fallback there is no
// second network: the side's hosts are each Partitioned (their processes
// stopped) and cannot reach each other either. One split at a time.
func (n *Network) Split(side ...*Host) (rejoin func()) {
	n.t.Helper()
	if !n.Isolated {
		for _, h := range side {
			h.Partition()
		}
		return func() {
			n.t.Helper()
			for _, h := range side {
				h.Heal()
			}
		}
	}
	move := func(bridge string, first ...string) {
		n.t.Helper()
		lines := first
		for _, h := range side {
			lines = append(lines, fmt.Sprintf("link set %s master %s", h.port, bridge))
		}
		ctx, cancel := context.WithTimeout(context.Background(), ipTimeout)
		defer cancel()
		cmd := exec.CommandContext(ctx, n.ip, "-n", n.sw, "-batch", "-")
		cmd.Stdin = strings.NewReader(strings.Join(lines, "\n") + "\n")
		if out, err := cmd.CombinedOutput(); err != nil {
			n.t.Fatalf("network: ip -n %s -batch (%s): %v: %s", n.sw, strings.Join(lines, "; "), err, out)
		}
	}
	move(splitBridge, "link add "+splitBridge+" type bridge", "link set "+splitBridge+" up")
	return func() {
		n.t.Helper()
		move("br0")
		n.must("-n", n.sw, "link", "del", splitBridge)
	}
}

// Forward listens on 127.0.0.1 in the test process and forwards every
// connection to target, dialled from the host (Dial): for clients that take
// no dialer, such as kmsclient, to call from the host. It returns the local
// address. A connection ends when either side closes; the listener and
// every connection are closed, and their goroutines waited for, when the
// test ends.
func (h *Host) Forward(target string) string {
	h.n.t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		h.n.t.Fatalf("network: forwarder listen: %v", err)
	}
	f := &forwarder{h: h, l: l, target: target, conns: map[net.Conn]bool{}}
	f.wg.Add(1)
	go f.accept()
	h.n.t.Cleanup(f.close)
	return l.Addr().String()
}

type forwarder struct {
	h      *Host
	l      net.Listener
	target string
	wg     sync.WaitGroup

	mu     sync.Mutex
	closed bool
	conns  map[net.Conn]bool
}

func (f *forwarder) accept() {
	defer f.wg.Done()
	for {
		c, err := f.l.Accept()
		if err != nil {
			return
		}
		if !f.track(c) {
			c.Close()
			return
		}
		f.wg.Add(1)
		go f.serve(c)
	}
}

// track remembers c for close; false if the forwarder is closed.
func (f *forwarder) track(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.conns[c] = true
	return true
}

func (f *forwarder) untrack(c net.Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
	c.Close()
}

func (f *forwarder) serve(in net.Conn) {
	defer f.wg.Done()
	defer f.untrack(in)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	out, err := f.h.Dial(ctx, f.target)
	cancel()
	if err != nil {
		return
	}
	if !f.track(out) {
		out.Close()
		return
	}
	defer f.untrack(out)
	var copies sync.WaitGroup
	copies.Add(2)
	pipe := func(dst, src net.Conn) {
		defer copies.Done()
		_, _ = io.Copy(dst, src)
		// One direction ended: end both, as a proxy that lost a side.
		dst.Close()
		src.Close()
	}
	go pipe(out, in)
	go pipe(in, out)
	copies.Wait()
}

func (f *forwarder) close() {
	f.mu.Lock()
	f.closed = true
	conns := f.conns
	f.conns = map[net.Conn]bool{}
	f.mu.Unlock()
	if err := f.l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		f.h.n.t.Errorf("network: closing the forwarder to %s: %v", f.target, err)
	}
	for c := range conns {
		c.Close()
	}
	f.wg.Wait()
}

// NewDistributorAt describes a distributor that p runs (started by the
// caller, for example on a Host), listening on addr, as name.
func (w *World) NewDistributorAt(p *Process, name, addr, stateDir string) *Distributor {
	return &Distributor{Process: p, w: w, Name: name, Addr: addr, StateDir: stateDir}
}

// NewReplicaAt describes a root KMS replica that p runs, serving its API
// on api (the address others reach it at) and Raft on raftAddr.
func (w *World) NewReplicaAt(p *Process, spec ReplicaSpec, api, raftAddr, dataDir string) *Replica {
	return &Replica{Process: p, ReplicaSpec: spec, w: w, API: api, RaftAddr: raftAddr, DataDir: dataDir}
}

// NewKMSServerAt describes a KMS server of region that p runs, reached at
// addr, as identity.
func (w *World) NewKMSServerAt(p *Process, identity, region, addr, stateDir string) *KMSServer {
	return &KMSServer{Process: p, w: w, Identity: identity, Region: region, Addr: addr, StateDir: stateDir}
}
