package kmsclient_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cairnkms/cairn/kmsclient"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// TestWithContextDialer: the client connects through the dialer given (an
// endpoint name nothing resolves, mapped by the dialer to the server), and
// mTLS runs over that connection as over TCP.
func TestWithContextDialer(t *testing.T) {
	w := testWorld(t)
	s := w.startKMS(east, "kms-1")
	var dials atomic.Int32
	dial := func(ctx context.Context, addr string) (net.Conn, error) {
		if addr != "kms-1.us-east.invalid:7001" {
			t.Errorf("dialer got address %q, want the endpoint as given", addr)
		}
		dials.Add(1)
		var d net.Dialer
		return d.DialContext(ctx, "tcp", s.addr)
	}
	c := w.client(appID, kmsclient.WithEndpoints(east, "kms-1.us-east.invalid:7001"), kmsclient.WithContextDialer(dial))
	a := aeadOf(t, c, east, ledger)
	ct, err := a.EncryptWithContext(ctxFor(t), []byte("dek"), []byte("ad"))
	if err != nil {
		t.Fatalf("Encrypt through the dialer = %v", err)
	}
	pt, err := a.DecryptWithContext(ctxFor(t), ct, []byte("ad"))
	if err != nil || !bytes.Equal(pt, []byte("dek")) {
		t.Fatalf("Decrypt through the dialer = %q, %v", pt, err)
	}
	if dials.Load() == 0 {
		t.Error("the dialer was never called")
	}
}

// TestReconnectsAtOnceWhenBack: a server that was unreachable and is back is
// used by the next call, although gRPC's reconnect backoff (a minute here)
// has not run out: a failed attempt resets it. Without that, every attempt
// of the call fails at once while the connection waits out its backoff.
func TestReconnectsAtOnceWhenBack(t *testing.T) {
	w := testWorld(t)
	s := w.startKMS(east, "kms-1")
	var down atomic.Bool
	down.Store(true)
	dial := func(ctx context.Context, addr string) (net.Conn, error) {
		if down.Load() {
			return nil, errors.New("host unreachable (test)")
		}
		var d net.Dialer
		return d.DialContext(ctx, "tcp", s.addr)
	}
	slowReconnect := grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: time.Minute, Multiplier: 1, MaxDelay: time.Minute}, MinConnectTimeout: time.Second})
	c := w.client(appID, kmsclient.WithEndpoints(east, s.addr), kmsclient.WithContextDialer(dial), kmsclient.WithDialOptions(slowReconnect))
	a := aeadOf(t, c, east, ledger)

	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	if _, err := a.EncryptWithContext(ctx, []byte("dek"), nil); err == nil {
		t.Fatal("Encrypt while the server is unreachable succeeded")
	}
	down.Store(false)
	ctx2, cancel2 := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel2()
	if _, err := a.EncryptWithContext(ctx2, []byte("dek"), nil); err != nil {
		t.Fatalf("Encrypt once the server is reachable again = %v, want success (the reconnect backoff is reset by the failure)", err)
	}
}
