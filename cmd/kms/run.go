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
	"path/filepath"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/cairnkms/cairn/internal/ops"
	"github.com/cairnkms/cairn/kms"
)

func run(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("kms", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "kms: a Cairn regional KMS server: serves one region's keysets from RAM to Tink clients (wrap and unwrap data keys) over gRPC with mTLS\n\nUsage: kms [flags]\n\nFlags:\n")
		fs.PrintDefaults()
	}
	var (
		id                                 identity.Flags
		region, listen, stateDir, auditLog string
		rootKMS, signingKeys, admins       string
		opsFlags                           ops.Flags
		maxBatch, maxPayload               int
		auditSync                          bool
	)
	id.Register(fs)
	tf := registerTransitFlags(fs)
	opsFlags.Register(fs)
	fs.StringVar(&region, "region", "", "the region this server serves, e.g. us-east (required; --name must be kms/<region>/<name>)")
	fs.StringVar(&listen, "listen", "127.0.0.1:7401", "gRPC listen address (data plane and admin, mTLS)")
	fs.StringVar(&stateDir, "state-dir", "", "directory of the last applied bundle (required; wrapped material only)")
	fs.StringVar(&auditLog, "audit-log", "", "audit log path (default <state-dir>/audit.log)")
	fs.StringVar(&rootKMS, "rootkms", "", "comma-separated host:port of root KMS replicas (required)")
	fs.StringVar(&signingKeys, "signing-key", "", "comma-separated bundle-signing public key files to pin (required)")
	fs.StringVar(&admins, "admins", "regionctl/*/*", "comma-separated SPIFFE ID patterns allowed to call KMSAdmin")
	fs.IntVar(&maxBatch, "max-batch", 0, "most items in a batch call (0: 1000)")
	fs.IntVar(&maxPayload, "max-payload", 0, "largest plaintext or associated data in bytes (0: 65536)")
	fs.BoolVar(&auditSync, "audit-sync", false, "fsync the audit log before answering each call (see the comment in run.go)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0 // -h: the help is printed
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "kms: unexpected arguments %v\n", fs.Args())
		return 2
	}
	log, err := opsFlags.Logger(stderr)
	if err != nil {
		fmt.Fprintln(stderr, "kms: "+err.Error())
		return 2
	}
	if err := serve(ctx, log, config{transit: *tf, id: id, region: region, listen: listen, stateDir: stateDir, auditLog: auditLog, rootKMS: rootKMS,
		signingKeys: signingKeys, admins: admins, ops: opsFlags, maxBatch: maxBatch, maxPayload: maxPayload, auditSync: auditSync}); err != nil {
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
	auditSync                                                        bool

	transit transitFlags // the Vault transit listener (transit.go)
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
	reg, err := ops.NewRegistry("kms")
	if err != nil {
		return err
	}
	srv, err := kms.New(kms.Config{
		Region: c.region, StateDir: c.stateDir, Source: src, RegionKeys: keys, SigningKeys: pinned, Admins: adm,
		Audit: alog, Logger: log, MaxBatch: c.maxBatch, MaxPayload: c.maxPayload,
		Registry: reg, Reflection: c.ops.Reflection,
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
	err = serveTransit(ctx, log, c.transit, srv, src) // until ctx is done
	log.Info("kms: shutting down")
	opsLis.Close()
	return errors.Join(err, srv.Close())
}
