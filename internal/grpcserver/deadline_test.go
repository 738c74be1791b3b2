package grpcserver_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/cairnkms/cairn/internal/grpcserver"
)

// nothingDo is the one method the test servers' policy allows (startWith).
const nothingDo = "/cairn.test.v1.Nothing/Do"

// callGuard ends a test's wait that would otherwise never end; it is far
// above every bound the tests set, so it waits for them and does not time
// them.
const callGuard = 30 * time.Second

// blocker serves nothingDo: it reads its request (an empty message), then
// reports the deadline its context has and blocks until the context ends,
// and fails with the context's error. It counts the calls that entered it
// and those still in it, from before their request is read.
type blocker struct {
	entered, active atomic.Int32
	seen            chan seenCall
}

// seenCall is what one call's handler saw.
type seenCall struct {
	deadline time.Time
	ok       bool  // the context had a deadline
	err      error // the context's error once it ended
}

func newBlocker() *blocker { return &blocker{seen: make(chan seenCall, 64)} }

func (b *blocker) register(s *grpc.Server) {
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: "cairn.test.v1.Nothing",
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{MethodName: "Do", Handler: func(_ any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
			b.entered.Add(1)
			b.active.Add(1)
			defer b.active.Add(-1)
			in := &emptypb.Empty{}
			if err := dec(in); err != nil {
				return nil, err
			}
			return interceptor(ctx, in, &grpc.UnaryServerInfo{FullMethod: nothingDo}, func(ctx context.Context, _ any) (any, error) {
				d, ok := ctx.Deadline()
				<-ctx.Done()
				b.seen <- seenCall{deadline: d, ok: ok, err: ctx.Err()}
				return nil, ctx.Err()
			})
		}}},
	}, nil)
}

// next is the next call the handler saw, or a failure after callGuard.
func (b *blocker) next(t *testing.T) seenCall {
	t.Helper()
	select {
	case s := <-b.seen:
		return s
	case <-time.After(callGuard):
		t.Fatalf("no call reached the handler's end within %v", callGuard)
		return seenCall{}
	}
}

// unbounded returns a context without a deadline (so the client sends
// none) that the guard cancels, should the call never end.
func unbounded(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	stop := time.AfterFunc(callGuard, cancel)
	t.Cleanup(func() { stop.Stop(); cancel() })
	return ctx
}

// TestCallWithoutDeadlineCutAtMaxCallDuration: a call whose client sent no
// deadline and whose handler waits for its context gets the server's
// bound: the handler sees a deadline and its context ends with
// DeadlineExceeded, and the client gets DEADLINE_EXCEEDED.
func TestCallWithoutDeadlineCutAtMaxCallDuration(t *testing.T) {
	b := newBlocker()
	s := startServing(t, grpcserver.Options{MaxCallDuration: 300 * time.Millisecond}, b.register)
	err := s.dial(t).Invoke(unbounded(t), nothingDo, &emptypb.Empty{}, &emptypb.Empty{})
	if status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("call without a deadline on a handler that waits = %v, want DEADLINE_EXCEEDED", err)
	}
	if seen := b.next(t); !seen.ok || !errors.Is(seen.err, context.DeadlineExceeded) {
		t.Errorf("handler saw deadline %v (set: %v), ended with %v; want the server's deadline and DeadlineExceeded", seen.deadline, seen.ok, seen.err)
	}
}

// TestClientDeadlineKept: a client's deadline earlier than the server's
// bound is the one the handler sees (the bound is an hour; the call ends
// with the client's 300 ms), and a client's deadline later than the bound
// gives way to it (an hour's deadline, a 300 ms bound).
func TestClientDeadlineKept(t *testing.T) {
	for _, tc := range []struct {
		name          string
		bound, client time.Duration
	}{
		{"client's deadline earlier", time.Hour, 300 * time.Millisecond},
		{"client's deadline later", 300 * time.Millisecond, time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBlocker()
			s := startServing(t, grpcserver.Options{MaxCallDuration: tc.bound}, b.register)
			ctx, cancel := context.WithTimeout(t.Context(), tc.client)
			defer cancel()
			// The guard cancels a call that the bound did not end (the
			// client's deadline, sent with the call, stays an hour).
			defer time.AfterFunc(callGuard, cancel).Stop()
			start := time.Now()
			err := s.dial(t).Invoke(ctx, nothingDo, &emptypb.Empty{}, &emptypb.Empty{})
			if status.Code(err) != codes.DeadlineExceeded {
				t.Errorf("call = %v, want DEADLINE_EXCEEDED", err)
			}
			seen := b.next(t)
			// The earlier of the two is 300 ms away, the later an hour:
			// a deadline within a minute of the start is the earlier one.
			if !seen.ok || !seen.deadline.Before(start.Add(time.Minute)) {
				t.Errorf("handler saw deadline %v (set: %v) for a call started at %v; want the earlier one, %v after the start", seen.deadline, seen.ok, start, min(tc.bound, tc.client))
			}
		})
	}
}

// TestWithheldRequestCut: calls that open and never send their request
// (a grpc-go client's stream without a message; raw HTTP/2 streams with
// headers only, or with a gRPC frame header announcing 64 bytes and 3 of
// them), with no deadline of their client, are ended by the server at
// MaxCallDuration with DEADLINE_EXCEEDED; by then every call that entered
// the handler has left it (its goroutine let go), while the connections
// stay open and the server answers the next call on the same connection.
func TestWithheldRequestCut(t *testing.T) {
	const raw = 8
	b := newBlocker()
	s := startServing(t, grpcserver.Options{MaxCallDuration: 300 * time.Millisecond}, b.register)
	s.ready.Store(true)
	cc := s.dial(t)
	st, err := cc.NewStream(unbounded(t), &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}, nothingDo)
	if err != nil {
		t.Fatal(err)
	}
	ended := withheldRaw(t, s, raw)
	if err := st.RecvMsg(&emptypb.Empty{}); status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("grpc-go call that never sent its request = %v, want DEADLINE_EXCEEDED", err)
	}
	for i, c := range ended {
		if c != "4" {
			t.Errorf("raw HTTP/2 call %d that never finished its request ended with grpc-status %q, want 4 (DEADLINE_EXCEEDED)", i, c)
		}
	}
	if n, a := b.entered.Load(), b.active.Load(); n != raw+1 || a != 0 {
		t.Errorf("withheld calls: %d entered the handler, %d still in it; want %d and 0", n, a, raw+1)
	}
	ctx, cancel := context.WithTimeout(t.Context(), callGuard)
	defer cancel()
	if r, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("Check on the connection of a cut call = %v, %v; want SERVING", r, err)
	}
}

// withheldRaw opens n calls of nothingDo on one new raw HTTP/2 connection
// (mTLS as clientID), the even ones with headers only, the odd ones with a
// gRPC frame header announcing a 64-byte request and 3 bytes of it, and
// reads the server's frames until every call has ended with trailers. It
// returns each call's grpc-status. The connection stays open until the test
// ends.
func withheldRaw(t *testing.T, s *server, n int) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), callGuard)
	defer cancel()
	tcp, err := (&net.Dialer{}).DialContext(ctx, "tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	conn, _, err := s.pki.ClientCredentials(clientID).ClientHandshake(ctx, "kms", tcp)
	if err != nil {
		tcp.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	var hdr bytes.Buffer
	enc := hpack.NewEncoder(&hdr)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "https"}, {":path", nothingDo},
		{":authority", "kms"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		if err := enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]}); err != nil {
			t.Fatal(err)
		}
	}
	fr := http2.NewFramer(conn, conn)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		id := uint32(2*i + 1)
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hdr.Bytes(), EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
		if i%2 == 1 {
			if err := fr.WriteData(id, false, append(binary.BigEndian.AppendUint32([]byte{0}, 64), 1, 2, 3)); err != nil {
				t.Fatal(err)
			}
		}
	}
	_ = conn.SetReadDeadline(time.Now().Add(callGuard))
	defer conn.SetReadDeadline(time.Time{})
	got := map[uint32]string{}
	for len(got) < n {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("%d calls that never finished their request: %d ended, then reading the server's frames: %v", n, len(got), err)
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			if v := f.PseudoValue("status"); v != "" && v != "200" {
				t.Fatalf("stream %d: HTTP status %s", f.StreamID, v)
			}
			for _, h := range f.RegularFields() {
				if h.Name == "grpc-status" {
					got[f.StreamID] = h.Value
				}
			}
		case *http2.RSTStreamFrame:
			// After its trailers the server resets a stream whose client
			// has not finished sending (NO_ERROR); before them, a reset is
			// no answer.
			if _, ok := got[f.StreamID]; !ok {
				t.Fatalf("stream %d reset (%v) before its trailers", f.StreamID, f.ErrCode)
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				if err := fr.WritePing(true, f.Data); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	out := make([]string, n)
	for i := range n {
		out[i] = got[uint32(2*i+1)]
		if out[i] == "" {
			out[i] = "(none for stream " + strconv.Itoa(2*i+1) + ")"
		}
	}
	return out
}

// TestHealthWatchOutlivesMaxCallDuration: a health watch, exempt from the
// bound, still delivers the next status after a bounded call opened after
// it has been cut at the bound.
func TestHealthWatchOutlivesMaxCallDuration(t *testing.T) {
	b := newBlocker()
	s := startServing(t, grpcserver.Options{MaxCallDuration: 300 * time.Millisecond}, b.register)
	cc := s.dial(t)
	w, err := healthpb.NewHealthClient(cc).Watch(unbounded(t), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := w.Recv(); err != nil || m.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("Watch first = %v, %v; want NOT_SERVING", m, err)
	}
	// A bounded call opened after the watch: once it is cut, the bound has
	// passed since the watch began.
	if err := cc.Invoke(unbounded(t), nothingDo, &emptypb.Empty{}, &emptypb.Empty{}); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("bounded call = %v, want DEADLINE_EXCEEDED", err)
	}
	s.ready.Store(true)
	if m, err := w.Recv(); err != nil || m.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("Watch after the bound passed = %v, %v; want SERVING (the watch still open)", m, err)
	}
}
