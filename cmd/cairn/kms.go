package main

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
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

const kmsUsage = `cairn kms: encrypt, decrypt and show status against a running chain, without writing Go

Usage: cairn kms <command> [flags] [argument]

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

// kmsSummaries are the first lines of the cairn kms commands' help.
var kmsSummaries = map[string]string{
	"encrypt": "encrypt TEXT (or standard input) with a keyset of the running chain; prints the ciphertext in base64",
	"decrypt": "decrypt a ciphertext (BASE64, or standard input) with a keyset of the running chain; prints the plaintext",
	"status":  "every KMS server of the running chain: its state, bundle and per-key-version usage, and what to do next",
}

func newKMSFlags(cmd string) kmsFlags {
	fs := flag.NewFlagSet("cairn kms "+cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return kmsFlags{fs: fs,
		chain:   fs.String("chain", chain.DefaultStateDir, "`state dir` of the chain (make up writes .state/up/chain.json)"),
		timeout: fs.Duration("timeout", 10*time.Second, "deadline of a KMS call (status: of each server's)"),
	}
}

// parse parses args; it returns -1 to go on, or the exit code. The help is
// the command's summary line, synopsis, more (if any) and the flags.
func (f kmsFlags) parse(args []string, maxArgs int, stdout, stderr io.Writer, synopsis string, more ...string) int {
	printUsage := func(w io.Writer) {
		fmt.Fprintf(w, "%s: %s\n\nUsage: %s %s\n\n", f.fs.Name(), kmsSummaries[strings.TrimPrefix(f.fs.Name(), "cairn kms ")], f.fs.Name(), synopsis)
		for _, m := range more {
			fmt.Fprint(w, m)
		}
		fmt.Fprint(w, "Flags:\n")
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

// kmsStatusMore documents cairn kms status's output and its --json fields,
// which are stable (new fields may be added; none is renamed or removed).
const kmsStatusMore = `Prints a table of the chain's KMS servers, a table of the key versions each
has used, and, when something needs doing, "next:" lines with the commands to
run (an unreachable server: cairn up restart NAME). It exits 1 when a server
is unreachable.

--json prints one JSON object instead:
  chain             the chain's state dir
  servers           one object per KMS server, in chain.json's order:
    name, region, address, pid   as in chain.json
    state           STARTING, SERVING, NOT_READY or UNREACHABLE
    error           why it is unreachable (UNREACHABLE only)
    not_ready_reason             why it does not serve (if it says)
    bundle_serial   the serial of the bundle it serves (0: none)
    keysets         how many keysets it serves
    versions        one object per key version it serves: keyset, key_id,
                    status (PRIMARY, ENABLED, ...), encrypts, decrypts,
                    last_used (RFC 3339; absent if never)
  unreachable       how many servers did not answer
  next              the commands to run next, each {"why": ..., "command": ...};
                    [] when there is nothing to do

`

// statusReport is what cairn kms status prints; its JSON field names are
// stable (kmsStatusMore documents them).
type statusReport struct {
	Chain       string         `json:"chain"`
	Servers     []serverStatus `json:"servers"`
	Unreachable int            `json:"unreachable"`
	Next        []nextCommand  `json:"next"`
}

// serverStatus is one KMS server's status.
type serverStatus struct {
	Name           string          `json:"name"`
	Region         string          `json:"region"`
	Address        string          `json:"address"`
	PID            int             `json:"pid"`
	State          string          `json:"state"`
	Error          string          `json:"error,omitempty"`
	NotReadyReason string          `json:"not_ready_reason,omitempty"`
	BundleSerial   uint64          `json:"bundle_serial"`
	Keysets        int             `json:"keysets"`
	Versions       []versionStatus `json:"versions"`
}

// versionStatus is one key version a server serves, and its use there.
type versionStatus struct {
	Keyset   string    `json:"keyset"`
	KeyID    uint32    `json:"key_id"`
	Status   string    `json:"status"`
	Encrypts uint64    `json:"encrypts"`
	Decrypts uint64    `json:"decrypts"`
	LastUsed time.Time `json:"last_used,omitzero"`
}

// nextCommand is a command to run next, and why.
type nextCommand struct {
	Why     string `json:"why"`
	Command string `json:"command"`
}

func runKMSStatus(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	f := newKMSFlags("status")
	asJSON := f.fs.Bool("json", false, "print one JSON object (its fields are above)")
	if code := f.parse(args, 0, stdout, stderr, "[--chain DIR] [--json]", kmsStatusMore); code >= 0 {
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

	r := statusReport{Chain: info.StateDir, Servers: []serverStatus{}, Next: []nextCommand{}}
	for i, c := range servers {
		r.Servers = append(r.Servers, serverStatusOf(c, replies[i].st, replies[i].err))
	}
	r.Next = statusNext(r.Servers, *f.chain, info.Running())
	for _, s := range r.Servers {
		if s.State == "UNREACHABLE" {
			r.Unreachable++
		}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(r); err != nil {
			return fail(err)
		}
	} else if err := r.printText(stdout); err != nil {
		return fail(err)
	}
	if r.Unreachable > 0 {
		return fail(fmt.Errorf("%d KMS servers unreachable", r.Unreachable))
	}
	return exitOK
}

// serverStatusOf is c's status from its GetStatus reply (or the error).
func serverStatusOf(c chain.Component, st *kmsv1.GetStatusResponse, err error) serverStatus {
	s := serverStatus{Name: c.Name, Region: c.Region, Address: c.Address, PID: c.PID, Versions: []versionStatus{}}
	if err != nil {
		s.State, s.Error = "UNREACHABLE", err.Error()
		return s
	}
	s.State = strings.TrimPrefix(st.GetState().String(), "SERVING_STATE_")
	s.NotReadyReason = st.GetNotReadyReason()
	s.BundleSerial = st.GetBundle().GetSerial()
	s.Keysets = int(st.GetKeysetCount())
	for _, k := range st.GetKeysets() {
		for _, v := range k.GetVersions() {
			vs := versionStatus{Keyset: k.GetKeyset(), KeyID: v.GetKeyId(), Status: strings.TrimPrefix(v.GetStatus().String(), "KEY_STATUS_"),
				Encrypts: v.GetEncryptCount(), Decrypts: v.GetDecryptCount()}
			if v.GetLastUsed() != nil {
				vs.LastUsed = v.GetLastUsed().AsTime().UTC()
			}
			s.Versions = append(s.Versions, vs)
		}
	}
	return s
}

// statusNext are the commands to run next: an unreachable server is
// restarted by the running cairn up, or the whole chain started again when
// its launcher is gone (running is false). chainDir is the --chain given.
func statusNext(servers []serverStatus, chainDir string, running bool) []nextCommand {
	flag := ""
	if chainDir != chain.DefaultStateDir {
		flag = " --state-dir " + chainDir
	}
	next := []nextCommand{}
	for _, s := range servers {
		if s.State != "UNREACHABLE" {
			continue
		}
		if !running {
			start := "make up"
			if flag != "" {
				start = "cairn up" + flag
			}
			return []nextCommand{{Why: "the chain's launcher (cairn up) is not running: start the chain again", Command: start}}
		}
		next = append(next, nextCommand{Why: s.Name + " is unreachable: restart it in the running chain",
			Command: "cairn up restart" + flag + " " + s.Name})
	}
	return next
}

// printText prints the report as tables and "next:" lines.
func (r statusReport) printText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVER\tADDRESS\tSTATE\tBUNDLE\tKEYSETS\tDETAIL")
	var usage []string
	for _, s := range r.Servers {
		if s.State == "UNREACHABLE" {
			fmt.Fprintf(tw, "%s\t%s\tUNREACHABLE\t-\t-\t%s\n", s.Name, s.Address, s.Error)
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\tserial %d\t%d\t%s\n", s.Name, s.Address, s.State, s.BundleSerial, s.Keysets, s.NotReadyReason)
		for _, v := range s.Versions {
			if v.Encrypts+v.Decrypts == 0 {
				continue
			}
			last := "-"
			if !v.LastUsed.IsZero() {
				last = v.LastUsed.Format(time.RFC3339)
			}
			usage = append(usage, fmt.Sprintf("%s\t%s\t%d\t%s\t%d\t%d\t%s", s.Name, v.Keyset, v.KeyID, v.Status, v.Encrypts, v.Decrypts, last))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(usage) > 0 {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "SERVER\tKEYSET\tKEY VERSION\tSTATUS\tENCRYPTS\tDECRYPTS\tLAST USED")
		for _, u := range usage {
			fmt.Fprintln(tw, u)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if len(r.Next) > 0 {
		fmt.Fprintln(w)
	}
	for _, n := range r.Next {
		fmt.Fprintf(w, "next: %s\n  %s\n", n.Why, n.Command)
	}
	return nil
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
