// Command safe is the security officers' tool: genesis of the root master
// key into HSM safes, releasing a share into an unseal ceremony, rekey, and
// restore drills.
package main

import (
	"context"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

func main() {
	if p := os.Args[0]; strings.ContainsRune(p, os.PathSeparator) {
		progName = p // as the officer ran it: bin/safe
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}
