//go:build !linux

package lockedmem

import "runtime"

// lockAll never locks on this system: mlockall is only used on Linux.
func lockAll() (bool, string) {
	return false, "locking process memory is not supported on " + runtime.GOOS
}
