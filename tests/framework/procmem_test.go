package framework

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// procMemChildEnv makes the test binary, re-run, act as the child whose
// memory TestScanProcessMemory reads.
const procMemChildEnv = "CAIRN_PROCMEM_CHILD"

// secretLen is the length of the secrets the child holds.
const secretLen = 32

// init runs the child before any test (and before TestMain): it reads two
// secrets from stdin, keeps the first raw and the second only as hex (the
// raw copy cleared), says "ready", and holds them until stdin closes.
func init() {
	if os.Getenv(procMemChildEnv) != "1" {
		return
	}
	raw := make([]byte, 2*secretLen)
	if _, err := io.ReadFull(os.Stdin, raw); err != nil {
		os.Exit(3)
	}
	held := raw[:secretLen]
	hexed := []byte(hex.EncodeToString(raw[secretLen:]))
	clear(raw[secretLen:])
	os.Stdout.WriteString("ready\n")
	_, _ = io.Copy(io.Discard, os.Stdin)
	runtime.KeepAlive(held)
	runtime.KeepAlive(hexed)
	os.Exit(0)
}

// TestScanProcessMemory: a child process holds secret A raw and secret B
// only hex-encoded; ScanProcessMemory of the stopped child finds A (raw)
// and B (hex, never raw) and not C, which the child never saw, reading
// every readable mapping. ProcessLimit reads back the RLIMIT_CORE set on
// the child.
func TestScanProcessMemory(t *testing.T) {
	var a, b, c [secretLen]byte
	for _, s := range [][]byte{a[:], b[:], c[:]} {
		if _, err := rand.Read(s); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), procMemChildEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	stopped := false
	t.Cleanup(func() {
		if stopped {
			_ = syscall.Kill(pid, syscall.SIGCONT)
		}
		stdin.Close()
		if err := cmd.Wait(); err != nil {
			t.Errorf("child: %v", err)
		}
	})
	if _, err := stdin.Write(append(a[:], b[:]...)); err != nil {
		t.Fatal(err)
	}
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("child said %q, %v; want ready", line, err)
	}

	// The child may not raise a hard limit of 0 again: set it from here,
	// as HardenProcess sets it in the servers.
	if err := unix.Prlimit(pid, unix.RLIMIT_CORE, &unix.Rlimit{Cur: 0, Max: 0}, nil); err != nil {
		t.Fatalf("prlimit(%d, RLIMIT_CORE, 0) = %v", pid, err)
	}
	if soft, hard, err := ProcessLimit(pid, "Max core file size"); err != nil || soft != "0" || hard != "0" {
		t.Errorf("ProcessLimit(Max core file size) = %q, %q, %v; want 0, 0", soft, hard, err)
	}
	if _, _, err := ProcessLimit(pid, "Max core file"); err == nil {
		t.Error("ProcessLimit of a prefix of a limit's name found a line, want an error")
	}

	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped = true
	if err := WaitStopped(pid); err != nil {
		t.Fatal(err)
	}
	found, stats, err := ScanProcessMemory(pid, []Secret{{Name: "A", Value: a[:]}, {Name: "B", Value: b[:]}, {Name: "C", Value: c[:]}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("scanned %d of %d mappings (%d skipped), %d bytes: %d hits %v", stats.Read, stats.Regions, stats.Skipped, stats.Bytes, stats.Hits, found)
	encodings := map[string][]string{}
	for _, f := range found {
		encodings[f.Secret] = append(encodings[f.Secret], f.Encoding)
		if f.Addr < f.Region.Start || f.Addr >= f.Region.End {
			t.Errorf("finding %s: address outside its mapping", f)
		}
	}
	if !slices.Contains(encodings["A"], "raw") {
		t.Errorf("secret A held raw: found as %v, want raw among them", encodings["A"])
	}
	if !slices.Contains(encodings["B"], "hex") || slices.Contains(encodings["B"], "raw") {
		t.Errorf("secret B held as hex only: found as %v, want hex and not raw", encodings["B"])
	}
	if len(encodings["C"]) > 0 {
		t.Errorf("secret C, never in the child, found as %v", encodings["C"])
	}
	if stats.Read+stats.Skipped != stats.Regions || stats.Read == 0 || stats.Bytes == 0 || stats.Hits != len(found) {
		t.Errorf("stats %+v: want every mapping read or skipped, some read, hits = %d findings", stats, len(found))
	}

}

// TestScanRegionChunks: copies of a secret placed across and next to the
// boundaries of the chunks a mapping is read in, and of the zero pages the
// scan skips, are each found exactly once, at their addresses; so is a
// secret that starts with eight zero bytes.
func TestScanRegionChunks(t *testing.T) {
	var random, zeroLed [secretLen]byte
	if _, err := rand.Read(random[:]); err != nil {
		t.Fatal(err)
	}
	copy(zeroLed[8:], random[8:])
	const page = 4096
	tests := []struct {
		name   string
		secret []byte
		chunk  int
		size   int
		at     []int
	}{
		{"small chunks", random[:], 256, 1024, []int{10, 256 - 16, 512 - secretLen, 512 - secretLen - 40, 767, 1024 - secretLen}},
		{"zero pages", random[:], page, 6 * page, []int{page, 3*page - 16, 4*page - secretLen, 5*page + 8}},
		{"leading zeros", zeroLed[:], page, 4 * page, []int{page - 8, 2 * page, 4*page - secretLen}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := newMemMatcher([]Secret{{Name: "A", Value: tt.secret}})
			if err != nil {
				t.Fatal(err)
			}
			mem := make([]byte, tt.size)
			for _, off := range tt.at {
				copy(mem[off:], tt.secret)
			}
			r := MemRegion{Start: 0, End: uint64(len(mem)), Perms: "rw-p"}
			var found []MemFinding
			var stats MemStats
			if err := m.scanRegion(bytes.NewReader(mem), r, make([]byte, tt.chunk+m.maxLen-1), &found, &stats); err != nil {
				t.Fatal(err)
			}
			var got []int
			for _, f := range found {
				if f.Encoding == "raw" {
					got = append(got, int(f.Addr))
				}
			}
			slices.Sort(got)
			want := slices.Sorted(slices.Values(tt.at))
			if !slices.Equal(got, want) || stats.Bytes != int64(len(mem)) || stats.Hits != len(found) {
				t.Errorf("scanRegion found raw copies at %v (%d hits, %d bytes), want %v once each (%d bytes)", got, stats.Hits, stats.Bytes, want, len(mem))
			}
			// A mapping shorter than it claims is an error, not a silent gap.
			if err := m.scanRegion(bytes.NewReader(mem[:tt.chunk]), r, make([]byte, tt.chunk+m.maxLen-1), &found, &stats); err == nil {
				t.Error("scanRegion of a mapping that cannot be read whole = nil error, want one")
			}
		})
	}
}

// TestReadMaps: this process's own maps name its executable and a stack,
// and ProcMemAccess explains itself when it refuses.
func TestReadMaps(t *testing.T) {
	rs, err := ReadMaps(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var sawExe, sawStack bool
	for _, r := range rs {
		sawExe = sawExe || r.Path == exe
		sawStack = sawStack || r.Path == "[stack]"
		if r.End <= r.Start || len(r.Perms) != 4 {
			t.Errorf("mapping %s: malformed", r)
		}
	}
	if !sawExe || !sawStack {
		t.Errorf("ReadMaps(self): executable %s mapped %v, [stack] %v; want both", exe, sawExe, sawStack)
	}
	if err := ProcMemAccess(); err != nil && !strings.Contains(err.Error(), "CAP_SYS_PTRACE") {
		t.Errorf("ProcMemAccess() = %v, want a reason naming CAP_SYS_PTRACE", err)
	}
}
