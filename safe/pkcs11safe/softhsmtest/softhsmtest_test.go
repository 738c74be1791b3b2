package softhsmtest

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fatalTB records a Fatal and ends the goroutine as testing.T does.
type fatalTB struct {
	testing.TB
	fatal string
}

func (f *fatalTB) Helper() {}

func (f *fatalTB) Fatal(args ...any) {
	f.fatal = fmt.Sprint(args...)
	runtime.Goexit()
}

func (f *fatalTB) Fatalf(format string, args ...any) {
	f.fatal = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// TestNewFailsWhenMissing: a missing SoftHSM2 fails the test, never skips it.
func TestNewFailsWhenMissing(t *testing.T) {
	t.Setenv(ModuleEnv, "/nonexistent/libsofthsm2.so")
	f := &fatalTB{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		New(f)
	}()
	<-done
	if f.fatal != missing {
		t.Errorf("New() without SoftHSM2 failed with %q, want %q", f.fatal, missing)
	}
	if t.Skipped() {
		t.Errorf("New() without SoftHSM2 skipped the test, want a failure")
	}
}

func TestEnv(t *testing.T) {
	env := New(t)
	if got := os.Getenv("SOFTHSM2_CONF"); got != env.Conf() {
		t.Errorf("SOFTHSM2_CONF = %q, want %q", got, env.Conf())
	}
	if !filepath.IsAbs(env.Module()) {
		t.Errorf("Module() = %q, want an absolute path", env.Module())
	}
	env.InitToken("one", "so-pin-0000", "user-pin-1234")
	env.InitToken("two", "so-pin-0000", "user-pin-1234")
	entries, err := os.ReadDir(filepath.Join(env.Dir(), "tokens"))
	if err != nil || len(entries) != 2 {
		t.Errorf("token directories = %d, %v, want 2", len(entries), err)
	}

	path := WritePINFile(t, env.Dir(), "user.pin", "user-pin-1234")
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("WritePINFile mode = %#o, want 0600", fi.Mode().Perm())
	}
	if b, _ := os.ReadFile(path); string(b) != "user-pin-1234\n" {
		t.Errorf("WritePINFile content = %q, want %q", b, "user-pin-1234\n")
	}
}

func TestInitTokenReportsFailure(t *testing.T) {
	env := New(t)
	f := &fatalTB{TB: t}
	env.t = f
	done := make(chan struct{})
	go func() {
		defer close(done)
		env.InitToken("short", "so", "user-pin-1234") // SO PIN below 4 characters
	}()
	<-done
	if !strings.Contains(f.fatal, "softhsm2-util --init-token --label short") {
		t.Errorf("InitToken(bad SO PIN) failed with %q, want the softhsm2-util error", f.fatal)
	}
}
