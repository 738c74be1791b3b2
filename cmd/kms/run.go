package main

import (
	"context"
	"crypto/ed25519"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/cairnkms/cairn/kms"
)

func run(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("kms", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		id                                 identity.Flags
		region, listen, stateDir, auditLog string
		rootKMS, signingKeys, admins       string
		metricsListen                      string
		maxBatch, maxPayload               int
		verbose, auditSync                 bool
	)
	id.Register(fs)
	fs.StringVar(&region, "region", "", "the region this server serves, e.g. us-east (required; --name must be kms/<region>/<name>)")
	fs.StringVar(&listen, "listen", "127.0.0.1:7401", "gRPC listen address (data plane and admin, mTLS)")
	fs.StringVar(&stateDir, "state-dir", "", "directory of the last applied bundle (required; wrapped material only)")
	fs.StringVar(&auditLog, "audit-log", "", "audit log path (default <state-dir>/audit.log)")
	fs.StringVar(&rootKMS, "rootkms", "", "comma-separated host:port of root KMS replicas (required)")
	fs.StringVar(&signingKeys, "signing-key", "", "comma-separated bundle-signing public key files to pin (required)")
	fs.StringVar(&admins, "admins", "regionctl/*/*", "comma-separated SPIFFE ID patterns allowed to call KMSAdmin")
	fs.StringVar(&metricsListen, "metrics-listen", "", "address to serve Prometheus metrics on, plain HTTP at /metrics (empty: none)")
	fs.IntVar(&maxBatch, "max-batch", 0, "most items in a batch call (0: 1000)")
	fs.IntVar(&maxPayload, "max-payload", 0, "largest plaintext or associated data in bytes (0: 65536)")
	fs.BoolVar(&auditSync, "audit-sync", false, "fsync the audit log before answering each call (see the comment in run.go)")
	fs.BoolVar(&verbose, "v", false, "debug logging")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "kms: unexpected arguments %v\n", fs.Args())
		return 2
	}
	level := slog.LevelInfo
	if verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	if err := serve(ctx, log, config{id: id, region: region, listen: listen, stateDir: stateDir, auditLog: auditLog, rootKMS: rootKMS,
		signingKeys: signingKeys, admins: admins, metricsListen: metricsListen, maxBatch: maxBatch, maxPayload: maxPayload, auditSync: auditSync}); err != nil {
		log.Error("kms: " + err.Error())
		return 1
	}
	return 0
}

type config struct {
	id                                                                              identity.Flags
	region, listen, stateDir, auditLog, rootKMS, signingKeys, admins, metricsListen string
	maxBatch, maxPayload                                                            int
	auditSync                                                                       bool
}

func serve(ctx context.Context, log *slog.Logger, c config) error {
	if c.region == "" || c.stateDir == "" || c.rootKMS == "" || c.signingKeys == "" {
		return errors.New("--region, --state-dir, --rootkms and --signing-key are required")
	}
	if err := lockedmem.HardenProcess(); err != nil {
		return fmt.Errorf("hardening the process: %w", err)
	}
	var pinned []ed25519.PublicKey
	for _, path := range identity.SplitList(c.signingKeys) {
		k, err := bundle.ReadPublicKey(path)
		if err != nil {
			return fmt.Errorf("--signing-key: %w", err)
		}
		pinned = append(pinned, k)
	}
	src, err := c.id.Source(log)
	if err != nil {
		return err
	}
	adm, err := identity.ParseAllowlist(src.TrustDomain(), identity.SplitList(c.admins)...)
	if err != nil {
		return fmt.Errorf("--admins: %w", err)
	}
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
	alog, err := audit.Open(c.auditLog, audit.Options{Sync: c.auditSync})
	if err != nil {
		return err
	}
	defer alog.Close()
	keys := kms.NewRootKMSRegionKeys(src, identity.SplitList(c.rootKMS))
	defer keys.Close()
	srv, err := kms.New(kms.Config{
		Region: c.region, StateDir: c.stateDir, Source: src, RegionKeys: keys, SigningKeys: pinned, Admins: adm,
		Audit: alog, Logger: log, MaxBatch: c.maxBatch, MaxPayload: c.maxPayload,
	})
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", c.listen)
	if err != nil {
		srv.Close()
		return fmt.Errorf("listening on %s: %w", c.listen, err)
	}
	var metrics *http.Server
	metricsDone := make(chan struct{})
	if c.metricsListen == "" {
		close(metricsDone)
	} else {
		mlis, err := net.Listen("tcp", c.metricsListen)
		if err != nil {
			lis.Close()
			srv.Close()
			return fmt.Errorf("listening on %s: %w", c.metricsListen, err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", srv.Handler())
		metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			defer close(metricsDone)
			if err := metrics.Serve(mlis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("kms: metrics listener stopped", "err", err)
			}
		}()
		log.Info("kms: metrics", "addr", mlis.Addr().String())
	}
	if err := srv.Start(lis); err != nil {
		lis.Close()
		if metrics != nil {
			metrics.Close()
		}
		<-metricsDone
		srv.Close()
		return err
	}
	<-ctx.Done()
	log.Info("kms: shutting down")
	if metrics != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = metrics.Shutdown(sctx)
		cancel()
	}
	<-metricsDone
	return srv.Close()
}
