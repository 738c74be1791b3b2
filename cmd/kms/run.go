package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"time"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/cairnkms/cairn/internal/ops"
	"github.com/cairnkms/cairn/kms"
)

func run(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("kms", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "kms: a Cairn regional KMS server: serves one region's keysets from RAM to Tink clients (wrap and unwrap data keys) over gRPC with mTLS\n\nUsage: kms [flags]\n\nEnvironment: GOGC defaults to 400 (the heap is small and stable; the collector runs less often), and GOMEMLIMIT, under a cgroup v2 memory limit, to 90% of it; set either to override.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	var (
		id                                 identity.Flags
		region, listen, stateDir, auditLog string
		rootKMS, signingKeys, admins       string
		adminsFile                         string
		reloadInterval                     time.Duration
		opsFlags                           ops.Flags
		maxBatch, maxPayload               int
		maxInFlight                        int
		auditSync                          bool
	)
	id.Register(fs)
	tf := registerTransitFlags(fs)
	opsFlags.Register(fs)
	mlock := lockedmem.RegisterFlag(fs)
	fs.StringVar(&region, "region", "", "the region this server serves, e.g. us-east (required; --name must be kms/<region>/<name>)")
	fs.StringVar(&listen, "listen", "127.0.0.1:7401", "gRPC listen address (data plane and admin, mTLS)")
	fs.StringVar(&stateDir, "state-dir", "", "directory of the last applied bundle (required; wrapped material only)")
	fs.StringVar(&auditLog, "audit-log", "", "audit log path (default <state-dir>/audit.log)")
	fs.StringVar(&rootKMS, "rootkms", "", "comma-separated host:port of root KMS replicas (required)")
	fs.StringVar(&signingKeys, "signing-key", "", "comma-separated bundle-signing public key files to pin (required)")
	fs.StringVar(&admins, "admins", "regionctl/*/*", "comma-separated SPIFFE ID patterns allowed to call KMSAdmin (or --admins-file)")
	fs.StringVar(&adminsFile, "admins-file", "", "file of SPIFFE ID patterns allowed to call KMSAdmin, one a line (# comments); replaces --admins, and is reloaded like --signing-key")
	fs.DurationVar(&reloadInterval, "reload-interval", 30*time.Second, "how often the --signing-key files and --admins-file are re-read (0: only on SIGHUP); a changed set is swapped in, audited and logged, a broken one is logged and ignored")
	fs.IntVar(&maxBatch, "max-batch", 0, "most items in a batch call (0: 1000)")
	fs.IntVar(&maxPayload, "max-payload", 0, "largest plaintext or associated data in bytes (0: 65536)")
	fs.IntVar(&maxInFlight, "max-in-flight", 0, "most data-plane calls in progress at once; more are shed with RESOURCE_EXHAUSTED and a retry hint (0: 64 x GOMAXPROCS)")
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
	adminsSet := false
	fs.Visit(func(f *flag.Flag) { adminsSet = adminsSet || f.Name == "admins" })
	if adminsSet && adminsFile != "" {
		fmt.Fprintln(stderr, "kms: --admins and --admins-file: give one")
		return 2
	}
	if reloadInterval < 0 {
		fmt.Fprintln(stderr, "kms: --reload-interval must not be negative")
		return 2
	}
	log, err := opsFlags.Logger(stderr)
	if err != nil {
		fmt.Fprintln(stderr, "kms: "+err.Error())
		return 2
	}
	log.Info("kms: garbage collector tuned for a small, stable heap", "settings", ops.TuneGC(ops.DefaultKMSGCPercent))
	if _, err := lockedmem.LockProcess(log, *mlock); err != nil {
		log.Error("kms: " + err.Error())
		return 1
	}
	if err := serve(ctx, log, config{transit: *tf, id: id, region: region, listen: listen, stateDir: stateDir, auditLog: auditLog, rootKMS: rootKMS,
		signingKeys: signingKeys, admins: admins, adminsFile: adminsFile, reloadInterval: reloadInterval, ops: opsFlags, maxBatch: maxBatch, maxPayload: maxPayload, maxInFlight: maxInFlight, auditSync: auditSync}); err != nil {
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

	transit transitFlags // the Vault transit listener (transit.go)
}

func serve(ctx context.Context, log *slog.Logger, c config) error {
	if c.region == "" || c.stateDir == "" || c.rootKMS == "" || c.signingKeys == "" {
		return errors.New("--region, --state-dir, --rootkms and --signing-key are required")
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
