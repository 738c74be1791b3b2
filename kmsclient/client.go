package kmsclient

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tink-crypto/tink-go/v2/core/registry"
	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// ErrClosed is returned by calls made after Close.
var ErrClosed = errors.New("kmsclient: client is closed")

// Connection settings. A refused or dropped connection is retried by gRPC
// with a backoff of its own, capped at connectMaxDelay so that a KMS server
// that comes back is used again within seconds; connectTimeout bounds one
// connection attempt (TCP and TLS handshake) in the background, whatever the
// call deadlines. Keepalive pings find dead connections while no call is in
// flight; the interval respects the servers' enforcement policy (10s).
const (
	connectBaseDelay = 100 * time.Millisecond
	connectMaxDelay  = 5 * time.Second
	connectTimeout   = 5 * time.Second
	keepaliveTime    = 30 * time.Second
	keepaliveTimeout = 10 * time.Second
	userAgent        = "cairn-kmsclient"
)

// Client is a Tink registry.KMSClient for Cairn key URIs. It holds the
// endpoints of each configured region, one lazily dialled gRPC connection per
// endpoint, and per region the endpoint currently in use. It is safe for
// concurrent use; Close releases the connections.
type Client struct {
	opts    options
	log     *slog.Logger
	regions map[string]*region
	sleep   func(ctx context.Context, d time.Duration) error

	closed atomic.Bool
	mu     sync.Mutex // guards dialling against Close
	conns  []*grpc.ClientConn
}

var _ registry.KMSClient = (*Client)(nil)

// region is one region's endpoints, the index of the one in use, and the
// regions a decrypt may fall back to. Immutable but for cur.
type region struct {
	name      string
	creds     credentials.TransportCredentials
	endpoints []*endpoint
	// decryptOrder is this region followed by its decrypt fallbacks.
	decryptOrder []*region
	// cur is the index of the endpoint in use: sticky, moved on by a
	// retryable failure of that endpoint.
	cur atomic.Int32
	// fallbackLogged is when a decrypt last warned that it fell back to
	// this region (unix nanoseconds).
	fallbackLogged atomic.Int64
}

// endpoint is one KMS server address and its connection, made on first use.
type endpoint struct {
	addr   string
	index  int
	region *region
	kms    atomic.Pointer[kmsv1.KMSClient]
	// cc is the endpoint's connection, once dialled.
	cc atomic.Pointer[grpc.ClientConn]
	// failoverLogged is when a failover from this endpoint was last logged
	// as a warning (unix nanoseconds).
	failoverLogged atomic.Int64
}

// New checks the options, loads the identity and returns a Client. It makes
// no connection: each endpoint is dialled on its first call.
func New(opts ...Option) (*Client, error) {
	var o options
	for _, opt := range opts {
		if opt == nil {
			o.errs = append(o.errs, errors.New("kmsclient: nil Option"))
			continue
		}
		opt(&o)
	}
	if err := o.validate(); err != nil {
		return nil, err
	}
	id, err := o.newIdentity()
	if err != nil {
		return nil, err
	}
	c := &Client{opts: o, log: o.logger, regions: make(map[string]*region, len(o.regions)), sleep: o.sleep}
	if c.sleep == nil {
		c.sleep = sleepContext
	}
	for _, name := range o.regions {
		creds, err := id.credentials(name)
		if err != nil {
			return nil, err
		}
		r := &region{name: name, creds: creds}
		for i, addr := range o.endpoints[name] {
			r.endpoints = append(r.endpoints, &endpoint{addr: addr, index: i, region: r})
		}
		if n := len(r.endpoints); n > 1 && !o.listedOrder {
			r.cur.Store(int32(randIntN(n)))
		}
		c.regions[name] = r
	}
	for _, r := range c.regions {
		r.decryptOrder = []*region{r}
		for _, f := range o.fallbacks[r.name] {
			r.decryptOrder = append(r.decryptOrder, c.regions[f])
		}
	}
	return c, nil
}

// Supported reports whether keyURI is a well-formed Cairn key URI of a region
// the client has endpoints for.
func (c *Client) Supported(keyURI string) bool {
	r, _, err := ParseKeyURI(keyURI)
	return err == nil && c.regions[r] != nil
}

// GetAEAD returns the AEAD (an *AEAD) of the keyset keyURI names. It makes no
// call; the keyset's existence and the caller's access are checked by the KMS
// on use.
func (c *Client) GetAEAD(keyURI string) (tink.AEAD, error) {
	r, k, err := ParseKeyURI(keyURI)
	if err != nil {
		return nil, err
	}
	return c.AEAD(r, k)
}

// AEAD returns the AEAD of keyset in region.
func (c *Client) AEAD(region, keyset string) (*AEAD, error) {
	if err := validKeyset(keyset); err != nil {
		return nil, fmt.Errorf("kmsclient: %v", err)
	}
	r, ok := c.regions[region]
	if !ok {
		return nil, fmt.Errorf("kmsclient: no endpoints for region %q (configured: %v)", truncate(region), c.opts.regions)
	}
	return &AEAD{c: c, region: r, keyset: keyset}, nil
}

// Close closes every connection. Calls in flight fail with Canceled; later
// calls with ErrClosed. Close is idempotent.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Swap(true) {
		return nil
	}
	var errs []error
	for _, cc := range c.conns {
		if err := cc.Close(); err != nil {
			errs = append(errs, fmt.Errorf("kmsclient: closing connection to %s: %w", cc.Target(), err))
		}
	}
	c.conns = nil
	return errors.Join(errs...)
}

// kmsClient returns the endpoint's KMS stub, dialling on first use.
func (c *Client) kmsClient(ep *endpoint) (kmsv1.KMSClient, error) {
	if kc := ep.kms.Load(); kc != nil {
		return *kc, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		return nil, ErrClosed
	}
	if kc := ep.kms.Load(); kc != nil {
		return *kc, nil
	}
	dopts := []grpc.DialOption{
		grpc.WithTransportCredentials(ep.region.creds),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: connectBaseDelay, Multiplier: 1.6, Jitter: 0.2, MaxDelay: connectMaxDelay},
			MinConnectTimeout: connectTimeout,
		}),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: keepaliveTime, Timeout: keepaliveTimeout}),
		grpc.WithUserAgent(userAgent),
		// Every attempt is bounded by the attempt timeout: gRPC puts it on
		// the context it makes for each call (see attempt). No resolver
		// may replace this config.
		grpc.WithDisableServiceConfig(),
		grpc.WithDefaultServiceConfig(attemptConfig(c.opts.attemptTimeout)),
	}
	target := ep.addr
	if c.opts.dialer != nil {
		// The dialer gets the address as given: no resolver in between.
		target = "passthrough:///" + ep.addr
		dopts = append(dopts, grpc.WithContextDialer(c.opts.dialer))
	}
	cc, err := grpc.NewClient(target, append(dopts, c.opts.dialOptions...)...)
	if err != nil {
		return nil, fmt.Errorf("kmsclient: endpoint %s of region %s: %w", ep.addr, ep.region.name, err)
	}
	c.conns = append(c.conns, cc)
	kc := kmsv1.NewKMSClient(cc)
	ep.cc.Store(cc)
	ep.kms.Store(&kc)
	return kc, nil
}

// attemptConfig is the service config that bounds every call of
// cairn.kms.v1.KMS by the attempt timeout d.
func attemptConfig(d time.Duration) string {
	return fmt.Sprintf(`{"methodConfig":[{"name":[{"service":%q}],"timeout":"%ss"}]}`,
		kmsv1.KMS_ServiceDesc.ServiceName, strconv.FormatFloat(d.Seconds(), 'f', -1, 64))
}
