package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/cairnkms/cairn/internal/ops"
	"github.com/cairnkms/cairn/internal/serverconfig"
	"github.com/cairnkms/cairn/kms"
)

func run(ctx context.Context, args []string, stderr io.Writer) int {
	return runWith(ctx, args, os.Environ(), os.Stdout, stderr)
}

// runWith is run with the environment (CAIRN_KMS_*) and the output of
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
			fmt.Fprintln(stderr, "kms: "+err.Error())
			return 1
		}
		return 0
	}
	log, err := s.c.ops.Logger(stderr)
	if err != nil {
		fmt.Fprintln(stderr, "kms: "+err.Error())
		return 2
	}
	if cfg.File() != "" {
		log.Info("kms: config file applied", "file", cfg.File())
	}
	log.Info("kms: garbage collector tuned for a small, stable heap", "settings", ops.TuneGC(ops.DefaultKMSGCPercent))
	if _, err := lockedmem.LockProcess(log, *s.mlock); err != nil {
		log.Error("kms: " + err.Error())
		return 1
	}
	if err := serve(ctx, log, s.c); err != nil {
		log.Error("kms: " + err.Error())
		return 1
	}
	return 0
}

type config struct {
	id                                                               identity.Flags
	ops                                                              ops.Flags
	region, listen, stateDir, auditLog, rootKMS, signingKeys, admins string
	maxBatch, maxPayload                                             int
	maxInFlight                                                      int
	auditSync                                                        bool
	adminsFile                                                       string
	reloadInterval                                                   time.Duration
	maxCallDuration                                                  time.Duration

	transit transitFlags // the Vault transit listener (transit.go)
}

func serve(ctx context.Context, log *slog.Logger, c config) error {
	if err := c.required(); err != nil {
		return err
	}
	if err := lockedmem.HardenProcess(); err != nil {
		return fmt.Errorf("hardening the process: %w", err)
	}
	src, err := c.id.Source(log)
	if err != nil {
		return err
	}
	ts := trustSource{signingKeys: c.signingKeys, admins: c.admins, adminsFile: c.adminsFile, td: src.TrustDomain()}
	trust, err := ts.load()
	if err != nil {
		return err
	}
	pinned, adm := trust.SigningKeys, trust.Admins
	// SIGHUP reloads them (reloadTrust, below); caught from here on, so one
	// sent once the server says it started never kills it.
	hup, stopHUP := notifyHUP()
	defer stopHUP()
	if c.auditLog == "" {
		c.auditLog = filepath.Join(c.stateDir, "audit.log")
	}
	// Sync is off by default: the data plane writes a record per call, and
	// an fsync per DEK unwrap caps the server at the disk's sync rate.
	// Records still reach the file (one write each) before the caller gets a
	// result, so a crash of the process loses nothing; a crash of the machine
	// can lose the last records in the page cache. With internal/audit's
	// group commit, --audit-sync makes every record durable at a cost the
	// operator can measure.
	alog, err := audit.Open(c.auditLog, audit.Options{Sync: c.auditSync, Signer: audit.SVIDSigner(src)})
	if err != nil {
		return err
	}
	defer alog.Close()
	keys := kms.NewRootKMSRegionKeys(src, identity.SplitList(c.rootKMS))
	defer keys.Close()
	reg, err := ops.NewRegistry("kms")
	if err != nil {
		return err
	}
	if err := lockedmem.RegisterMetrics(reg); err != nil {
		return err
	}
	srv, err := kms.New(kms.Config{
		Region: c.region, StateDir: c.stateDir, Source: src, RegionKeys: keys, SerialFloor: keys, SigningKeys: pinned, Admins: adm,
		Audit: alog, Logger: log, MaxBatch: c.maxBatch, MaxPayload: c.maxPayload, MaxInFlight: c.maxInFlight,
		MaxCallDuration: c.maxCallDuration, Registry: reg, Reflection: c.ops.Reflection,
	})
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", c.listen)
	if err != nil {
		srv.Close()
		return fmt.Errorf("listening on %s: %w", c.listen, err)
	}
	opsLis, err := c.ops.Listen(log, reg, srv.Readiness)
	if err != nil {
		lis.Close()
		srv.Close()
		return err
	}
	if err := srv.Start(lis); err != nil {
		lis.Close()
		opsLis.Close()
		srv.Close()
		return err
	}
	// The signing keys and admins reload on SIGHUP and every interval.
	rctx, stopReload := context.WithCancel(ctx)
	reloaded := make(chan struct{})
	go func() { defer close(reloaded); reloadTrust(rctx, log, srv, ts, c.reloadInterval, hup) }()
	err = serveTransit(ctx, log, c.transit, srv, src) // until ctx is done
	log.Info("kms: shutting down")
	stopReload()
	<-reloaded
	opsLis.Close()
	return errors.Join(err, srv.Close())
}
