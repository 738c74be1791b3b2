package identity

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// AuthInfo is the gRPC peer information of a connection authenticated by
// Credentials: the TLS state and the peer's verified SPIFFE ID. Only
// Credentials creates it, so a server wired with other transport
// credentials never yields an identity.
type AuthInfo struct {
	credentials.TLSInfo
	// ID is the peer's verified identity.
	ID ID
}

// AuthType implements credentials.AuthInfo.
func (AuthInfo) AuthType() string { return "cairn-spiffe-mtls" }

// Credentials are gRPC transport credentials over a ServerTLSConfig or
// ClientTLSConfig that record the verified peer ID in an AuthInfo.
type Credentials struct {
	credentials.TransportCredentials
}

// NewCredentials wraps a TLS configuration made by this package's
// ServerTLSConfig, ClientTLSConfig or StaticClientTLSConfig.
func NewCredentials(cfg *tls.Config) *Credentials {
	return &Credentials{TransportCredentials: credentials.NewTLS(cfg)}
}

// ServerCredentials is NewCredentials(ServerTLSConfig(src, allow)).
func ServerCredentials(src *Source, allow Authorizer) *Credentials {
	return NewCredentials(ServerTLSConfig(src, allow))
}

// ClientCredentials is NewCredentials(ClientTLSConfig(src, allow)).
func ClientCredentials(src *Source, allow Authorizer) *Credentials {
	return NewCredentials(ClientTLSConfig(src, allow))
}

// ServerHandshake implements credentials.TransportCredentials.
func (c *Credentials) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ServerHandshake(raw)
	if err != nil {
		return nil, nil, err
	}
	return wrapAuthInfo(conn, info)
}

// ClientHandshake implements credentials.TransportCredentials.
func (c *Credentials) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err != nil {
		return nil, nil, err
	}
	return wrapAuthInfo(conn, info)
}

// Clone implements credentials.TransportCredentials.
func (c *Credentials) Clone() credentials.TransportCredentials {
	return &Credentials{TransportCredentials: c.TransportCredentials.Clone()}
}

func wrapAuthInfo(conn net.Conn, info credentials.AuthInfo) (net.Conn, credentials.AuthInfo, error) {
	tlsInfo, ok := info.(credentials.TLSInfo)
	if !ok {
		conn.Close()
		return nil, nil, fmt.Errorf("identity: unexpected auth info %T", info)
	}
	if tlsInfo.State.Version != tls.VersionTLS13 {
		conn.Close()
		return nil, nil, fmt.Errorf("identity: negotiated %s; TLS 1.3 is required", tls.VersionName(tlsInfo.State.Version))
	}
	id, err := peerID(tlsInfo.State)
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	return conn, AuthInfo{TLSInfo: tlsInfo, ID: id}, nil
}

type ctxKey struct{}

// NewContext returns a context carrying the caller's identity.
func NewContext(ctx context.Context, id ID) context.Context {
	return context.WithValue(ctx, ctxKey{}, id)
}

// FromContext returns the caller identity of ctx: the one put there by
// NewContext (or UnaryServerInterceptor), else the verified identity of
// the gRPC peer (a connection authenticated by Credentials), else none. A
// gRPC server therefore needs no per-call context value for it.
func FromContext(ctx context.Context) (ID, bool) {
	if id, ok := ctx.Value(ctxKey{}).(ID); ok {
		return id, !id.IsZero()
	}
	id, err := FromPeer(ctx)
	return id, err == nil && !id.IsZero()
}

// FromPeer returns the verified identity of the gRPC peer of ctx.
func FromPeer(ctx context.Context) (ID, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return ID{}, errors.New("identity: no gRPC peer in context")
	}
	info, ok := p.AuthInfo.(AuthInfo)
	if !ok {
		return ID{}, fmt.Errorf("identity: connection is not authenticated by identity.Credentials (auth info %T)", p.AuthInfo)
	}
	return info.ID, nil
}

// UnaryServerInterceptor puts the verified peer identity in the request
// context and refuses, with Unauthenticated, a call without one.
func UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		id, err := FromPeer(ctx)
		if err != nil {
			return nil, status.Error(codes.Unauthenticated, err.Error())
		}
		return handler(NewContext(ctx, id), req)
	}
}

// StreamServerInterceptor is UnaryServerInterceptor for streams.
func StreamServerInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		id, err := FromPeer(ss.Context())
		if err != nil {
			return status.Error(codes.Unauthenticated, err.Error())
		}
		return handler(srv, &identityStream{ServerStream: ss, ctx: NewContext(ss.Context(), id)})
	}
}

type identityStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *identityStream) Context() context.Context { return s.ctx }

// Policy maps full gRPC method names ("/cairn.kms.v1.KMS/Encrypt") to the
// authorizer that decides who may call them. A method with no entry is
// refused: default deny.
type Policy map[string]Authorizer

// Authorize checks id against the policy for method.
func (p Policy) Authorize(method string, id ID) error {
	allow, ok := p[method]
	if !ok || allow == nil {
		return fmt.Errorf("%w: no access policy for %s", ErrPermissionDenied, method)
	}
	if err := allow(id); err != nil {
		return fmt.Errorf("%s may not call %s: %w", id, method, err)
	}
	return nil
}

// UnaryAuthorizeInterceptor refuses, with PermissionDenied, calls the policy
// does not allow. It must run after UnaryServerInterceptor (and after the
// audit interceptor, so refusals are audited).
func UnaryAuthorizeInterceptor(p Policy) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		id, _ := FromContext(ctx)
		if err := p.Authorize(info.FullMethod, id); err != nil {
			return nil, status.Error(codes.PermissionDenied, err.Error())
		}
		return handler(ctx, req)
	}
}

// Admit is UnaryServerInterceptor and UnaryAuthorizeInterceptor in one
// check, for a server that runs them inside an interceptor of its own: the
// caller of ctx (FromContext) must be known (else Unauthenticated) and
// allowed by p to call method (else PermissionDenied).
func (p Policy) Admit(ctx context.Context, method string) error {
	id, ok := FromContext(ctx)
	if !ok {
		_, err := FromPeer(ctx)
		if err == nil {
			err = errors.New("identity: the peer has no identity")
		}
		return status.Error(codes.Unauthenticated, err.Error())
	}
	if err := p.Authorize(method, id); err != nil {
		return status.Error(codes.PermissionDenied, err.Error())
	}
	return nil
}

// StreamAuthorizeInterceptor is UnaryAuthorizeInterceptor for streams.
func StreamAuthorizeInterceptor(p Policy) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		id, _ := FromContext(ss.Context())
		if err := p.Authorize(info.FullMethod, id); err != nil {
			return status.Error(codes.PermissionDenied, err.Error())
		}
		return handler(srv, ss)
	}
}
