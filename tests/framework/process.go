package framework

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cairnkms/cairn/cmd/cairn/chain"
)

// exitTimeout bounds how long a signalled process may take to exit.
const exitTimeout = 10 * time.Second

// Process is one long-running binary: the same command line may be started
// again after it exited (Kill, Stop), as a restarted server would be. Each
// run's stdout and stderr go to their own files in the log directory, where
// they stay for the secret scan.
type Process struct {
	t      testing.TB
	name   string
	path   string
	args   []string
	env    []string
	logDir string

	mu      sync.Mutex
	cmd     *exec.Cmd // the current or last run
	done    chan struct{}
	waitErr error
	runs    int
	stdout  string // path of the current run's stdout
	stderr  string // path of the current run's stderr
	cleanup bool
}

// NewProcess describes a process; Start runs it. name names its log files
// (<logDir>/<name>.<run>.stdout|stderr). env is added to this process's
// environment.
func NewProcess(t testing.TB, name, logDir, path string, args []string, env ...string) *Process {
	t.Helper()
	if err := os.MkdirAll(logDir, 0o700); err != nil {
		t.Fatalf("MkdirAll(%s) = %v", logDir, err)
	}
	return &Process{t: t, name: name, path: path, args: args, env: env, logDir: logDir}
}

// Name is the name given to NewProcess.
func (p *Process) Name() string { return p.name }

// Start runs the process. It fails the test if it is already running or
// cannot be started. The first Start registers a cleanup that kills the
// process (by its PID) if it still runs when the test ends.
func (p *Process) Start() {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.runningLocked() {
		p.t.Fatalf("%s: Start while running (pid %d)", p.name, p.cmd.Process.Pid)
	}
	p.runs++
	base := filepath.Join(p.logDir, fmt.Sprintf("%s.%d", p.name, p.runs))
	stdout, err := os.OpenFile(base+".stdout", os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		p.t.Fatalf("%s: %v", p.name, err)
	}
	stderr, err := os.OpenFile(base+".stderr", os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		stdout.Close()
		p.t.Fatalf("%s: %v", p.name, err)
	}
	cmd := exec.Command(p.path, p.args...)
	cmd.Env = append(os.Environ(), p.env...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	// If the test binary dies without running its cleanups, the kernel
	// kills the child instead of leaving it behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err = cmd.Start()
	// The child has its own descriptors now; ours are not needed.
	stdout.Close()
	stderr.Close()
	if err != nil {
		p.t.Fatalf("%s: starting %s: %v", p.name, p.path, err)
	}
	done := make(chan struct{})
	p.cmd, p.done, p.waitErr, p.stdout, p.stderr = cmd, done, nil, base+".stdout", base+".stderr"
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		if p.cmd == cmd {
			p.waitErr = err
		}
		p.mu.Unlock()
		close(done)
	}()
	if !p.cleanup {
		p.cleanup = true
		p.t.Cleanup(p.cleanupFunc)
	}
}

// cleanupFunc kills a still-running process and, if the test failed, shows
// the end of its log.
func (p *Process) cleanupFunc() {
	p.mu.Lock()
	running := p.runningLocked()
	p.mu.Unlock()
	if running {
		if err := p.signal(syscall.SIGKILL); err != nil {
			p.t.Errorf("%s: cleanup: %v", p.name, err)
		}
	}
	if p.t.Failed() {
		p.t.Logf("%s: last lines of %s:\n%s", p.name, p.StderrPath(), tail(p.StderrPath(), 25))
	}
}

// Restart starts the process again with the same command line; it must
// have exited.
func (p *Process) Restart() {
	p.t.Helper()
	p.Start()
}

func (p *Process) runningLocked() bool {
	if p.done == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Running reports whether the current run has not exited yet.
func (p *Process) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.runningLocked()
}

// PID is the current run's process id (0 before Start).
func (p *Process) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// StderrPath is the current run's stderr file.
func (p *Process) StderrPath() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr
}

// StdoutPath is the current run's stdout file.
func (p *Process) StdoutPath() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stdout
}

// Exited reports whether the current run has exited, and how.
func (p *Process) Exited() (bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.runningLocked() || p.done == nil {
		return false, nil
	}
	return true, p.waitErr
}

// Kill sends SIGKILL (kill -9) and waits for the process to be gone.
func (p *Process) Kill() {
	p.t.Helper()
	if err := p.signal(syscall.SIGKILL); err != nil {
		p.t.Fatalf("%s: kill -9: %v", p.name, err)
	}
}

// Stop sends SIGTERM and waits for a clean exit (status 0); anything else
// fails the test.
func (p *Process) Stop() {
	p.t.Helper()
	if err := p.Terminate(); err != nil {
		p.t.Fatal(err)
	}
}

// Terminate is Stop that returns what went wrong instead of failing the
// test: the process is gone either way (a hung one gets SIGQUIT, then
// SIGKILL).
func (p *Process) Terminate() error {
	if err := p.signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("%s: SIGTERM: %v", p.name, err)
	}
	if _, err := p.Exited(); err != nil {
		return fmt.Errorf("%s: exit after SIGTERM = %v, want status 0\n%s", p.name, err, tail(p.StderrPath(), 25))
	}
	return nil
}

// Pause sends SIGSTOP: the process keeps its sockets (the kernel still
// accepts connections for it) but runs no code until Resume. A paused
// process is still killed in cleanup (SIGKILL ends a stopped process).
func (p *Process) Pause() {
	p.t.Helper()
	p.sendOnly(syscall.SIGSTOP)
	// Every thread must have stopped before the caller counts on it: until
	// then the process can still answer (a paused Raft follower could still
	// acknowledge an entry).
	if err := WaitStopped(p.PID()); err != nil {
		p.t.Fatalf("%s: SIGSTOP: %v", p.name, err)
	}
}

// Resume sends SIGCONT to a paused process.
func (p *Process) Resume() {
	p.t.Helper()
	p.sendOnly(syscall.SIGCONT)
}

// sendOnly sends sig to the current run without waiting for anything.
func (p *Process) sendOnly(sig syscall.Signal) {
	p.t.Helper()
	p.mu.Lock()
	cmd, running := p.cmd, p.runningLocked()
	p.mu.Unlock()
	if !running {
		p.t.Fatalf("%s: %v: not running", p.name, sig)
	}
	if err := cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("%s: %v: %v", p.name, sig, err)
	}
}

// WaitExit waits at most d for the current run to exit by itself. It
// reports whether it did and, if so, its exit code (-1 if a signal ended
// it).
func (p *Process) WaitExit(d time.Duration) (exited bool, code int) {
	p.t.Helper()
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if done == nil {
		p.t.Fatalf("%s: WaitExit before Start", p.name)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true, cmd.ProcessState.ExitCode()
	case <-t.C:
		return false, 0
	}
}

// Stderr returns what the current run wrote to stderr so far.
func (p *Process) Stderr() string {
	p.t.Helper()
	b, err := os.ReadFile(p.StderrPath())
	if err != nil {
		p.t.Fatalf("%s: %v", p.name, err)
	}
	return string(b)
}

// Stdout returns what the current run wrote to stdout so far.
func (p *Process) Stdout() string {
	p.t.Helper()
	b, err := os.ReadFile(p.StdoutPath())
	if err != nil {
		p.t.Fatalf("%s: %v", p.name, err)
	}
	return string(b)
}

// signal sends sig to the current run (by PID) and waits until it exited;
// if it has not after exitTimeout, it gets SIGQUIT (a Go program prints
// every goroutine's stack to its stderr and exits: what it hung on) and,
// if even that does not end it, SIGKILL.
func (p *Process) signal(sig syscall.Signal) error {
	p.mu.Lock()
	cmd, done, running := p.cmd, p.done, p.runningLocked()
	p.mu.Unlock()
	if !running {
		return fmt.Errorf("not running")
	}
	if err := cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	t := time.NewTimer(exitTimeout)
	defer t.Stop()
	select {
	case <-done:
		return nil
	case <-t.C:
	}
	hung := fmt.Sprintf("pid %d did not exit within %s of %v", cmd.Process.Pid, exitTimeout, sig)
	_ = cmd.Process.Signal(syscall.SIGQUIT)
	tq := time.NewTimer(quitTimeout)
	defer tq.Stop()
	select {
	case <-done:
		return fmt.Errorf("%s; SIGQUIT ended it (its goroutines are at the end of %s)", hung, keep(p.StderrPath()))
	case <-tq.C:
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	t2 := time.NewTimer(exitTimeout)
	defer t2.Stop()
	select {
	case <-done:
		return fmt.Errorf("%s, nor of SIGQUIT; killed it", hung)
	case <-t2.C:
		return fmt.Errorf("pid %d did not exit even after SIGKILL", cmd.Process.Pid)
	}
}

// quitTimeout is how long a hung process gets to print its stacks after
// SIGQUIT.
const quitTimeout = 3 * time.Second

// keep copies a log into a new temporary file that outlives the test (its
// own directory is removed when it ends) and returns the copy's path, or
// the original's if it cannot.
func keep(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return path
	}
	f, err := os.CreateTemp("", "cairn-hung-"+filepath.Base(path)+"-")
	if err != nil {
		return path
	}
	defer f.Close()
	if _, err := f.Write(b); err != nil {
		return path
	}
	return f.Name()
}

// Result is what a one-shot command did.
type Result struct {
	Args           []string
	Stdout, Stderr string
	// ExitCode is the exit status, or -1 if the command did not exit by
	// itself (it was killed at its deadline).
	ExitCode int
	Took     time.Duration
}

func (r Result) String() string {
	return fmt.Sprintf("%s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(r.Args, " "), r.ExitCode, r.Stdout, r.Stderr)
}

// commandTimeout bounds a one-shot command.
const commandTimeout = 60 * time.Second

// Run runs a one-shot command to completion (at most commandTimeout), with
// its output in <logDir>/<name>.stdout|stderr as well as in the Result.
func Run(t testing.TB, name, logDir, path string, args []string, env ...string) Result {
	t.Helper()
	return RunInput(t, name, logDir, nil, path, args, env...)
}

// RunInput is Run with stdin as the command's standard input (nil: none),
// as if piped into it.
func RunInput(t testing.TB, name, logDir string, stdin []byte, path string, args []string, env ...string) Result {
	t.Helper()
	if err := os.MkdirAll(logDir, 0o700); err != nil {
		t.Fatalf("MkdirAll(%s) = %v", logDir, err)
	}
	base := filepath.Join(logDir, name)
	stdout, err := os.OpenFile(base+".stdout", os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer stdout.Close()
	stderr, err := os.OpenFile(base+".stderr", os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = exitTimeout
	start := time.Now()
	err = cmd.Run()
	r := Result{Args: append([]string{filepath.Base(path)}, args...), ExitCode: cmd.ProcessState.ExitCode(), Took: time.Since(start)}
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("%s: %v", name, err)
	}
	if ctx.Err() != nil {
		t.Fatalf("%s: still running after %s; killed", name, commandTimeout)
	}
	o, _ := os.ReadFile(base + ".stdout")
	e, _ := os.ReadFile(base + ".stderr")
	r.Stdout, r.Stderr = string(o), string(e)
	return r
}

// FreePorts returns n distinct TCP ports on 127.0.0.1 that are free now, so
// that servers can be named (as each other's peers) before any of them
// starts. The ports are taken from below the kernel's ephemeral range: a
// port the kernel hands out for "listen on :0" or as the local end of an
// outgoing connection can then never collide with one of ours, not even
// while a killed server is being restarted on it. All n are held open
// together while they are chosen.
func FreePorts(t testing.TB, n int) []int {
	t.Helper()
	lo, hi := portRange()
	var ports []int
	var lis []net.Listener
	defer func() {
		for _, l := range lis {
			l.Close()
		}
	}()
	for attempt := 0; len(ports) < n; attempt++ {
		if attempt >= 1000 {
			t.Fatalf("FreePorts(%d): no free port in [%d, %d) after %d attempts", n, lo, hi, attempt)
		}
		port := lo + randIntn(t, hi-lo)
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue // taken
		}
		lis = append(lis, l)
		ports = append(ports, port)
	}
	return ports
}

// portRange is where FreePorts looks: [20000, start of the ephemeral range),
// or, if that range starts too low to leave room, the upper half of the
// ports above it.
func portRange() (lo, hi int) {
	ephemeralLo, ephemeralHi := chain.EphemeralPorts()
	if ephemeralLo >= 21000 {
		return 20000, ephemeralLo
	}
	return ephemeralHi + 1 + (65535-ephemeralHi)/2, 65536
}

// randIntn returns a uniform random int in [0, n).
func randIntn(t testing.TB, n int) int {
	t.Helper()
	r, err := rand.Int(rand.Reader, big.NewInt(int64(n)))
	if err != nil {
		t.Fatal(err)
	}
	return int(r.Int64())
}
