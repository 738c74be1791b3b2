// Command kms runs a regional KMS server: it serves one region's keysets
// from RAM (wrap and unwrap data keys), loads config bundles pushed by
// regionctl, and fetches the region key from the root KMS once per boot.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stderr))
}
