// Command blobstore is a small storage system that keeps files encrypted
// with Cairn: the code a storage system would copy.
//
// Each object gets a fresh data-encryption key (DEK) made locally by Tink;
// the DEK encrypts the object, and Cairn wraps the DEK with a keyset that
// never leaves the regional KMS servers (envelope encryption,
// aead.NewKMSEnvelopeAEADWithContext over the kmsclient AEAD). The store holds
// only ciphertext and the wrapped DEK.
//
// Against the chain `make up` starts (it reads the endpoints and the demo
// client's certificate from .state/up/chain.json, and keeps the objects in
// .state/blobstore, beside the chain's state and out of the source tree):
//
//	go run ./examples/blobstore put notes.txt README.md
//	go run ./examples/blobstore list
//	go run ./examples/blobstore get notes.txt
//
// Against any Cairn deployment, say where and who:
//
//	blobstore --key-uri cairn-kms://us-east/payments/ledger \
//	  --kms us-east=10.0.0.1:7300,10.0.0.2:7300 --kms eu-west=10.1.0.1:7300 --fallback eu-west \
//	  --cert svid.pem --key-file svid-key.pem --ca bundle.pem  put invoice-1 invoice-1.pdf
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/tink-crypto/tink-go/v2/tink"

	"github.com/cairnkms/cairn/cmd/cairn/chain"
	"github.com/cairnkms/cairn/kmsclient"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usage = `blobstore: a small storage system that keeps files envelope-encrypted with a Cairn keyset (an example to copy)

Usage: blobstore [flags] <command> [arguments]

Commands:
  put NAME [FILE]   encrypt FILE (default: standard input) and store it as NAME
  get NAME [FILE]   decrypt NAME to FILE (default: standard output)
  list              list the objects (from their public metadata; nothing is decrypted)
  rm NAME           delete NAME (its DEK existed only inside it)

Without --kms and --cert, the endpoints and identity come from a ` + "`make up`" + ` chain (--chain).

Flags:
`

// defaultStore is where the objects go without --store: under .state, with
// the local chain's state (git ignores it; make clean removes it).
const defaultStore = ".state/blobstore"

// kmsFlag collects --kms region=addr,addr flags.
type kmsFlag map[string][]string

func (k kmsFlag) String() string { return "" }

func (k kmsFlag) Set(v string) error {
	region, addrs, ok := strings.Cut(v, "=")
	if !ok || region == "" || addrs == "" {
		return fmt.Errorf("want REGION=HOST:PORT[,HOST:PORT...], got %q", v)
	}
	for _, a := range strings.Split(addrs, ",") {
		k[region] = append(k[region], strings.TrimSpace(a))
	}
	return nil
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("blobstore", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage); fs.PrintDefaults() }
	dir := fs.String("store", defaultStore, "`directory` of the object store")
	keyURI := fs.String("key-uri", "cairn-kms://us-east/demo/blobs", "Cairn keyset that wraps new objects' DEKs")
	endpoints := kmsFlag{}
	fs.Var(endpoints, "kms", "`REGION=HOST:PORT,...` KMS servers of a region (repeat for several regions)")
	fallback := fs.String("fallback", "", "comma-separated `regions` to decrypt in when every KMS server of the key's region is down")
	cert := fs.String("cert", "", "client X.509-SVID certificate `file`")
	keyFile := fs.String("key-file", "", "its private key `file`")
	ca := fs.String("ca", "", "trust bundle `file` (the Cairn CA)")
	chainDir := fs.String("chain", ".state/up", "`state dir` of a `make up` chain, used when --kms and --cert are not given")
	timeout := fs.Duration("timeout", 10*time.Second, "deadline of one KMS call, retries included")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "blobstore: %v\n", strings.TrimPrefix(err.Error(), "blobstore: "))
		return 1
	}

	region, _, err := kmsclient.ParseKeyURI(*keyURI)
	if err != nil {
		return fail(err)
	}
	if len(endpoints) == 0 && *cert == "" {
		// The local chain: its endpoints and the demo client of the key's
		// region.
		info, err := chain.Load(*chainDir)
		if err != nil {
			return fail(fmt.Errorf("%w (or give --kms, --cert, --key-file and --ca)", err))
		}
		for _, r := range info.Regions {
			endpoints[r.Name] = r.KMS
		}
		r, ok := info.Region(region)
		if !ok {
			return fail(fmt.Errorf("the chain in %s has no region %q", *chainDir, region))
		}
		*cert, *keyFile, *ca = r.Client.Cert, r.Client.Key, r.Client.CA
	}

	// This is the part a storage system copies: one client per process,
	// endpoints per region, an mTLS identity, a deadline per call.
	opts := []kmsclient.Option{
		kmsclient.WithIdentityFiles(*cert, *keyFile, *ca),
		kmsclient.WithTimeout(*timeout),
	}
	for r, addrs := range endpoints {
		opts = append(opts, kmsclient.WithEndpoints(r, addrs...))
	}
	if *fallback != "" {
		opts = append(opts, kmsclient.WithDecryptFallback(region, strings.Split(*fallback, ",")...))
	}
	client, err := kmsclient.New(opts...)
	if err != nil {
		return fail(err)
	}
	defer client.Close()
	kek := func(uri string) (tink.AEADWithContext, error) {
		region, keyset, err := kmsclient.ParseKeyURI(uri)
		if err != nil {
			return nil, err
		}
		return client.AEAD(region, keyset)
	}
	store, err := NewStore(*dir, *keyURI, kek)
	if err != nil {
		return fail(err)
	}

	cmd, rest := fs.Arg(0), fs.Args()[1:]
	switch {
	case cmd == "put" && (len(rest) == 1 || len(rest) == 2):
		in := stdin
		if len(rest) == 2 && rest[1] != "-" {
			f, err := os.Open(rest[1])
			if err != nil {
				return fail(err)
			}
			defer f.Close()
			in = f
		}
		data, err := io.ReadAll(io.LimitReader(in, MaxObjectSize+1))
		if err != nil {
			return fail(err)
		}
		if err := store.Put(ctx, rest[0], data); err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "stored %s: %d bytes, DEK wrapped by %s\n", rest[0], len(data), *keyURI)
	case cmd == "get" && (len(rest) == 1 || len(rest) == 2):
		data, err := store.Get(ctx, rest[0])
		if err != nil {
			return fail(err)
		}
		if len(rest) == 2 && rest[1] != "-" {
			if err := os.WriteFile(rest[1], data, 0o600); err != nil {
				return fail(err)
			}
			fmt.Fprintf(stdout, "wrote %s: %d bytes\n", rest[1], len(data))
		} else if _, err := stdout.Write(data); err != nil {
			return fail(err)
		}
	case cmd == "list" && len(rest) == 0:
		objs, err := store.List()
		if err != nil {
			return fail(err)
		}
		tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tSIZE\tCREATED\tKEY\tCIPHERTEXT")
		damaged := 0
		for _, o := range objs {
			if o.Damaged != "" {
				damaged++
				fmt.Fprintf(tw, "%s\t-\t-\t-\tDAMAGED: %s\n", o.Name, o.Damaged)
				continue
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", o.Name, o.Size, o.Created.Format(time.RFC3339), o.KeyURI, o.Fingerprint)
		}
		if err := tw.Flush(); err != nil {
			return fail(err)
		}
		if damaged > 0 {
			return fail(fmt.Errorf("%d damaged objects", damaged))
		}
	case cmd == "rm" && len(rest) == 1:
		if err := store.Delete(rest[0]); err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "deleted %s\n", rest[0])
	default:
		fmt.Fprintf(stderr, "blobstore: bad command line %q\n\n", fs.Args())
		fs.Usage()
		return 2
	}
	return 0
}
