// Command cairn is the Cairn command-line tool. For now it has one command,
// "cairn dev certs", which writes a development CA and an X.509-SVID for
// every component of a local chain.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
