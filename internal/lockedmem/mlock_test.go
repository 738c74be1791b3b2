package lockedmem_test

import (
	"bytes"
	"flag"
	"log/slog"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/prometheus/client_golang/prometheus"
)

func TestRegisterFlag(t *testing.T) {
	tests := []struct {
		args    []string
		want    lockedmem.Mode
		wantErr string
	}{
		{args: nil, want: lockedmem.MlockAuto},
		{args: []string{"--mlock=auto"}, want: lockedmem.MlockAuto},
		{args: []string{"--mlock=on"}, want: lockedmem.MlockOn},
		{args: []string{"--mlock", "off"}, want: lockedmem.MlockOff},
		{args: []string{"--mlock=yes"}, wantErr: `lockedmem: --mlock "yes": want auto, on or off`},
		{args: []string{"--mlock="}, wantErr: `want auto, on or off`},
	}
	for _, tt := range tests {
		fs := flag.NewFlagSet("x", flag.ContinueOnError)
		fs.SetOutput(new(bytes.Buffer))
		m := lockedmem.RegisterFlag(fs)
		err := fs.Parse(tt.args)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Parse(%q) error = %v, want one containing %q", tt.args, err, tt.wantErr)
			}
			continue
		}
		if err != nil || *m != tt.want {
			t.Errorf("Parse(%q) = %q, %v, want %q, nil", tt.args, *m, err, tt.want)
		}
	}
}

// TestLockProcessInProcess covers what is safe to run in the test process
// itself: off, and a bad mode. Locking is tested in a child process
// (mlock_linux_test.go), never here: the test binary may be a race build.
func TestLockProcessInProcess(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	o, err := lockedmem.LockProcess(log, lockedmem.MlockOff)
	if err != nil || o.Locked || o.Reason != "--mlock=off" {
		t.Errorf("LockProcess(off) = %+v, %v, want {Locked: false, Reason: --mlock=off}, nil", o, err)
	}
	if !strings.Contains(logs.String(), "process memory NOT locked into RAM") {
		t.Errorf("LockProcess(off) logged %q, want the not-locked warning", logs.String())
	}
	if _, err := lockedmem.LockProcess(log, "sometimes"); err == nil || !strings.Contains(err.Error(), `lockedmem: mlock mode "sometimes"`) {
		t.Errorf("LockProcess(sometimes) error = %v, want the bad mode named", err)
	}
	if lockedmem.ProcessLocked() {
		t.Error("ProcessLocked() = true after off and a bad mode, want false")
	}
}

func TestRegisterMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	if err := lockedmem.RegisterMetrics(reg); err != nil {
		t.Fatalf("RegisterMetrics() error = %v", err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather() error = %v", err)
	}
	if len(mfs) != 1 || mfs[0].GetName() != "cairn_memory_locked" || len(mfs[0].GetMetric()) != 1 {
		t.Fatalf("Gather() = %v, want the one gauge cairn_memory_locked", mfs)
	}
	// The test process is never locked (LockProcess only runs in children).
	if got := mfs[0].GetMetric()[0].GetGauge().GetValue(); got != 0 {
		t.Errorf("cairn_memory_locked in the test process = %v, want 0", got)
	}
	if err := lockedmem.RegisterMetrics(reg); err == nil || !strings.Contains(err.Error(), "lockedmem: registering cairn_memory_locked") {
		t.Errorf("second RegisterMetrics() on the same registry error = %v, want a registration error", err)
	}
}
