//go:build !linux

package lockedmem

import (
	"fmt"
	"runtime"
)

// New returns an error on this system: locked, non-dumpable memory is only
// implemented for Linux, and Cairn does not pretend to protect keys it
// cannot protect.
func New(size int) (*Buffer, error) {
	if err := checkSize(size); err != nil {
		return nil, err
	}
	return nil, fmt.Errorf("lockedmem: locked memory not supported on %s", runtime.GOOS)
}

// Destroy does nothing and returns nil: on this system [New] never makes a
// Buffer, so the only Buffer there is the zero value, which is already
// destroyed.
func (b *Buffer) Destroy() error { return nil }

// HardenProcess returns an error on this system: disabling core dumps and
// ptrace is only implemented for Linux.
func HardenProcess() error {
	return fmt.Errorf("lockedmem: process hardening not supported on %s", runtime.GOOS)
}
