package chain

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Bounds of process handling.
const (
	// termTimeout is how long a component gets to exit after SIGTERM
	// before it gets SIGKILL.
	termTimeout = 10 * time.Second
	// killTimeout is how long the kernel gets to end a SIGKILLed process.
	killTimeout = 5 * time.Second
	// commandTimeout bounds a one-shot command (genesis, a release,
	// regionctl); genesis with three file safes derives six argon2id keys.
	commandTimeout = 2 * time.Minute
)

// proc is one long-running component of the chain: a child process whose
// stdout and stderr go to its log file. It is started once, by Chain.start,
// which also starts the goroutine that waits for it (owned by the Chain).
type proc struct {
	Component // PID is set by start

	path string
	args []string
	env  []string

	cmd      *exec.Cmd
	done     chan struct{} // closed once the process exited and waitErr is set
	waitErr  error
	stopping atomic.Bool // set before the launcher signals it
}

// exited reports whether the process has exited, and how.
func (p *proc) exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.waitErr
	default:
		return false, nil
	}
}

// errorf makes an error about p that carries its log for the failure
// report.
func (p *proc) errorf(format string, a ...any) error {
	return &logError{err: fmt.Errorf("chain: %s: %s", p.Name, fmt.Sprintf(format, a...)), name: p.Name, log: p.Log}
}

// logError is an error of a process with a log; the step runner prints the
// end of the log under the error.
type logError struct {
	err       error
	name, log string
}

func (e *logError) Error() string { return e.err.Error() }
func (e *logError) Unwrap() error { return e.err }

// start starts p with its output in its log file (truncated) and registers
// it with the chain, which stops it in Stop.
func (c *Chain) start(p *proc) error {
	if err := os.MkdirAll(filepath.Dir(p.Log), 0o700); err != nil {
		return fmt.Errorf("chain: %w", err)
	}
	f, err := os.OpenFile(p.Log, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("chain: %w", err)
	}
	cmd := exec.Command(p.path, p.args...)
	cmd.Env = append(os.Environ(), p.env...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = childAttr()
	c.log.Debug("chain: starting", "component", p.Name, "cmd", p.path, "args", p.args)
	err = cmd.Start()
	f.Close() // the child holds its own descriptor
	if err != nil {
		return &logError{err: fmt.Errorf("chain: starting %s: %w", p.Name, err), name: p.Name, log: p.Log}
	}
	p.cmd, p.done, p.PID = cmd, make(chan struct{}), cmd.Process.Pid
	c.mu.Lock()
	c.procs = append(c.procs, p)
	c.mu.Unlock()
	c.wg.Add(1)
	go c.reap(p)
	return nil
}

// reap waits for p to exit; an exit the launcher did not ask for is
// recorded for Wait.
func (c *Chain) reap(p *proc) {
	defer c.wg.Done()
	err := p.cmd.Wait()
	p.waitErr = err
	close(p.done)
	if p.stopping.Load() {
		return
	}
	if err == nil {
		err = errors.New("exit status 0")
	}
	c.mu.Lock()
	c.deaths = append(c.deaths, p.errorf("exited unexpectedly (pid %d, %v)", p.PID, err))
	c.mu.Unlock()
	select {
	case c.died <- struct{}{}:
	default: // Wait is already due to look
	}
}

// ErrNotStopped is wrapped by Stop's error when a process could not be
// ended at all (it survived SIGKILL, or could not be signalled).
var ErrNotStopped = errors.New("chain: a process could not be stopped")

// stop ends p: SIGTERM, then SIGKILL if it has not exited within grace (or
// when ctx ends). Only p's own PID is signalled. It returns a line for the
// user and an error if the process did not exit cleanly (a non-zero exit, or
// it had to be killed); the error wraps ErrNotStopped if p may still run.
func (p *proc) stop(ctx context.Context, grace time.Duration) (string, error) {
	if done, err := p.exited(); done {
		return fmt.Sprintf("%s (pid %d) had already exited: %s", p.Name, p.PID, exitString(err)), nil
	}
	start := time.Now()
	p.stopping.Store(true)
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return "", fmt.Errorf("%w: %s: SIGTERM to pid %d: %w", ErrNotStopped, p.Name, p.PID, err)
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	var why string
	select {
	case <-p.done:
		took := time.Since(start).Round(time.Millisecond)
		line := fmt.Sprintf("stopped %s (pid %d): %s in %s", p.Name, p.PID, exitString(p.waitErr), took)
		if p.waitErr != nil {
			return line, p.errorf("exit after SIGTERM: %v", p.waitErr)
		}
		return line, nil
	case <-t.C:
		why = fmt.Sprintf("did not exit within %s of SIGTERM", grace)
	case <-ctx.Done():
		why = "stop deadline reached"
	}
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return "", fmt.Errorf("%w: %s: SIGKILL to pid %d: %w", ErrNotStopped, p.Name, p.PID, err)
	}
	k := time.NewTimer(killTimeout)
	defer k.Stop()
	select {
	case <-p.done:
		line := fmt.Sprintf("killed %s (pid %d): %s; SIGKILL", p.Name, p.PID, why)
		return line, p.errorf("%s; killed it", why)
	case <-k.C:
		return "", fmt.Errorf("%w: %w", ErrNotStopped, p.errorf("%s, and pid %d did not end within %s of SIGKILL", why, p.PID, killTimeout))
	}
}

// exitString describes how a process ended.
func exitString(err error) string {
	if err == nil {
		return "exit 0"
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return "killed by " + unix.SignalName(ws.Signal())
		}
		return fmt.Sprintf("exit %d", ee.ExitCode())
	}
	return err.Error()
}

// run runs a one-shot command to completion (at most commandTimeout), with
// stdout and stderr in logs/<name>.log, and returns its stdout. A failure is
// a *logError naming the log.
func (c *Chain) run(ctx context.Context, name, path string, args []string, env ...string) (string, error) {
	return c.runWatching(ctx, name, path, args, env, nil)
}

// runWatching is run that also hands each line the command prints on
// stdout, as it prints it, to line (when not nil), on one goroutine at a
// time, before runWatching returns.
func (c *Chain) runWatching(ctx context.Context, name, path string, args, env []string, line func(string)) (string, error) {
	logPath := filepath.Join(c.layout.logs(), name+".log")
	if err := os.MkdirAll(filepath.Dir(logPath), 0o700); err != nil {
		return "", fmt.Errorf("chain: %w", err)
	}
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return "", fmt.Errorf("chain: %w", err)
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(ctx, commandTimeout)
	defer cancel()
	var stdout bytes.Buffer
	lines := &lineWriter{fn: line}
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = io.MultiWriter(f, &stdout, lines), f
	cmd.SysProcAttr = childAttr()
	cmd.WaitDelay = killTimeout
	// Not the arguments: softhsm2-util takes PINs as arguments.
	c.log.Debug("chain: running", "name", name, "cmd", path)
	err = cmd.Run()
	lines.flush()
	if err == nil {
		return stdout.String(), nil
	}
	fail := func(format string, a ...any) error {
		return &logError{err: fmt.Errorf("chain: %s: %s", name, fmt.Sprintf(format, a...)), name: name, log: logPath}
	}
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return "", fail("did not finish within %s; killed", commandTimeout)
	case ctx.Err() != nil:
		return "", fmt.Errorf("chain: %s: %w", name, ctx.Err())
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return "", fail("%s %s failed (%s)", filepath.Base(path), strings.Join(firstWords(args, 2), " "), exitString(err))
	}
	return "", fail("%v", err)
}

// firstWords returns the leading arguments that are not flags, at most n:
// a command's subcommand ("genesis", "bundle push").
func firstWords(args []string, n int) []string {
	var out []string
	for _, a := range args {
		if len(out) == n || strings.HasPrefix(a, "-") {
			break
		}
		out = append(out, a)
	}
	return out
}

// lineWriter hands every complete line written to it, without its newline,
// to fn (nil: drops them); flush hands over a last unterminated line.
type lineWriter struct {
	fn      func(string)
	partial []byte
}

func (w *lineWriter) Write(p []byte) (int, error) {
	if w.fn == nil {
		return len(p), nil
	}
	w.partial = append(w.partial, p...)
	for {
		i := bytes.IndexByte(w.partial, '\n')
		if i < 0 {
			break
		}
		w.fn(string(w.partial[:i]))
		w.partial = w.partial[i+1:]
	}
	return len(p), nil
}

func (w *lineWriter) flush() {
	if w.fn != nil && len(w.partial) > 0 {
		w.fn(string(w.partial))
	}
	w.partial = nil
}
