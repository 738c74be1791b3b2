package main

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/term"
	"google.golang.org/grpc"

	"github.com/cairnkms/cairn/cmd/cairn/chain"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/kmsclient"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

const kmsUsage = `Usage: cairn kms <command> [flags] [argument]

Poke a running chain (started with "make up") without writing Go. Endpoints
and identities come from the chain's state dir (--chain, default .state/up).

Commands:
  encrypt [TEXT]        encrypt TEXT (or standard input) with a keyset; prints the ciphertext in base64
  decrypt [BASE64]      decrypt a ciphertext (or standard input); prints the plaintext
  status                every KMS server's state, bundle and per-key-version usage

An argument is visible to every local user (ps, /proc) and lands in shell
history: pipe anything secret on standard input instead.

Run "cairn kms <command> -h" for its flags.
`

// stdin is what encrypt and decrypt read when given no argument (tests
// replace it).
var stdin io.Reader = os.Stdin

func runKMS(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, kmsUsage)
		return exitUsage
	}
	switch args[0] {
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, kmsUsage)
		return exitOK
	case "encrypt", "decrypt":
		return runKMSCrypt(ctx, args[0], args[1:], stdout, stderr)
	case "status":
		return runKMSStatus(ctx, args[1:], stdout, stderr)
	default:
		fmt.Fprintf(stderr, "cairn kms: unknown command %q\n\n%s", args[0], kmsUsage)
		return exitUsage
	}
}

// kmsFlags are the flags every cairn kms command shares.
type kmsFlags struct {
	fs      *flag.FlagSet
	chain   *string
	timeout *time.Duration
}

func newKMSFlags(cmd string) kmsFlags {
	fs := flag.NewFlagSet("cairn kms "+cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return kmsFlags{fs: fs,
		chain:   fs.String("chain", ".state/up", "`state dir` of the chain (make up writes .state/up/chain.json)"),
		timeout: fs.Duration("timeout", 10*time.Second, "deadline of a KMS call (status: of each server's)"),
	}
}

// parse parses args; it returns -1 to go on, or the exit code.
func (f kmsFlags) parse(args []string, maxArgs int, stdout, stderr io.Writer, synopsis string) int {
	printUsage := func(w io.Writer) {
		fmt.Fprintf(w, "Usage: %s %s\n\nFlags:\n", f.fs.Name(), synopsis)
		f.fs.SetOutput(w)
		f.fs.PrintDefaults()
		f.fs.SetOutput(io.Discard)
	}
	if err := f.fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printUsage(stdout)
			return exitOK
		}
		fmt.Fprintf(stderr, "%s: %v\n", f.fs.Name(), err)
		printUsage(stderr)
		return exitUsage
	}
	if f.fs.NArg() > maxArgs {
		fmt.Fprintf(stderr, "%s: unexpected arguments %q\n", f.fs.Name(), f.fs.Args()[maxArgs:])
		printUsage(stderr)
		return exitUsage
	}
	return -1
}

func runKMSCrypt(ctx context.Context, cmd string, args []string, stdout, stderr io.Writer) int {
	f := newKMSFlags(cmd)
	keyURI := f.fs.String("key", "", "keyset as a Tink key `URI`, cairn-kms://<region>/<keyset> (default: the chain's first demo keyset)")
	ad := f.fs.String("ad", "", "associated `data`: bound to the ciphertext, needed again to decrypt it")
	synopsis := "[--key URI] [--ad TEXT] [TEXT]"
	if cmd == "decrypt" {
		synopsis = "[--key URI] [--ad TEXT] [BASE64]"
	}
	if code := f.parse(args, 1, stdout, stderr, synopsis); code >= 0 {
		return code
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "cairn kms %s: %v\n", cmd, err)
		return exitError
	}
	info, err := chain.Load(*f.chain)
	if err != nil {
		return fail(err)
	}
	if *keyURI == "" {
		if len(info.Regions) == 0 || len(info.Regions[0].Keysets) == 0 {
			return fail(errors.New("the chain lists no keysets; give --key"))
		}
		*keyURI = info.Regions[0].Keysets[0]
	}
	region, keyset, err := kmsclient.ParseKeyURI(*keyURI)
	if err != nil {
		return fail(err)
	}
	r, ok := info.Region(region)
	if !ok {
		return fail(fmt.Errorf("the chain in %s has no region %q (it has %s)", *f.chain, region, regionNames(info)))
	}
	var input []byte
	if f.fs.NArg() == 1 {
		input = []byte(f.fs.Arg(0))
	} else if input, err = io.ReadAll(io.LimitReader(stdin, 1<<20)); err != nil {
		return fail(err)
	}

	client, err := kmsclient.New(kmsclient.WithEndpoints(region, r.KMS...),
		kmsclient.WithIdentityFiles(r.Client.Cert, r.Client.Key, r.Client.CA), kmsclient.WithTimeout(*f.timeout))
	if err != nil {
		return fail(err)
	}
	defer client.Close()
	a, err := client.AEAD(region, keyset)
	if err != nil {
		return fail(err)
	}
	ctx, cancel := context.WithTimeout(ctx, *f.timeout)
	defer cancel()
	if cmd == "encrypt" {
		ct, err := a.EncryptWithContext(ctx, input, []byte(*ad))
		if err != nil {
			return fail(err)
		}
		fmt.Fprintln(stdout, base64.StdEncoding.EncodeToString(ct))
		fmt.Fprintf(stderr, "encrypted %d bytes as %s with key version %d of %s (decrypt: cairn kms decrypt --key %s%s CIPHERTEXT)\n",
			len(input), r.Client.SPIFFEID, keyVersion(ct), *keyURI, *keyURI, adFlag(*ad))
		return exitOK
	}
	ct, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(input)))
	if err != nil {
		return fail(fmt.Errorf("the ciphertext is not base64 (as cairn kms encrypt prints it): %v", err))
	}
	pt, err := a.DecryptWithContext(ctx, ct, []byte(*ad))
	if err != nil {
		return fail(err)
	}
	if _, err := stdout.Write(pt); err != nil {
		return fail(err)
	}
	// The plaintext's bytes exactly (a DEK piped to a file must not gain a
	// newline); a terminal gets one for the prompt's sake.
	if f, ok := stdout.(*os.File); ok && term.IsTerminal(int(f.Fd())) && len(pt) > 0 && pt[len(pt)-1] != '\n' {
		fmt.Fprintln(stdout)
	}
	return exitOK
}

// keyVersion is the key ID in a Tink ciphertext's 5-byte prefix (0x01 and
// the big-endian ID), which routes it to its key version.
func keyVersion(ct []byte) uint32 {
	if len(ct) < 5 || ct[0] != 1 {
		return 0
	}
	return binary.BigEndian.Uint32(ct[1:5])
}

func adFlag(ad string) string {
	if ad == "" {
		return ""
	}
	return fmt.Sprintf(" --ad %q", ad)
}

func regionNames(info *chain.Info) string {
	var names []string
	for _, r := range info.Regions {
		names = append(names, r.Name)
	}
	return strings.Join(names, ", ")
}

func runKMSStatus(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	f := newKMSFlags("status")
	if code := f.parse(args, 0, stdout, stderr, ""); code >= 0 {
		return code
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "cairn kms status: %v\n", err)
		return exitError
	}
	info, err := chain.Load(*f.chain)
	if err != nil {
		return fail(err)
	}
	td, err := spiffeid.TrustDomainFromString(info.TrustDomain)
	if err != nil {
		return fail(fmt.Errorf("chain.json: trust domain: %v", err))
	}
	// KMSAdmin answers regionctl identities.
	id := info.Regionctl.Identity
	src, err := identity.NewSource(identity.SourceConfig{CertFile: id.Cert, KeyFile: id.Key, BundleFile: id.CA, TrustDomain: td})
	if err != nil {
		return fail(err)
	}
	// Every server at once, each with the whole timeout: one hung server
	// must not make the others look unreachable.
	var servers []chain.Component
	for _, c := range info.Components {
		if c.Kind == "kms" {
			servers = append(servers, c)
		}
	}
	type reply struct {
		st  *kmsv1.GetStatusResponse
		err error
	}
	replies := make([]reply, len(servers))
	var wg sync.WaitGroup
	for i, c := range servers {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(ctx, *f.timeout)
			defer cancel()
			replies[i].st, replies[i].err = kmsStatus(ctx, src, td, c)
		})
	}
	wg.Wait()

	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVER\tADDRESS\tSTATE\tBUNDLE\tKEYSETS\tDETAIL")
	var usage []string
	down := 0
	for i, c := range servers {
		st, err := replies[i].st, replies[i].err
		if err != nil {
			down++
			fmt.Fprintf(tw, "%s\t%s\tUNREACHABLE\t-\t-\t%v\n", c.Name, c.Address, err)
			continue
		}
		state := strings.TrimPrefix(st.GetState().String(), "SERVING_STATE_")
		fmt.Fprintf(tw, "%s\t%s\t%s\tserial %d\t%d\t%s\n", c.Name, c.Address, state, st.GetBundle().GetSerial(), st.GetKeysetCount(), st.GetNotReadyReason())
		for _, k := range st.GetKeysets() {
			for _, v := range k.GetVersions() {
				if v.GetEncryptCount()+v.GetDecryptCount() == 0 {
					continue
				}
				last := "-"
				if v.GetLastUsed() != nil {
					last = v.GetLastUsed().AsTime().Format(time.RFC3339)
				}
				usage = append(usage, fmt.Sprintf("%s\t%s\t%d\t%s\t%d\t%d\t%s",
					c.Name, k.GetKeyset(), v.GetKeyId(), strings.TrimPrefix(v.GetStatus().String(), "KEY_STATUS_"), v.GetEncryptCount(), v.GetDecryptCount(), last))
			}
		}
	}
	if err := tw.Flush(); err != nil {
		return fail(err)
	}
	if len(usage) > 0 {
		fmt.Fprintln(stdout)
		tw = tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "SERVER\tKEYSET\tKEY VERSION\tSTATUS\tENCRYPTS\tDECRYPTS\tLAST USED")
		for _, u := range usage {
			fmt.Fprintln(tw, u)
		}
		if err := tw.Flush(); err != nil {
			return fail(err)
		}
	}
	if down > 0 {
		return fail(fmt.Errorf("%d KMS servers unreachable", down))
	}
	return exitOK
}

// kmsStatus asks one KMS server for its status, as regionctl, accepting
// only a KMS server of the component's region.
func kmsStatus(ctx context.Context, src *identity.Source, td spiffeid.TrustDomain, c chain.Component) (*kmsv1.GetStatusResponse, error) {
	allow, err := identity.ParseAllowlist(td, "kms/"+c.Region+"/*")
	if err != nil {
		return nil, err
	}
	cc, err := grpc.NewClient(c.Address, grpc.WithTransportCredentials(identity.ClientCredentials(src, allow.Authorize)))
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	return kmsv1.NewKMSAdminClient(cc).GetStatus(ctx, &kmsv1.GetStatusRequest{IncludeKeysets: true})
}
