package lockedmem_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// mlockResult is what testdata/mlockhelper prints.
type mlockResult struct {
	Locked  bool
	Reason  string
	Gauge   float64
	VmLckKB int
}

// helperHeapKB is testdata/mlockhelper's HeapBytes in kB.
const helperHeapKB = 32 << 10

// buildMlockHelper builds testdata/mlockhelper without the race detector
// (LockProcess never locks a race binary) into a directory every user may
// read, so that it can also run as nobody.
func buildMlockHelper(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "mlockhelper")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "mlockhelper")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./testdata/mlockhelper")
	cmd.Env = append(os.Environ(), "GOFLAGS=-buildvcs=false", "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./testdata/mlockhelper: %v\n%s", err, out)
	}
	return bin
}

// mayLockAll reports whether this (test) process could lock all its memory:
// RLIMIT_MEMLOCK unlimited or CAP_IPC_LOCK. A child run as the same user
// inherits both.
func mayLockAll(t *testing.T) bool {
	t.Helper()
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &lim); err != nil {
		t.Fatal(err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		t.Fatal(err)
	}
	return lim.Cur == unix.RLIM_INFINITY || data[0].Effective&(1<<unix.CAP_IPC_LOCK) != 0
}

// TestLockProcess runs LockProcess in a child process (the helper binary)
// in every mode, with the limits of this process and with RLIMIT_MEMLOCK
// lowered to 64 KiB and no CAP_IPC_LOCK (as root, the child runs as nobody,
// which drops it), and checks the outcome, the gauge and the kernel's VmLck.
func TestLockProcess(t *testing.T) {
	bin := buildMlockHelper(t)
	privileged := mayLockAll(t)
	t.Logf("this process may lock all its memory: %v", privileged)
	const refusal = "RLIMIT_MEMLOCK is 65536 bytes and the process lacks CAP_IPC_LOCK"
	tests := []struct {
		name        string
		args        []string
		restricted  bool // lower RLIMIT_MEMLOCK, drop CAP_IPC_LOCK
		wantLocked  bool
		wantExit    int
		wantMessage string // in Reason, or in stderr when wantExit != 0
	}{
		{name: "auto", args: []string{"-mlock", "auto"}, wantLocked: privileged,
			wantMessage: map[bool]string{true: "mlockall(MCL_CURRENT|MCL_FUTURE) succeeded", false: "lacks CAP_IPC_LOCK"}[privileged]},
		{name: "default is auto", wantLocked: privileged,
			wantMessage: map[bool]string{true: "succeeded", false: "lacks CAP_IPC_LOCK"}[privileged]},
		{name: "on", args: []string{"-mlock", "on"}, wantLocked: privileged, wantExit: map[bool]int{true: 0, false: 1}[privileged],
			wantMessage: map[bool]string{true: "succeeded", false: "lockedmem: --mlock=on: cannot lock process memory"}[privileged]},
		{name: "off", args: []string{"-mlock", "off"}, wantMessage: "--mlock=off"},
		{name: "auto refused", args: []string{"-mlock", "auto", "-memlock", "65536"}, restricted: true, wantMessage: refusal},
		{name: "on refused", args: []string{"-mlock", "on", "-memlock", "65536"}, restricted: true, wantExit: 1,
			wantMessage: "lockedmem: --mlock=on: cannot lock process memory: " + refusal},
		{name: "off restricted", args: []string{"-mlock", "off", "-memlock", "65536"}, restricted: true, wantMessage: "--mlock=off"},
		{name: "bad mode", args: []string{"-mlock", "sometimes"}, wantExit: 2, wantMessage: `--mlock "sometimes": want auto, on or off`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, bin, tt.args...)
			if tt.restricted && os.Geteuid() == 0 {
				cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			}
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			if got := cmd.ProcessState.ExitCode(); got != tt.wantExit {
				t.Fatalf("mlockhelper %q exit code = %d (%v), want %d\nstderr: %s", tt.args, got, err, tt.wantExit, stderr.String())
			}
			if tt.wantExit != 0 {
				if !strings.Contains(stderr.String(), tt.wantMessage) {
					t.Errorf("mlockhelper %q stderr = %q, want it to contain %q", tt.args, stderr.String(), tt.wantMessage)
				}
				return
			}
			var got mlockResult
			if err := json.Unmarshal(stdout.Bytes(), &got); err != nil {
				t.Fatalf("mlockhelper %q output %q: %v", tt.args, stdout.String(), err)
			}
			if got.Locked != tt.wantLocked || !strings.Contains(got.Reason, tt.wantMessage) {
				t.Errorf("LockProcess(%q) = {Locked: %v, Reason: %q}, want {Locked: %v, Reason containing %q}",
					tt.args, got.Locked, got.Reason, tt.wantLocked, tt.wantMessage)
			}
			wantGauge := map[bool]float64{true: 1, false: 0}[tt.wantLocked]
			if got.Gauge != wantGauge {
				t.Errorf("mlockhelper %q: cairn_memory_locked = %v, want %v", tt.args, got.Gauge, wantGauge)
			}
			// Locked, VmLck covers the whole address space, including the
			// 32 MiB the helper allocated after LockProcess (MCL_FUTURE);
			// not locked, the helper has nothing locked at all.
			if tt.wantLocked && got.VmLckKB < helperHeapKB {
				t.Errorf("mlockhelper %q: VmLck = %d kB, want >= %d kB", tt.args, got.VmLckKB, helperHeapKB)
			}
			if !tt.wantLocked && got.VmLckKB != 0 {
				t.Errorf("mlockhelper %q: VmLck = %d kB, want 0", tt.args, got.VmLckKB)
			}
			wantLog := map[bool]string{true: "process memory locked into RAM", false: "process memory NOT locked into RAM"}[tt.wantLocked]
			if !strings.Contains(stderr.String(), wantLog) {
				t.Errorf("mlockhelper %q log = %q, want it to contain %q", tt.args, stderr.String(), wantLog)
			}
		})
	}
}
