package chain

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// restartChain is a Chain of two tiny processes, "svc" and "other" (sh
// running sleep), with chain.json written and the control socket served,
// as Up leaves a chain.
func restartChain(t *testing.T) (c *Chain, dir string, out *bytes.Buffer) {
	t.Helper()
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Fatal(err)
	}
	dir = t.TempDir()
	out = &bytes.Buffer{}
	c = &Chain{s: settings{StateDir: dir}, layout: layout{dir}, out: out, log: slog.New(slog.DiscardHandler), died: make(chan struct{}, 1),
		termTimeout: 300 * time.Millisecond}
	for _, name := range []string{"svc", "other"} {
		p := &proc{Component: Component{Name: name, Log: filepath.Join(dir, "logs", name+".log")}, path: sh, args: []string{"-c", "echo started; exec sleep 60"}}
		if err := c.start(p); err != nil {
			t.Fatal(err)
		}
		c.info.Components = append(c.info.Components, p.Component)
	}
	c.info.Version, c.info.StateDir, c.info.TrustDomain, c.info.CA = InfoVersion, dir, DefaultTrustDomain, filepath.Join(dir, "ca.pem")
	c.info.LauncherPID = os.Getpid()
	c.info.Regions = []Region{{Name: "us-east", KMS: []string{"127.0.0.1:1"}}}
	if err := c.info.write(); err != nil {
		t.Fatal(err)
	}
	if err := c.startControl(); err != nil {
		t.Fatalf("startControl() = %v", err)
	}
	t.Cleanup(func() { c.Stop(context.Background()) })
	return c, dir, out
}

// procNamed returns the started process named name.
func procNamed(t *testing.T, c *Chain, name string) *proc {
	t.Helper()
	for _, p := range c.started() {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("no started process %s", name)
	return nil
}

// TestRestartThroughControlSocket restarts a component of a running chain
// the way `cairn up restart` does (RestartComponent over the launcher's
// control socket): the old process is stopped by its PID, a new one runs
// the same command line, chain.json has the new PID, Stop stops the new
// one; a component that died is started again; bad requests, unknown
// components and a stopped chain are refused, changing nothing.
func TestRestartThroughControlSocket(t *testing.T) {
	c, dir, out := restartChain(t)
	info, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(dir, controlDirName, controlSocketName); info.Control != want {
		t.Fatalf("chain.json control = %q, want %q", info.Control, want)
	}
	if fi, err := os.Stat(filepath.Dir(info.Control)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("control socket dir: %v, %v; want mode 0700", fi, err)
	}
	old, other := procNamed(t, c, "svc"), procNamed(t, c, "other")
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	var progress bytes.Buffer
	if err := RestartComponent(ctx, dir, "svc", &progress); err != nil {
		t.Fatalf("RestartComponent(svc) = %v\n%s", err, progress.String())
	}
	p := procNamed(t, c, "svc")
	if p == old || p.PID == old.PID || !alive(p.PID) {
		t.Fatalf("after the restart svc is pid %d (alive %v), want a new running process (old pid %d)", p.PID, alive(p.PID), old.PID)
	}
	if done, _ := old.exited(); !done {
		t.Errorf("the old svc (pid %d) still runs after the restart", old.PID)
	}
	for _, want := range []string{
		fmt.Sprintf("stopped svc (pid %d): killed by SIGTERM", old.PID),
		fmt.Sprintf("started svc (pid %d)", p.PID),
		"svc ready: started (no readiness check for its kind)",
		fmt.Sprintf("chain.json: svc is pid %d", p.PID),
	} {
		if !strings.Contains(progress.String(), want) {
			t.Errorf("RestartComponent output does not contain %q:\n%s", want, progress.String())
		}
	}
	if !slices.Equal(p.args, old.args) || p.path != old.path || p.Log != old.Log {
		t.Errorf("restarted svc runs %s %q (log %s), want the same command line %s %q and log", p.path, p.args, p.Log, old.path, old.args)
	}
	if got := c.started(); len(got) != 2 || got[0] != p || got[1] != other {
		t.Errorf("started processes after the restart = %v, want [new svc, other] (the start order kept)", got)
	}
	info, err = Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := map[string]int{info.Components[0].Name: info.Components[0].PID, info.Components[1].Name: info.Components[1].PID}; !cmp.Equal(got, map[string]int{"svc": p.PID, "other": other.PID}) {
		t.Errorf("chain.json PIDs after the restart = %v, want svc %d, other %d", got, p.PID, other.PID)
	}
	// No death is reported for a restart.
	wctx, wcancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	if err := c.Wait(wctx); err != nil {
		t.Errorf("Wait() after a restart = %v, want nil (no death)", err)
	}
	wcancel()

	// A component that died (kill -9) is reported, then just started again.
	if err := syscall.Kill(p.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := c.Wait(ctx); err == nil || !strings.Contains(err.Error(), "svc: exited unexpectedly") {
		t.Errorf("Wait() after kill -9 = %v, want svc's death", err)
	}
	progress.Reset()
	if err := RestartComponent(ctx, dir, "svc", &progress); err != nil {
		t.Fatalf("RestartComponent(dead svc) = %v\n%s", err, progress.String())
	}
	if want := fmt.Sprintf("svc (pid %d) had already exited: killed by SIGKILL", p.PID); !strings.Contains(progress.String(), want) {
		t.Errorf("RestartComponent(dead svc) output does not contain %q:\n%s", want, progress.String())
	}
	if n := c.Running(); n != 2 {
		t.Errorf("Running() after restarting a dead component = %d, want 2", n)
	}

	// Refusals change nothing.
	before := c.started()
	if err := RestartComponent(ctx, dir, "nope", &progress); err == nil || !strings.Contains(err.Error(), `no component "nope" in the chain in `+dir+"; it has svc, other") {
		t.Errorf("RestartComponent(nope) = %v, want an error naming the components", err)
	}
	if err := c.Restart(ctx, "nope", func(string) {}); err == nil || !strings.Contains(err.Error(), `no component "nope"; the chain has svc, other`) {
		t.Errorf("Restart(nope) = %v, want an error naming the components", err)
	}
	for _, req := range []string{"{}\n", "not json\n", `{"restart": ""}` + "\n"} {
		if got := rawControl(t, info.Control, req); !strings.Contains(got, `"done":true`) || !strings.Contains(got, "bad request") {
			t.Errorf("control request %q answered %q, want done with a bad-request error", req, got)
		}
	}
	if after := c.started(); !slices.Equal(before, after) {
		t.Errorf("refused requests changed the processes: %v, then %v", before, after)
	}

	// Once stopped: the socket is gone and nothing restarts.
	last := c.started()
	if err := c.Stop(t.Context()); errors.Is(err, ErrNotStopped) {
		t.Errorf("Stop() = %v, want every process stopped (sh exits on SIGTERM: an error, not ErrNotStopped)", err)
	}
	for _, p := range last {
		if done, _ := p.exited(); !done {
			t.Errorf("%s (pid %d) runs after Stop", p.Name, p.PID)
		}
	}
	if _, err := os.Stat(info.Control); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control socket after Stop: %v, want it removed", err)
	}
	if err := RestartComponent(ctx, dir, "svc", &progress); !errors.Is(err, ErrNotRunning) || !strings.Contains(err.Error(), "was stopped at") {
		t.Errorf("RestartComponent after Stop = %v, want ErrNotRunning saying it was stopped", err)
	}
	if err := c.Restart(ctx, "svc", func(string) {}); !errors.Is(err, ErrStopping) {
		t.Errorf("Restart after Stop = %v, want ErrStopping", err)
	}
	if !strings.Contains(out.String(), "cairn up: restarted svc") {
		t.Errorf("launcher output does not report the restart:\n%s", out.String())
	}
}

// rawControl sends req on the control socket and returns the answer.
func rawControl(t *testing.T, path, req string) string {
	t.Helper()
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(conn).ReadString('\n')
	return line
}

// TestRestartComponentLauncherGone: chain.json of a chain whose launcher
// was killed (not stopped) names a socket nothing answers on.
func TestRestartComponentLauncherGone(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, controlDirName, controlSocketName)
	if err := os.MkdirAll(filepath.Dir(sock), 0o700); err != nil {
		t.Fatal(err)
	}
	// A socket file left behind: bound, then its listener closed without
	// removing it.
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	info := Info{Version: InfoVersion, StateDir: dir, TrustDomain: DefaultTrustDomain, CA: "/x", LauncherPID: deadPID(t), Control: sock,
		Components: []Component{{Name: "rootkms-1", Kind: "rootkms"}}, Regions: []Region{{Name: "us-east", KMS: []string{"127.0.0.1:1"}}}}
	if err := info.write(); err != nil {
		t.Fatal(err)
	}
	err = RestartComponent(t.Context(), dir, "rootkms-1", &bytes.Buffer{})
	if !errors.Is(err, ErrNotRunning) || !strings.Contains(err.Error(), fmt.Sprintf("its launcher (pid %d) is gone", info.LauncherPID)) || !strings.Contains(err.Error(), "make up") {
		t.Errorf("RestartComponent with the launcher gone = %v, want ErrNotRunning saying it is gone and how to start the chain", err)
	}
	// A chain made by a launcher without a control socket.
	info.Control = ""
	if err := info.write(); err != nil {
		t.Fatal(err)
	}
	if err := RestartComponent(t.Context(), dir, "rootkms-1", &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), "takes no requests") {
		t.Errorf("RestartComponent without a control socket = %v, want an error saying so", err)
	}
}

// deadPID returns the PID of a process that has exited and been reaped.
func deadPID(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid
}

func TestRestartArgs(t *testing.T) {
	for _, tt := range []struct {
		kind string
		args []string
		want []string
	}{
		{"rootkms", []string{"--id", "rootkms-1", "--bootstrap", "--data-dir", "d"}, []string{"--id", "rootkms-1", "--data-dir", "d"}},
		{"rootkms", []string{"--id", "rootkms-2", "--join", "127.0.0.1:7111", "--data-dir", "d"}, []string{"--id", "rootkms-2", "--data-dir", "d"}},
		{"rootkms", []string{"--join=127.0.0.1:7111,127.0.0.1:7112", "-bootstrap", "--data-dir", "d"}, []string{"--data-dir", "d"}},
		{"distributor", []string{"--manifest", "m", "--peers", "a,b"}, []string{"--manifest", "m", "--peers", "a,b"}},
		{"kms", []string{"--region", "us-east", "--bootstrap"}, []string{"--region", "us-east", "--bootstrap"}},
	} {
		p := &proc{Component: Component{Kind: tt.kind}, args: tt.args}
		if got := restartArgs(p); !slices.Equal(got, tt.want) {
			t.Errorf("restartArgs(%s %q) = %q, want %q", tt.kind, tt.args, got, tt.want)
		}
	}
}

// TestPortsHint checks the hint of a port clash: a base port whose every
// port was found free, or the state dir's chain already running.
func TestPortsHint(t *testing.T) {
	base, plan := hintBase(t)
	// A port of the plan and one of the plan 100 higher are taken: the
	// hint skips to 200 higher.
	for _, port := range []int{plan[0].Port, plan[len(plan)-1].Port + 100} {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
	}
	err := checkPorts(plan)
	var pt *PortsTakenError
	if !errors.As(err, &pt) {
		t.Fatalf("checkPorts with %d taken = %v, want a PortsTakenError", plan[0].Port, err)
	}
	span := planSpan(base, plan)
	empty := t.TempDir()
	hint := portsHint(empty, "st", base, plan, false)
	want := fmt.Sprintf("start this chain on ports found free just now: --base-port %d (ports %d-%d)", base+200, base+201, base+200+span)
	if !strings.Contains(hint, want) || !strings.Contains(hint, "make up") {
		t.Errorf("portsHint(first run) = %q, want it to contain %q and name make up", hint, want)
	}
	if err := checkPorts(PortPlan(base+200, DefaultRegions)); err != nil {
		t.Errorf("the suggested base port %d: %v, want every port free", base+200, err)
	}
	rerun := portsHint(empty, "st", base, plan, true)
	if want := fmt.Sprintf("the chain in st keeps base port %d", base); !strings.Contains(rerun, want) || !strings.Contains(rerun, fmt.Sprintf("--base-port %d --state-dir <another dir>", base+200)) {
		t.Errorf("portsHint(re-run) = %q, want it to say %q and suggest --base-port %d with another state dir", rerun, want, base+200)
	}
	pt.Hint = hint
	if msg := pt.Error(); !strings.HasPrefix(msg, fmt.Sprintf("chain: port %d (distributor-1 gRPC) on 127.0.0.1 is taken; is another `make up`", plan[0].Port)) || !strings.HasSuffix(msg, want) {
		t.Errorf("PortsTakenError.Error() with the hint = %q", msg)
	}
	pt.Hint = ""
	if msg := pt.Error(); !strings.Contains(msg, "--base-port BASE") {
		t.Errorf("PortsTakenError.Error() without a hint = %q, want a generic hint naming no port", msg)
	}

	// Near the top of the port range, no base port above fits.
	top := 65535 - span - 50
	if hint := portsHint(empty, "st", top, PortPlan(top, DefaultRegions), false); !strings.Contains(hint, "pick a --base-port whose ports are free") {
		t.Errorf("portsHint(base %d) = %q, want it to say no free base port was found", top, hint)
	}

	// The state dir's chain runs: its launcher (this test) and a component
	// are alive.
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Fatal(err)
	}
	child := exec.Command(sh, "-c", "exec sleep 60")
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { child.Process.Kill(); child.Wait() }()
	dir := t.TempDir()
	info := Info{Version: InfoVersion, StateDir: dir, TrustDomain: DefaultTrustDomain, CA: "/x", LauncherPID: os.Getpid(), StartedAt: time.Now(),
		Components: []Component{{Name: "distributor-1", PID: child.Process.Pid}}, Regions: []Region{{Name: "us-east", KMS: []string{"127.0.0.1:1"}}}}
	if err := info.write(); err != nil {
		t.Fatal(err)
	}
	want = fmt.Sprintf("the chain in st is already running (cairn up, pid %d, ready since", os.Getpid())
	if hint := portsHint(dir, "st", base, plan, true); !strings.Contains(hint, want) || !strings.Contains(hint, fmt.Sprintf("kill %d", os.Getpid())) {
		t.Errorf("portsHint(running chain) = %q, want it to contain %q and how to stop it", hint, want)
	}
	// Stopped, or with every component gone, it does not run.
	for _, edit := range []func(*Info){
		func(i *Info) { i.StoppedAt = time.Now() },
		func(i *Info) { i.Components[0].PID = deadPID(t) },
		func(i *Info) { i.LauncherPID = deadPID(t) },
	} {
		i := info
		i.Components = slices.Clone(info.Components)
		edit(&i)
		if err := i.write(); err != nil {
			t.Fatal(err)
		}
		if hint := portsHint(dir, "st", base, plan, true); strings.Contains(hint, "already running") {
			t.Errorf("portsHint(%+v) = %q, want no running chain", i, hint)
		}
	}
}

// hintBase returns a base port in [10000, 10700) whose plan, and the plans
// 100 and 200 higher, are free now (see freeBase: this package's tests keep
// to [10000, 11000)).
func hintBase(t *testing.T) (int, []Port) {
	t.Helper()
	for range 50 {
		base := freeBase(t, len(DefaultRegions))
		if base >= 10700 && base < 11000 {
			continue
		}
		if checkPorts(PortPlan(base+100, DefaultRegions)) == nil && checkPorts(PortPlan(base+200, DefaultRegions)) == nil {
			return base, PortPlan(base, DefaultRegions)
		}
	}
	t.Fatal("no base port with 3 free plans in [10000, 11000)")
	return 0, nil
}

// TestControlSocketLongStateDir: a state dir too deep for a Unix socket's
// path gets its socket in a private temporary directory, named in
// chain.json and removed by Stop.
func TestControlSocketLongStateDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", maxSocketPath))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	c := &Chain{s: settings{StateDir: dir}, layout: layout{dir}, out: &bytes.Buffer{}, log: slog.New(slog.DiscardHandler), died: make(chan struct{}, 1)}
	c.info = Info{Version: InfoVersion, StateDir: dir, TrustDomain: DefaultTrustDomain, CA: "/x", LauncherPID: os.Getpid(),
		Regions: []Region{{Name: "us-east", KMS: []string{"127.0.0.1:1"}}}}
	if err := c.startControl(); err != nil {
		t.Fatalf("startControl() = %v", err)
	}
	info, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	sockDir := filepath.Dir(info.Control)
	if len(info.Control) > maxSocketPath || strings.HasPrefix(info.Control, dir) {
		t.Errorf("chain.json control = %s, want a short path outside the state dir", info.Control)
	}
	if fi, err := os.Stat(sockDir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("control socket dir %s: %v, %v; want mode 0700", sockDir, fi, err)
	}
	if got := rawControl(t, info.Control, "{}\n"); !strings.Contains(got, "bad request") {
		t.Errorf("control request {} answered %q, want a bad-request error", got)
	}
	c.Stop(t.Context())
	if _, err := os.Stat(sockDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control socket dir %s after Stop: %v, want it removed", sockDir, err)
	}
}
