package cli

import (
	"context"
	"flag"
	"fmt"
	"maps"
	"os"
	"slices"
	"time"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/safety"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
)

// What a command's options register beyond --config, identity and
// --timeout.
const (
	withRoot = 1 << iota
	withKMS
	withJSON
	withTeams
	withSigningKey
	withSigningPub
	withWindow
)

// options are the flags most commands share, completed from the config
// file: a flag given on the command line wins over the file.
type options struct {
	fs         *flag.FlagSet
	configPath string
	id         identity.Flags
	rootkms    string
	kms        string
	timeout    time.Duration
	json       bool
	teams      string
	signingKey string
	signingPub string
	window     time.Duration
	rootWindow time.Duration // the root KMS's, from its last keyset answer

	file *File
	set  map[string]bool
}

func (o *options) register(fs *flag.FlagSet, what int) {
	o.fs = fs
	fs.StringVar(&o.configPath, "config", "", "regionctl config file (default $"+ConfigEnv+")")
	o.id.Register(fs)
	fs.DurationVar(&o.timeout, "timeout", DefaultTimeout, "deadline of each remote call")
	if what&withRoot != 0 {
		fs.StringVar(&o.rootkms, "rootkms", "", "comma-separated API addresses (host:port) of root KMS replicas (default: the config file's rootkms)")
	}
	if what&withKMS != 0 {
		fs.StringVar(&o.kms, "kms", "", "comma-separated KMSAdmin addresses of the region's servers (default: the config file's regions)")
	}
	if what&withJSON != 0 {
		fs.BoolVar(&o.json, "json", false, "print JSON")
	}
	if what&withTeams != 0 {
		fs.StringVar(&o.teams, "teams", "", "directory of team config files (*.json) (default: the config file's teams)")
	}
	if what&withSigningKey != 0 {
		fs.StringVar(&o.signingKey, "signing-key", "", "bundle-signing private key file (default: the config file's signing_key)")
	}
	if what&withSigningPub != 0 {
		fs.StringVar(&o.signingPub, "signing-pub", "", "comma-separated bundle-signing public key files (default: the config file's signing_pubs)")
	}
	if what&withWindow != 0 {
		fs.DurationVar(&o.window, "window", 0, "propagation window (default: the root KMS's; this or the config file's propagation_window can only lengthen it)")
	}
}

// load reads the config file and merges it under the flags.
func (o *options) load() error {
	o.set = map[string]bool{}
	o.fs.Visit(func(f *flag.Flag) { o.set[f.Name] = true })
	path := o.configPath
	if path == "" {
		path = os.Getenv(ConfigEnv)
	}
	if path == "" {
		o.file = &File{}
		return nil
	}
	f, err := LoadFile(path)
	if err != nil {
		return err
	}
	o.file = f
	// Identity: any identity flag replaces the file's identity as a whole;
	// the trust domain is merged on its own.
	if o.id.TrustDomain == "" {
		o.id.TrustDomain = f.TrustDomain
	}
	if o.id.Cert == "" && o.id.Key == "" && o.id.CA == "" && o.id.DevCerts == "" && o.id.Name == "" {
		o.id.DevCerts, o.id.Name = f.Identity.DevCerts, f.Identity.Name
		o.id.Cert, o.id.Key, o.id.CA = f.Identity.Cert, f.Identity.Key, f.Identity.CA
	}
	if o.teams == "" {
		o.teams = f.Teams
	}
	if o.signingKey == "" {
		o.signingKey = f.SigningKey
	}
	return nil
}

func (o *options) source() (*identity.Source, error) { return o.id.Source(nil) }

// clockKey carries RunOptions.Now in a command's context.
type clockKey struct{}

// clockNow is the time of regionctl's decisions: RunOptions.Now, else
// time.Now.
func clockNow(ctx context.Context) time.Time {
	if now, ok := ctx.Value(clockKey{}).(func() time.Time); ok {
		return now()
	}
	return time.Now()
}

func (o *options) rootAddrs() []string {
	if a := identity.SplitList(o.rootkms); len(a) > 0 {
		return a
	}
	return o.file.RootKMS
}

func (o *options) signingPubs() []string {
	if p := identity.SplitList(o.signingPub); len(p) > 0 {
		return p
	}
	var out []string
	if o.file.SigningPub != "" {
		out = append(out, o.file.SigningPub)
	}
	return append(out, o.file.SigningPubs...)
}

// propagationWindow is the Safety Condition window regionctl judges with
// and compiles into bundles. The root KMS's (learnt from its keyset
// answers) rules: --window or the config file's propagation_window can only
// lengthen it. Without either answer or setting it is safety.DefaultWindow.
func (o *options) propagationWindow() time.Duration {
	local := o.window
	if local == 0 {
		local = o.file.window
	}
	switch {
	case local == 0 && o.rootWindow > 0:
		return o.rootWindow
	case local == 0:
		return safety.DefaultWindow
	}
	return max(local, o.rootWindow)
}

// regions returns the KMS servers of each region to look at: --kms (which
// needs region), else the config file's regions (only region if set).
func (o *options) regions(region string) (map[string][]string, error) {
	if a := identity.SplitList(o.kms); len(a) > 0 {
		if region == "" {
			return nil, fmt.Errorf("--kms needs --region (the region of those servers)")
		}
		return map[string][]string{region: a}, nil
	}
	if region != "" {
		a, ok := o.file.Regions[region]
		if !ok {
			return nil, fmt.Errorf("region %s: no KMS servers configured (give --kms or list it under regions in the config file)", region)
		}
		return map[string][]string{region: a}, nil
	}
	if len(o.file.Regions) == 0 {
		return nil, fmt.Errorf("no KMS servers configured (give --region and --kms, or regions in the config file)")
	}
	return maps.Clone(o.file.Regions), nil
}

func sortedRegions(m map[string][]string) []string { return slices.Sorted(maps.Keys(m)) }

// root is a connection to the root KMS cluster.
type root struct {
	c       *rootkmsclient.Client
	src     *identity.Source
	timeout time.Duration
	// window receives the root KMS's propagation window from its answers.
	window *time.Duration
}

func (o *options) root() (*root, error) {
	addrs := o.rootAddrs()
	if len(addrs) == 0 {
		return nil, fmt.Errorf("no root KMS addresses (give --rootkms or rootkms in the config file)")
	}
	src, err := o.source()
	if err != nil {
		return nil, err
	}
	return &root{c: rootkmsclient.New(src, addrs), src: src, timeout: o.timeout, window: &o.rootWindow}, nil
}

func (r *root) Close() { r.c.Close() }

// rootCall makes one call (one RPC) through r and returns its answer.
func rootCall[T any](ctx context.Context, r *root, call func(context.Context, rootkmsv1.RootKMSClient) (T, error)) (T, error) {
	var out T
	err := r.do(ctx, func(ctx context.Context, c rootkmsv1.RootKMSClient) (err error) {
		out, err = call(ctx, c)
		return err
	})
	return out, err
}

// do runs one call (one RPC) through the cluster client. Every attempt of a
// write carries one request ID (rootkmsclient.Do), so a retry after a lost
// answer is applied once.
func (r *root) do(ctx context.Context, call func(context.Context, rootkmsv1.RootKMSClient) error) error {
	return r.c.Do(ctx, func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		ctx, cancel := context.WithTimeout(ctx, r.timeout)
		defer cancel()
		return call(ctx, c)
	})
}
