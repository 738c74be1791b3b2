//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package audit

import "os"

// oNoFollow is 0 where the platform has no O_NOFOLLOW: Open follows symbolic
// links there.
const oNoFollow = 0

// lockFile does nothing where the platform has no flock: nothing stops two
// Logs from opening the same file there.
func lockFile(*os.File) error { return nil }
