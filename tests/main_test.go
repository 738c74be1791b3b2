// Package tests holds Cairn's multi-process end-to-end tests: the real
// binaries, built once in TestMain, run as separate processes that talk gRPC
// over mTLS on 127.0.0.1, and are killed and restarted by PID. The framework
// they use is in tests/framework.
package tests

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/tests/framework"
)

// bin are the binaries under test.
var bin *framework.Binaries

func TestMain(m *testing.M) {
	b, err := framework.Build()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = b
	goleak.VerifyTestMain(m, goleak.Cleanup(func(code int) {
		if err := b.Remove(); err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
		os.Exit(code)
	}))
}
