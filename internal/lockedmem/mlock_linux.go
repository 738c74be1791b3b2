package lockedmem

import (
	"fmt"
	"log/slog"

	"golang.org/x/sys/unix"
)

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
		if ok, why := mayLockAll(); !ok {
			o.Reason = why
			break
		}
		if err := unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE); err != nil {
			o.Reason = fmt.Sprintf("mlockall(MCL_CURRENT|MCL_FUTURE): %v", err)
			break
		}
		processLocked.Store(true)
		o = Outcome{Locked: true, Reason: "mlockall(MCL_CURRENT|MCL_FUTURE) succeeded"}
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

// mayLockAll reports whether mlockall(MCL_FUTURE) is safe for this process
// and, when not, why.
func mayLockAll() (bool, string) {
	if raceDetector {
		return false, "binary built with the race detector (mlockall would fault in its shadow memory)"
	}
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &lim); err != nil {
		return false, fmt.Sprintf("getrlimit(RLIMIT_MEMLOCK): %v", err)
	}
	if lim.Cur == unix.RLIM_INFINITY {
		return true, ""
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err == nil && data[0].Effective&(1<<unix.CAP_IPC_LOCK) != 0 {
		return true, ""
	}
	return false, fmt.Sprintf("RLIMIT_MEMLOCK is %d bytes and the process lacks CAP_IPC_LOCK, "+
		"so allocations beyond the limit would fail once locked; set LimitMEMLOCK=infinity in the systemd unit or grant CAP_IPC_LOCK", lim.Cur)
}
