package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/cairnkms/cairn/internal/audit"
)

const auditUsage = `cairn audit: check audit logs

Usage: cairn audit <command> [arguments]

Commands:
  verify   check that audit log files are intact: chained, complete, checkpoints signed
`

func runAudit(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, auditUsage)
		return exitUsage
	}
	switch args[0] {
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, auditUsage)
		return exitOK
	case "verify":
		return runAuditVerify(ctx, args[1:], stdout, stderr)
	default:
		fmt.Fprintf(stderr, "cairn audit: unknown command %q\n\n%s", args[0], auditUsage)
		return exitUsage
	}
}

// runAuditVerify implements "cairn audit verify": audit.VerifyFiles over the
// files, a one-line summary if intact, every problem (file:line) if not.
func runAuditVerify(_ context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("cairn audit verify", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	ca := fs.String("ca", "", "trust bundle `file` (PEM CA certificates): checkpoint certificates must chain to it")
	printUsage := func(w io.Writer) {
		fmt.Fprint(w, "cairn audit verify: check that audit log files are intact\n\n"+
			"Usage: cairn audit verify [--ca BUNDLE] FILE...\n\n"+
			"Give the files oldest first (audit.log.2 audit.log.1 audit.log): they are\n"+
			"checked as one chain. Every record must link to the line before it, every\n"+
			"checkpoint's signature must verify (and its certificate chain to BUNDLE when\n"+
			"given) and its record count match. Prints a one-line summary and exits 0 when\n"+
			"intact; prints each problem as FILE:LINE and exits 1 otherwise.\n\nFlags:\n")
		fs.SetOutput(w)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printUsage(stdout)
			return exitOK
		}
		fmt.Fprintf(stderr, "cairn audit verify: %v\nRun \"cairn audit verify -h\" for usage.\n", err)
		return exitUsage
	}
	if fs.NArg() == 0 {
		fmt.Fprint(stderr, "cairn audit verify: no log files given\nRun \"cairn audit verify -h\" for usage.\n")
		return exitUsage
	}
	var opts audit.VerifyOptions
	if *ca != "" {
		roots, err := readRoots(*ca)
		if err != nil {
			fmt.Fprintf(stderr, "cairn audit verify: %v\n", err)
			return exitError
		}
		opts.Roots = roots
	}
	rep, err := audit.VerifyFiles(fs.Args(), opts)
	if err != nil {
		fmt.Fprintf(stderr, "cairn audit verify: %v\n", err)
		return exitError
	}
	if !rep.OK() {
		for _, p := range rep.Problems {
			fmt.Fprintln(stdout, p.String())
		}
		fmt.Fprintf(stderr, "cairn audit verify: NOT intact: %d problems; the first is at %s:%d\n", len(rep.Problems), rep.Problems[0].Path, rep.Problems[0].Line)
		return exitError
	}
	s := rep.Summary()
	if *ca == "" && rep.Checkpoints > 0 {
		s += "; checkpoint certificates not checked against a CA (no --ca)"
	}
	fmt.Fprintln(stdout, s)
	return exitOK
}

// readRoots reads the PEM CA certificates of a trust bundle file.
func readRoots(path string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var roots []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		roots = append(roots, c)
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("%s: no PEM certificates", path)
	}
	return roots, nil
}
