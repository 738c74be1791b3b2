package rootkmsclient

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/identity/identitytest"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// electing is a replica that knows no leader for its first `noLeader`
// calls, then answers.
type electing struct {
	rootkmsv1.UnimplementedRootKMSServer
	noLeader int64
	calls    atomic.Int64
}

func (e *electing) GetRegion(context.Context, *rootkmsv1.GetRegionRequest) (*rootkmsv1.Region, error) {
	if e.calls.Add(1) <= e.noLeader {
		st, _ := status.New(codes.FailedPrecondition, "rootkms: this replica is not the leader and no leader is known; retry shortly").
			WithDetails(&errdetails.ErrorInfo{Reason: ReasonNotLeader, Domain: ErrorDomain})
		return nil, st.Err()
	}
	return &rootkmsv1.Region{Name: "us-east"}, nil
}

func startElecting(t *testing.T, pki *identitytest.PKI, noLeader int64) (*electing, string) {
	t.Helper()
	e := &electing{noLeader: noLeader}
	return e, serveReplica(t, pki, "rootkms-1", e)
}

// serveReplica serves impl as root KMS replica id on loopback, over mTLS,
// until the test ends, and returns its address.
func serveReplica(t *testing.T, pki *identitytest.PKI, id string, impl rootkmsv1.RootKMSServer) string {
	t.Helper()
	srv := grpc.NewServer(grpc.Creds(pki.ServerCredentials("spiffe://cairn.test/rootkms/global/" + id)))
	rootkmsv1.RegisterRootKMSServer(srv, impl)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { _ = srv.Serve(lis) })
	t.Cleanup(func() { srv.Stop(); wg.Wait() })
	return lis.Addr().String()
}

// TestDoWaitsOutAnElection: answers of "no leader known" are polled for up
// to the election wait, not cut off after a few hops; past it, the
// NOT_LEADER error is returned.
func TestDoWaitsOutAnElection(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	get := func(c *Client) error {
		return c.Do(t.Context(), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.GetRegion(ctx, &rootkmsv1.GetRegionRequest{Region: "us-east"})
			return err
		})
	}

	// Ten "no leader" answers (a second of election), more than maxHops.
	e, addr := startElecting(t, pki, 10)
	c := New(pki.Source("spiffe://cairn.test/regionctl/global/regionctl"), []string{addr})
	defer c.Close()
	if err := get(c); err != nil {
		t.Fatalf("Do through an election of 10 polls = %v, want success", err)
	}
	if n := e.calls.Load(); n != 11 {
		t.Errorf("calls = %d, want 11 (10 without a leader, then the answer)", n)
	}

	// A cluster that never elects: the error comes back after the wait.
	_, addr = startElecting(t, pki, 1<<40)
	c2 := New(pki.Source("spiffe://cairn.test/regionctl/global/regionctl"), []string{addr})
	defer c2.Close()
	c2.electionWait = 300 * time.Millisecond
	start := time.Now()
	err := get(c2)
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("Do with no leader ever = %v, want FailedPrecondition (NOT_LEADER)", err)
	}
	if took := time.Since(start); took < 300*time.Millisecond || took > 10*time.Second {
		t.Errorf("Do with no leader ever returned after %v, want after the 300ms election wait", took)
	}
}

// TestDoMovesPastAnUnreachableReplica: a replica that accepts TCP but never
// completes a handshake (a host that hangs) costs the connect timeout, not
// the attempt timeout: with attempts allowed an hour, the call still reaches
// the next replica well within its own deadline (gRPC's default connect
// timeout, 20 s, would not).
func TestDoMovesPastAnUnreachableReplica(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	hung, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var held []net.Conn
	var mu sync.Mutex
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			conn, err := hung.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, conn) // never answered
			mu.Unlock()
		}
	})
	t.Cleanup(func() {
		hung.Close()
		wg.Wait()
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	})
	e, addr := startElecting(t, pki, 0)
	c := New(pki.Source("spiffe://cairn.test/regionctl/global/regionctl"), []string{hung.Addr().String(), addr})
	defer c.Close()
	c.attemptTimeout = time.Hour
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	err = c.Do(ctx, func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
		_, err := cl.GetRegion(ctx, &rootkmsv1.GetRegionRequest{Region: "us-east"})
		return err
	})
	if err != nil {
		t.Fatalf("Do with a hung replica listed first = %v, want the next replica's answer", err)
	}
	if e.calls.Load() != 1 {
		t.Errorf("the live replica answered %d calls, want 1", e.calls.Load())
	}
}

// down is a replica that answers every call Unavailable, counting them.
type down struct {
	rootkmsv1.UnimplementedRootKMSServer
	calls atomic.Int64
}

func (d *down) GetRegion(context.Context, *rootkmsv1.GetRegionRequest) (*rootkmsv1.Region, error) {
	d.calls.Add(1)
	return nil, status.Error(codes.Unavailable, "test: cut off")
}

// TestDoTriesTheRememberedLeaderOnce: the leader the client remembers is
// asked first, and once per pass over the replicas, not once as the
// remembered leader and again as a configured address: a leader cut off
// from its cluster costs one attempt before the call moves on.
func TestDoTriesTheRememberedLeaderOnce(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	d := &down{}
	downAddr := serveReplica(t, pki, "rootkms-2", d)
	e, addr := startElecting(t, pki, 0)
	c := New(pki.Source("spiffe://cairn.test/regionctl/global/regionctl"), []string{downAddr, addr})
	defer c.Close()
	c.leader = downAddr
	err := c.Do(t.Context(), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
		_, err := cl.GetRegion(ctx, &rootkmsv1.GetRegionRequest{Region: "us-east"})
		return err
	})
	if err != nil {
		t.Fatalf("Do = %v, want the second replica's answer", err)
	}
	if got, want := [2]int64{d.calls.Load(), e.calls.Load()}, [2]int64{1, 1}; got != want {
		t.Errorf("calls (remembered leader, other replica) = %v, want %v", got, want)
	}
}

// redirecting is a replica that, for its first call, redirects to the
// leader at to (a stale leader), and then answers.
type redirecting struct {
	rootkmsv1.UnimplementedRootKMSServer
	to    string
	calls atomic.Int64
}

func (r *redirecting) GetRegion(context.Context, *rootkmsv1.GetRegionRequest) (*rootkmsv1.Region, error) {
	if r.calls.Add(1) == 1 {
		st, _ := status.New(codes.FailedPrecondition, "rootkms: not the leader").
			WithDetails(&errdetails.ErrorInfo{Reason: ReasonNotLeader, Domain: ErrorDomain, Metadata: map[string]string{LeaderAddressKey: r.to}})
		return nil, st.Err()
	}
	return &rootkmsv1.Region{Name: "us-east"}, nil
}

// TestDoAsksAgainAfterAStaleRedirect: while Do waits out an election it
// keeps asking the replicas it followed a redirect from, not only the one
// that knows no leader: a replica that redirected to a leader that has
// gone (a stale leader) may be the next leader. Here A knows no leader for
// ever and B redirects to A once, then serves: the call must succeed at B
// within the election wait.
func TestDoAsksAgainAfterAStaleRedirect(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	a, aAddr := startElecting(t, pki, 1<<40)
	b := &redirecting{to: aAddr}
	bAddr := serveReplica(t, pki, "rootkms-2", b)
	c := New(pki.Source("spiffe://cairn.test/regionctl/global/regionctl"), []string{bAddr, aAddr})
	defer c.Close()
	c.electionWait = 2 * time.Second
	err := c.Do(t.Context(), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
		_, err := cl.GetRegion(ctx, &rootkmsv1.GetRegionRequest{Region: "us-east"})
		return err
	})
	if err != nil {
		t.Fatalf("Do with a stale redirect to a replica that knows no leader = %v, want B's answer", err)
	}
	if n := b.calls.Load(); n != 2 {
		t.Errorf("calls to B = %d, want 2 (the redirect, then the answer)", n)
	}
	t.Logf("A was asked %d times", a.calls.Load())
}

// TestDoReconnectsOnceAReplicaIsBack: after a replica was down through many
// failed calls, the client does not wait out a grown reconnect backoff once
// it is back: the call that finds the connection still failing resets its
// backoff, so at the latest the next call reaches the replica.
func TestDoReconnectsOnceAReplicaIsBack(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close() // down: connections to addr are refused
	c := New(pki.Source("spiffe://cairn.test/regionctl/global/regionctl"), []string{addr})
	defer c.Close()
	c.electionWait = 0
	get := func() error {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		return c.Do(ctx, func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.GetRegion(ctx, &rootkmsv1.GetRegionRequest{Region: "us-east"})
			return err
		})
	}
	for i := range 12 {
		if err := get(); status.Code(err) != codes.Unavailable {
			t.Fatalf("call %d with the replica down = %v, want Unavailable", i, err)
		}
		time.Sleep(250 * time.Millisecond)
	}

	srv := grpc.NewServer(grpc.Creds(pki.ServerCredentials("spiffe://cairn.test/rootkms/global/rootkms-1")))
	rootkmsv1.RegisterRootKMSServer(srv, &electing{})
	back, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { _ = srv.Serve(back) })
	defer func() { srv.Stop(); wg.Wait() }()
	first := get()
	if err := get(); err != nil {
		t.Fatalf("second call after the replica came back = %v (first: %v), want success: the failed call resets the reconnect backoff", err, first)
	}
}
