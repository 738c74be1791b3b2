package framework

import (
	"testing"
	"time"
)

// waitStatus polls get until ok accepts its reply and returns the reply and
// how long it took. It fails the test after WaitTimeout, or at once if p
// exits. who names the process in failure messages.
func waitStatus[T any](t testing.TB, p *Process, who, what string, get func() (T, error), ok func(T) bool) (T, time.Duration) {
	t.Helper()
	start := time.Now()
	deadline := start.Add(WaitTimeout)
	var last T
	var lastErr error
	for attempt := 0; ; attempt++ {
		st, err := get()
		if err == nil && ok(st) {
			return st, time.Since(start)
		}
		last, lastErr = st, err
		if exited, why := p.Exited(); exited {
			t.Fatalf("%s exited (%v) while waiting until %s\n%s", who, why, what, tail(p.StderrPath(), 25))
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not %s after %s (%d polls); last status %v, error %v", who, what, WaitTimeout, attempt+1, last, lastErr)
		}
		time.Sleep(pollInterval)
	}
}
