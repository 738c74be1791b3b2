package grpcserver_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/cairnkms/cairn/internal/grpcserver"
)

// openBodyless opens n health checks on one new raw HTTP/2 connection to s
// (mTLS as clientID), each with its headers and no request, and reads what
// the server sends until it has seen the server's SETTINGS and it has
// refused n-allowed of the streams (REFUSED_STREAM), or the guard passes. It returns the server's SETTINGS_MAX_CONCURRENT_STREAMS
// (0: not sent) and how many streams it refused. The connection stays open
// until the test ends.
func openBodyless(t *testing.T, s *server, n, allowed int) (maxStreams uint32, refused int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	raw, err := (&net.Dialer{}).DialContext(ctx, "tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	conn, _, err := s.pki.ClientCredentials(clientID).ClientHandshake(ctx, "kms", raw)
	if err != nil {
		raw.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	var hdr bytes.Buffer
	enc := hpack.NewEncoder(&hdr)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "https"}, {":path", "/grpc.health.v1.Health/Check"},
		{":authority", "kms"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		if err := enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]}); err != nil {
			t.Fatal(err)
		}
	}
	fr := http2.NewFramer(conn, conn)
	if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(2*i + 1), BlockFragment: hdr.Bytes(), EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
	}
	// The guard only ends a wait that would otherwise never end.
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer conn.SetReadDeadline(time.Time{})
	settings := false
	for !settings || refused < n-allowed {
		f, err := fr.ReadFrame()
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("%d body-less streams on one connection: %d refused after 10s (SETTINGS seen: %v), want %d", n, refused, settings, n-allowed)
		}
		if err != nil {
			t.Fatalf("reading the server's frames: %v", err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			settings = settings || !f.IsAck()
			if v, ok := f.Value(http2.SettingMaxConcurrentStreams); ok {
				maxStreams = v
			}
		case *http2.RSTStreamFrame:
			if f.ErrCode == http2.ErrCodeRefusedStream {
				refused++
			}
		}
	}
	return maxStreams, refused
}

// TestStreamsPerConnectionBounded: the server advertises
// Options.MaxConcurrentStreams and refuses (REFUSED_STREAM) every stream past
// it on a connection whose calls never send their request, while a
// well-behaved client on another connection is served; with no option the
// bound is DefaultMaxConcurrentStreams, not gRPC's unlimited default.
func TestStreamsPerConnectionBounded(t *testing.T) {
	const limit, n = 8, 20
	s := startWith(t, grpcserver.Options{MaxConcurrentStreams: limit})
	s.ready.Store(true)
	got, refused := openBodyless(t, s, n, limit)
	if got != limit || refused != n-limit {
		t.Errorf("%d body-less streams on one connection: SETTINGS_MAX_CONCURRENT_STREAMS %d, %d refused; want %d and %d",
			n, got, refused, limit, n-limit)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if r, err := healthpb.NewHealthClient(s.dial(t)).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("Check beside a connection at its stream bound = %v, %v; want SERVING", r, err)
	}

	d := startWith(t, grpcserver.Options{})
	if got, _ := openBodyless(t, d, 0, 0); got != grpcserver.DefaultMaxConcurrentStreams {
		t.Errorf("default SETTINGS_MAX_CONCURRENT_STREAMS = %d, want %d", got, grpcserver.DefaultMaxConcurrentStreams)
	}
}
