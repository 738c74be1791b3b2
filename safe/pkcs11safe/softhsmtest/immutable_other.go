//go:build !linux

package softhsmtest

import (
	"errors"
	"runtime"
)

// setImmutable is not implemented outside Linux: root cannot be kept out of
// a directory here, so MakeReadOnly fails the test.
func setImmutable(paths []string, on bool) error {
	if !on {
		return nil
	}
	return errors.New("no immutable attribute support on " + runtime.GOOS)
}
