//go:build !linux

package lockedmem

import (
	"fmt"
	"log/slog"
	"runtime"
)

// LockProcess never locks on this system: mlockall is only used on Linux.
// With [MlockOn] it returns an error, with [MlockAuto] it logs a warning,
// with [MlockOff] it does nothing but log.
func LockProcess(log *slog.Logger, mode Mode) (Outcome, error) {
	if mode == "" {
		mode = MlockAuto
	}
	o := Outcome{Reason: "locking process memory is not supported on " + runtime.GOOS}
	switch mode {
	case MlockOff:
		o.Reason = "--mlock=off"
	case MlockAuto:
	case MlockOn:
		return o, fmt.Errorf("lockedmem: --mlock=on: cannot lock process memory: %s", o.Reason)
	default:
		return o, fmt.Errorf("lockedmem: mlock mode %q: want auto, on or off", mode)
	}
	log.Warn("lockedmem: process memory NOT locked into RAM; keys on the Go heap may be swapped to disk",
		"mlock", string(mode), "reason", o.Reason)
	return o, nil
}
