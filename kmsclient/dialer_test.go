package kmsclient_test

import (
	"bytes"
	"context"
	"net"
	"sync/atomic"
	"testing"

	"github.com/cairnkms/cairn/kmsclient"
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
