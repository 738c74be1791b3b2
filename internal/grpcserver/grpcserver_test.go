package grpcserver_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/grpcserver"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
)

const (
	serverID = "spiffe://cairn.test/kms/us-east/kms-1"
	clientID = "spiffe://cairn.test/client/us-east/demo"
)

type server struct {
	addr  string
	ready *atomic.Bool
	audit *syncWriter
	pki   *identitytest.PKI
}

// start serves a grpcserver with only the built-in services (health, and
// reflection if asked) on 127.0.0.1. The access policy names one method no
// service implements, which the server needs to start.
func start(t *testing.T, reflection bool) *server {
	t.Helper()
	return startWith(t, grpcserver.Options{Reflection: reflection})
}

// startWith is start with more options (Source, Audit, Policy and Ready are
// the test's).
func startWith(t *testing.T, opts grpcserver.Options) *server {
	t.Helper()
	return startServing(t, opts, nil)
}

// startServing is startWith that lets register add services before the
// server serves (nil: none).
func startServing(t *testing.T, opts grpcserver.Options, register func(*grpc.Server)) *server {
	t.Helper()
	pki := identitytest.New(t, spiffeid.RequireTrustDomainFromString("cairn.test"))
	w := &syncWriter{}
	alog := audit.NewWriter(w, audit.Options{})
	s := &server{ready: new(atomic.Bool), audit: w, pki: pki}
	opts.Source, opts.Audit = pki.Source(serverID), alog
	opts.Policy = identity.Policy{"/cairn.test.v1.Nothing/Do": identity.AllowAny()}
	opts.Ready = func() (bool, string) { return s.ready.Load(), "still loading the bundle" }
	srv, err := grpcserver.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if register != nil {
		register(srv)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Stop(); <-done; alog.Close() })
	s.addr = lis.Addr().String()
	return s
}

// syncWriter lets the test read what the audit log wrote while it writes.
type syncWriter struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (w *syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

func (w *syncWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

func (s *server) dial(t *testing.T) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(s.pki.ClientCredentials(clientID)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func TestNewNeedsReadiness(t *testing.T) {
	pki := identitytest.New(t, spiffeid.RequireTrustDomainFromString("cairn.test"))
	_, err := grpcserver.New(grpcserver.Options{Source: pki.Source(serverID), Audit: audit.NewWriter(&bytes.Buffer{}, audit.Options{}),
		Policy: identity.Policy{"/x.y/Z": identity.AllowAny()}})
	if err == nil || !strings.Contains(err.Error(), "readiness") {
		t.Errorf("New without Ready: err = %v, want one naming the readiness function", err)
	}
}

// TestHealth: grpc.health.v1 follows the server's readiness, says why it is
// not serving, refuses an unknown service, and a watch sees the change.
func TestHealth(t *testing.T) {
	s := start(t, false)
	h := healthpb.NewHealthClient(s.dial(t))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	var hdr metadata.MD
	resp, err := h.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Header(&hdr))
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("Check (not ready) = %v, %v; want NOT_SERVING", resp, err)
	}
	if got := hdr.Get("cairn-not-ready-reason"); len(got) != 1 || got[0] != "still loading the bundle" {
		t.Errorf("not-ready reason header = %q, want the readiness reason", got)
	}
	if _, err := h.Check(ctx, &healthpb.HealthCheckRequest{Service: "no.such.Service"}); status.Code(err) != codes.NotFound {
		t.Errorf("Check(unknown service) = %v, want NotFound", err)
	}
	w, err := h.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := w.Recv(); err != nil || m.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("Watch first = %v, %v; want NOT_SERVING", m, err)
	}
	s.ready.Store(true)
	if m, err := w.Recv(); err != nil || m.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Watch after ready = %v, %v; want SERVING", m, err)
	}
	if resp, err := h.Check(ctx, &healthpb.HealthCheckRequest{Service: "grpc.health.v1.Health"}); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("Check(grpc.health.v1.Health) = %v, %v; want SERVING", resp, err)
	}
	list, err := h.List(ctx, &healthpb.HealthListRequest{})
	if err != nil || list.GetStatuses()[""].GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("List = %v, %v; want the server SERVING", list, err)
	}
	if strings.Contains(s.audit.String(), "grpc.health.v1") {
		t.Errorf("health polls were audited:\n%s", s.audit.String())
	}
}

// listServices asks the reflection service for the service names.
func listServices(ctx context.Context, conn *grpc.ClientConn) ([]string, error) {
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		return nil, err
	}
	// A Send that finds the stream already ended by the server returns
	// io.EOF; the status is then Recv's (as grpc-go documents).
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil && err != io.EOF {
		return nil, err
	}
	resp, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	stream.CloseSend()
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	_, _ = stream.Recv() // the end of the stream, so its audit record is written
	return names, nil
}

// TestReflection: reflection lists the services when on, is refused when
// off, and every use is audited with the caller.
func TestReflection(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	on := start(t, true)
	names, err := listServices(ctx, on.dial(t))
	if err != nil || !slices.Contains(names, "grpc.health.v1.Health") || !slices.Contains(names, "grpc.reflection.v1.ServerReflection") {
		t.Fatalf("reflection list = %v, %v; want the health and reflection services", names, err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(on.audit.String(), "ServerReflectionInfo") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := on.audit.String(); !strings.Contains(got, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo") || !strings.Contains(got, clientID) {
		t.Errorf("audit log after reflection = %q, want a record of the call and the caller", got)
	}

	off := start(t, false)
	if _, err := listServices(ctx, off.dial(t)); status.Code(err) != codes.Unimplemented {
		t.Errorf("reflection with Reflection off = %v, want Unimplemented", err)
	}
}

// TestSlowHandshakeCutOff: connections that never complete a handshake
// (slow-loris) are closed by the server once HandshakeTimeout passes, and a
// well-behaved client is served meanwhile.
func TestSlowHandshakeCutOff(t *testing.T) {
	s := startWith(t, grpcserver.Options{HandshakeTimeout: 200 * time.Millisecond})
	var loris []net.Conn
	for range 20 {
		c, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		loris = append(loris, c)
		// One byte of a TLS record header, then nothing.
		if _, err := c.Write([]byte{0x16}); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, c := range loris {
			c.Close()
		}
	})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(s.dial(t)).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health check beside 20 stalled handshakes = %v", err)
	}
	for i, c := range loris {
		// The guard is far above the timeout: this waits for the close,
		// it does not time it.
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := io.ReadAll(c)
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatalf("connection %d with a stalled handshake still open after 10s", i)
		}
	}
}
