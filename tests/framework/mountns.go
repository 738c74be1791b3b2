package framework

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// mountTimeout bounds one command run in a mount namespace (mkfs, mount,
// fsfreeze).
const mountTimeout = 30 * time.Second

// MountNamespace is a private mount namespace held open by a sleeping
// process of its own, for tests that put a server's file on a filesystem
// they can fault (fill, freeze) without touching the host's mounts: a mount
// made in it is seen only by the processes started in it
// (Process.InMountNamespace), and it goes away with them, loop device and
// all, even if the test process is killed. The test reaches its files
// through /proc/<holder>/root (Path).
type MountNamespace struct {
	t      testing.TB
	holder *Process
	pid    int
	dir    string // for images and logs
}

// MountNamespaceSupport reports why this process cannot make a
// MountNamespace with an ext4 loop mount it can freeze, or nil if it can:
// that needs root and the unshare, nsenter, mount, mkfs.ext4 and fsfreeze
// commands and a loop device.
func MountNamespaceSupport() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("not root (euid %d): a mount namespace, a loop mount and fsfreeze need CAP_SYS_ADMIN", os.Geteuid())
	}
	for _, c := range []string{"unshare", "nsenter", "mount", "mkfs.ext4", "fsfreeze"} {
		if _, err := exec.LookPath(c); err != nil {
			return fmt.Errorf("no %s command: %v", c, err)
		}
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		return fmt.Errorf("no loop devices: %v", err)
	}
	return nil
}

// NewMountNamespace makes a private mount namespace (see MountNamespace);
// dir holds its images and command logs. It fails the test if it cannot:
// check MountNamespaceSupport first.
func NewMountNamespace(t testing.TB, dir string) *MountNamespace {
	t.Helper()
	if err := MountNamespaceSupport(); err != nil {
		t.Fatalf("mount namespace: %v", err)
	}
	// unshare without --fork execs sleep in its own process: the holder's
	// PID is the namespace's. It is killed (by PID) when the test ends; the
	// namespace lives on only while processes started in it do.
	holder := NewProcess(t, "mountns-holder", filepath.Join(dir, "logs"), "unshare",
		[]string{"--mount", "--propagation", "private", "--", "sleep", "86400"})
	holder.Start()
	m := &MountNamespace{t: t, holder: holder, pid: holder.PID(), dir: dir}
	self, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatalf("mount namespace: %v", err)
	}
	deadline := time.Now().Add(mountTimeout)
	for {
		ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", m.pid))
		comm, cerr := os.ReadFile(fmt.Sprintf("/proc/%d/comm", m.pid))
		if err == nil && cerr == nil && ns != self && strings.TrimSpace(string(comm)) == "sleep" {
			break
		}
		if exited, werr := holder.Exited(); exited {
			t.Fatalf("mount namespace: unshare exited: %v\n%s", werr, tail(holder.StderrPath(), 10))
		}
		if time.Now().After(deadline) {
			t.Fatalf("mount namespace: pid %d not in a namespace of its own after %s", m.pid, mountTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("mount namespace: private, held by pid %d", m.pid)
	return m
}

// PID is the holder's PID: nsenter -t PID -m enters the namespace.
func (m *MountNamespace) PID() int { return m.pid }

// Path is how the test reaches path as the namespace sees it.
func (m *MountNamespace) Path(path string) string {
	return filepath.Join(fmt.Sprintf("/proc/%d/root", m.pid), path)
}

// Run runs a command in the namespace and returns its combined output.
func (m *MountNamespace) Run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), mountTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"-t", strconv.Itoa(m.pid), "-m", "--"}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// must runs a command in the namespace and fails the test if it fails.
func (m *MountNamespace) must(args ...string) {
	m.t.Helper()
	if out, err := m.Run(args...); err != nil {
		m.t.Fatalf("mount namespace: %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// MountExt4 makes an ext4 image of size bytes and mounts it on dir (made if
// needed) in the namespace only. It is unmounted when the test ends.
func (m *MountNamespace) MountExt4(dir string, size int64) {
	m.t.Helper()
	img := filepath.Join(m.dir, "ext4-"+strings.ReplaceAll(strings.Trim(dir, "/"), "/", "-")+".img")
	f, err := os.OpenFile(img, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		m.t.Fatalf("mount namespace: %v", err)
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		m.t.Fatalf("mount namespace: %v", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		m.t.Fatalf("mount namespace: %v", err)
	}
	m.must("mkfs.ext4", "-q", "-F", img)
	// -o loop sets autoclear: the loop device goes with the last mount.
	m.must("mount", "-o", "loop", img, dir)
	m.t.Cleanup(func() {
		if out, err := m.Run("umount", "-l", dir); err != nil {
			m.t.Logf("mount namespace: umount %s: %v: %s", dir, err, out)
		}
	})
}

// Freeze freezes the filesystem mounted on dir (fsfreeze): every write to
// it blocks, uninterruptibly, until Thaw. A process blocked so cannot even
// be killed, so the freeze is bounded twice: the returned thaw is also
// registered as a cleanup (it runs before the cleanups registered earlier,
// such as the kill of a server started before the freeze), and a watchdog
// process of its own session, which outlives even a killed test process,
// thaws dir after at most maxHold.
func (m *MountNamespace) Freeze(dir string, maxHold time.Duration) (thaw func()) {
	m.t.Helper()
	m.must("fsfreeze", "-f", dir)
	watchdog := exec.Command("nsenter", "-t", strconv.Itoa(m.pid), "-m", "--", "sh", "-c",
		fmt.Sprintf("sleep %d; fsfreeze -u %q", int(maxHold.Seconds())+1, dir))
	watchdog.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := watchdog.Start(); err != nil {
		_, _ = m.Run("fsfreeze", "-u", dir)
		m.t.Fatalf("mount namespace: starting the freeze watchdog: %v", err)
	}
	waited := make(chan struct{})
	go func() { _ = watchdog.Wait(); close(waited) }()
	thawed := false
	thaw = func() {
		if thawed {
			return
		}
		thawed = true
		if out, err := m.Run("fsfreeze", "-u", dir); err != nil {
			m.t.Errorf("mount namespace: fsfreeze -u %s: %v: %s", dir, err, out)
		}
		// The watchdog is ours (its PID); it has nothing left to do.
		if err := watchdog.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			m.t.Logf("mount namespace: killing the freeze watchdog (pid %d): %v", watchdog.Process.Pid, err)
		}
		<-waited
	}
	m.t.Cleanup(thaw)
	return thaw
}

// InMountNamespace makes the process start in the namespace from its next
// Start on: nsenter enters it and execs the binary, so the PID is the
// binary's own.
func (p *Process) InMountNamespace(m *MountNamespace) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.args = append([]string{"-t", strconv.Itoa(m.pid), "-m", "--", p.path}, p.args...)
	p.path = "nsenter"
	if lp, err := exec.LookPath("nsenter"); err == nil {
		p.path = lp
	}
}

// FileSizeLimit sets the soft RLIMIT_FSIZE of the running process (prlimit)
// and returns the previous one. Past the limit every write(2) of the
// process fails with EFBIG (Go ignores the SIGXFSZ that comes with it): a
// write fault of the real process that needs no privilege. Setting it back
// to the old value lifts the fault.
func (p *Process) FileSizeLimit(limit uint64) (old uint64, err error) {
	pid := p.PID()
	if pid == 0 || !p.Running() {
		return 0, fmt.Errorf("%s: not running", p.name)
	}
	var cur unix.Rlimit
	if err := unix.Prlimit(pid, unix.RLIMIT_FSIZE, nil, &cur); err != nil {
		return 0, fmt.Errorf("%s: prlimit(pid %d, RLIMIT_FSIZE): %w", p.name, pid, err)
	}
	next := unix.Rlimit{Cur: min(limit, cur.Max), Max: cur.Max}
	if err := unix.Prlimit(pid, unix.RLIMIT_FSIZE, &next, nil); err != nil {
		return 0, fmt.Errorf("%s: prlimit(pid %d, RLIMIT_FSIZE=%d): %w", p.name, pid, limit, err)
	}
	return cur.Cur, nil
}

// AppendArgs appends flags to the process's command line (after the
// binary's own); they take effect at its next Start.
func (p *Process) AppendArgs(args ...string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.args = append(p.args, args...)
}
