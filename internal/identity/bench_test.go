package identity_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
)

// BenchmarkHandshake measures one full TLS 1.3 mutual handshake over
// loopback TCP with SPIFFE verification on both sides (what every new
// connection to a Cairn server costs).
func BenchmarkHandshake(b *testing.B) {
	pki := identitytest.New(b, identitytest.TrustDomain)
	serverCfg := identity.ServerTLSConfig(pki.Source(serverID), identity.AllowAny())
	clientCfg := identity.StaticClientTLSConfig(pki.TLSCertificate(clientID, devca.LeafOptions{}), pki.Bundle(), identity.AllowAny())
	clientCfg.ClientSessionCache = nil // a full handshake every time
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			s := tls.Server(c, serverCfg)
			_ = s.Handshake()
			s.Close()
		}
	}()
	b.Cleanup(func() { lis.Close(); <-done })
	b.ResetTimer()
	for b.Loop() {
		c, err := tls.Dial("tcp", lis.Addr().String(), clientCfg)
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "handshakes/s")
}

// BenchmarkUnaryRPC measures a minimal unary gRPC call over one mTLS
// connection through the identity and authorization interceptors: the floor
// under every Cairn RPC, and the "bare mTLS echo" later data-plane
// benchmarks compare against. Sub-benchmarks vary the number of concurrent
// callers.
func BenchmarkUnaryRPC(b *testing.B) {
	pki := identitytest.New(b, identitytest.TrustDomain)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(pki.ServerCredentials(serverID)),
		grpc.ChainUnaryInterceptor(identity.UnaryServerInterceptor(), identity.UnaryAuthorizeInterceptor(allowAll())))
	healthpb.RegisterHealthServer(srv, &recorderless{})
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	b.Cleanup(func() { srv.Stop(); <-done })
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(pki.ClientCredentials(clientID)))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	client := healthpb.NewHealthClient(conn)
	req := &healthpb.HealthCheckRequest{}
	if _, err := client.Check(context.Background(), req); err != nil {
		b.Fatal(err)
	}
	for _, callers := range []int{1, 16, 64} {
		b.Run(fmt.Sprintf("callers=%d", callers), func(b *testing.B) {
			// Exactly `callers` goroutines share b.N calls (RunParallel
			// could only give multiples of GOMAXPROCS).
			var next atomic.Int64
			var wg sync.WaitGroup
			for range callers {
				wg.Go(func() {
					for next.Add(1) <= int64(b.N) {
						if _, err := client.Check(context.Background(), req); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "calls/s")
		})
	}
}

// recorderless answers Check without recording, so the benchmark measures
// the RPC path only.
type recorderless struct {
	healthpb.UnimplementedHealthServer
}

func (recorderless) Check(context.Context, *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}
