package lockedmem

import (
	"flag"
	"fmt"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// Mode says whether [LockProcess] locks the whole process into RAM. It is
// the value of the --mlock flag of the servers that hold key material on
// the Go heap (the root KMS and the regional KMS).
type Mode string

const (
	// MlockAuto locks when the process may lock all of its memory
	// (RLIMIT_MEMLOCK unlimited, or CAP_IPC_LOCK) and otherwise logs why it
	// did not and carries on. It is the default.
	MlockAuto Mode = "auto"
	// MlockOn locks or fails: [LockProcess] returns an error when the
	// process may not or cannot lock its memory.
	MlockOn Mode = "on"
	// MlockOff never locks.
	MlockOff Mode = "off"
)

// String returns the mode's flag spelling.
func (m *Mode) String() string {
	if m == nil || *m == "" {
		return string(MlockAuto)
	}
	return string(*m)
}

// Set implements [flag.Value]: it accepts auto, on and off.
func (m *Mode) Set(s string) error {
	switch Mode(s) {
	case MlockAuto, MlockOn, MlockOff:
		*m = Mode(s)
		return nil
	}
	return fmt.Errorf("lockedmem: --mlock %q: want auto, on or off", s)
}

// RegisterFlag adds --mlock=auto|on|off (default auto) to fs and returns
// the mode it sets, for [LockProcess].
func RegisterFlag(fs *flag.FlagSet) *Mode {
	m := MlockAuto
	fs.Var(&m, "mlock", "lock all process memory into RAM with mlockall so keys on the Go heap never reach swap: "+
		"auto (lock when RLIMIT_MEMLOCK is unlimited or the process has CAP_IPC_LOCK, else log why not), on (fail to start if it cannot), off")
	return &m
}

// Outcome is what [LockProcess] did.
type Outcome struct {
	// Locked is true when mlockall(MCL_CURRENT|MCL_FUTURE) succeeded.
	Locked bool
	// Reason says why the memory is or is not locked, for the log.
	Reason string
}

// processLocked records a successful mlockall. mlockall is a property of
// the whole process, so this is process-wide state too; the
// cairn_memory_locked gauge of every registry reads it.
var processLocked atomic.Bool

// ProcessLocked reports whether [LockProcess] has locked the process's
// memory.
func ProcessLocked() bool { return processLocked.Load() }

// RegisterMetrics registers cairn_memory_locked on reg: a gauge that is 1
// when the whole process memory is locked into RAM ([LockProcess]
// succeeded) and 0 when it is not. Alert on 0 for servers that should run
// locked.
func RegisterMetrics(reg prometheus.Registerer) error {
	g := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "cairn", Name: "memory_locked",
		Help: "1 if all process memory is locked into RAM (mlockall), 0 if not: key material on the Go heap could then be swapped to disk."},
		func() float64 {
			if ProcessLocked() {
				return 1
			}
			return 0
		})
	if err := reg.Register(g); err != nil {
		return fmt.Errorf("lockedmem: registering cairn_memory_locked: %w", err)
	}
	return nil
}
