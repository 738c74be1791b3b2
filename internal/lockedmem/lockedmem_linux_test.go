package lockedmem_test

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"
)

// vma is one mapping from /proc/self/smaps.
type vma struct {
	start, end uintptr
	kB         map[string]int // "Size", "Rss", "Locked", ... in kB
	flags      []string       // VmFlags: "lo" locked, "dd" don't dump, "wf" wipe on fork, ...
}

func readSmaps(t *testing.T) []vma {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatalf("Open(/proc/self/smaps) error = %v", err)
	}
	defer f.Close()
	var out []vma
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		key, rest, ok := strings.Cut(line, ":")
		// Header lines look like "7f12-7f34 rw-p 00000000 00:00 0 ...";
		// field lines like "Locked:   4 kB" and "VmFlags: rd wr lo dd".
		if lo, hi, isRange := strings.Cut(strings.Fields(line)[0], "-"); isRange && !strings.HasSuffix(key, "Flags") {
			start, err1 := strconv.ParseUint(lo, 16, 64)
			end, err2 := strconv.ParseUint(hi, 16, 64)
			if err1 == nil && err2 == nil {
				out = append(out, vma{start: uintptr(start), end: uintptr(end), kB: map[string]int{}})
				continue
			}
		}
		if !ok || len(out) == 0 {
			continue
		}
		cur := &out[len(out)-1]
		if key == "VmFlags" {
			cur.flags = strings.Fields(rest)
			continue
		}
		if v, found := strings.CutSuffix(strings.TrimSpace(rest), " kB"); found {
			n, err := strconv.Atoi(v)
			if err != nil {
				t.Fatalf("smaps line %q: %v", line, err)
			}
			cur.kB[key] = n
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("reading /proc/self/smaps: %v", err)
	}
	if len(out) == 0 {
		t.Fatal("/proc/self/smaps lists no mappings")
	}
	return out
}

// vmaAt returns the mapping that contains addr, if any. Adjacent mappings
// with the same flags may have been merged by the kernel, so this looks for
// containment, not for an equal start.
func vmaAt(t *testing.T, addr uintptr) (vma, bool) {
	t.Helper()
	for _, m := range readSmaps(t) {
		if m.start <= addr && addr < m.end {
			return m, true
		}
	}
	return vma{}, false
}

// vmLck returns VmLck from /proc/self/status, in kB.
func vmLck(t *testing.T) int {
	t.Helper()
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatalf("ReadFile(/proc/self/status) error = %v", err)
	}
	for line := range strings.Lines(string(status)) {
		if v, ok := strings.CutPrefix(line, "VmLck:"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				t.Fatalf("VmLck line %q: %v", line, err)
			}
			return n
		}
	}
	t.Fatalf("/proc/self/status has no VmLck line:\n%s", status)
	return 0
}

func newBuffer(t *testing.T, size int) *lockedmem.Buffer {
	t.Helper()
	b, err := lockedmem.New(size)
	if err != nil {
		t.Fatalf("New(%d) error = %v", size, err)
	}
	t.Cleanup(func() {
		if err := b.Destroy(); err != nil {
			t.Errorf("Destroy() error = %v", err)
		}
	})
	return b
}

func addr(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

func pages(size int) int {
	page := os.Getpagesize()
	return (size + page - 1) / page * page
}

var testSizes = []int{1, 32, os.Getpagesize() - 1, os.Getpagesize(), os.Getpagesize() + 1, lockedmem.MaxSize}

func TestRoundTrip(t *testing.T) {
	for _, size := range testSizes {
		t.Run(strconv.Itoa(size), func(t *testing.T) {
			b, err := lockedmem.New(size)
			if err != nil {
				t.Fatalf("New(%d) error = %v", size, err)
			}
			mem := b.Bytes()
			if len(mem) != size || cap(mem) != size {
				t.Fatalf("len, cap of Bytes() = %d, %d, want %d, %d", len(mem), cap(mem), size, size)
			}
			if got := b.Size(); got != size {
				t.Errorf("Size() = %d, want %d", got, size)
			}
			if got := addr(mem) % uintptr(os.Getpagesize()); got != 0 {
				t.Errorf("Bytes() address %% page size = %d, want 0", got)
			}
			if !bytes.Equal(mem, make([]byte, size)) {
				t.Errorf("Bytes() of a new Buffer is not all zero")
			}
			want := make([]byte, size)
			for i := range want {
				want[i] = byte(i*7 + 1)
			}
			copy(mem, want)
			if got := b.Bytes(); !bytes.Equal(got, want) || addr(got) != addr(mem) {
				t.Errorf("Bytes() after writing does not alias the written memory")
			}

			if err := b.Destroy(); err != nil {
				t.Fatalf("Destroy() = %v, want nil", err)
			}
			if got := b.Bytes(); got != nil {
				t.Errorf("Bytes() after Destroy = non-nil slice of length %d, want nil", len(got))
			}
			if got := b.Size(); got != 0 {
				t.Errorf("Size() after Destroy = %d, want 0", got)
			}
			if err := b.Destroy(); err != nil {
				t.Errorf("second Destroy() = %v, want nil", err)
			}
		})
	}
}

// TestLockedAndNotDumped checks with the kernel's own accounting that New
// locked the mapping and excluded it from core dumps, and that Destroy gives
// it back.
func TestLockedAndNotDumped(t *testing.T) {
	for _, size := range []int{32, lockedmem.MaxSize} {
		t.Run(strconv.Itoa(size), func(t *testing.T) {
			mappedKB := pages(size) / 1024
			before := vmLck(t)
			b, err := lockedmem.New(size)
			if err != nil {
				t.Fatalf("New(%d) error = %v", size, err)
			}
			start := addr(b.Bytes())
			if got := vmLck(t) - before; got < mappedKB {
				t.Errorf("VmLck increase after New(%d) = %d kB, want >= %d kB", size, got, mappedKB)
			}
			m, ok := vmaAt(t, start)
			if !ok {
				t.Fatalf("smaps has no mapping containing %#x", start)
			}
			if got := m.kB["Locked"]; got < mappedKB {
				t.Errorf("smaps Locked of %#x = %d kB, want >= %d kB", start, got, mappedKB)
			}
			for _, flag := range []string{"lo", "dd", "wf"} { // mlock, MADV_DONTDUMP, MADV_WIPEONFORK
				if !slices.Contains(m.flags, flag) {
					t.Errorf("smaps VmFlags of %#x = %q, want it to contain %q", start, m.flags, flag)
				}
			}

			if err := b.Destroy(); err != nil {
				t.Fatalf("Destroy() = %v, want nil", err)
			}
			if got := vmLck(t); got != before {
				t.Errorf("VmLck after Destroy = %d kB, want %d kB (as before New)", got, before)
			}
			// The address range may be reused by a later mapping of the
			// runtime, but not by a locked, non-dumpable one.
			if m, ok := vmaAt(t, start); ok && (slices.Contains(m.flags, "lo") || slices.Contains(m.flags, "dd")) {
				t.Errorf("after Destroy smaps still lists %#x in %#x-%#x with VmFlags %q", start, m.start, m.end, m.flags)
			}
			if err := b.Destroy(); err != nil {
				t.Errorf("second Destroy() = %v, want nil", err)
			}
		})
	}
}

// TestDestroyConcurrent checks that concurrent Destroy calls unmap once and
// all succeed.
func TestDestroyConcurrent(t *testing.T) {
	before := vmLck(t)
	b, err := lockedmem.New(32)
	if err != nil {
		t.Fatalf("New(32) error = %v", err)
	}
	copy(b.Bytes(), "key")
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Go(func() {
			errs[i] = b.Destroy()
			_ = b.Bytes()
			_ = b.Size()
		})
	}
	wg.Wait()
	if diff := cmp.Diff(make([]error, len(errs)), errs); diff != "" {
		t.Errorf("concurrent Destroy() errors (-want +got):\n%s", diff)
	}
	if got := vmLck(t); got != before {
		t.Errorf("VmLck after Destroy = %d kB, want %d kB", got, before)
	}
}

func TestRedacted(t *testing.T) {
	key := []byte("KEYMATERIAL-0123456789abcdef-XYZ")
	b := newBuffer(t, len(key))
	copy(b.Bytes(), key)
	// Forms in which the key would show if a printer reached the bytes.
	leaks := []string{string(key), hex.EncodeToString(key), strings.ToUpper(hex.EncodeToString(key)),
		fmt.Sprint(key), fmt.Sprintf("%q", key)}

	type holder struct {
		Exported   *lockedmem.Buffer
		unexported *lockedmem.Buffer
	}
	h := holder{Exported: b, unexported: b}
	var logged bytes.Buffer
	slog.New(slog.NewTextHandler(&logged, nil)).Info("k", "buf", b)
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("k", "buf", b)

	for _, tc := range []struct {
		name, got string
		exact     bool // got must be exactly the redaction marker
	}{
		{`Sprintf("%v")`, fmt.Sprintf("%v", b), true},
		{`Sprintf("%s")`, fmt.Sprintf("%s", b), true},
		{`Sprintf("%x")`, fmt.Sprintf("%x", b), true},
		{`Sprintf("%X")`, fmt.Sprintf("%X", b), true},
		{`Sprintf("%q")`, fmt.Sprintf("%q", b), true},
		{`Sprintf("%d")`, fmt.Sprintf("%d", b), true},
		{`Sprintf("%+v")`, fmt.Sprintf("%+v", b), true},
		{`Sprintf("%#v")`, fmt.Sprintf("%#v", b), true},
		{"String()", b.String(), true},
		{"LogValue()", b.LogValue().String(), true},
		{`Sprintf("%+v", holder)`, fmt.Sprintf("%+v", h), false},
		{`Sprintf("%#v", holder)`, fmt.Sprintf("%#v", h), false},
		{"slog text and JSON", logged.String(), false},
	} {
		if tc.exact && tc.got != lockedmem.Redacted {
			t.Errorf("%s = %q, want %q", tc.name, tc.got, lockedmem.Redacted)
		}
		for _, leak := range leaks {
			if strings.Contains(tc.got, leak) {
				t.Errorf("%s = %q, want no %q in it", tc.name, tc.got, leak)
			}
		}
	}
}

// childEnv names the test that a re-executed test binary should act as the
// child of; see runChild.
const childEnv = "LOCKEDMEM_TEST_CHILD"

// runChild runs the test named name again in a fresh copy of the test binary,
// for checks that change the whole process, and returns the JSON the child
// printed on a line starting with "RESULT ", decoded into out.
func runChild(t *testing.T, name string, out any) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatalf("Executable() error = %v", err)
	}
	cmd := exec.CommandContext(t.Context(), exe, "-test.run=^"+name+"$", "-test.count=1")
	// The race detector waits a second before exiting unless told not to.
	cmd.Env = append(os.Environ(), childEnv+"="+name, "GORACE="+os.Getenv("GORACE")+" atexit_sleep_ms=0")
	output, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child %s: %v\n%s", name, err, output)
	}
	for line := range strings.Lines(string(output)) {
		if res, ok := strings.CutPrefix(line, "RESULT "); ok {
			if err := json.Unmarshal([]byte(res), out); err != nil {
				t.Fatalf("child %s result %q: %v", name, res, err)
			}
			return
		}
	}
	t.Fatalf("child %s printed no RESULT line:\n%s", name, output)
}

// printResult is what a child calls to hand its findings to runChild.
func printResult(t *testing.T, v any) {
	t.Helper()
	js, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("Marshal(%v) error = %v", v, err)
	}
	fmt.Printf("RESULT %s\n", js)
}

type processState struct {
	CoreCur, CoreMax uint64
	Dumpable         int
}

func readProcessState(t *testing.T) processState {
	t.Helper()
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_CORE, &lim); err != nil {
		t.Fatalf("Getrlimit(RLIMIT_CORE) error = %v", err)
	}
	d, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
	if err != nil {
		t.Fatalf("prctl(PR_GET_DUMPABLE) error = %v", err)
	}
	return processState{CoreCur: lim.Cur, CoreMax: lim.Max, Dumpable: d}
}

func TestHardenProcess(t *testing.T) {
	type result struct {
		Before, After processState
		Err           string
	}
	if os.Getenv(childEnv) == t.Name() {
		// Allow core dumps first (as far as the hard limit lets an
		// unprivileged process), so that the test sees HardenProcess
		// change something.
		var lim unix.Rlimit
		if err := unix.Getrlimit(unix.RLIMIT_CORE, &lim); err != nil {
			t.Fatalf("Getrlimit(RLIMIT_CORE) error = %v", err)
		}
		lim.Cur = lim.Max
		if err := unix.Setrlimit(unix.RLIMIT_CORE, &lim); err != nil {
			t.Fatalf("Setrlimit(RLIMIT_CORE, %+v) error = %v", lim, err)
		}
		r := result{Before: readProcessState(t)}
		if err := lockedmem.HardenProcess(); err != nil {
			r.Err = err.Error()
		}
		r.After = readProcessState(t)
		printResult(t, r)
		return
	}

	var got result
	runChild(t, t.Name(), &got)
	if got.Before.Dumpable != 1 || got.Before.CoreMax == 0 {
		t.Errorf("child state before HardenProcess = %+v, want dumpable 1 and a core limit > 0", got.Before)
	}
	if diff := cmp.Diff(result{Before: got.Before}, got); diff != "" {
		t.Errorf("HardenProcess() in child: result mismatch (-want +got):\n%s", diff)
	}
}

// TestMlockFailure checks that New fails, cleanly and with advice, when the
// process may not lock memory: in a child, RLIMIT_MEMLOCK is set to 0 and
// CAP_IPC_LOCK, which overrides it, is dropped from the thread's effective
// set.
func TestMlockFailure(t *testing.T) {
	type result struct {
		Err       string
		GotBuffer bool
		LockedKB  int
	}
	if os.Getenv(childEnv) == t.Name() {
		// Capabilities are per thread; New must run on the thread that
		// dropped CAP_IPC_LOCK. The thread is discarded when the test
		// goroutine exits still locked to it.
		runtime.LockOSThread()
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			t.Fatalf("capget error = %v", err)
		}
		data[0].Effective &^= 1 << unix.CAP_IPC_LOCK
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			t.Fatalf("capset error = %v", err)
		}
		if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &unix.Rlimit{Cur: 0, Max: 0}); err != nil {
			t.Fatalf("Setrlimit(RLIMIT_MEMLOCK, 0) error = %v", err)
		}
		b, err := lockedmem.New(32)
		r := result{GotBuffer: b != nil, LockedKB: vmLck(t)}
		if err != nil {
			r.Err = err.Error()
		}
		printResult(t, r)
		return
	}

	var got result
	runChild(t, t.Name(), &got)
	if got.GotBuffer || got.LockedKB != 0 {
		t.Errorf("New(32) without mlock rights: buffer %v, VmLck %d kB, want no buffer, 0 kB", got.GotBuffer, got.LockedKB)
	}
	for _, want := range []string{"lockedmem: mlock", "RLIMIT_MEMLOCK", "LimitMEMLOCK"} {
		if !strings.Contains(got.Err, want) {
			t.Errorf("New(32) without mlock rights: error = %q, want it to contain %q", got.Err, want)
		}
	}
}
