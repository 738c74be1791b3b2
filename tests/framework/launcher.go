package framework

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cairnkms/cairn/cmd/cairn/chain"
)

// Bounds of a launcher and its chain.
const (
	// LauncherReadyTimeout bounds a `cairn up` until "cairn up: ready": a
	// first run makes certificates, safes (argon2id), a genesis, a Raft
	// cluster, keysets and bundles, and may share 2 cores with `go test
	// -race` of other packages.
	LauncherReadyTimeout = 3 * time.Minute
	// LauncherExitTimeout bounds a launcher's exit once it was told to
	// stop: it stops up to ten components one after another, each with 10
	// seconds of grace.
	LauncherExitTimeout = 90 * time.Second
	// ComponentsGoneTimeout bounds how long a chain's components take to
	// die after their launcher was killed (the kernel sends them SIGKILL)
	// or after one of them got SIGKILL.
	ComponentsGoneTimeout = 10 * time.Second
)

// Launcher is one `cairn up` process (cmd/cairn, cmd/cairn/chain): it starts
// a whole chain as its own children, each in its own process group and
// killed by the kernel if the launcher dies, and writes chain.json into its
// state dir once the chain is ready. Its stdout and stderr are in the log
// directory like any Process's.
//
// When the test ends, a launcher that still runs is killed (kill -9), and
// the cleanup waits until its children are gone, so that nothing writes
// into the test's temporary directories while they are removed.
type Launcher struct {
	*Process
	// StateDir is its --state-dir.
	StateDir string

	t       testing.TB
	bin     *Binaries
	started time.Time

	mu   sync.Mutex
	info *chain.Info // the last chain.json Info read
}

// StartLauncher starts `cairn up --bin-dir <bin.Dir> --state-dir stateDir`
// with args added, its output in <logDir>/<name>.1.stdout|stderr.
func StartLauncher(t testing.TB, bin *Binaries, name, logDir, stateDir string, args ...string) *Launcher {
	t.Helper()
	l := &Launcher{StateDir: stateDir, t: t, bin: bin}
	l.Process = NewProcess(t, name, logDir, bin.Cairn, append([]string{"up", "--bin-dir", bin.Dir, "--state-dir", stateDir}, args...))
	l.started = time.Now()
	l.Start()
	// Registered after Start's own cleanup, so it runs first: while the
	// launcher still runs, its children can be found.
	t.Cleanup(l.cleanup)
	return l
}

// cleanup kills a launcher that still runs and waits until its children
// (and the components of its last chain.json) are gone; if the test
// failed, it shows the end of the launcher's stdout.
func (l *Launcher) cleanup() {
	pids := map[int]string{}
	if l.Running() {
		for _, pid := range children(l.PID()) {
			pids[pid] = fmt.Sprintf("child pid %d of the launcher", pid)
		}
		if err := l.signal(syscall.SIGKILL); err != nil {
			l.t.Errorf("%s: cleanup: %v", l.Name(), err)
		}
	}
	l.mu.Lock()
	if l.info != nil {
		for _, c := range l.info.Components {
			pids[c.PID] = fmt.Sprintf("%s (pid %d)", c.Name, c.PID)
		}
	}
	l.mu.Unlock()
	if still := waitGone(pids, ComponentsGoneTimeout); len(still) > 0 {
		l.t.Errorf("%s: cleanup: still running %s after the launcher ended: %s", l.Name(), ComponentsGoneTimeout, strings.Join(still, ", "))
	}
	if l.t.Failed() {
		l.t.Logf("%s: last lines of %s:\n%s", l.Name(), l.StdoutPath(), tail(l.StdoutPath(), 40))
	}
}

// Send sends sig to the launcher without waiting; ExitCode waits for the
// exit.
func (l *Launcher) Send(sig syscall.Signal) {
	l.t.Helper()
	l.sendOnly(sig)
}

// ExitCode waits at most LauncherExitTimeout for the launcher to exit and
// returns its exit code (-1 if a signal ended it). It fails the test if the
// launcher is still running then.
func (l *Launcher) ExitCode() int {
	l.t.Helper()
	exited, code := l.WaitExit(LauncherExitTimeout)
	if !exited {
		l.t.Fatalf("%s still runs %s after it was told to stop\nstdout:\n%s\nstderr:\n%s", l.Name(), LauncherExitTimeout, l.Stdout(), l.Stderr())
	}
	return code
}

// WaitReady waits until the launcher prints a line starting with
// "cairn up: ready" and returns how long that took since it started. It
// fails the test if the launcher exits first or is not ready within
// LauncherReadyTimeout.
func (l *Launcher) WaitReady() time.Duration {
	l.t.Helper()
	l.waitOutput(`a "cairn up: ready" line`, LauncherReadyTimeout, func(stdout, _ string) bool {
		for line := range strings.Lines(stdout) {
			if strings.HasPrefix(line, "cairn up: ready") {
				return true
			}
		}
		return false
	})
	return time.Since(l.started)
}

// WaitOutput waits at most WaitTimeout until ok accepts the launcher's
// stdout and stderr so far (what says what it waits for), and returns how
// long that took. A launcher that exits meanwhile is given one last look.
func (l *Launcher) WaitOutput(what string, ok func(stdout, stderr string) bool) time.Duration {
	l.t.Helper()
	return l.waitOutput(what, WaitTimeout, ok)
}

func (l *Launcher) waitOutput(what string, timeout time.Duration, ok func(stdout, stderr string) bool) time.Duration {
	l.t.Helper()
	start := time.Now()
	deadline := start.Add(timeout)
	for {
		exited, _ := l.Exited()
		if ok(l.Stdout(), l.Stderr()) {
			return time.Since(start)
		}
		if exited {
			l.t.Fatalf("%s exited (%v) before printing %s\nstdout:\n%s\nstderr:\n%s", l.Name(), l.exitDescription(), what, l.Stdout(), l.Stderr())
		}
		if time.Now().After(deadline) {
			l.t.Fatalf("%s: no %s after %s\nstdout:\n%s\nstderr:\n%s", l.Name(), what, timeout, l.Stdout(), l.Stderr())
		}
		time.Sleep(pollInterval)
	}
}

func (l *Launcher) exitDescription() string {
	_, err := l.Exited()
	if err == nil {
		return "exit 0"
	}
	return err.Error()
}

// Info loads chain.json from the state dir and checks that it describes
// this launcher's running chain (its PID, not stopped). The components it
// lists are waited for in the cleanup too.
func (l *Launcher) Info() *chain.Info {
	l.t.Helper()
	info, err := chain.Load(l.StateDir)
	if err != nil {
		l.t.Fatalf("chain.Load(%s) = %v", l.StateDir, err)
	}
	l.mu.Lock()
	l.info = info
	l.mu.Unlock()
	if info.LauncherPID != l.PID() || !info.StoppedAt.IsZero() {
		l.t.Errorf("chain.json: launcher pid %d, stopped at %v; want %d, running", info.LauncherPID, info.StoppedAt, l.PID())
	}
	return info
}

// Component returns the component of info named name ("us-east/kms-1").
func Component(t testing.TB, info *chain.Info, name string) chain.Component {
	t.Helper()
	i := slices.IndexFunc(info.Components, func(c chain.Component) bool { return c.Name == name })
	if i < 0 {
		t.Fatalf("chain.json lists no component %s", name)
	}
	return info.Components[i]
}

// KillComponent sends SIGKILL (kill -9) to the component of info named
// name, by the PID chain.json gives, and waits until it is gone. It checks
// first that the PID is this launcher's child running one of the test's
// binaries, so that a reused PID is never signalled.
func (l *Launcher) KillComponent(info *chain.Info, name string) chain.Component {
	l.t.Helper()
	c := Component(l.t, info, name)
	if ppid := parentPID(c.PID); ppid != l.PID() {
		l.t.Fatalf("%s (pid %d): parent pid %d, want the launcher's %d; not killing it", c.Name, c.PID, ppid, l.PID())
	}
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", c.PID))
	if err != nil || filepath.Dir(exe) != l.bin.Dir {
		l.t.Fatalf("%s (pid %d) runs %q (%v), not a binary of %s; not killing it", c.Name, c.PID, exe, err, l.bin.Dir)
	}
	if err := syscall.Kill(c.PID, syscall.SIGKILL); err != nil {
		l.t.Fatalf("kill -9 %d (%s): %v", c.PID, c.Name, err)
	}
	RequireComponentsGone(l.t, []chain.Component{c}, ComponentsGoneTimeout)
	return c
}

// RequireComponentsRunning fails the test for every component that does not
// run.
func RequireComponentsRunning(t testing.TB, cs []chain.Component) {
	t.Helper()
	for _, c := range cs {
		if !Alive(c.PID) {
			t.Errorf("%s (pid %d) does not run", c.Name, c.PID)
		}
	}
}

// RequireComponentsGone waits at most d until none of cs runs, and fails
// the test naming those that still do.
func RequireComponentsGone(t testing.TB, cs []chain.Component, d time.Duration) {
	t.Helper()
	pids := map[int]string{}
	for _, c := range cs {
		pids[c.PID] = fmt.Sprintf("%s (pid %d)", c.Name, c.PID)
	}
	if still := waitGone(pids, d); len(still) > 0 {
		t.Fatalf("still running after %s: %s", d, strings.Join(still, ", "))
	}
}

// waitGone polls until no pid of pids runs, at most d, and returns the
// names of those still running then.
func waitGone(pids map[int]string, d time.Duration) []string {
	deadline := time.Now().Add(d)
	for {
		var still []string
		for pid, name := range pids {
			if Alive(pid) {
				still = append(still, name)
			}
		}
		if len(still) == 0 || time.Now().After(deadline) {
			slices.Sort(still)
			return still
		}
		time.Sleep(pollInterval)
	}
}

// Alive reports whether pid runs (a zombie does not).
func Alive(pid int) bool {
	state, _, ok := procStat(pid)
	return ok && state != 'Z' && state != 'X'
}

// parentPID is pid's parent's PID (0 if pid does not exist).
func parentPID(pid int) int {
	_, ppid, _ := procStat(pid)
	return ppid
}

// procStat reads pid's state and parent PID from /proc/<pid>/stat.
func procStat(pid int) (state byte, ppid int, ok bool) {
	f, err := statFields(pid)
	if err != nil || len(f) < 2 || len(f[0]) != 1 {
		return 0, 0, false
	}
	ppid, err = strconv.Atoi(f[1])
	if err != nil {
		return 0, 0, false
	}
	return f[0][0], ppid, true
}

// statFields returns the fields of /proc/<pid>/stat from the third (the
// state) on: f[0] is field 3 of proc(5), f[i] field i+3.
func statFields(pid int) ([]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, err
	}
	// pid (comm) state ppid ...; comm may hold spaces and parentheses, so
	// look after the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return nil, fmt.Errorf("/proc/%d/stat: no ')' in %q", pid, s)
	}
	return strings.Fields(s[i+1:]), nil
}

// children returns the PIDs of pid's running children.
func children(pid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if state, ppid, ok := procStat(p); ok && ppid == pid && state != 'Z' && state != 'X' {
			out = append(out, p)
		}
	}
	return out
}

// basePorts are the base ports FreeBasePort has handed out in this process:
// a later chain never gets a port of an earlier one, whose sockets may
// linger.
var basePorts struct {
	sync.Mutex
	used []int
}

// FreeBasePort returns a base port for a chain of these regions
// (chain.PortPlan) whose every port is free now. It looks in [11000, 20000):
// below the kernel's ephemeral range, so no outgoing connection or listener
// on port 0 takes one of its ports meanwhile; below [20000, ...), where
// FreePorts picks ports for the tests of other packages that may run at the
// same time; and above [10000, 11000), where cmd/cairn/chain's unit tests
// check and briefly listen on port plans. Only launcher tests use this
// range. If the ephemeral range reaches below 20000, it looks above it, in
// the lower half of the ports there (FreePorts uses the upper half), past
// the 1000 ports cmd/cairn/chain's tests take. Every range it returns is
// disjoint from those it returned before in this process.
func FreeBasePort(t testing.TB, regions []string) int {
	t.Helper()
	lo, hi := 11000, 20000
	if ephLo, ephHi := chain.EphemeralPorts(); ephLo < 20000 {
		lo, hi = ephHi+1001, ephHi+1+(65535-ephHi)/2
	}
	span := 0
	for _, p := range chain.PortPlan(0, regions) {
		span = max(span, p.Port)
	}
	basePorts.Lock()
	defer basePorts.Unlock()
	for range 200 {
		base := lo + randIntn(t, hi-lo-span)
		if slices.ContainsFunc(basePorts.used, func(b int) bool { return base <= b+span && b <= base+span }) {
			continue
		}
		if portsFree(chain.PortPlan(base, regions)) {
			basePorts.used = append(basePorts.used, base)
			return base
		}
	}
	t.Fatalf("FreeBasePort: no free range of %d ports in [%d, %d)", span, lo, hi)
	return 0
}

// portsFree listens on every port of plan on 127.0.0.1, all at once, and
// closes them again; it reports whether all could be listened on.
func portsFree(plan []chain.Port) bool {
	var held []net.Listener
	defer func() {
		for _, l := range held {
			l.Close()
		}
	}()
	for _, p := range plan {
		l, err := net.Listen("tcp", p.Addr())
		if err != nil {
			return false
		}
		held = append(held, l)
	}
	return true
}

// PlanAddr returns the address the plan gives component's listener for
// purpose ("gRPC", "Raft", "metrics").
func PlanAddr(t testing.TB, plan []chain.Port, component, purpose string) chain.Port {
	t.Helper()
	i := slices.IndexFunc(plan, func(p chain.Port) bool { return p.Component == component && p.Purpose == purpose })
	if i < 0 {
		t.Fatalf("the port plan has no %s %s port: %v", component, purpose, plan)
	}
	return plan[i]
}
