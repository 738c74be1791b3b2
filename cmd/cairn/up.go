package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cairnkms/cairn/cmd/cairn/chain"
)

// stopTimeout bounds stopping the whole chain after Ctrl-C; each component
// gets SIGKILL once it runs out.
const stopTimeout = 60 * time.Second

const upUsage = `Usage: cairn up [flags]

Starts the whole chain on this machine as real processes: dev certs, 3 safes
(SoftHSM2 tokens when SoftHSM2 is installed, else insecure file safes),
3 distributors, a 3-voter root KMS, and 2 KMS servers per region serving the
demo team's keysets; then runs a demo round trip through the Tink client,
writes <state-dir>/chain.json and prints what runs where. The first run in an
empty state dir makes everything (genesis, regions, keysets, bundles); a
re-run reuses it (the distributors are unsealed by a dev unseal ceremony).
Ctrl-C (or SIGTERM) stops every process it started. A component that dies
meanwhile is reported and the rest keeps running (kill a KMS server to watch
clients fail over); the exit status is then 1. Logs are in <state-dir>/logs.

Flags:
`

// runUp implements "cairn up": it starts the chain, prints "cairn up: ready"
// and waits for ctx (the signals). A component that dies meanwhile is
// reported and the rest keeps running; once nothing is left, or on the
// signal, it stops everything. It exits 0 after a clean run, 1 if a
// component died (or could not be stopped).
func runUp(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("cairn up", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors and usage are printed below
	stateDir := fs.String("state-dir", chain.DefaultStateDir, "`directory` of the chain's state, logs and chain.json")
	basePort := fs.Int("base-port", chain.DefaultBasePort, "first `port` of the chain's range on 127.0.0.1 (it uses base+1 to base+70 at most)")
	binDir := fs.String("bin-dir", "", "`directory` of the safe, distributor, rootkms, kms and regionctl binaries (default: the directory of this cairn)")
	td := fs.String("trust-domain", chain.DefaultTrustDomain, "SPIFFE trust `domain` of a new chain")
	safes := fs.String("safes", string(chain.SafesAuto), "`kind` of safes of a new chain: auto (SoftHSM2 if installed), file or softhsm")
	regions := fs.String("regions", strings.Join(chain.DefaultRegions, ","), "comma-separated `regions` of a new chain")
	noDemo := fs.Bool("no-demo", false, "skip the demo round trip through the Tink client")
	verbose := fs.Bool("v", false, "debug logs of the launcher on stderr")
	printUsage := func(w io.Writer) {
		fmt.Fprint(w, upUsage)
		fs.SetOutput(w)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printUsage(stdout)
			return exitOK
		}
		fmt.Fprintf(stderr, "cairn up: %v\nRun \"cairn up -h\" for usage.\n", err)
		return exitUsage
	}
	if fs.NArg() != 0 {
		fmt.Fprintf(stderr, "cairn up: unexpected arguments %q\nRun \"cairn up -h\" for usage.\n", fs.Args())
		return exitUsage
	}
	cfg := chain.Config{StateDir: *stateDir, BinDir: *binDir, Demo: !*noDemo, Out: stdout}
	// Flags left out mean "the default for a new chain, what the state dir
	// was made with on a re-run".
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "base-port":
			cfg.BasePort = *basePort
		case "trust-domain":
			cfg.TrustDomain = *td
		case "safes":
			cfg.Safes = chain.SafesKind(*safes)
		case "regions":
			cfg.Regions = strings.Split(*regions, ",")
			for i, r := range cfg.Regions {
				cfg.Regions[i] = strings.TrimSpace(r)
			}
		}
	})
	if cfg.BinDir == "" {
		exe, err := os.Executable()
		if err == nil {
			exe, err = filepath.EvalSymlinks(exe)
		}
		if err != nil {
			fmt.Fprintf(stderr, "cairn up: finding the directory of this cairn: %v; give --bin-dir\n", err)
			return exitError
		}
		cfg.BinDir = filepath.Dir(exe)
	}
	if *verbose {
		cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if err := cfg.Validate(); err != nil {
		fmt.Fprintf(stderr, "cairn up: %s\nRun \"cairn up -h\" for usage.\n", strings.ReplaceAll(err.Error(), "\n", "\ncairn up: "))
		return exitUsage
	}

	c, err := chain.Up(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "cairn up: %v\n", err)
		return exitError
	}
	fmt.Fprintln(stdout, "cairn up: ready; Ctrl-C stops everything")
	// A component that dies is reported and the rest keeps running: kill a
	// KMS server to watch its region's clients fail over. The launcher
	// stops when told to, or when nothing is left running.
	died := false
	for {
		werr := c.Wait(ctx)
		if werr == nil {
			fmt.Fprintln(stdout, "cairn up: stopping everything")
			break
		}
		died = true
		fmt.Fprintf(stderr, "cairn up: %v\n", werr)
		if c.Running() == 0 {
			fmt.Fprintln(stdout, "cairn up: every component has exited; stopping")
			break
		}
		fmt.Fprintf(stdout, "cairn up: a component exited (%d still running); Ctrl-C stops everything\n", c.Running())
	}
	sctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	serr := c.Stop(sctx)
	if serr != nil {
		// A component that exited non-zero or had to be killed is
		// reported; only one that may still run fails the stop.
		fmt.Fprintf(stderr, "cairn up: stopping: %v\n", serr)
	}
	if died || errors.Is(serr, chain.ErrNotStopped) {
		return exitError
	}
	fmt.Fprintln(stdout, "cairn up: stopped")
	return exitOK
}
