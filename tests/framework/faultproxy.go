package framework

import (
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"
)

// NetFault is what a FaultProxy does to the bytes it forwards. The zero
// NetFault forwards them as they come.
type NetFault struct {
	// Latency delays every chunk read from either side by Latency plus a
	// uniform jitter in [0, Jitter) before it is written to the other,
	// keeping their order: a slow or lossy link (TCP turns loss into
	// delay).
	Latency, Jitter time.Duration
	// Blackhole reads and discards what either side sends, on the
	// connections open and on new ones, which it accepts: a silent
	// partition, where nothing is refused and every call waits for its
	// deadline.
	Blackhole bool
}

// FaultProxy forwards the TCP connections it accepts on a 127.0.0.1 port of
// its own to a target address, with a NetFault switched at run time: the
// etcd-style fault proxy of the chaos soak, put in front of a server by
// handing its clients (or, for Raft, its peers through --raft-advertise)
// the proxy's address instead of the server's. It sees only bytes (TLS
// passes through untouched), so it cannot tell one client from another: a
// fault applies to everything that reaches the target through it.
type FaultProxy struct {
	t      testing.TB
	name   string
	target string
	ln     net.Listener

	mu     sync.Mutex
	fault  NetFault
	conns  map[*proxyConn]bool
	closed bool
	wg     sync.WaitGroup
}

// proxyConn is one proxied connection: the client's side and the target's.
type proxyConn struct {
	client, server net.Conn
}

func (c *proxyConn) close() {
	c.client.Close()
	c.server.Close()
}

// NewFaultProxy listens on a free 127.0.0.1 port and forwards to target
// (which need not be up yet: a connection it refuses is closed). It is
// closed when the test ends.
func NewFaultProxy(t testing.TB, name, target string) *FaultProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("fault proxy %s: %v", name, err)
	}
	p := &FaultProxy{t: t, name: name, target: target, ln: ln, conns: map[*proxyConn]bool{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

// Addr is the proxy's address, to hand out instead of the target's.
func (p *FaultProxy) Addr() string { return p.ln.Addr().String() }

// Target is the address it forwards to.
func (p *FaultProxy) Target() string { return p.target }

// Set switches the fault for every connection, open or new.
func (p *FaultProxy) Set(f NetFault) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fault = f
}

// Fault is the fault in force.
func (p *FaultProxy) Fault() NetFault {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.fault
}

// Heal forwards as it comes again, and closes every connection open now:
// one that crossed a blackhole has lost bytes, so neither side can trust
// its stream (TLS would fail it anyway); both sides reconnect.
func (p *FaultProxy) Heal() {
	p.mu.Lock()
	wasHole := p.fault.Blackhole
	p.fault = NetFault{}
	var open []*proxyConn
	if wasHole {
		for c := range p.conns {
			open = append(open, c)
		}
	}
	p.mu.Unlock()
	for _, c := range open {
		c.close()
	}
}

// Close stops accepting, closes every connection and waits for its
// goroutines.
func (p *FaultProxy) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	var open []*proxyConn
	for c := range p.conns {
		open = append(open, c)
	}
	p.mu.Unlock()
	p.ln.Close()
	for _, c := range open {
		c.close()
	}
	p.wg.Wait()
}

func (p *FaultProxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		server, err := net.DialTimeout("tcp", p.target, 5*time.Second)
		if err != nil {
			client.Close() // the target is down: as if it refused
			continue
		}
		c := &proxyConn{client: client, server: server}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.close()
			return
		}
		p.conns[c] = true
		p.wg.Add(2)
		p.mu.Unlock()
		go p.pipe(c, client, server)
		go p.pipe(c, server, client)
	}
}

// pipe copies from src to dst under the fault in force at each chunk. A
// delayed chunk is written by a goroutine of its own in order (a queue),
// so the reader goes on reading: latency, not a throughput limit.
func (p *FaultProxy) pipe(c *proxyConn, src, dst net.Conn) {
	defer p.wg.Done()
	defer func() {
		c.close()
		p.mu.Lock()
		delete(p.conns, c)
		p.mu.Unlock()
	}()
	type chunk struct {
		due  time.Time
		data []byte
	}
	queue := make(chan chunk, 1024)
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		for ch := range queue {
			time.Sleep(time.Until(ch.due))
			if _, err := dst.Write(ch.data); err != nil {
				c.close()
				for range queue { // drain, so the reader never blocks
				}
				return
			}
		}
	}()
	defer func() {
		close(queue)
		<-writerDone
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			f := p.Fault()
			if !f.Blackhole {
				delay := f.Latency
				if f.Jitter > 0 {
					delay += rand.N(f.Jitter)
				}
				queue <- chunk{due: time.Now().Add(delay), data: append([]byte(nil), buf[:n]...)}
			}
		}
		if err != nil {
			return // EOF, or closed by the other direction, Heal or Close
		}
	}
}
