package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/ops"
	"github.com/cairnkms/cairn/internal/serverconfig"
)

// configSpec maps the distributor's flags to its config file keys and
// CAIRN_DISTRIBUTOR_* variables (package serverconfig).
var configSpec = serverconfig.Spec{
	Binary: "distributor",
	Rename: map[string]string{"v": "verbose"},
	Lists:  []string{"officers", "root-key-readers", "peer-ids", "peers"},
	Checks: map[string]serverconfig.Check{
		"listen":         serverconfig.BindAddr,
		"metrics-listen": serverconfig.Optional(serverconfig.BindAddr),
		"log-format":     serverconfig.OneOf("text", "json"),
		"peers":          serverconfig.Optional(serverconfig.PeerAddrList),
	},
}

// settings are the distributor's flags. The distributor hands its address
// to nobody (peers and root KMS replicas are configured with it), so
// --listen is only a bind address.
type settings struct {
	id                          identity.Flags
	ops                         ops.Flags
	listen, stateDir, auditPath string
	officers, readers, peerIDs  string
	peers, manifest             string
	ceremonyTTL                 time.Duration
}

// newFlagSet returns the distributor's flags, writing help and errors to out.
func newFlagSet(out io.Writer) (*flag.FlagSet, *settings, *serverconfig.Flags) {
	fs := flag.NewFlagSet("distributor", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "distributor: a Cairn root-key distributor: holds the root master key in locked memory only and hands it to root KMS replicas\n\n"+
			"Usage: distributor [--config FILE] [flags]\n\n"+
			"Every flag is also a key of the --config file (its name with _ for -; -v is verbose) and a CAIRN_DISTRIBUTOR_<KEY> variable\n"+
			"(upper case); flags win over the environment, which wins over the file. --print-config shows the result.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	s := &settings{}
	s.id.Register(fs)
	s.ops.Register(fs)
	fs.StringVar(&s.listen, "listen", "127.0.0.1:7101", "gRPC listen address")
	fs.StringVar(&s.stateDir, "state-dir", "", "directory for the pinned genesis manifest (genesis.json) and the audit log (required)")
	fs.StringVar(&s.auditPath, "audit-log", "", "audit log path (default <state-dir>/audit.log)")
	fs.StringVar(&s.officers, "officers", "officer/global/*", "comma-separated SPIFFE ID patterns of security officers")
	fs.StringVar(&s.readers, "root-key-readers", "rootkms/*/*", "comma-separated SPIFFE ID patterns that may fetch the root key")
	fs.StringVar(&s.peerIDs, "peer-ids", "distributor/*/*", "comma-separated SPIFFE ID patterns of peer distributors")
	fs.StringVar(&s.peers, "peers", "", "comma-separated host:port of peer distributors to unseal from")
	fs.StringVar(&s.manifest, "manifest", "", "public genesis manifest `file` to pin in the state dir at start (a distributor joining a fleet can then unseal from --peers); a pinned manifest of another root key is never replaced")
	fs.DurationVar(&s.ceremonyTTL, "ceremony-ttl", 30*time.Minute, "default ceremony lifetime")
	return fs, s, serverconfig.Register(fs, configSpec)
}

// load parses the command line, then the config file and env (as
// os.Environ returns it) under it. A nil *serverconfig.Config with a nil
// error means -h: the help is printed; serverconfig.ErrPrinted, a bad flag the flag
// package has reported.
func load(args, env []string, out io.Writer) (*settings, *serverconfig.Config, *serverconfig.Flags, error) {
	fs, s, cf := newFlagSet(out)
	cfg, err := cf.Parse(fs, args, env)
	if cfg == nil || err != nil {
		return nil, nil, nil, err
	}
	return s, cfg, cf, nil
}

// check refuses settings the distributor cannot start with.
func (s *settings) check() error {
	if s.stateDir == "" {
		return errors.New("--state-dir is required")
	}
	return nil
}
