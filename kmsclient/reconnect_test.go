package kmsclient_test

import (
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/kmsclient"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// restartable is a fake KMS that can be stopped and started again on the
// same address, as a killed and restarted server is.
type restartable struct {
	*fakeKMS
	t   *testing.T
	pki *identitytest.PKI
	id  string
	mu  sync.Mutex
	srv *grpc.Server
	wg  sync.WaitGroup
}

func startRestartable(t *testing.T, pki *identitytest.PKI, id string) *restartable {
	t.Helper()
	r := &restartable{fakeKMS: &fakeKMS{}, t: t, pki: pki, id: id}
	r.set(answerCode(codes.OK))
	r.addr = "127.0.0.1:0"
	r.start()
	t.Cleanup(r.stop)
	return r
}

func (r *restartable) start() {
	r.t.Helper()
	lis, err := net.Listen("tcp", r.addr)
	if err != nil {
		r.t.Fatal(err)
	}
	r.addr = lis.Addr().String()
	srv := grpc.NewServer(grpc.Creds(r.pki.ServerCredentials(r.id)))
	kmsv1.RegisterKMSServer(srv, r.fakeKMS)
	r.mu.Lock()
	r.srv = srv
	r.mu.Unlock()
	r.wg.Go(func() { srv.Serve(lis) })
}

func (r *restartable) stop() {
	r.mu.Lock()
	srv := r.srv
	r.srv = nil
	r.mu.Unlock()
	if srv != nil {
		srv.Stop()
	}
	r.wg.Wait()
}

// TestFallbackToReconnectingRegion: a decrypt whose region is down falls
// back to a region whose servers were down a while ago and are back, while
// this client's connections to them still wait out gRPC's reconnect backoff
// (fail-fast TRANSIENT_FAILURE). The call must reconnect and succeed, not
// spend its attempts in milliseconds on connections that only look dead.
func TestFallbackToReconnectingRegion(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	w1 := startRestartable(t, pki, "spiffe://cairn.test/kms/us-west/fake-1")
	w2 := startRestartable(t, pki, "spiffe://cairn.test/kms/us-west/fake-2")
	c := fakeClient(t, pki, kmsclient.WithEndpoints(east, deadAddr(t), deadAddr(t)), kmsclient.WithEndpoints(west, w1.addr, w2.addr),
		kmsclient.WithDecryptFallback(east, west))
	westAEAD, eastAEAD := aeadOf(t, c, west, ledger), aeadOf(t, c, east, ledger)
	if _, err := westAEAD.Decrypt([]byte("ct"), nil); err != nil {
		t.Fatalf("Decrypt in us-west = %v", err)
	}
	// us-west goes down; this client's calls there fail until its
	// connections back off.
	w1.stop()
	w2.stop()
	for range 4 {
		if _, err := westAEAD.Decrypt([]byte("ct"), nil); status.Code(err) != codes.Unavailable {
			t.Fatalf("Decrypt in us-west while it is down = %v, want Unavailable", err)
		}
	}
	w1.start()
	w2.start()
	for i := range 20 {
		start := time.Now()
		if _, err := eastAEAD.Decrypt([]byte("ct"), nil); err != nil {
			t.Fatalf("decrypt %d in us-east (down) with us-west back = %v after %v", i, err, time.Since(start))
		}
	}
}
