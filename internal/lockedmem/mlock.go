package lockedmem

import (
	"flag"
	"fmt"
	"log/slog"
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

// LockProcess applies mode to the whole process and logs the outcome on
// log: one Info line when the memory is locked, one Warn line when it is
// not. Call it early in main, before key material is loaded, and once.
//
// Locking calls mlockall(MCL_CURRENT|MCL_FUTURE): every page the process
// has and will map stays in RAM, so region keys and keysets that live on
// the Go heap never reach swap. With MCL_FUTURE, every later allocation
// counts against RLIMIT_MEMLOCK, and one beyond it fails (the Go runtime
// then dies with "out of memory"). So LockProcess locks only when the limit
// cannot bite: RLIMIT_MEMLOCK is unlimited (LimitMEMLOCK=infinity in a
// systemd unit) or the process has CAP_IPC_LOCK (root usually has). It
// never locks a binary built with the race detector, whose shadow memory
// mlockall would fault in.
//
// With [MlockAuto] a process that may not lock is logged and carries on;
// with [MlockOn] LockProcess returns an error instead; with [MlockOff] it
// does nothing but log. The returned error is nil except for MlockOn.
func LockProcess(log *slog.Logger, mode Mode) (Outcome, error) {
	if mode == "" {
		mode = MlockAuto
	}
	var o Outcome
	switch mode {
	case MlockOff:
		o.Reason = "--mlock=off"
	case MlockAuto, MlockOn:
		o.Locked, o.Reason = lockAll()
		processLocked.Store(o.Locked)
	default:
		return o, fmt.Errorf("lockedmem: mlock mode %q: want auto, on or off", mode)
	}
	if o.Locked {
		log.Info("lockedmem: process memory locked into RAM", "mlock", string(mode))
		return o, nil
	}
	if mode == MlockOn {
		return o, fmt.Errorf("lockedmem: --mlock=on: cannot lock process memory: %s", o.Reason)
	}
	log.Warn("lockedmem: process memory NOT locked into RAM; keys on the Go heap may be swapped to disk",
		"mlock", string(mode), "reason", o.Reason)
	return o, nil
}
