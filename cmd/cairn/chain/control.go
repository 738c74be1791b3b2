package chain

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// The launcher owns every component: they are its children, which the
// kernel kills when it dies. So `cairn up restart` does not start anything
// itself: it asks the running launcher, over a Unix socket in the state dir
// (a 0700 directory: only its user reaches it), to restart the component,
// and prints the launcher's progress lines.

// Names and bounds of the control socket.
const (
	// controlDirName is the directory of the socket in the state dir.
	controlDirName = "run"
	// controlSocketName is the socket's name.
	controlSocketName = "launcher.sock"
	// maxSocketPath keeps the socket's path within sun_path (108 bytes on
	// Linux, 104 on the BSDs); a longer one goes to a private temporary
	// directory.
	maxSocketPath = 100
	// controlReadTimeout bounds reading a request.
	controlReadTimeout = 5 * time.Second
	// maxControlRequest bounds a request's size.
	maxControlRequest = 4 << 10
	// RestartTimeout bounds a restart as the client waits for it: the
	// stop (grace, then SIGKILL), the start and the wait until ready.
	RestartTimeout = termTimeout + killTimeout + waitTimeout + 15*time.Second
)

// controlRequest is one request on the control socket, a JSON line.
type controlRequest struct {
	// Restart names the component to restart.
	Restart string `json:"restart"`
}

// controlReply is one JSON line of the answer: progress lines, then one
// with Done set and, if the request failed, Error.
type controlReply struct {
	Line  string `json:"line,omitempty"`
	Done  bool   `json:"done,omitempty"`
	Error string `json:"error,omitempty"`
}

// startControl listens on the control socket, serves it until Stop, and
// records it in chain.json. A chain without one runs as well; only `cairn
// up restart` cannot reach it.
func (c *Chain) startControl() error {
	dir := c.layout.path(controlDirName)
	var tempDir string
	if len(filepath.Join(dir, controlSocketName)) > maxSocketPath {
		var err error
		if dir, err = os.MkdirTemp("", "cairn-up-"); err != nil {
			return fmt.Errorf("chain: control socket: %w", err)
		}
		tempDir = dir
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("chain: control socket: %w", err)
	}
	// Only the user reaches the socket: connecting needs search permission
	// on its directory.
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("chain: control socket: %w", err)
	}
	path := filepath.Join(dir, controlSocketName)
	// A socket left by a launcher that was killed: nothing answers on it.
	if conn, err := net.DialTimeout("unix", path, time.Second); err == nil {
		conn.Close()
		return fmt.Errorf("chain: control socket %s: another launcher answers on it", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("chain: control socket: %w", err)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		if tempDir != "" {
			os.RemoveAll(tempDir)
		}
		return fmt.Errorf("chain: control socket: %w", err)
	}
	c.ctl.mu.Lock()
	if c.ctl.stopping {
		c.ctl.mu.Unlock()
		lis.Close()
		return ErrStopping
	}
	c.ctl.lis, c.ctl.path, c.ctl.tempDir = lis, path, tempDir
	c.ctl.serving.Add(1)
	c.ctl.mu.Unlock()
	go c.serveControl(lis)

	c.mu.Lock()
	c.info.Control = path
	info := c.info
	info.Components = slices.Clone(c.info.Components)
	written := info.Version != 0
	c.mu.Unlock()
	if written {
		return info.write()
	}
	return nil
}

// serveControl accepts connections until the listener is closed.
func (c *Chain) serveControl(lis net.Listener) {
	defer c.ctl.serving.Done()
	for {
		conn, err := lis.Accept()
		if err != nil {
			return // closed by stopControl
		}
		c.ctl.conns.Add(1)
		go func() {
			defer c.ctl.conns.Done()
			defer conn.Close()
			c.handleControl(conn)
		}()
	}
}

// handleControl answers one request.
func (c *Chain) handleControl(conn net.Conn) {
	enc := json.NewEncoder(conn)
	reply := func(r controlReply) {
		// A client that went away does not stop the restart.
		conn.SetWriteDeadline(time.Now().Add(controlReadTimeout))
		enc.Encode(r)
	}
	conn.SetReadDeadline(time.Now().Add(controlReadTimeout))
	line, err := bufio.NewReader(io.LimitReader(conn, maxControlRequest)).ReadBytes('\n')
	if err != nil {
		reply(controlReply{Done: true, Error: fmt.Sprintf("chain: reading the request: %v", err)})
		return
	}
	var req controlRequest
	if err := json.Unmarshal(line, &req); err != nil || req.Restart == "" {
		reply(controlReply{Done: true, Error: fmt.Sprintf("chain: bad request %q: want {\"restart\": COMPONENT}", strings.TrimSpace(string(line)))})
		return
	}
	fmt.Fprintf(c.out, "cairn up: restart of %s requested\n", req.Restart)
	err = c.Restart(c.stopContext(), req.Restart, func(line string) {
		fmt.Fprintf(c.out, "  %s\n", line)
		reply(controlReply{Line: line})
	})
	if err != nil {
		fmt.Fprintf(c.out, "cairn up: restart of %s failed: %s\n", req.Restart, strings.ReplaceAll(err.Error(), "\n", "\n  "))
		for _, le := range logErrors(err) {
			reply(controlReply{Line: fmt.Sprintf("last lines of %s's log (%s):", le.name, le.log)})
			for _, l := range tail(le.log, tailLines) {
				reply(controlReply{Line: "  | " + l})
			}
		}
		reply(controlReply{Done: true, Error: err.Error()})
		return
	}
	fmt.Fprintf(c.out, "cairn up: restarted %s\n", req.Restart)
	reply(controlReply{Done: true})
}

// stopControl refuses new restarts, cuts a running one short, waits for
// it, closes the socket and removes it. Stop calls it first.
func (c *Chain) stopControl() {
	c.stopContext()
	c.ctl.stopFunc()
	c.ctl.mu.Lock() // a running restart returns first
	c.ctl.stopping = true
	lis, path, tempDir := c.ctl.lis, c.ctl.path, c.ctl.tempDir
	c.ctl.mu.Unlock()
	if lis == nil {
		return
	}
	lis.Close()
	c.ctl.serving.Wait()
	c.ctl.conns.Wait()
	os.Remove(path)
	if tempDir != "" {
		os.RemoveAll(tempDir)
	}
}

// ErrNotRunning is wrapped by RestartComponent's error when the chain of the
// state dir does not run.
var ErrNotRunning = errors.New("chain: the chain is not running")

// RestartComponent asks the launcher running the chain of stateDir (`cairn
// up`) to restart the component named name, and writes the launcher's
// progress lines to out. It fails, changing nothing, when the state dir has
// no chain, when its chain is not running (wrapping ErrNotRunning), or when
// the chain has no such component; and when the restart fails, with the
// launcher's error. ctx bounds the wait (RestartTimeout is what a restart
// may take).
func RestartComponent(ctx context.Context, stateDir, name string, out io.Writer) error {
	info, err := Load(stateDir)
	if err != nil {
		return err
	}
	if !info.StoppedAt.IsZero() {
		return fmt.Errorf("%w: the chain in %s was stopped at %s; start it with `make up` (or cairn up --state-dir %s)",
			ErrNotRunning, stateDir, info.StoppedAt.Local().Format(time.DateTime), stateDir)
	}
	var names []string
	for _, c := range info.Components {
		names = append(names, c.Name)
	}
	if !slices.Contains(names, name) {
		return fmt.Errorf("chain: no component %q in the chain in %s; it has %s", name, stateDir, strings.Join(names, ", "))
	}
	if info.Control == "" {
		return fmt.Errorf("chain: the launcher of the chain in %s (pid %d) takes no requests (chain.json names no control socket); stop it and start it again", stateDir, info.LauncherPID)
	}
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	conn, err := d.DialContext(dctx, "unix", info.Control)
	cancel()
	if err != nil {
		state := "is gone"
		if alive(info.LauncherPID) {
			state = "does not answer"
		}
		return fmt.Errorf("%w: its launcher (pid %d) %s (%v); start the chain with `make up` (or cairn up --state-dir %s)",
			ErrNotRunning, info.LauncherPID, state, err, stateDir)
	}
	defer conn.Close()
	// The reply may take RestartTimeout; ctx ends it sooner.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	conn.SetDeadline(time.Now().Add(RestartTimeout))
	req, err := json.Marshal(controlRequest{Restart: name})
	if err != nil {
		return fmt.Errorf("chain: %w", err)
	}
	if _, err := conn.Write(append(req, '\n')); err != nil {
		return fmt.Errorf("chain: asking the launcher (pid %d): %w", info.LauncherPID, err)
	}
	dec := json.NewDecoder(conn)
	for {
		var r controlReply
		if err := dec.Decode(&r); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("chain: restart of %s: %w (the launcher goes on with it)", name, ctx.Err())
			}
			return fmt.Errorf("chain: the launcher (pid %d) ended the restart of %s without an answer: %v (is it stopping?)", info.LauncherPID, name, err)
		}
		if r.Line != "" {
			fmt.Fprintln(out, r.Line)
		}
		if r.Done {
			if r.Error != "" {
				return errors.New(r.Error)
			}
			return nil
		}
	}
}
