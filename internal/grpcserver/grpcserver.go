// Package grpcserver assembles the gRPC server every Cairn tier runs: mTLS
// with SPIFFE identities (TLS 1.3, client certificates required), the caller
// identity in the context, every call audited (fail closed), a per-method
// access policy (default deny), and bounded message sizes.
package grpcserver

import (
	"errors"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
)

// Options configures New.
type Options struct {
	// Source is the server's own certificate and trust bundle.
	Source *identity.Source
	// Connect decides which peers may complete a TLS handshake at all (nil:
	// any member of the source's trust domain).
	Connect identity.Authorizer
	// Policy maps each full method name to who may call it. Methods not in
	// it are refused.
	Policy identity.Policy
	// Audit receives a record for every call.
	Audit *audit.Log
	// Mutating lists methods whose attempt is audited before they run.
	Mutating []string
	// Unaudited lists status methods that are not audited (see
	// audit.InterceptorOptions.Unaudited).
	Unaudited []string
	// MaxRecvMsgSize bounds request size (0: 64 KiB).
	MaxRecvMsgSize int
}

// DefaultMaxRecvMsgSize is Options.MaxRecvMsgSize's default: Cairn requests
// carry keys and small payloads, never bulk data.
const DefaultMaxRecvMsgSize = 64 << 10

// New returns a gRPC server wired with Cairn's security stack. Register
// services on it and Serve.
func New(opts Options) (*grpc.Server, error) {
	switch {
	case opts.Source == nil:
		return nil, errors.New("grpcserver: no identity source")
	case opts.Audit == nil:
		return nil, errors.New("grpcserver: no audit log (every call must be audited)")
	case len(opts.Policy) == 0:
		return nil, errors.New("grpcserver: empty access policy")
	}
	connect := opts.Connect
	if connect == nil {
		connect = identity.MemberOf(opts.Source.TrustDomain())
	}
	maxRecv := opts.MaxRecvMsgSize
	if maxRecv == 0 {
		maxRecv = DefaultMaxRecvMsgSize
	}
	return grpc.NewServer(
		grpc.Creds(identity.ServerCredentials(opts.Source, connect)),
		grpc.ChainUnaryInterceptor(
			identity.UnaryServerInterceptor(),
			audit.UnaryServerInterceptor(opts.Audit, audit.InterceptorOptions{Mutating: opts.Mutating, Unaudited: opts.Unaudited}),
			identity.UnaryAuthorizeInterceptor(opts.Policy),
		),
		// No Cairn service streams, and the audit interceptor is unary:
		// refuse streams rather than serve one unaudited.
		grpc.StreamInterceptor(func(any, grpc.ServerStream, *grpc.StreamServerInfo, grpc.StreamHandler) error {
			return status.Error(codes.Unimplemented, "grpcserver: streaming calls are not served (they would not be audited)")
		}),
		grpc.MaxRecvMsgSize(maxRecv),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		// Stop returns only once every handler has: a server's Close can
		// then trust that no call changes its state afterwards.
		grpc.WaitForHandlers(true),
	), nil
}
