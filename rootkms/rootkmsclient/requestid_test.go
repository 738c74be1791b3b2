package rootkmsclient

import (
	"context"
	"net"
	"regexp"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/identity/identitytest"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// flaky is a replica whose RotateRegionKey fails in every way that leaves a
// write's outcome unknown, in turn, before it answers; it records the
// request IDs each attempt carried.
type flaky struct {
	rootkmsv1.UnimplementedRootKMSServer

	mu  sync.Mutex
	ids [][]string // the x-request-id values of each attempt
}

func (f *flaky) RotateRegionKey(ctx context.Context, req *rootkmsv1.RotateRegionKeyRequest) (*rootkmsv1.Region, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	f.mu.Lock()
	f.ids = append(f.ids, md.Get(RequestIDHeader))
	n := len(f.ids)
	f.mu.Unlock()
	switch n % 4 {
	case 1: // stalled past the attempt's timeout (the write may still commit)
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	case 2: // the leader lost its leadership with the write in flight
		st, _ := status.New(codes.Unavailable, "rootkms: raft: leadership lost while committing log").
			WithDetails(&errdetails.ErrorInfo{Reason: ReasonOutcomeUnknown, Domain: ErrorDomain})
		return nil, st.Err()
	case 3: // a transport failure
		return nil, status.Error(codes.Unavailable, "connection reset")
	}
	return &rootkmsv1.Region{Name: req.GetRegion(), PrimaryVersion: 2}, nil
}

func (f *flaky) attempts() [][]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([][]string(nil), f.ids...)
}

func startFlaky(t *testing.T, pki *identitytest.PKI) (*flaky, string) {
	t.Helper()
	f := &flaky{}
	srv := grpc.NewServer(grpc.Creds(pki.ServerCredentials("spiffe://cairn.test/rootkms/global/rootkms-1")))
	rootkmsv1.RegisterRootKMSServer(srv, f)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { _ = srv.Serve(lis) })
	t.Cleanup(func() { srv.Stop(); wg.Wait() })
	return f, lis.Addr().String()
}

// wellFormed is what the audit interceptor keeps of a client's request ID.
var wellFormed = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,64}$`)

// TestDoSendsOneRequestIDOnEveryAttempt: an attempt cut short by the
// attempt timeout, an OUTCOME_UNKNOWN answer and a transport failure are
// retried, and every attempt of one Do carries the same well-formed request
// ID (its own, or the one the caller pinned with WithRequestID); another Do
// gets another ID.
func TestDoSendsOneRequestIDOnEveryAttempt(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	f, addr := startFlaky(t, pki)
	c := New(pki.Source("spiffe://cairn.test/regionctl/global/regionctl"), []string{addr})
	defer c.Close()
	c.attemptTimeout = 200 * time.Millisecond
	rotate := func(ctx context.Context) (*rootkmsv1.Region, error) {
		var out *rootkmsv1.Region
		err := c.Do(ctx, func(ctx context.Context, rc rootkmsv1.RootKMSClient) error {
			var err error
			out, err = rc.RotateRegionKey(ctx, &rootkmsv1.RotateRegionKeyRequest{Region: "us-east"})
			return err
		})
		return out, err
	}

	const pinned = "regionctl-rotate:us-east.2"
	var got []string // the ID of each Do
	for i, ctx := range []context.Context{t.Context(), t.Context(), WithRequestID(t.Context(), pinned)} {
		before := len(f.attempts())
		r, err := rotate(ctx)
		if err != nil || r.GetPrimaryVersion() != 2 {
			t.Fatalf("Do #%d = %v, %v; want success after three retried attempts", i, r, err)
		}
		attempts := f.attempts()[before:]
		if len(attempts) != 4 {
			t.Errorf("Do #%d made %d attempts, want 4 (timeout, OUTCOME_UNKNOWN, transport failure, success)", i, len(attempts))
		}
		for j, ids := range attempts {
			if len(ids) != 1 || !wellFormed.MatchString(ids[0]) {
				t.Fatalf("Do #%d attempt %d: x-request-id = %q, want exactly one well-formed ID", i, j, ids)
			}
			if ids[0] != attempts[0][0] {
				t.Errorf("Do #%d attempt %d: x-request-id = %q, want %q as on its first attempt", i, j, ids[0], attempts[0][0])
			}
		}
		got = append(got, attempts[0][0])
	}
	if got[0] == got[1] {
		t.Errorf("two Do calls sent the same request ID %q, want one each", got[0])
	}
	if got[2] != pinned {
		t.Errorf("Do with WithRequestID(%q) sent %q", pinned, got[2])
	}
}

// TestWithRequestIDReplaces: pinning an ID over one already in the context
// leaves exactly one value (the server ignores a header sent twice).
func TestWithRequestIDReplaces(t *testing.T) {
	ctx := metadata.AppendToOutgoingContext(t.Context(), RequestIDHeader, "first", "other-key", "v")
	ctx = WithRequestID(ctx, "second")
	md, _ := metadata.FromOutgoingContext(ctx)
	if got := md.Get(RequestIDHeader); len(got) != 1 || got[0] != "second" {
		t.Errorf("x-request-id after WithRequestID = %q, want [second]", got)
	}
	if got := md.Get("other-key"); len(got) != 1 {
		t.Errorf("other-key after WithRequestID = %q, want it kept", got)
	}
	if got := RequestIDFrom(ctx); got != "second" {
		t.Errorf("RequestIDFrom = %q, want second", got)
	}
	if id := NewRequestID(); !wellFormed.MatchString(id) || len(id) > MaxRequestIDLen {
		t.Errorf("NewRequestID() = %q, not a well-formed request ID", id)
	}
}
