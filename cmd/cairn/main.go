// Command cairn is the Cairn command-line tool for people:
//
//   - "cairn dev certs" writes a development CA and an X.509-SVID for every
//     component of a local chain;
//   - "cairn up" (what "make up" runs) starts the whole chain on this machine
//     and runs a demo;
//   - "cairn kms encrypt|decrypt|status" pokes a running chain without
//     writing Go.
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
