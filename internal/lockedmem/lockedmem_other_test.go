//go:build !linux

package lockedmem_test

import (
	"runtime"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/lockedmem"
)

// TestUnsupported checks that this system gets an honest error, not a Buffer
// that protects nothing.
func TestUnsupported(t *testing.T) {
	want := "not supported on " + runtime.GOOS
	b, err := lockedmem.New(32)
	if err == nil || !strings.Contains(err.Error(), want) || b != nil {
		t.Errorf("New(32) = %v, %v, want nil, error containing %q", b, err, want)
	}
	if err := lockedmem.HardenProcess(); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("HardenProcess() = %v, want error containing %q", err, want)
	}
}
