package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Exit codes of run.
const (
	exitOK    = 0
	exitError = 1 // the command failed
	exitUsage = 2 // the command line was wrong
)

const usage = `cairn: the Cairn command-line tool for people: a dev CA, the whole chain on this machine, calls to a running chain

Usage: cairn <command> [arguments]

Commands:
  dev certs   write a development CA and a certificate for every component
  up          start the whole chain on this machine (make up)
  up restart  restart one component of the running chain
  kms         encrypt, decrypt and show status against a running chain
  audit       verify that audit log files are intact (cairn audit verify)
  help        show this help

Run "cairn dev certs -h", "cairn up -h", "cairn up restart -h" or "cairn kms -h" for the flags of a command.
`

const devUsage = `cairn dev: development helpers: a dev CA and a certificate for every component of a local chain

Usage: cairn dev <command> [arguments]

Commands:
  certs   write a development CA and a certificate for every component
`

// run is cairn's main with its environment passed in: args excludes the
// program name. It returns the process exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	switch args[0] {
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	case "dev":
		return runDev(ctx, args[1:], stdout, stderr)
	case "up":
		return runUp(ctx, args[1:], stdout, stderr)
	case "kms":
		return runKMS(ctx, args[1:], stdout, stderr)
	case "audit":
		return runAudit(ctx, args[1:], stdout, stderr)
	default:
		fmt.Fprintf(stderr, "cairn: unknown command %q\n\n%s", args[0], usage)
		return exitUsage
	}
}

func runDev(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, devUsage)
		return exitUsage
	}
	switch args[0] {
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, devUsage)
		return exitOK
	case "certs":
		return runDevCerts(ctx, args[1:], stdout, stderr)
	default:
		fmt.Fprintf(stderr, "cairn dev: unknown command %q\n\n%s", args[0], devUsage)
		return exitUsage
	}
}

// runDevCerts implements "cairn dev certs": it parses flags into a
// devca.Plan and calls devca.WriteChain.
func runDevCerts(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	def := devca.DefaultPlan(spiffeid.TrustDomain{})
	fs := flag.NewFlagSet("cairn dev certs", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors and usage are printed below
	out := fs.String("out", "", "`directory` to write the CA and certificates to (required)")
	tdName := fs.String("trust-domain", "", "SPIFFE trust `domain` of every identity, e.g. dev.cairn.test (required)")
	regions := fs.String("regions", strings.Join(def.Regions, ","), "comma-separated `regions`, each of a-z, 0-9 and -")
	distributors := fs.Int("distributors", def.Distributors, "number of distributors")
	rootKMS := fs.Int("rootkms", def.RootKMS, "number of root KMS voters")
	kmsPerRegion := fs.Int("kms-per-region", def.KMSPerRegion, "number of KMS nodes in each region")
	officers := fs.Int("officers", def.Officers, "number of security officers")
	printUsage := func(w io.Writer) {
		fmt.Fprint(w, "cairn dev certs: write a development CA and an X.509-SVID for every component of a local chain\n\n"+
			"Usage: cairn dev certs --out DIR --trust-domain DOMAIN [flags]\n\n"+
			"Writes DIR/ca.pem (the trust bundle), DIR/ca-key.pem and, for every\n"+
			"component, DIR/<tier>/<region>/<name>/cert.pem and key.pem. Existing\n"+
			"certificates are kept while valid for at least 7 more days.\n\nFlags:\n")
		fs.SetOutput(w)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	usageError := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "cairn dev certs: "+format+"\n", a...)
		fmt.Fprintln(stderr, `Run "cairn dev certs -h" for usage.`)
		return exitUsage
	}

	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printUsage(stdout)
			return exitOK
		}
		return usageError("%v", err)
	}
	switch {
	case fs.NArg() != 0:
		return usageError("unexpected arguments %q", fs.Args())
	case *out == "":
		return usageError("--out is required")
	case *tdName == "":
		return usageError("--trust-domain is required")
	}
	td, err := spiffeid.TrustDomainFromString(*tdName)
	if err != nil {
		return usageError("invalid --trust-domain %q: %v", *tdName, err)
	}
	plan := devca.Plan{
		TrustDomain:  td,
		Regions:      strings.Split(*regions, ","),
		Distributors: *distributors,
		RootKMS:      *rootKMS,
		KMSPerRegion: *kmsPerRegion,
		Officers:     *officers,
	}
	for i, r := range plan.Regions {
		plan.Regions[i] = strings.TrimSpace(r)
	}
	if err := plan.Validate(); err != nil {
		return usageError("%s", strings.ReplaceAll(err.Error(), "\n", "\ncairn dev certs: "))
	}
	if err := ctx.Err(); err != nil {
		fmt.Fprintf(stderr, "cairn dev certs: %v\n", err)
		return exitError
	}

	_, written, err := devca.WriteChain(*out, plan, time.Now())
	if err != nil {
		fmt.Fprintf(stderr, "cairn dev certs: %v\n", err)
		return exitError
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	var issued int
	for _, w := range written {
		verb := "kept"
		if !w.Reused {
			verb = "issued"
			issued++
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", verb, w.ID, w.CertPath)
	}
	if err := tw.Flush(); err != nil {
		fmt.Fprintf(stderr, "cairn dev certs: %v\n", err)
		return exitError
	}
	fmt.Fprintf(stdout, "%d identities: %d issued, %d kept\n", len(written), issued, len(written)-issued)
	fmt.Fprintf(stdout, "trust bundle: %s\n", filepath.Join(*out, "ca.pem"))
	return exitOK
}
