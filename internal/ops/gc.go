package ops

import (
	"fmt"
	"math"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
)

// DefaultKMSGCPercent is the regional KMS's GOGC when the environment does
// not set one. A KMS server's live heap is small and stable (the keysets of
// one bundle) while every call leaves garbage (messages, audit records), so
// at Go's default of 100 the collector runs many times a second and takes a
// large share of the CPU of a busy server; at 400 it runs a quarter as
// often, for a peak heap of about five times the live one. GOMEMLIMIT
// (below) keeps that peak inside a container's memory limit.
const DefaultKMSGCPercent = 400

// cgroupMemoryMax is the cgroup v2 memory limit of this process's cgroup.
const cgroupMemoryMax = "/sys/fs/cgroup/memory.max"

// memLimitShare is the share of a cgroup memory limit GOMEMLIMIT defaults
// to: the rest is headroom for what Go's limit does not count (thread
// stacks outside the heap, the binary, the kernel's page cache charged to
// the cgroup).
const memLimitShare = 0.9

// TuneGC applies a server's garbage-collector defaults where the
// environment does not set its own: GOGC=gcPercent, and, when the process
// runs under a cgroup v2 memory limit (a container), GOMEMLIMIT = 90% of it,
// so that a large GOGC never takes the heap past the container's limit
// (the collector runs more often near the limit instead). GOGC and
// GOMEMLIMIT in the environment win, as they do for any Go program. It
// returns a description of the settings in force, for the start-up log.
func TuneGC(gcPercent int) string {
	gogc := os.Getenv("GOGC")
	if gogc == "" {
		debug.SetGCPercent(gcPercent)
		gogc = strconv.Itoa(gcPercent) + " (Cairn's default)"
	} else {
		gogc += " (from the environment)"
	}
	limit := "none"
	if v := os.Getenv("GOMEMLIMIT"); v != "" {
		limit = v + " (from the environment)"
	} else if max, ok := cgroupLimit(cgroupMemoryMax); ok {
		n := int64(float64(max) * memLimitShare)
		debug.SetMemoryLimit(n)
		limit = fmt.Sprintf("%d MiB (90%% of the cgroup's memory.max)", n>>20)
	}
	return "GOGC=" + gogc + ", GOMEMLIMIT=" + limit
}

// cgroupLimit reads a cgroup v2 memory.max file: a byte count, or "max"
// (no limit, as outside a container).
func cgroupLimit(path string) (int64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || n <= 0 || n == math.MaxInt64 {
		return 0, false
	}
	return n, true
}
