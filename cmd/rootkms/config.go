package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/cairnkms/cairn/internal/ops"
	"github.com/cairnkms/cairn/internal/serverconfig"
)

// configSpec maps the root KMS's flags to its config file keys and
// CAIRN_ROOTKMS_* variables (package serverconfig).
var configSpec = serverconfig.Spec{
	Binary: "rootkms",
	Rename: map[string]string{"v": "verbose"},
	Lists:  []string{"distributors", "join", "regionctl", "operators", "officers"},
	Checks: map[string]serverconfig.Check{
		"listen":         serverconfig.BindAddr,
		"raft-listen":    serverconfig.BindAddr,
		"api-advertise":  serverconfig.Optional(serverconfig.PeerAddr),
		"raft-advertise": serverconfig.Optional(serverconfig.PeerAddr),
		"metrics-listen": serverconfig.Optional(serverconfig.BindAddr),
		"log-format":     serverconfig.OneOf("text", "json"),
		"distributors":   serverconfig.Optional(serverconfig.PeerAddrList),
		"join":           serverconfig.Optional(serverconfig.PeerAddrList),
	},
}

// settings are the root KMS's flags.
type settings struct {
	id                                  identity.Flags
	ops                                 ops.Flags
	mlock                               *lockedmem.Mode
	replicaID, listen, raftListen       string
	apiAdvertise, raftAdvertise         string
	dataDir, manifest, auditPath        string
	distributors, join                  string
	regionctl, operators, officers      string
	bootstrap, nonVoter                 bool
	heartbeat, election, lease, applyTO time.Duration
	safetyWindow                        time.Duration
	maxClockSkew                        time.Duration
}

// newFlagSet returns the root KMS's flags, writing help and errors to out.
func newFlagSet(out io.Writer) (*flag.FlagSet, *settings, *serverconfig.Flags) {
	fs := flag.NewFlagSet("rootkms", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "rootkms: a Cairn root KMS replica: a Raft member that holds the region master keys, wrapped by the root master key\n\n"+
			"Usage: rootkms [--config FILE] [flags]\n\n"+
			"Every flag is also a key of the --config file (its name with _ for -; -v is verbose) and a CAIRN_ROOTKMS_<KEY> variable\n"+
			"(upper case); flags win over the environment, which wins over the file. --print-config shows the result.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	s := &settings{}
	s.id.Register(fs)
	s.ops.Register(fs)
	s.mlock = lockedmem.RegisterFlag(fs)
	fs.StringVar(&s.replicaID, "id", "", "Raft server ID of this replica, e.g. rootkms-1 (required)")
	fs.StringVar(&s.listen, "listen", "127.0.0.1:7201", "gRPC API listen (bind) address")
	fs.StringVar(&s.raftListen, "raft-listen", "127.0.0.1:7301", "Raft transport listen (bind) address (mTLS)")
	fs.StringVar(&s.apiAdvertise, "api-advertise", "", "host:port at which clients and the other replicas reach the API (recorded in the cluster's members, handed out in leader redirects; default: the --listen address, which must then not be 0.0.0.0 or [::])")
	fs.StringVar(&s.raftAdvertise, "raft-advertise", "", "host:port at which the other replicas reach the Raft transport (a host name is resolved once at start; default: the --raft-listen address, which must then not be 0.0.0.0 or [::])")
	fs.StringVar(&s.dataDir, "data-dir", "", "Raft log, stable store and snapshots (required)")
	fs.StringVar(&s.manifest, "manifest", "", "the pinned genesis manifest (required)")
	fs.StringVar(&s.auditPath, "audit-log", "", "audit log path (default <data-dir>/audit.log)")
	fs.StringVar(&s.distributors, "distributors", "", "comma-separated host:port of distributors (required)")
	fs.BoolVar(&s.bootstrap, "bootstrap", false, "make this replica the first voter of a new cluster")
	fs.StringVar(&s.join, "join", "", "comma-separated API addresses of replicas to join through")
	fs.BoolVar(&s.nonVoter, "non-voter", false, "with --join: join as a non-voting read replica")
	fs.StringVar(&s.regionctl, "regionctl", "regionctl/*/*", "comma-separated SPIFFE ID patterns allowed to manage regions and keysets")
	fs.StringVar(&s.operators, "operators", "operator/*/*", "comma-separated SPIFFE ID patterns allowed to change membership and snapshot (never replicas: a pattern matching rootkms/*/* is refused)")
	fs.StringVar(&s.officers, "officers", "officer/*/*", "comma-separated SPIFFE ID patterns of security officers, who may drop the root key (emergency seal)")
	fs.DurationVar(&s.heartbeat, "heartbeat-timeout", 0, "Raft heartbeat timeout (0: 1s)")
	fs.DurationVar(&s.election, "election-timeout", 0, "Raft election timeout (0: 1s)")
	fs.DurationVar(&s.lease, "leader-lease-timeout", 0, "Raft leader lease timeout (0: 500ms)")
	fs.DurationVar(&s.applyTO, "apply-timeout", 0, "Raft write timeout (0: 5s)")
	fs.DurationVar(&s.safetyWindow, "safety-window", 0, "propagation window of the Safety Condition checks on keyset lifecycle steps (0: 10m)")
	fs.DurationVar(&s.maxClockSkew, "max-clock-skew", 0, "how far the leader's clock may be from the median of a quorum of voters before it refuses time-judged keyset steps (0: 2s, or a quarter of --safety-window if that is less)")
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
	// The addresses others are given must be ones they can dial: a replica
	// bound to every interface says where it is reached.
	if s.raftAdvertise == "" && serverconfig.Unspecified(s.raftListen) {
		return nil, nil, nil, cfg.Errorf("raft-listen", "%q binds every interface: set raft_advertise (--raft-advertise, CAIRN_ROOTKMS_RAFT_ADVERTISE) to the host:port the other replicas reach", s.raftListen)
	}
	if s.apiAdvertise == "" && serverconfig.Unspecified(s.listen) {
		return nil, nil, nil, cfg.Errorf("listen", "%q binds every interface: set api_advertise (--api-advertise, CAIRN_ROOTKMS_API_ADVERTISE) to the host:port clients and the other replicas reach", s.listen)
	}
	if s.bootstrap && s.join != "" {
		return nil, nil, nil, fmt.Errorf("rootkms: %s and %s are exclusive: bootstrap starts a new cluster, join enters an existing one", cfg.Name("bootstrap"), cfg.Name("join"))
	}
	return s, cfg, cf, nil
}

// check refuses settings the root KMS cannot start with.
func (s *settings) check() error {
	if s.replicaID == "" || s.dataDir == "" || s.manifest == "" || s.distributors == "" {
		return errors.New("--id, --data-dir, --manifest and --distributors are required")
	}
	return nil
}
