package lockedmem_test

import (
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/lockedmem"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestNewRefusesSize checks the size bounds, which hold on every system.
func TestNewRefusesSize(t *testing.T) {
	for _, size := range []int{-1 << 40, -1, 0, lockedmem.MaxSize + 1, 1 << 40} {
		b, err := lockedmem.New(size)
		if err == nil || !strings.Contains(err.Error(), "lockedmem: invalid size") {
			t.Errorf("New(%d) error = %v, want lockedmem: invalid size ...", size, err)
		}
		if b != nil {
			t.Errorf("New(%d) = %v, want nil", size, b)
		}
	}
}

// TestZeroValue checks that the zero Buffer behaves as a destroyed one.
func TestZeroValue(t *testing.T) {
	var b lockedmem.Buffer
	if got := b.Bytes(); got != nil {
		t.Errorf("Bytes() of zero Buffer = %v, want nil", got)
	}
	if got := b.Size(); got != 0 {
		t.Errorf("Size() of zero Buffer = %d, want 0", got)
	}
	for i := range 2 {
		if err := b.Destroy(); err != nil {
			t.Errorf("Destroy() #%d of zero Buffer = %v, want nil", i+1, err)
		}
	}
}
