// Command mlockhelper is the child process of the lockedmem mlock tests: it
// optionally lowers its RLIMIT_MEMLOCK, calls lockedmem.LockProcess, then
// allocates and touches 32 MiB on the Go heap and prints, as JSON, the
// outcome, the cairn_memory_locked gauge and VmLck from /proc/self/status.
// It exits 1 if LockProcess returns an error. It is built without -race by
// the tests (a race binary is never locked).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"

	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// HeapBytes is how much the helper allocates after locking.
const HeapBytes = 32 << 20

type result struct {
	Locked  bool
	Reason  string
	Gauge   float64
	VmLckKB int
}

func main() {
	mode := lockedmem.RegisterFlag(flag.CommandLine)
	memlock := flag.Int64("memlock", -1, "set RLIMIT_MEMLOCK (soft and hard) to this many bytes first (-1: leave it)")
	flag.Parse()
	if *memlock >= 0 {
		lim := uint64(*memlock)
		if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &unix.Rlimit{Cur: lim, Max: lim}); err != nil {
			fmt.Fprintln(os.Stderr, "mlockhelper: setrlimit:", err)
			os.Exit(2)
		}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	o, err := lockedmem.LockProcess(log, *mode)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	heap := make([]byte, HeapBytes)
	for i := range heap {
		heap[i] = byte(i)
	}
	reg := prometheus.NewRegistry()
	if err := lockedmem.RegisterMetrics(reg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	mfs, err := reg.Gather()
	if err != nil || len(mfs) != 1 || len(mfs[0].GetMetric()) != 1 {
		fmt.Fprintln(os.Stderr, "mlockhelper: gathering cairn_memory_locked:", err, mfs)
		os.Exit(2)
	}
	r := result{Locked: o.Locked, Reason: o.Reason, Gauge: mfs[0].GetMetric()[0].GetGauge().GetValue(), VmLckKB: vmLck()}
	runtime.KeepAlive(heap)
	if err := json.NewEncoder(os.Stdout).Encode(r); err != nil {
		os.Exit(2)
	}
}

// vmLck returns VmLck from /proc/self/status in kB.
func vmLck() int {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		fmt.Fprintln(os.Stderr, "mlockhelper:", err)
		os.Exit(2)
	}
	for line := range strings.Lines(string(data)) {
		if v, ok := strings.CutPrefix(line, "VmLck:"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				fmt.Fprintln(os.Stderr, "mlockhelper: VmLck:", err)
				os.Exit(2)
			}
			return n
		}
	}
	fmt.Fprintln(os.Stderr, "mlockhelper: no VmLck in /proc/self/status")
	os.Exit(2)
	return 0
}
