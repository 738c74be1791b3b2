package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/transit"
)

// transitFlags configure the Vault transit listener (package kms/transit).
type transitFlags struct {
	listen, mount string
}

func registerTransitFlags(fs *flag.FlagSet) *transitFlags {
	f := &transitFlags{}
	fs.StringVar(&f.listen, "transit-listen", "", "address to serve the Vault transit API on: HTTPS as the --name identity, client certificates of the trust domain required (empty: off)")
	fs.StringVar(&f.mount, "transit-mount", transit.DefaultMount, "mount of the Vault transit API: it is served under /v1/<mount>/")
	return f
}

// Timeouts and limits of the transit HTTPS server. A request body is
// bounded by the handler (transit.BodyLimit of the KMS's limits; 413 past
// it); the timeouts leave a slow client minutes for a full batch, never an
// unbounded hold on a connection.
const (
	transitReadHeaderTimeout = 10 * time.Second
	transitReadTimeout       = 2 * time.Minute
	transitWriteTimeout      = 2 * time.Minute
	transitIdleTimeout       = 2 * time.Minute
	transitMaxHeaderBytes    = 64 << 10
	// transitGrace bounds how long shutdown waits for calls in flight.
	transitGrace = 5 * time.Second
)

// serveTransit serves the transit API over srv on f.listen until ctx is
// done, then shuts it down (calls in flight get transitGrace), before the
// caller closes srv. With f.listen empty it only waits for ctx. It returns
// early, with an error, if the listener cannot start or stops by itself.
func serveTransit(ctx context.Context, log *slog.Logger, f transitFlags, srv *kms.Server, src *identity.Source) error {
	if f.listen == "" {
		<-ctx.Done()
		return nil
	}
	h, err := srv.Transit(transit.Options{Mount: f.mount, Logger: log})
	if err != nil {
		return fmt.Errorf("--transit-mount: %w", err)
	}
	lis, err := net.Listen("tcp", f.listen)
	if err != nil {
		return fmt.Errorf("--transit-listen: %w", err)
	}
	hs := &http.Server{
		Handler: h,
		// TLS 1.3, a client certificate verified as an X.509-SVID of the
		// trust domain: the handler takes the caller's identity from it.
		TLSConfig:         identity.ServerTLSConfig(src, identity.MemberOf(src.TrustDomain())),
		ReadHeaderTimeout: transitReadHeaderTimeout,
		ReadTimeout:       transitReadTimeout,
		WriteTimeout:      transitWriteTimeout,
		IdleTimeout:       transitIdleTimeout,
		MaxHeaderBytes:    transitMaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	served := make(chan error, 1)
	go func() { served <- hs.ServeTLS(lis, "", "") }()
	log.Info("kms: Vault transit API", "addr", lis.Addr().String(), "mount", "/v1/"+f.mount+"/")
	select {
	case err := <-served:
		return fmt.Errorf("transit listener stopped: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), transitGrace)
	defer cancel()
	if err := hs.Shutdown(sctx); err != nil {
		log.Warn("kms: transit calls still in flight after the grace period; closing them", "err", err)
		hs.Close()
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("transit listener: %w", err)
	}
	return nil
}
