package chain_test

import (
	"context"
	"fmt"
	"os"
	"os/signal"

	"github.com/cairnkms/cairn/cmd/cairn/chain"
)

// Up starts the chain and returns once it serves; Wait returns when the
// context ends (or a component dies), and Stop stops every process.
func ExampleUp() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	c, err := chain.Up(ctx, chain.Config{StateDir: ".state/up", BinDir: "bin", Demo: true, Out: os.Stdout})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	for _, r := range c.Info().Regions {
		fmt.Println(r.Name, r.KMS)
	}
	if err := c.Wait(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	if err := c.Stop(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
}

// Load reads what a running chain wrote: where its KMS servers are and the
// demo client's identity, all a Tink client needs.
func ExampleLoad() {
	info, err := chain.Load(".state/up")
	if err != nil {
		fmt.Fprintln(os.Stderr, err) // e.g. no chain.json: start one with make up
		return
	}
	r, ok := info.Region("us-east")
	if !ok {
		return
	}
	fmt.Println(r.KMS, r.Client.Cert, r.Client.Key, r.Client.CA, chain.KeyURI(r.Name, "demo/notes"))
}
