// Command regionctl is the SREs' tool for Cairn's regional config: it
// creates regions and keysets through the root KMS, compiles per-team keyset
// configs into one signed config bundle per region, and pushes bundles to
// regional KMS servers. See regionctl/cli.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/cairnkms/cairn/regionctl/cli"
)

func main() {
	// regionctl reads the bundle-signing private key: no core dumps, no
	// ptrace by other users. SREs also run it on systems HardenProcess does
	// not support, so a failure is a warning, not a refusal.
	if err := lockedmem.HardenProcess(); err != nil {
		fmt.Fprintln(os.Stderr, "regionctl: warning: "+err.Error())
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(cli.Run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}
