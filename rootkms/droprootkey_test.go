package rootkms_test

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms"
)

// gatedDistributor hands out the chain's RMK like an unsealed distributor.
// With hold set, the next hand-out seals the key to the caller and then
// waits on gate before answering (a response in flight); with sealed set it
// refuses, as an emergency-sealed distributor does.
type gatedDistributor struct {
	distributorv1.UnimplementedDistributorServer
	c        *chain
	hold     atomic.Bool
	sealed   atomic.Bool
	held     chan struct{} // closed once a held hand-out has sealed the key
	gate     chan struct{} // closing it lets the held hand-out answer
	refusals atomic.Int64
}

func (g *gatedDistributor) FetchRootKey(ctx context.Context, req *distributorv1.FetchRootKeyRequest) (*distributorv1.FetchRootKeyResponse, error) {
	hold := g.hold.CompareAndSwap(true, false)
	if g.sealed.Load() && !hold {
		g.refusals.Add(1)
		return nil, status.Error(codes.FailedPrecondition, "gatedDistributor: sealed")
	}
	caller, _ := identity.FromContext(ctx)
	info, err := hpkeseal.Info("cairn/distributor/v1/root-key", g.c.manifest.GetGenesisId(), caller.String())
	if err != nil {
		return nil, err
	}
	raw := g.c.rmk.Data()
	sealed, err := hpkeseal.Seal(req.GetRecipient(), info, raw)
	clear(raw)
	if hold {
		close(g.held)
		<-g.gate
	}
	return &distributorv1.FetchRootKeyResponse{SealedRootKey: sealed, GenesisId: g.c.manifest.GetGenesisId()}, err
}

// startGatedDistributor serves g on a loopback port and has every replica
// started after it fetch the root key from it alone.
func (c *chain) startGatedDistributor(t *testing.T) *gatedDistributor {
	t.Helper()
	g := &gatedDistributor{c: c, held: make(chan struct{}), gate: make(chan struct{})}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(c.pki.ServerCredentials("spiffe://cairn.test/distributor/global/gated")),
		grpc.UnaryInterceptor(identity.UnaryServerInterceptor()))
	distributorv1.RegisterDistributorServer(srv, g)
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Stop(); <-done })
	c.configure = func(_ string, cfg *rootkms.Config) { cfg.Distributors = []string{lis.Addr().String()} }
	return g
}

// TestDropRootKeyDiscardsFetchInFlight: an emergency seal seals the
// distributors, then drops the key on every replica. A replica whose fetch
// was already handed the key (it was refetching after an earlier drop) must
// not install it when the answer arrives after the drop: it would hold the
// key with the whole fleet sealed. It fetches again, is refused, and holds
// the key again only once a distributor hands it out anew.
func TestDropRootKeyDiscardsFetchInFlight(t *testing.T) {
	c := newChain(t)
	g := c.startGatedDistributor(t)
	r1 := c.startReplica("rootkms-1", true, false)
	if err := r1.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	officer := c.rawClient(t, "spiffe://cairn.test/officer/global/officer-1", r1.api)

	// A drill drop: the replica refetches, and the distributor holds its
	// answer after sealing the key to it.
	g.hold.Store(true)
	if _, err := officer.DropRootKey(bg(t), &rootkmsv1.DropRootKeyRequest{Reason: "drill"}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.held:
	case <-bg(t).Done():
		t.Fatal("the replica did not fetch the root key again after the drill drop")
	}

	// The emergency seal: the distributor seals, then the replica's key is
	// dropped, with the hand-out still in flight.
	g.sealed.Store(true)
	if _, err := officer.DropRootKey(bg(t), &rootkmsv1.DropRootKeyRequest{Reason: "emergency seal"}); err != nil {
		t.Fatal(err)
	}
	close(g.gate)

	// The replica fetches one at a time: a refusal after the release means
	// the held fetch has finished (installed or discarded its key).
	for deadline := time.Now().Add(20 * time.Second); g.refusals.Load() == 0 && !r1.srv.HasRootKey(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the replica neither installed the key nor fetched again within 20s of the held answer")
		}
	}
	if r1.srv.HasRootKey() {
		t.Fatal("the replica installed a root key fetched before an emergency DropRootKey: it holds the key with every distributor sealed")
	}
	if ready, why := r1.srv.Readiness(); ready {
		t.Errorf("Readiness after the emergency drop = ready, want not ready (%s)", why)
	}
	if loads := keyLoads(t, r1); loads != 1 {
		t.Errorf("root-key-loaded audit records = %d, want 1 (at boot; the key fetched before the drop was discarded)", loads)
	}

	// Unsealed again (a ceremony), the distributor hands the key out and
	// the replica loads it.
	g.sealed.Store(false)
	if err := r1.srv.WaitReady(bg(t)); err != nil {
		t.Fatalf("no root key once the distributor is unsealed: %v", err)
	}
}
