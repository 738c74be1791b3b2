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

const upUsage = `cairn up: start the whole Cairn chain on this machine as real processes, run a demo and wait (make up)

Usage: cairn up [flags]
       cairn up restart [--state-dir DIR] COMPONENT   (see "cairn up restart -h")

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
	if len(args) > 0 && args[0] == "restart" {
		return runUpRestart(ctx, args[1:], stdout, stderr)
	}
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

const upRestartUsage = `cairn up restart: restart one component of the running chain; the cairn up that runs it stops it and starts it again

Usage: cairn up restart [--state-dir DIR] COMPONENT

COMPONENT is a name from the table cairn up printed (and chain.json):
distributor-1..3, rootkms-1..3 or REGION/kms-1..2 (e.g. us-east/kms-1). The
running cairn up stops it (SIGTERM by its PID, SIGKILL after 10 s; one that
died is just started again), starts it with the same flags and state dir, and
waits until it is ready: a distributor unsealed from its peers, a root KMS
voter serving in the cluster, a KMS server serving its persisted bundle.
chain.json then records its new PID. Each step is printed here and in cairn
up's output. It fails, changing nothing, if no chain runs in the state dir or
it has no such component.

Flags:
`

// runUpRestart implements "cairn up restart COMPONENT": it asks the running
// launcher of the state dir's chain to restart the component (see
// chain.RestartComponent) and prints its progress.
func runUpRestart(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("cairn up restart", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors and usage are printed below
	stateDir := fs.String("state-dir", chain.DefaultStateDir, "`directory` of the running chain (its chain.json)")
	timeout := fs.Duration("timeout", chain.RestartTimeout, "how long to wait for the restart")
	printUsage := func(w io.Writer) {
		fmt.Fprint(w, upRestartUsage)
		fs.SetOutput(w)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	usageError := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "cairn up restart: "+format+"\nRun \"cairn up restart -h\" for usage.\n", a...)
		return exitUsage
	}
	// COMPONENT may come before or after the flags.
	var name string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		name, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printUsage(stdout)
			return exitOK
		}
		return usageError("%v", err)
	}
	rest := fs.Args()
	if name == "" && len(rest) > 0 {
		name, rest = rest[0], rest[1:]
	}
	switch {
	case len(rest) > 0:
		return usageError("unexpected arguments %q", rest)
	case name == "":
		return usageError("give the COMPONENT to restart, e.g. us-east/kms-1")
	case *timeout <= 0:
		return usageError("--timeout must be positive")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	if err := chain.RestartComponent(ctx, *stateDir, name, stdout); err != nil {
		fmt.Fprintf(stderr, "cairn up restart: %s\n", strings.ReplaceAll(err.Error(), "\n", "\ncairn up restart: "))
		return exitError
	}
	fmt.Fprintf(stdout, "restarted %s\n", name)
	return exitOK
}
