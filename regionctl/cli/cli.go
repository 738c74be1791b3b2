// Package cli is the regionctl command line: bundle-signing keys, regions and
// keysets through the root KMS, and config bundles built, inspected and
// pushed to regional KMS servers. cmd/regionctl is a few lines around Run.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/cairnkms/cairn/internal/identity"
)

// Usage is the top-level help text.
const Usage = `usage: regionctl <command> <verb> [flags]

Commands:
  keys generate   --out DIR
                  make a bundle-signing key pair: DIR/bundle-signing.key (mode 0600) and
                  DIR/bundle-signing.pub; refuses to overwrite either
  region create   --rootkms ADDR[,ADDR] --region NAME [identity flags]
                  create a region and its first master key version in the root KMS
  keyset create   --rootkms ADDR[,ADDR] --teams DIR --store DIR [--only NAME] [identity flags]
                  generate through the root KMS every keyset of the valid team configs that
                  the store does not hold yet, and store it; stored keysets are left alone
  bundle build    --region NAME --serial N --teams DIR --store DIR --signing-key FILE --out FILE
                  [--created-by SPIFFE-ID | identity flags]
                  compile and sign the region's config bundle from the valid team configs
                  and the stored keysets; invalid team files and keysets missing from the
                  store are reported on stderr and left out
  bundle inspect  --bundle FILE --signing-pub FILE[,FILE]
                  verify a bundle and summarize it (never key material)
  bundle push     --kms ADDR[,ADDR] --bundle FILE [--dry-run] [--force --reason TEXT]
                  [identity flags]
                  apply a bundle on each KMS server in turn, stopping at the first refusal

Identity flags: --trust-domain TD, and --dev-certs DIR --name regionctl/global/NAME or
--cert FILE --key FILE --ca FILE.
Exit status: 0 done, 1 failed or refused, 2 bad command line.
Run "regionctl <command> <verb> -h" for a command's flags.
`

// errUsage marks a bad command line (exit 2).
var errUsage = errors.New("usage")

// DefaultTimeout bounds each remote call unless --timeout says otherwise.
const DefaultTimeout = 30 * time.Second

type command func(ctx context.Context, args []string, stdout, stderr io.Writer) error

var commands = map[string]map[string]command{
	"keys":   {"generate": keysGenerate},
	"region": {"create": regionCreate},
	"keyset": {"create": keysetCreate},
	"bundle": {"build": bundleBuild, "inspect": bundleInspect, "push": bundlePush},
}

// Run runs regionctl with args (without the program name) and returns the
// exit status.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, Usage)
		return 2
	}
	if args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(stdout, Usage)
		return 0
	}
	verbs, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "regionctl: unknown command %q\n\n%s", args[0], Usage)
		return 2
	}
	if len(args) < 2 {
		fmt.Fprintf(stderr, "regionctl %s: missing verb (%s)\n", args[0], verbNames(verbs))
		return 2
	}
	if args[1] == "help" || args[1] == "-h" || args[1] == "--help" {
		fmt.Fprint(stdout, Usage)
		return 0
	}
	cmd, ok := verbs[args[1]]
	if !ok {
		fmt.Fprintf(stderr, "regionctl %s: unknown verb %q (%s)\n", args[0], args[1], verbNames(verbs))
		return 2
	}
	if err := cmd(ctx, args[2:], stdout, stderr); err != nil {
		if errors.Is(err, errUsage) || errors.Is(err, flag.ErrHelp) {
			return 2
		}
		fmt.Fprintf(stderr, "regionctl %s %s: %v\n", args[0], args[1], err)
		return 1
	}
	return 0
}

func verbNames(verbs map[string]command) string {
	return strings.Join(slices.Sorted(maps.Keys(verbs)), ", ")
}

func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("regionctl "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return flag.ErrHelp
		}
		return errUsage
	}
	if fs.NArg() != 0 {
		fmt.Fprintf(fs.Output(), "%s: unexpected arguments: %v\n", fs.Name(), fs.Args())
		return errUsage
	}
	return nil
}

// usageError prints msg for the command and returns errUsage.
func usageError(fs *flag.FlagSet, format string, a ...any) error {
	fmt.Fprintf(fs.Output(), "%s: %s\n", fs.Name(), fmt.Sprintf(format, a...))
	return errUsage
}

// source loads the identity the flags name.
func source(id *identity.Flags) (*identity.Source, error) {
	return id.Source(nil)
}
