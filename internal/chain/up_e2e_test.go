package chain

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
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
)

// Bounds of the end-to-end test.
const (
	buildTimeout = 5 * time.Minute // go build of every command, cold cache on 2 cores
	readyTimeout = 3 * time.Minute // a launcher until "cairn up: ready"
	exitTimeout  = 90 * time.Second
	goneTimeout  = 10 * time.Second // a component after its launcher was killed
)

// TestUpFirstRunRerunAndTakenPort runs the real launcher (`cairn up`, built
// with every other binary) three times. On an empty state dir with file
// safes it makes the whole chain, runs the demo through the Tink client,
// writes chain.json, and stops every component on SIGTERM, exiting 0. On the
// same state dir it reuses everything (a dev unseal ceremony, no genesis)
// and is ready again; killed with -9, it takes its components with it. With
// one of its ports taken it exits non-zero naming the port and the fix,
// having started and written nothing.
func TestUpFirstRunRerunAndTakenPort(t *testing.T) {
	bin := buildBinaries(t)
	base := freeBase(t, len(DefaultRegions))
	state := filepath.Join(t.TempDir(), "state")
	var outputs []string

	// First run.
	l1 := startLauncher(t, bin, "--state-dir", state, "--base-port", strconv.Itoa(base), "--safes", "file")
	took := l1.waitReady()
	t.Logf("first run: ready in %s", took.Round(100*time.Millisecond))
	out := l1.stdout()
	for _, want := range []string{"new chain in", "genesis: 2-of-3 into 3 insecure file safes", "distributor-2 by peer:", "push: bundle serial 1",
		"demo: Tink envelope encryption", "through " + addr(base+31) + "; decrypted through " + addr(base+32) + ": matched", "decrypted in eu-west as", "chain.json"} {
		if !strings.Contains(out, want) {
			t.Errorf("first run output does not contain %q:\n%s", want, out)
		}
	}
	info := loadInfo(t, state, l1)
	requireRunning(t, info)
	if err := l1.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := l1.waitExit(); code != 0 {
		t.Fatalf("first run: exit %d after SIGTERM, want 0\nstdout:\n%s\nstderr:\n%s", code, l1.stdout(), l1.stderr())
	}
	out = l1.stdout()
	for _, c := range info.Components {
		if want := fmt.Sprintf("stopped %s (pid %d): exit 0", c.Name, c.PID); !strings.Contains(out, want) {
			t.Errorf("first run output after SIGTERM does not contain %q:\n%s", want, out)
		}
	}
	if !strings.Contains(out, "cairn up: stopped") {
		t.Errorf("first run output does not end with \"cairn up: stopped\":\n%s", out)
	}
	requireGone(t, info, 0) // reaped by the launcher before it exited
	if after, err := Load(state); err != nil || after.StoppedAt.IsZero() {
		t.Errorf("chain.json after the stop: %v, %v; want StoppedAt set", after, err)
	}
	outputs = append(outputs, l1.stdout(), l1.stderr())

	// Re-run on the same state dir: no --base-port, no --safes; all from
	// the state dir.
	l2 := startLauncher(t, bin, "--state-dir", state)
	took = l2.waitReady()
	t.Logf("re-run: ready in %s", took.Round(100*time.Millisecond))
	out = l2.stdout()
	for _, want := range []string{"re-run of the chain in", "(0 issued, 18 kept)", "unseal ceremony: officers 1 and 2", "distributor-1 unsealed; distributor-2 by peer:",
		"3 voters restart from their Raft data", "SERVING serial 1, 2 keysets", ": matched"} {
		if !strings.Contains(out, want) {
			t.Errorf("re-run output does not contain %q:\n%s", want, out)
		}
	}
	for _, notWant := range []string{"genesis:", "keysets:", "bundles:"} {
		if strings.Contains(out, notWant) {
			t.Errorf("re-run output contains %q (nothing is made again):\n%s", notWant, out)
		}
	}
	info = loadInfo(t, state, l2)
	requireRunning(t, info)
	// kill -9 of the launcher: the kernel ends its components.
	if err := l2.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if code := l2.waitExit(); code != -1 {
		t.Errorf("re-run: exit %d after SIGKILL, want -1 (killed)", code)
	}
	requireGone(t, info, goneTimeout)
	outputs = append(outputs, l2.stdout(), l2.stderr())

	// A taken port: nothing starts, nothing is written.
	taken := base + rootAPIOffset + 1 // rootkms-2's API
	lis, err := net.Listen("tcp", addr(taken))
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	fresh := filepath.Join(t.TempDir(), "fresh")
	l3 := startLauncher(t, bin, "--state-dir", fresh, "--base-port", strconv.Itoa(base), "--safes", "file")
	if code := l3.waitExit(); code != 1 {
		t.Errorf("with port %d taken: exit %d, want 1", taken, code)
	}
	all := l3.stdout() + l3.stderr()
	for _, want := range []string{fmt.Sprintf("port %d (rootkms-2 gRPC) on 127.0.0.1 is taken", taken), "make up", "--base-port"} {
		if !strings.Contains(all, want) {
			t.Errorf("with port %d taken, the output does not contain %q:\n%s", taken, want, all)
		}
	}
	for _, notWant := range []string{"[ 2/", "stopping"} {
		if strings.Contains(all, notWant) {
			t.Errorf("with port %d taken, the output contains %q (something ran):\n%s", taken, notWant, all)
		}
	}
	if _, err := os.Stat(fresh); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("with port %d taken, the state dir was created (%v), want nothing written", taken, err)
	}
	outputs = append(outputs, l3.stdout(), l3.stderr())

	requireNoPassphrases(t, state, outputs)
}

// buildBinaries builds every command of the module into a temporary
// directory and returns it.
func buildBinaries(t *testing.T) string {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(t.Context(), buildTimeout)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+string(filepath.Separator),
		"./cmd/cairn", "./cmd/safe", "./cmd/distributor", "./cmd/rootkms", "./cmd/kms", "./cmd/regionctl")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/...: %v\n%s", err, out)
	}
	t.Logf("built the binaries in %s", time.Since(start).Round(100*time.Millisecond))
	return dir
}

// moduleRoot returns the directory of the go.mod above the working
// directory.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

func addr(port int) string { return "127.0.0.1:" + strconv.Itoa(port) }

// launcher is one `cairn up` process of the test.
type launcher struct {
	t       *testing.T
	cmd     *exec.Cmd
	out     syncBuffer
	err     syncBuffer
	done    chan struct{}
	started time.Time
}

// syncBuffer is a bytes.Buffer safe for the writer goroutine of exec and the
// test's reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startLauncher starts `cairn up` with args (and --bin-dir bin). It is
// killed (by its PID) if it still runs when the test ends; its components
// then die with it.
func startLauncher(t *testing.T, bin string, args ...string) *launcher {
	t.Helper()
	l := &launcher{t: t, done: make(chan struct{})}
	l.cmd = exec.Command(filepath.Join(bin, "cairn"), append([]string{"up", "--bin-dir", bin}, args...)...)
	l.cmd.Stdout, l.cmd.Stderr = &l.out, &l.err
	l.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	l.started = time.Now()
	if err := l.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(l.done)
		l.cmd.Wait()
	}()
	t.Cleanup(func() {
		select {
		case <-l.done:
			return
		default:
		}
		l.cmd.Process.Signal(syscall.SIGKILL)
		<-l.done
		t.Logf("killed a launcher that still ran; its stdout:\n%s\nstderr:\n%s", l.stdout(), l.stderr())
	})
	return l
}

func (l *launcher) stdout() string { return l.out.String() }
func (l *launcher) stderr() string { return l.err.String() }

// waitReady waits until the launcher prints a line starting with
// "cairn up: ready" and returns how long that took since its start.
func (l *launcher) waitReady() time.Duration {
	l.t.Helper()
	deadline := time.NewTimer(readyTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		for _, line := range strings.Split(l.stdout(), "\n") {
			if strings.HasPrefix(line, "cairn up: ready") {
				return time.Since(l.started)
			}
		}
		select {
		case <-l.done:
			l.t.Fatalf("cairn up exited (%v) before it was ready\nstdout:\n%s\nstderr:\n%s", l.cmd.ProcessState, l.stdout(), l.stderr())
		case <-deadline.C:
			l.t.Fatalf("cairn up not ready after %s\nstdout:\n%s\nstderr:\n%s", readyTimeout, l.stdout(), l.stderr())
		case <-tick.C:
		}
	}
}

// waitExit waits until the launcher exits and returns its exit code (-1 if
// a signal ended it).
func (l *launcher) waitExit() int {
	l.t.Helper()
	t := time.NewTimer(exitTimeout)
	defer t.Stop()
	select {
	case <-l.done:
		return l.cmd.ProcessState.ExitCode()
	case <-t.C:
		l.t.Fatalf("cairn up still runs %s after it was told to stop\nstdout:\n%s\nstderr:\n%s", exitTimeout, l.stdout(), l.stderr())
		return 0
	}
}

// loadInfo loads chain.json and checks it describes l's chain.
func loadInfo(t *testing.T, state string, l *launcher) *Info {
	t.Helper()
	info, err := Load(state)
	if err != nil {
		t.Fatalf("Load(%s) = %v", state, err)
	}
	if info.LauncherPID != l.cmd.Process.Pid || !info.StoppedAt.IsZero() {
		t.Errorf("chain.json: launcher pid %d, stopped at %v; want %d, running", info.LauncherPID, info.StoppedAt, l.cmd.Process.Pid)
	}
	if got, want := len(info.Components), numDistributors+numRootKMS+kmsPerRegion*len(DefaultRegions); got != want {
		t.Errorf("chain.json lists %d components, want %d", got, want)
	}
	if len(info.Regions) != 2 || info.Regions[0].Name != "us-east" || len(info.Regions[0].KMS) != kmsPerRegion ||
		info.Regions[0].Keysets[0] != "cairn-kms://us-east/demo/notes" {
		t.Errorf("chain.json regions = %+v", info.Regions)
	}
	for _, p := range []string{info.CA, info.Manifest, info.BundleSigningPub, info.Regions[0].Client.Cert, info.Regions[0].Client.Key, info.Regionctl.SigningKey} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("chain.json names %s: %v", p, err)
		}
	}
	return info
}

// alive reports whether pid runs (a zombie does not).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) state ...; comm may hold spaces, so look after the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] != 'Z' && s[i+2] != 'X'
}

func requireRunning(t *testing.T, info *Info) {
	t.Helper()
	for _, c := range info.Components {
		if !alive(c.PID) {
			t.Errorf("%s (pid %d) does not run", c.Name, c.PID)
		}
	}
}

// requireGone waits at most d until no component of info runs.
func requireGone(t *testing.T, info *Info, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		var running []string
		for _, c := range info.Components {
			if alive(c.PID) {
				running = append(running, fmt.Sprintf("%s (pid %d)", c.Name, c.PID))
			}
		}
		if len(running) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("still running %s after their launcher ended: %s", d, strings.Join(running, ", "))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// requireNoPassphrases checks that no file of the state dir but the
// passphrase files themselves, and none of the launchers' output, holds a
// file safe's passphrase, and that the passphrase files are mode 0600.
func requireNoPassphrases(t *testing.T, state string, outputs []string) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(state, "safes", "*.passphrase"))
	if err != nil || len(files) != numSafes {
		t.Fatalf("passphrase files: %v, %v; want %d", files, err, numSafes)
	}
	var secrets []string
	for _, f := range files {
		fi, err := os.Stat(f)
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, %v; want mode 0600", f, fi, err)
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if s := strings.TrimSpace(string(b)); len(s) < 32 {
			t.Errorf("%s holds a %d-character passphrase, want a long random one", f, len(s))
		} else {
			secrets = append(secrets, s)
		}
	}
	check := func(where string, data []byte) {
		for i, s := range secrets {
			if bytes.Contains(data, []byte(s)) {
				t.Errorf("%s holds the passphrase of safe-%d", where, i+1)
			}
		}
	}
	scanned := 0
	err = filepath.WalkDir(state, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || strings.HasSuffix(path, ".passphrase") {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		scanned++
		check(path, data)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for i, o := range outputs {
		check(fmt.Sprintf("launcher output %d", i), []byte(o))
	}
	t.Logf("scanned %d files and %d outputs for %d passphrases", scanned, len(outputs), len(secrets))
}
