// Package raftnode runs the root KMS's hashicorp/raft node: the Raft network
// transport over mutual TLS (peers authenticated by SPIFFE ID), raft-boltdb
// for the log and stable store, file snapshots, and the slog adapter raft's
// logging needs.
package raftnode

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cairnkms/cairn/internal/identity"
)

// alpn keeps Raft and gRPC (h2) from ever talking to each other by mistake.
const alpn = "cairn-raft/1"

// handshakeTimeout bounds a peer's TLS handshake, so a peer that connects and
// stalls holds a goroutine and a socket for at most this long.
const handshakeTimeout = 10 * time.Second

// StreamLayer is a raft.StreamLayer over mutual TLS 1.3. Incoming
// connections are handshaken off the accept path (a slow or hostile peer
// cannot stall Accept); only connections from peers that allow accepts
// reach Raft. Outgoing connections accept only servers allow accepts.
type StreamLayer struct {
	lis       net.Listener
	advertise net.Addr
	server    *tls.Config
	client    *tls.Config
	log       *slog.Logger

	ready  chan net.Conn
	closed chan struct{}
	once   sync.Once
	wg     sync.WaitGroup

	// raft's NetworkTransport does not close the connections it accepted
	// when it shuts down; the layer tracks every connection it hands out
	// and closes them on Close, so no reader outlives the node.
	mu    sync.Mutex
	conns map[*trackedConn]struct{}
}

type trackedConn struct {
	net.Conn
	l    *StreamLayer
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}

// track registers c, or closes it if the layer is closed already.
func (s *StreamLayer) track(c net.Conn) (net.Conn, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conns == nil {
		c.Close()
		return nil, net.ErrClosed
	}
	t := &trackedConn{Conn: c, l: s}
	s.conns[t] = struct{}{}
	return t, nil
}

// NewStreamLayer serves Raft on lis. advertise is the address peers dial
// (nil: lis.Addr()). allow decides which peer identities may connect either
// way (typically rootkms/*/*).
func NewStreamLayer(lis net.Listener, advertise net.Addr, src *identity.Source, allow identity.Authorizer, log *slog.Logger) *StreamLayer {
	if advertise == nil {
		advertise = lis.Addr()
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	server := identity.ServerTLSConfig(src, allow)
	server.NextProtos = []string{alpn}
	client := identity.ClientTLSConfig(src, allow)
	client.NextProtos = []string{alpn}
	s := &StreamLayer{lis: lis, advertise: advertise, server: server, client: client, log: log,
		ready: make(chan net.Conn), closed: make(chan struct{}), conns: map[*trackedConn]struct{}{}}
	s.wg.Add(1)
	go s.acceptLoop()
	return s
}

func (s *StreamLayer) acceptLoop() {
	defer s.wg.Done()
	for {
		c, err := s.lis.Accept()
		if err != nil {
			select {
			case <-s.closed:
				return
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			s.log.Error("raft transport: accept failed", "err", err)
			return
		}
		s.wg.Add(1)
		go s.handshake(c)
	}
}

func (s *StreamLayer) handshake(c net.Conn) {
	defer s.wg.Done()
	tc := tls.Server(c, s.server)
	ctx, cancel := context.WithTimeout(context.Background(), handshakeTimeout)
	defer cancel()
	go func() {
		select {
		case <-s.closed:
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := tc.HandshakeContext(ctx); err != nil {
		s.log.Warn("raft transport: refused a peer", "remote", c.RemoteAddr().String(), "err", err)
		tc.Close()
		return
	}
	if tc.ConnectionState().NegotiatedProtocol != alpn {
		s.log.Warn("raft transport: peer did not speak "+alpn, "remote", c.RemoteAddr().String())
		tc.Close()
		return
	}
	select {
	case s.ready <- tc:
	case <-s.closed:
		tc.Close()
	}
}

// Accept implements net.Listener: it returns the next authenticated peer.
func (s *StreamLayer) Accept() (net.Conn, error) {
	select {
	case c := <-s.ready:
		return s.track(c)
	case <-s.closed:
		return nil, net.ErrClosed
	}
}

// Close implements net.Listener; it waits for in-flight handshakes.
func (s *StreamLayer) Close() error {
	var err error
	s.once.Do(func() {
		close(s.closed)
		err = s.lis.Close()
		s.wg.Wait()
		s.mu.Lock()
		conns := s.conns
		s.conns = nil
		s.mu.Unlock()
		for c := range conns {
			c.Conn.Close()
		}
	})
	return err
}

// Addr implements net.Listener: the advertised address.
func (s *StreamLayer) Addr() net.Addr { return s.advertise }

// Dial implements raft.StreamLayer.
func (s *StreamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	d := tls.Dialer{Config: s.client}
	c, err := d.DialContext(ctx, "tcp", string(address))
	if err != nil {
		return nil, err
	}
	return s.track(c)
}
