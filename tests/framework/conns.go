package framework

import (
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/cairnkms/cairn/internal/identity"
)

// connCache holds one mTLS connection per caller identity to one server
// address, made on first use and closed when the test ends. The server must
// present an identity matching serverPattern.
type connCache struct {
	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

// get returns the connection to addr as caller name.
func (c *connCache) get(w *World, addr, name, serverPattern string) *grpc.ClientConn {
	w.T.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if cc, ok := c.conns[name]; ok {
		return cc
	}
	src := w.Source(name)
	only, err := identity.ParseAllowlist(src.TrustDomain(), serverPattern)
	if err != nil {
		w.T.Fatal(err)
	}
	cc, err := grpc.NewClient(addr, append(w.dialOptions(),
		grpc.WithTransportCredentials(identity.ClientCredentials(src, only.Authorize)),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.5, MaxDelay: 200 * time.Millisecond}, MinConnectTimeout: time.Second}))...)
	if err != nil {
		w.T.Fatalf("grpc.NewClient(%s) = %v", addr, err)
	}
	if c.conns == nil {
		c.conns = map[string]*grpc.ClientConn{}
	}
	c.conns[name] = cc
	w.T.Cleanup(func() { cc.Close() })
	return cc
}

// dialOptions are the options every framework connection adds: the World's
// Dialer, if set.
func (w *World) dialOptions() []grpc.DialOption {
	if w.Dialer == nil {
		return nil
	}
	return []grpc.DialOption{grpc.WithContextDialer(w.Dialer)}
}
