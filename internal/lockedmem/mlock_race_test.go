//go:build race

package lockedmem_test

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/lockedmem"
)

// TestLockProcessRace checks that a race binary is never locked: auto logs
// why and on fails, both without calling mlockall (which would fault in the
// race detector's shadow memory and take this test process with it).
func TestLockProcessRace(t *testing.T) {
	const why = "race detector"
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	o, err := lockedmem.LockProcess(log, lockedmem.MlockAuto)
	if err != nil || o.Locked || !strings.Contains(o.Reason, why) || !strings.Contains(logs.String(), why) {
		t.Errorf("LockProcess(auto) in a race binary = %+v, %v (log %q), want not locked because of the %s", o, err, logs.String(), why)
	}
	if _, err := lockedmem.LockProcess(log, lockedmem.MlockOn); err == nil || !strings.Contains(err.Error(), why) {
		t.Errorf("LockProcess(on) in a race binary error = %v, want one naming the %s", err, why)
	}
	if lockedmem.ProcessLocked() {
		t.Error("ProcessLocked() = true in a race binary, want false")
	}
}
