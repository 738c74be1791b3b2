package ops

import (
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"
)

func TestCgroupLimit(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		content string
		want    int64
		ok      bool
	}{
		{"536870912\n", 536870912, true},
		{"max\n", 0, false},
		{"", 0, false},
		{"-1\n", 0, false},
		{"12abc\n", 0, false},
	} {
		p := filepath.Join(dir, "memory.max")
		if err := os.WriteFile(p, []byte(c.content), 0o600); err != nil {
			t.Fatal(err)
		}
		got, ok := cgroupLimit(p)
		if got != c.want || ok != c.ok {
			t.Errorf("cgroupLimit(%q) = %d, %v; want %d, %v", c.content, got, ok, c.want, c.ok)
		}
	}
	if _, ok := cgroupLimit(filepath.Join(dir, "absent")); ok {
		t.Error("cgroupLimit of a missing file = ok, want no limit")
	}
}

// TestTuneGC: the default applies when GOGC is unset, and the environment
// wins when it is set.
func TestTuneGC(t *testing.T) {
	old, oldLimit := debug.SetGCPercent(100), debug.SetMemoryLimit(-1)
	t.Cleanup(func() {
		debug.SetGCPercent(old)
		debug.SetMemoryLimit(oldLimit)
	})

	t.Setenv("GOGC", "")
	if got := TuneGC(400); !strings.HasPrefix(got, "GOGC=400 (Cairn's default)") {
		t.Errorf("TuneGC(400) without GOGC = %q", got)
	}
	if got := debug.SetGCPercent(100); got != 400 {
		t.Errorf("GC percent after TuneGC(400) = %d, want 400", got)
	}

	t.Setenv("GOGC", "150")
	if got := TuneGC(400); !strings.HasPrefix(got, "GOGC=150 (from the environment)") {
		t.Errorf("TuneGC(400) with GOGC=150 = %q", got)
	}
	if got := debug.SetGCPercent(100); got != 100 {
		t.Errorf("GC percent after TuneGC with GOGC set = %d, want it untouched (100)", got)
	}
}
