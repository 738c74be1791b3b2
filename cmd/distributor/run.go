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

	"github.com/cairnkms/cairn/distributor"
	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/cairnkms/cairn/internal/ops"
	"github.com/cairnkms/cairn/safe"
)

func run(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("distributor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "distributor: a Cairn root-key distributor: holds the root master key in locked memory only and hands it to root KMS replicas\n\nUsage: distributor [flags]\n\nFlags:\n")
		fs.PrintDefaults()
	}
	var (
		id                          identity.Flags
		listen, stateDir, auditPath string
		officers, readers, peerIDs  string
		peers, manifest             string
		ceremonyTTL                 time.Duration
		opsFlags                    ops.Flags
	)
	id.Register(fs)
	opsFlags.Register(fs)
	fs.StringVar(&listen, "listen", "127.0.0.1:7101", "gRPC listen address")
	fs.StringVar(&stateDir, "state-dir", "", "directory for the pinned genesis manifest (genesis.json) and the audit log (required)")
	fs.StringVar(&auditPath, "audit-log", "", "audit log path (default <state-dir>/audit.log)")
	fs.StringVar(&officers, "officers", "officer/global/*", "comma-separated SPIFFE ID patterns of security officers")
	fs.StringVar(&readers, "root-key-readers", "rootkms/*/*", "comma-separated SPIFFE ID patterns that may fetch the root key")
	fs.StringVar(&peerIDs, "peer-ids", "distributor/*/*", "comma-separated SPIFFE ID patterns of peer distributors")
	fs.StringVar(&peers, "peers", "", "comma-separated host:port of peer distributors to unseal from")
	fs.StringVar(&manifest, "manifest", "", "public genesis manifest `file` to pin in the state dir at start (a distributor joining a fleet can then unseal from --peers); a pinned manifest of another root key is never replaced")
	fs.DurationVar(&ceremonyTTL, "ceremony-ttl", 30*time.Minute, "default ceremony lifetime")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0 // -h: the help is printed
		}
		return 2
	}
	log, err := opsFlags.Logger(stderr)
	if err != nil {
		fmt.Fprintln(stderr, "distributor: "+err.Error())
		return 2
	}
	if err := serve(ctx, log, &id, &opsFlags, listen, stateDir, auditPath, officers, readers, peerIDs, peers, manifest, ceremonyTTL); err != nil {
		log.Error("distributor: " + err.Error())
		return 1
	}
	return 0
}

func serve(ctx context.Context, log *slog.Logger, id *identity.Flags, opsFlags *ops.Flags, listen, stateDir, auditPath, officers, readers, peerIDs, peers, manifest string, ttl time.Duration) error {
	if stateDir == "" {
		return errors.New("--state-dir is required")
	}
	manifestPath := filepath.Join(stateDir, "genesis.json")
	if manifest != "" {
		m, err := safe.ReadManifest(manifest)
		if err != nil {
			return fmt.Errorf("--manifest: %w", err)
		}
		wrote, err := distributor.PinManifest(manifestPath, m)
		if err != nil {
			return fmt.Errorf("--manifest: %w", err)
		}
		if wrote {
			log.Info("distributor: pinned the genesis manifest", "from", manifest, "genesis_id", m.GetGenesisId(), "epoch", m.GetEpoch())
		} else {
			log.Info("distributor: --manifest kept the pinned manifest (same root key, same or later epoch)", "from", manifest, "epoch", m.GetEpoch())
		}
	}
	// No core dumps and no ptrace: the root key must not leave RAM.
	if err := lockedmem.HardenProcess(); err != nil {
		return fmt.Errorf("hardening the process: %w", err)
	}
	src, err := id.Source(log)
	if err != nil {
		return err
	}
	td := src.TrustDomain()
	allow := func(flagName, v string) (identity.Allowlist, error) {
		a, err := identity.ParseAllowlist(td, identity.SplitList(v)...)
		if err != nil {
			return a, fmt.Errorf("--%s: %w", flagName, err)
		}
		return a, nil
	}
	officerList, err := allow("officers", officers)
	if err != nil {
		return err
	}
	readerList, err := allow("root-key-readers", readers)
	if err != nil {
		return err
	}
	peerList, err := allow("peer-ids", peerIDs)
	if err != nil {
		return err
	}
	if auditPath == "" {
		auditPath = filepath.Join(stateDir, "audit.log")
	}
	alog, err := audit.Open(auditPath, audit.Options{Sync: true, Signer: audit.SVIDSigner(src)})
	if err != nil {
		return err
	}
	defer alog.Close()
	reg, err := ops.NewRegistry("distributor")
	if err != nil {
		return err
	}
	srv, err := distributor.New(distributor.Config{
		Registry: reg, Reflection: opsFlags.Reflection,
		ManifestPath: manifestPath,
		Source:       src, Officers: officerList, RootKeyReaders: readerList, Peers: peerList,
		PeerAddrs: identity.SplitList(peers), Audit: alog, Logger: log, CeremonyTTL: ttl,
	})
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", listen)
	if err != nil {
		srv.Close()
		return fmt.Errorf("listening on %s: %w", listen, err)
	}
	opsLis, err := opsFlags.Listen(log, reg, srv.Readiness)
	if err != nil {
		lis.Close()
		srv.Close()
		return err
	}
	defer opsLis.Close()
	log.Info("distributor: serving", "addr", lis.Addr().String(), "id", src.ID().String(), "sealed", srv.Sealed())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(lis) }()
	select {
	case <-ctx.Done():
		log.Info("distributor: shutting down; wiping the root key")
		srv.Close()
		<-done
		return nil
	case err := <-done:
		srv.Close()
		return err
	}
}
