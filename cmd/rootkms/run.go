package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"time"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/cairnkms/cairn/internal/ops"
	"github.com/cairnkms/cairn/rootkms"
	"github.com/cairnkms/cairn/safe"
)

func run(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("rootkms", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "rootkms: a Cairn root KMS replica: a Raft member that holds the region master keys, wrapped by the root master key\n\nUsage: rootkms [flags]\n\nFlags:\n")
		fs.PrintDefaults()
	}
	var (
		id                                  identity.Flags
		replicaID, listen, raftListen       string
		dataDir, manifest, auditPath        string
		distributors, join                  string
		regionctl, operators, officers      string
		bootstrap, nonVoter                 bool
		opsFlags                            ops.Flags
		heartbeat, election, lease, applyTO time.Duration
		safetyWindow                        time.Duration
	)
	id.Register(fs)
	opsFlags.Register(fs)
	mlock := lockedmem.RegisterFlag(fs)
	fs.StringVar(&replicaID, "id", "", "Raft server ID of this replica, e.g. rootkms-1 (required)")
	fs.StringVar(&listen, "listen", "127.0.0.1:7201", "gRPC API listen address")
	fs.StringVar(&raftListen, "raft-listen", "127.0.0.1:7301", "Raft transport listen address (mTLS)")
	fs.StringVar(&dataDir, "data-dir", "", "Raft log, stable store and snapshots (required)")
	fs.StringVar(&manifest, "manifest", "", "the pinned genesis manifest (required)")
	fs.StringVar(&auditPath, "audit-log", "", "audit log path (default <data-dir>/audit.log)")
	fs.StringVar(&distributors, "distributors", "", "comma-separated host:port of distributors (required)")
	fs.BoolVar(&bootstrap, "bootstrap", false, "make this replica the first voter of a new cluster")
	fs.StringVar(&join, "join", "", "comma-separated API addresses of replicas to join through")
	fs.BoolVar(&nonVoter, "non-voter", false, "with --join: join as a non-voting read replica")
	fs.StringVar(&regionctl, "regionctl", "regionctl/*/*", "comma-separated SPIFFE ID patterns allowed to manage regions and keysets")
	fs.StringVar(&operators, "operators", "operator/*/*", "comma-separated SPIFFE ID patterns allowed to change membership and snapshot (never replicas: a pattern matching rootkms/*/* is refused)")
	fs.StringVar(&officers, "officers", "officer/*/*", "comma-separated SPIFFE ID patterns of security officers, who may drop the root key (emergency seal)")
	fs.DurationVar(&heartbeat, "heartbeat-timeout", 0, "Raft heartbeat timeout (0: 1s)")
	fs.DurationVar(&election, "election-timeout", 0, "Raft election timeout (0: 1s)")
	fs.DurationVar(&lease, "leader-lease-timeout", 0, "Raft leader lease timeout (0: 500ms)")
	fs.DurationVar(&applyTO, "apply-timeout", 0, "Raft write timeout (0: 5s)")
	fs.DurationVar(&safetyWindow, "safety-window", 0, "propagation window of the Safety Condition checks on keyset lifecycle steps (0: 10m)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0 // -h: the help is printed
		}
		return 2
	}
	log, err := opsFlags.Logger(stderr)
	if err != nil {
		fmt.Fprintln(stderr, "rootkms: "+err.Error())
		return 2
	}
	err = func() error {
		if replicaID == "" || dataDir == "" || manifest == "" || distributors == "" {
			return errors.New("--id, --data-dir, --manifest and --distributors are required")
		}
		if err := lockedmem.HardenProcess(); err != nil {
			return fmt.Errorf("hardening the process: %w", err)
		}
		if _, err := lockedmem.LockProcess(log, *mlock); err != nil {
			return err
		}
		src, err := id.Source(log)
		if err != nil {
			return err
		}
		m, err := safe.ReadManifest(manifest)
		if err != nil {
			return err
		}
		rc, err := identity.ParseAllowlist(src.TrustDomain(), identity.SplitList(regionctl)...)
		if err != nil {
			return fmt.Errorf("--regionctl: %w", err)
		}
		opList, err := identity.ParseAllowlist(src.TrustDomain(), identity.SplitList(operators)...)
		if err != nil {
			return fmt.Errorf("--operators: %w", err)
		}
		offList, err := identity.ParseAllowlist(src.TrustDomain(), identity.SplitList(officers)...)
		if err != nil {
			return fmt.Errorf("--officers: %w", err)
		}
		if auditPath == "" {
			auditPath = filepath.Join(dataDir, "audit.log")
		}
		alog, err := audit.Open(auditPath, audit.Options{Sync: true, Signer: audit.SVIDSigner(src)})
		if err != nil {
			return err
		}
		defer alog.Close()
		reg, err := ops.NewRegistry("rootkms")
		if err != nil {
			return err
		}
		if err := lockedmem.RegisterMetrics(reg); err != nil {
			return err
		}
		srv, err := rootkms.New(rootkms.Config{
			Registry: reg, Reflection: opsFlags.Reflection,
			ID: replicaID, DataDir: dataDir, Bootstrap: bootstrap, Join: identity.SplitList(join), NonVoter: nonVoter,
			Manifest: m, Distributors: identity.SplitList(distributors), Source: src, Regionctl: rc, Operators: opList, Officers: offList,
			Audit: alog, Logger: log, HeartbeatTimeout: heartbeat, ElectionTimeout: election, LeaderLeaseTimeout: lease, ApplyTimeout: applyTO,
			Safety: rootkms.SafetyConfig{Window: safetyWindow},
		})
		if err != nil {
			return err
		}
		apiLis, err := net.Listen("tcp", listen)
		if err != nil {
			return fmt.Errorf("listening on %s: %w", listen, err)
		}
		raftLis, err := net.Listen("tcp", raftListen)
		if err != nil {
			apiLis.Close()
			return fmt.Errorf("listening on %s: %w", raftListen, err)
		}
		if err := srv.Start(apiLis, raftLis); err != nil {
			apiLis.Close()
			raftLis.Close()
			return err
		}
		opsLis, err := opsFlags.Listen(log, reg, srv.Readiness)
		if err != nil {
			srv.Close()
			return err
		}
		<-ctx.Done()
		log.Info("rootkms: shutting down")
		opsLis.Close()
		return srv.Close()
	}()
	if err != nil {
		log.Error("rootkms: " + err.Error())
		return 1
	}
	return 0
}
