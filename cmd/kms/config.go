package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/cairnkms/cairn/internal/region"
	"github.com/cairnkms/cairn/internal/serverconfig"
)

// configSpec maps the KMS server's flags to its config file keys and
// CAIRN_KMS_* variables (package serverconfig).
var configSpec = serverconfig.Spec{
	Binary: "kms",
	Rename: map[string]string{"v": "verbose"},
	Lists:  []string{"rootkms", "signing-key", "admins"},
	Checks: map[string]serverconfig.Check{
		"listen":         serverconfig.BindAddr,
		"transit-listen": serverconfig.Optional(serverconfig.BindAddr),
		"metrics-listen": serverconfig.Optional(serverconfig.BindAddr),
		"log-format":     serverconfig.OneOf("text", "json"),
		"rootkms":        serverconfig.Optional(serverconfig.PeerAddrList),
		"region": serverconfig.Optional(func(v string) error {
			if err := region.ValidName(v); err != nil {
				return errors.New("is not a region name (^[a-z][a-z0-9-]{0,62}$)")
			}
			return nil
		}),
	},
}

// settings are the KMS server's flags: serve's config, the transit
// listener's and --mlock.
type settings struct {
	c       config
	transit *transitFlags
	mlock   *lockedmem.Mode
}

// newFlagSet returns the KMS server's flags, writing help and errors to out.
func newFlagSet(out io.Writer) (*flag.FlagSet, *settings, *serverconfig.Flags) {
	fs := flag.NewFlagSet("kms", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "kms: a Cairn regional KMS server: serves one region's keysets from RAM to Tink clients (wrap and unwrap data keys) over gRPC with mTLS\n\n"+
			"Usage: kms [--config FILE] [flags]\n\n"+
			"Every flag is also a key of the --config file (its name with _ for -; -v is verbose) and a CAIRN_KMS_<KEY> variable\n"+
			"(upper case); flags win over the environment, which wins over the file. --print-config shows the result.\n\n"+
			"Environment: GOGC defaults to 400 (the heap is small and stable; the collector runs less often), and GOMEMLIMIT, under a cgroup v2 memory limit, to 90% of it; set either to override.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	s := &settings{}
	c := &s.c
	c.id.Register(fs)
	s.transit = registerTransitFlags(fs)
	c.ops.Register(fs)
	s.mlock = lockedmem.RegisterFlag(fs)
	fs.StringVar(&c.region, "region", "", "the region this server serves, e.g. us-east (required; --name must be kms/<region>/<name>)")
	fs.StringVar(&c.listen, "listen", "127.0.0.1:7401", "gRPC listen address (data plane and admin, mTLS)")
	fs.StringVar(&c.stateDir, "state-dir", "", "directory of the last applied bundle (required; wrapped material only)")
	fs.StringVar(&c.auditLog, "audit-log", "", "audit log path (default <state-dir>/audit.log)")
	fs.StringVar(&c.rootKMS, "rootkms", "", "comma-separated host:port of root KMS replicas (required)")
	fs.StringVar(&c.signingKeys, "signing-key", "", "comma-separated bundle-signing public key files to pin (required)")
	fs.StringVar(&c.admins, "admins", "regionctl/*/*", "comma-separated SPIFFE ID patterns allowed to call KMSAdmin (or --admins-file)")
	fs.StringVar(&c.adminsFile, "admins-file", "", "file of SPIFFE ID patterns allowed to call KMSAdmin, one a line (# comments); replaces --admins, and is reloaded like --signing-key")
	fs.DurationVar(&c.reloadInterval, "reload-interval", 30*time.Second, "how often the --signing-key files and --admins-file are re-read (0: only on SIGHUP); a changed set is swapped in, audited and logged, a broken one is logged and ignored")
	fs.IntVar(&c.maxBatch, "max-batch", 0, "most items in a batch call (0: 1000)")
	fs.IntVar(&c.maxPayload, "max-payload", 0, "largest plaintext or associated data in bytes (0: 65536)")
	fs.IntVar(&c.maxInFlight, "max-in-flight", 0, "most data-plane calls in progress at once; more are shed with RESOURCE_EXHAUSTED and a retry hint (0: 64 x GOMAXPROCS)")
	fs.DurationVar(&c.maxCallDuration, "max-call-duration", 0, "longest a gRPC call may last, its request's read included; a call whose client set no earlier deadline is cut then with DEADLINE_EXCEEDED (0: 30s)")
	fs.BoolVar(&c.auditSync, "audit-sync", false, "fsync the audit log before answering each call (see the comment in run.go)")
	return fs, s, serverconfig.Register(fs, configSpec)
}

// load parses the command line, then the config file and env (as
// os.Environ returns it) under it, and checks the settings against each
// other. A nil *serverconfig.Config with a nil error means -h: the help is
// printed; serverconfig.ErrPrinted, a bad flag the flag package has reported.
func load(args, env []string, out io.Writer) (*settings, *serverconfig.Config, *serverconfig.Flags, error) {
	fs, s, cf := newFlagSet(out)
	cfg, err := cf.Parse(fs, args, env)
	if cfg == nil || err != nil {
		return nil, nil, nil, err
	}
	// admins has a default; admins-file replaces it, so giving both anywhere
	// is a mistake.
	if cfg.IsSet("admins") && s.c.adminsFile != "" {
		return nil, nil, nil, fmt.Errorf("kms: %s and %s: give one", cfg.Name("admins"), cfg.Name("admins-file"))
	}
	s.c.transit = *s.transit
	return s, cfg, cf, nil
}

// required refuses a config without the settings the server cannot start
// without.
func (c config) required() error {
	if c.region == "" || c.stateDir == "" || c.rootKMS == "" || c.signingKeys == "" {
		return errors.New("--region, --state-dir, --rootkms and --signing-key are required")
	}
	return nil
}
