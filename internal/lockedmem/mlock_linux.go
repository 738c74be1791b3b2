package lockedmem

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// lockAll locks the whole process into RAM if that is safe (see
// LockProcess) and says why it did or did not.
func lockAll() (bool, string) {
	if ok, why := mayLockAll(); !ok {
		return false, why
	}
	if err := unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE); err != nil {
		return false, fmt.Sprintf("mlockall(MCL_CURRENT|MCL_FUTURE): %v", err)
	}
	return true, "mlockall(MCL_CURRENT|MCL_FUTURE) succeeded"
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
