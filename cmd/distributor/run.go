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

	"github.com/cairnkms/cairn/distributor"
	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/cairnkms/cairn/internal/ops"
	"github.com/cairnkms/cairn/internal/serverconfig"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
)

func run(ctx context.Context, args []string, stderr io.Writer) int {
	return runWith(ctx, args, os.Environ(), os.Stdout, stderr)
}

// runWith is run with the environment (CAIRN_DISTRIBUTOR_*) and the output
// of --print-config given.
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
			fmt.Fprintln(stderr, "distributor: "+err.Error())
			return 1
		}
		return 0
	}
	log, err := s.ops.Logger(stderr)
	if err != nil {
		fmt.Fprintln(stderr, "distributor: "+err.Error())
		return 2
	}
	if err := s.check(); err != nil {
		log.Error("distributor: " + err.Error())
		return 1
	}
	if cfg.File() != "" {
		log.Info("distributor: config file applied", "file", cfg.File())
	}
	if err := serve(ctx, log, &s.id, &s.ops, s.listen, s.stateDir, s.auditPath, s.officers, s.readers, s.peerIDs, s.peers, s.manifest, s.ceremonyTTL); err != nil {
		log.Error("distributor: " + err.Error())
		return 1
	}
	return 0
}

func serve(ctx context.Context, log *slog.Logger, id *identity.Flags, opsFlags *ops.Flags, listen, stateDir, auditPath, officers, readers, peerIDs, peers, manifest string, ttl time.Duration) error {
	manifestPath := filepath.Join(stateDir, "genesis.json")
	var m *safev1.GenesisManifest
	if manifest != "" {
		var err error
		if m, err = safe.ReadManifest(manifest); err != nil {
			return fmt.Errorf("--manifest: %w", err)
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
	// Pinned only once the trust domain is known: a manifest whose officers
	// are of another one could never be unsealed by a ceremony.
	if m != nil {
		if err := distributor.CheckManifest(m, td); err != nil {
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
