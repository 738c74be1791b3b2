package grpcserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/tap"
)

// DefaultMaxCallDuration is Options.MaxCallDuration's default. Every Cairn
// client bounds its own calls within it (kmsclient 10 s a call,
// rootkmsclient 3 s an attempt, regionctl 30 s unless its --timeout asks
// for more, which this bound then caps; the KMS's and the distributor's own
// peer calls 5 to 10 s), and the slowest call a server
// serves (ApplyBundle of a large bundle, which fetches region keys within
// the KMS's 10 s FetchTimeout; a root KMS write, within its 5 s
// ApplyTimeout) ends far sooner. A call past it is one whose client went
// away or never meant to finish: it is cut with DEADLINE_EXCEEDED.
const DefaultMaxCallDuration = 30 * time.Second

// unboundedMethods are the calls MaxCallDuration does not bound: the
// long-lived streams of the services every Cairn server runs. Cairn's own
// services (proto/cairn/...) have no streaming method, and every other
// stream is refused (streamsOnly); of grpcserver's built-in streams, the
// health watch lives, by the protocol, for as long as its client listens
// (a client-side health checker keeps one open per connection). Reflection
// (ServerReflectionInfo) is bounded: a tool's reflection exchange is a few
// round trips. A watch still costs its client a stream of its connection,
// which MaxConcurrentStreams and MaxConnsPerIP bound, and it is open only to
// members the handshake admits.
var unboundedMethods = [...]string{healthWatch}

// callDeadline returns the tap handle that gives every call but the
// unbounded ones a deadline of at most limit. gRPC runs it once the
// stream's context exists (with the client's deadline, if it sent one) and
// before the stream's request reader is made from that context, so the
// deadline bounds the request's read as well as the handler: a client that
// opens a call and withholds its request is cut then, and the stream and
// its goroutine are let go.
//
// gRPC runs it in the connection's reader, under the transport's lock, so
// it must be cheap. A call whose client already asked for a deadline no
// later than limit keeps its context as it is, without an allocation
// (every Cairn client does, so the data plane pays nothing). Any other gets
// a child context with the bound (a context, a timer and the goroutine that
// cancels it when the stream ends).
func callDeadline(limit time.Duration) func(ctx context.Context, info *tap.Info) (context.Context, error) {
	return func(ctx context.Context, info *tap.Info) (context.Context, error) {
		if d, ok := ctx.Deadline(); ok && time.Until(d) <= limit {
			return ctx, nil
		}
		for _, m := range unboundedMethods {
			if info.FullMethodName == m {
				return ctx, nil
			}
		}
		bounded, cancel := context.WithTimeout(ctx, limit)
		// The tap handle cannot see the stream end; its context does (gRPC
		// cancels it then, which already cancels the child), so the
		// child's own cancel runs then too.
		context.AfterFunc(ctx, cancel)
		return bounded, nil
	}
}

// DefaultMaxConnsPerIP is Options.MaxConnsPerIP's default. A Cairn client
// process keeps one connection to each server it calls (kmsclient, the
// root KMS and distributor clients, regionctl), so 256 lets that many
// client processes share one address (a host, or a NAT gateway in front of
// many) with room to spare. It bounds what one address can hold of the
// server before any handshake: an idle established connection costs about
// 100 KiB (TLS record buffers, gRPC's 32 KiB read and write buffers, three
// goroutines), so 256 of them some 25 MiB, and a connection still in its
// handshake is cut after HandshakeTimeout anyway. Raise it for deployments
// where more clients share an address.
const DefaultMaxConnsPerIP = 256

// errTooManyConns is why a connection over MaxConnsPerIP is closed; gRPC
// closes the connection when the handshake fails and logs the error only at
// its info level (off by default), so a flood does not flood the logs.
var errTooManyConns = errors.New("grpcserver: too many connections from this address")

// connLimit counts the connections open from each remote IP address and
// refuses one past max.
type connLimit struct {
	max     int
	refused prometheus.Counter // nil: not counted

	mu   sync.Mutex
	open map[netip.Addr]int
}

func newConnLimit(max int, reg prometheus.Registerer) (*connLimit, error) {
	l := &connLimit{max: max, open: map[netip.Addr]int{}}
	if reg != nil {
		l.refused = prometheus.NewCounter(prometheus.CounterOpts{Namespace: "cairn", Subsystem: "grpc", Name: "connections_over_ip_limit_total",
			Help: "Connections closed as they were accepted, before any handshake, because their remote IP address already had MaxConnsPerIP connections open."})
		if err := reg.Register(l.refused); err != nil {
			return nil, fmt.Errorf("grpcserver: registering metrics: %w", err)
		}
	}
	return l, nil
}

// acquire counts a new connection from addr, or refuses it (false) when
// its address already has max open. A connection that is not over IP (a
// Unix socket) is neither counted nor refused: it is local. The address to
// release is returned.
func (l *connLimit) acquire(addr net.Addr) (netip.Addr, bool) {
	tcp, ok := addr.(*net.TCPAddr)
	if !ok {
		return netip.Addr{}, true
	}
	ip := tcp.AddrPort().Addr().Unmap()
	l.mu.Lock()
	n := l.open[ip]
	if n >= l.max {
		l.mu.Unlock()
		if l.refused != nil {
			l.refused.Inc()
		}
		return netip.Addr{}, false
	}
	l.open[ip] = n + 1
	l.mu.Unlock()
	return ip, true
}

// release uncounts a connection acquire counted.
func (l *connLimit) release(ip netip.Addr) {
	if !ip.IsValid() {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if n := l.open[ip]; n > 1 {
		l.open[ip] = n - 1
	} else {
		delete(l.open, ip)
	}
}

// limitedCreds applies a connLimit to the server's transport credentials:
// gRPC hands every connection it accepts to ServerHandshake first, so a
// connection past the limit is closed there, before a byte of it is read;
// one within it is counted until it closes. It sits in the credentials
// rather than in a listener because each server passes its own listener to
// Serve, while New builds the credentials: the bound then holds on every
// server without a change to any of them.
type limitedCreds struct {
	credentials.TransportCredentials
	limit *connLimit
}

// ServerHandshake implements credentials.TransportCredentials.
func (c *limitedCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	ip, ok := c.limit.acquire(raw.RemoteAddr())
	if !ok {
		return nil, nil, errTooManyConns
	}
	counted := &countedConn{Conn: raw, limit: c.limit, ip: ip}
	conn, info, err := c.TransportCredentials.ServerHandshake(counted)
	if err != nil {
		// gRPC closes raw itself; the count must not wait for that.
		counted.release()
		return nil, nil, err
	}
	return conn, info, nil
}

// Clone implements credentials.TransportCredentials; the clone shares the
// count.
func (c *limitedCreds) Clone() credentials.TransportCredentials {
	return &limitedCreds{TransportCredentials: c.TransportCredentials.Clone(), limit: c.limit}
}

// countedConn is an accepted connection that connLimit counts until its
// first Close. The TLS connection gRPC serves wraps it, so closing that
// closes this.
type countedConn struct {
	net.Conn
	limit    *connLimit
	ip       netip.Addr
	released atomic.Bool
}

func (c *countedConn) Close() error {
	c.release()
	return c.Conn.Close()
}

func (c *countedConn) release() {
	if c.released.CompareAndSwap(false, true) {
		c.limit.release(c.ip)
	}
}

// SyscallConn exposes the socket's, as the accepted connection does, so
// that gRPC's socket options and channelz still reach it.
func (c *countedConn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := c.Conn.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errors.ErrUnsupported
}
