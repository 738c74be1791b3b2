package framework

import (
	"os"
	"testing"
)

// RequireCapability ends the test when the machine cannot run it (err
// says why: not root, no namespaces, no ptrace): under CI=true it fails,
// as CI must run every test; elsewhere it is skipped, saying that it did
// not pass and what to run it as. what names what the test needed.
func RequireCapability(t testing.TB, what string, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true: cannot %s, so this test is unchecked here: %v", what, err)
	}
	t.Skipf("SKIPPED (not passed): cannot %s: %v (under CI=true this fails)", what, err)
}
