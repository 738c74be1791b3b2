package chaos

import (
	"flag"
	"fmt"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/tests/framework"
)

// The soak's flags. `go test ./tests/chaos` runs the short run; `make soak
// DURATION=30m` sets -chaos.duration.
var (
	seedFlag     = flag.Uint64("chaos.seed", 0, "the schedule's seed (0: a new one, printed); give a failed run's seed to replay its schedule")
	durationFlag = flag.Duration("chaos.duration", 70*time.Second, "how long faults are injected (the short run's default fits in make test)")
	rateFlag     = flag.Int("chaos.rate", 40, "operations per second per workload client (at most)")
)

// bin are the binaries under test.
var bin *framework.Binaries

func TestMain(m *testing.M) {
	flag.Parse()
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
