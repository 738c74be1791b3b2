package grpcserver_test

import (
	"context"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/cairnkms/cairn/internal/grpcserver"
)

// attacker is the loopback address the connection flood comes from; the
// well-behaved client calls from 127.0.0.1.
var attacker = &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}

// closedByServer reports whether err is how a raw connection the server
// closed ends for its client.
func closedByServer(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
}

// TestConnectionsPerIPBounded: of limit+extra raw TCP connections from
// 127.0.0.2 that never start a handshake, the server closes exactly extra
// (and one more opened after them), counting each in
// cairn_grpc_connections_over_ip_limit_total, while a client from 127.0.0.1
// is served; once the attacker's connections close, a client from
// 127.0.0.2 is served again.
func TestConnectionsPerIPBounded(t *testing.T) {
	const limit, extra = 8, 5
	reg := prometheus.NewRegistry()
	// A handshake bound far above the test, so that only the per-address
	// bound closes connections.
	s := startWith(t, grpcserver.Options{MaxConnsPerIP: limit, HandshakeTimeout: 5 * time.Minute, Registerer: reg})
	s.ready.Store(true)
	from := &net.Dialer{LocalAddr: attacker, Timeout: callGuard}

	type ended struct {
		i   int
		err error
	}
	ends := make(chan ended, limit+extra)
	var flood []net.Conn
	t.Cleanup(func() {
		for _, c := range flood {
			c.Close()
		}
	})
	for i := range limit + extra {
		c, err := from.Dial("tcp", s.addr)
		if err != nil {
			t.Fatalf("connection %d from %v: %v", i, attacker.IP, err)
		}
		flood = append(flood, c)
		go func() {
			_, err := c.Read(make([]byte, 1)) // the server never writes first
			ends <- ended{i, err}
		}()
	}
	guard := time.After(callGuard)
	for range extra {
		select {
		case e := <-ends:
			if !closedByServer(e.err) {
				t.Fatalf("connection %d from %v ended with %v, want EOF or a reset from the server", e.i, attacker.IP, e.err)
			}
		case <-guard:
			t.Fatalf("%d connections from %v: fewer than %d closed by the server after %v", limit+extra, attacker.IP, extra, callGuard)
		}
	}

	// The attacker's address is still at the bound: one more is closed.
	c, err := from.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(callGuard))
	if _, err := c.Read(make([]byte, 1)); !closedByServer(err) {
		t.Errorf("connection %d from %v at the bound: read = %v, want EOF or a reset from the server", limit+extra+1, attacker.IP, err)
	}
	c.Close()

	ctx, cancel := context.WithTimeout(t.Context(), callGuard)
	defer cancel()
	if r, err := healthpb.NewHealthClient(s.dial(t)).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("Check from 127.0.0.1 beside %d connections from %v = %v, %v; want SERVING", limit, attacker.IP, r, err)
	}
	if got := overIPLimit(t, reg); got != extra+1 {
		t.Errorf("cairn_grpc_connections_over_ip_limit_total = %v, want %d", got, extra+1)
	}
	select {
	case e := <-ends:
		t.Errorf("connection %d from %v within the bound ended (%v), want it held", e.i, attacker.IP, e.err)
	default:
	}

	// The attacker goes away: its address may connect again (the server
	// lets go of each connection once it sees it closed, so the client
	// retries until then, within the guard).
	for _, c := range flood {
		c.Close()
	}
	for range limit {
		<-ends
	}
	conn, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(s.pki.ClientCredentials(clientID)),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{LocalAddr: attacker}).DialContext(ctx, "tcp", addr)
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var last error
	for ctx.Err() == nil {
		r, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		if err == nil && r.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return
		}
		last = err
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("Check from %v after its connections closed: %v, want SERVING within %v", attacker.IP, last, callGuard)
}

// overIPLimit reads cairn_grpc_connections_over_ip_limit_total from reg.
func overIPLimit(t *testing.T, reg *prometheus.Registry) float64 {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == "cairn_grpc_connections_over_ip_limit_total" && len(f.GetMetric()) == 1 {
			return f.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no cairn_grpc_connections_over_ip_limit_total in the registry")
	return 0
}
