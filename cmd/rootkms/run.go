package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/cairnkms/cairn/internal/ops"
	"github.com/cairnkms/cairn/internal/serverconfig"
	"github.com/cairnkms/cairn/rootkms"
	"github.com/cairnkms/cairn/safe"
)

func run(ctx context.Context, args []string, stderr io.Writer) int {
	return runWith(ctx, args, os.Environ(), os.Stdout, stderr)
}

// runWith is run with the environment (CAIRN_ROOTKMS_*) and the output of
// --print-config given.
func runWith(ctx context.Context, args, env []string, stdout, stderr io.Writer) int {
	s, cfg, cf, err := load(args, env, stderr)
	switch {
	case errors.Is(err, serverconfig.ErrPrinted):
		return 2
	case err != nil:
		fmt.Fprintln(stderr, err)
		return 2
	case cfg == nil:
		return 0 // -h: the help is printed
	case cf.Print:
		if err := cfg.Print(stdout); err != nil {
			fmt.Fprintln(stderr, "rootkms: "+err.Error())
			return 1
		}
		return 0
	}
	log, err := s.ops.Logger(stderr)
	if err != nil {
		fmt.Fprintln(stderr, "rootkms: "+err.Error())
		return 2
	}
	if cfg.File() != "" {
		log.Info("rootkms: config file applied", "file", cfg.File())
	}
	err = func() error {
		if err := s.check(); err != nil {
			return err
		}
		if err := lockedmem.HardenProcess(); err != nil {
			return fmt.Errorf("hardening the process: %w", err)
		}
		if _, err := lockedmem.LockProcess(log, *s.mlock); err != nil {
			return err
		}
		src, err := s.id.Source(log)
		if err != nil {
			return err
		}
		m, err := safe.ReadManifest(s.manifest)
		if err != nil {
			return err
		}
		rc, err := identity.ParseAllowlist(src.TrustDomain(), identity.SplitList(s.regionctl)...)
		if err != nil {
			return fmt.Errorf("--regionctl: %w", err)
		}
		opList, err := identity.ParseAllowlist(src.TrustDomain(), identity.SplitList(s.operators)...)
		if err != nil {
			return fmt.Errorf("--operators: %w", err)
		}
		offList, err := identity.ParseAllowlist(src.TrustDomain(), identity.SplitList(s.officers)...)
		if err != nil {
			return fmt.Errorf("--officers: %w", err)
		}
		if s.auditPath == "" {
			s.auditPath = filepath.Join(s.dataDir, "audit.log")
		}
		alog, err := audit.Open(s.auditPath, audit.Options{Sync: true, Signer: audit.SVIDSigner(src)})
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
			Registry: reg, Reflection: s.ops.Reflection,
			ID: s.replicaID, DataDir: s.dataDir, Bootstrap: s.bootstrap, Join: identity.SplitList(s.join), NonVoter: s.nonVoter,
			APIAdvertise: s.apiAdvertise, RaftAdvertise: s.raftAdvertise,
			Manifest: m, Distributors: identity.SplitList(s.distributors), Source: src, Regionctl: rc, Operators: opList, Officers: offList,
			Audit: alog, Logger: log, HeartbeatTimeout: s.heartbeat, ElectionTimeout: s.election, LeaderLeaseTimeout: s.lease, ApplyTimeout: s.applyTO,
			Safety: rootkms.SafetyConfig{Window: s.safetyWindow, MaxClockSkew: s.maxClockSkew},
		})
		if err != nil {
			return err
		}
		apiLis, err := net.Listen("tcp", s.listen)
		if err != nil {
			return fmt.Errorf("listening on %s: %w", s.listen, err)
		}
		raftLis, err := net.Listen("tcp", s.raftListen)
		if err != nil {
			apiLis.Close()
			return fmt.Errorf("listening on %s: %w", s.raftListen, err)
		}
		if err := srv.Start(apiLis, raftLis); err != nil {
			apiLis.Close()
			raftLis.Close()
			return err
		}
		opsLis, err := s.ops.Listen(log, reg, srv.Readiness)
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
