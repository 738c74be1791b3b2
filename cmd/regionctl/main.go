// Command regionctl is the SREs' tool for Cairn's regional config: it
// creates regions and keysets through the root KMS, compiles per-team keyset
// configs into one signed config bundle per region, and pushes bundles to
// regional KMS servers. See regionctl/cli.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/cairnkms/cairn/regionctl/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(cli.Run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}
