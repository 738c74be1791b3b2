// Package grpcserver assembles the gRPC server every Cairn tier runs: mTLS
// with SPIFFE identities (TLS 1.3, client certificates required), the caller
// identity in the context, every call audited (fail closed; every refusal,
// PermissionDenied or Unauthenticated, on every method), a per-method
// access policy (default deny), bounded message sizes, streams per
// connection, connections per client address and call durations,
// grpc.health.v1 answered from the server's readiness, and (when asked)
// gRPC reflection.
package grpcserver

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/encoding"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
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
	// Unaudited lists status methods whose calls are not audited unless
	// they are refused (see audit.InterceptorOptions.Unaudited).
	Unaudited []string
	// MaxRecvMsgSize bounds request size (0: 64 KiB).
	MaxRecvMsgSize int
	// Ready backs grpc.health.v1 (required): SERVING exactly when it says
	// the server is ready. Any member the Connect authorizer admits may
	// check health; checks are not audited (they are polls) unless refused.
	Ready Readiness
	// Reflection serves gRPC server reflection (grpc.reflection.v1 and
	// v1alpha), so grpcurl and similar tools can list and describe the
	// services without the .proto files. It reveals only the API's shape;
	// any member the Connect authorizer admits may use it, and each use is
	// audited. Off by default in production binaries, on in `cairn up`.
	Reflection bool
	// StreamWorkers is how many long-lived goroutines serve calls (0: a
	// new goroutine per call). A call served by a worker runs on a stack
	// already grown by the calls before it, where a new goroutine starts
	// small and grows (copies) its stack on every call through the
	// interceptors; a call that finds every worker busy gets a goroutine
	// of its own, so the number bounds idle goroutines, not concurrency.
	// Size it to the calls a server has in progress at once.
	StreamWorkers int
	// Codec replaces gRPC's protobuf codec on this server (nil: the
	// standard one). It must encode and decode exactly as protobuf does.
	Codec encoding.CodecV2
	// HandshakeTimeout bounds a new connection's TLS handshake and HTTP/2
	// preface (0: DefaultHandshakeTimeout). A client that trickles them
	// (slow-loris) is cut off then, instead of holding a connection and a
	// goroutine for gRPC's default two minutes.
	HandshakeTimeout time.Duration
	// MaxConcurrentStreams bounds the calls in progress on one connection
	// (0: DefaultMaxConcurrentStreams). gRPC's own default is no bound: one
	// authenticated connection could open streams without end, each a
	// goroutine and its buffers held for as long as the client withholds
	// its request. A gRPC client over the bound waits for one of its calls
	// to end (the server advertises it in SETTINGS_MAX_CONCURRENT_STREAMS);
	// a stream past it is refused (REFUSED_STREAM).
	MaxConcurrentStreams uint32
	// MaxCallDuration bounds how long one call may last, its request's read
	// included (0: DefaultMaxCallDuration). A client's own deadline within
	// it is kept; a call without one, or with a later one, is cut at the
	// bound with DEADLINE_EXCEEDED, so a client that opens calls and
	// withholds their requests holds their streams for this long at most.
	// Health watches are not bounded (see unboundedMethods).
	MaxCallDuration time.Duration
	// MaxConnsPerIP bounds the connections open at once from one remote IP
	// address (0: DefaultMaxConnsPerIP). A connection past it is closed as
	// it is accepted, before its TLS handshake.
	MaxConnsPerIP int
	// Registerer receives the server's own metrics (nil: none):
	// cairn_grpc_connections_over_ip_limit_total. It is the server's
	// registry, never the global one.
	Registerer prometheus.Registerer
}

// DefaultHandshakeTimeout is Options.HandshakeTimeout's default: a
// handshake between hosts of one deployment takes milliseconds.
const DefaultHandshakeTimeout = 10 * time.Second

// DefaultMaxConcurrentStreams is Options.MaxConcurrentStreams's default:
// far above what one Cairn client keeps in progress on a connection, and it
// caps what one connection can make a server hold (a stream whose request
// never arrives costs a goroutine and about 12 KiB).
const DefaultMaxConcurrentStreams = 1024

// maxConnectionIdle closes a connection that has had no call in progress
// for this long (the client reconnects on its next call), so abandoned
// connections do not accumulate.
const maxConnectionIdle = 15 * time.Minute

// DefaultMaxRecvMsgSize is Options.MaxRecvMsgSize's default: Cairn requests
// carry keys and small payloads, never bulk data.
const DefaultMaxRecvMsgSize = 64 << 10

// New returns a gRPC server wired with Cairn's security stack. Register
// services on it and Serve.
func New(opts Options) (*grpc.Server, error) {
	if opts.Source == nil {
		return nil, errors.New("grpcserver: no identity source")
	}
	connect := opts.Connect
	if connect == nil {
		connect = identity.MemberOf(opts.Source.TrustDomain())
	}
	return newServer(opts, identity.ServerCredentials(opts.Source, connect))
}

// newServer is New with the transport credentials given: tests serve over
// other transports to reach the paths mTLS closes (a call without a verified
// identity).
func newServer(opts Options, creds credentials.TransportCredentials) (*grpc.Server, error) {
	switch {
	case opts.Source == nil:
		return nil, errors.New("grpcserver: no identity source")
	case opts.Audit == nil:
		return nil, errors.New("grpcserver: no audit log (every call must be audited)")
	case len(opts.Policy) == 0:
		return nil, errors.New("grpcserver: empty access policy")
	case opts.Ready == nil:
		return nil, errors.New("grpcserver: no readiness function (grpc.health.v1 needs one)")
	}
	maxRecv := opts.MaxRecvMsgSize
	if maxRecv == 0 {
		maxRecv = DefaultMaxRecvMsgSize
	}
	// Health and reflection are open to every member the handshake admits;
	// a service's own policy entries win.
	policy := identity.Policy{healthCheck: identity.AllowAny(), healthList: identity.AllowAny(), healthWatch: identity.AllowAny()}
	if opts.Reflection {
		policy[reflectionV1] = identity.AllowAny()
		policy[reflectionV1Alpha] = identity.AllowAny()
	}
	for m, a := range opts.Policy {
		policy[m] = a
	}
	handshake := opts.HandshakeTimeout
	if handshake <= 0 {
		handshake = DefaultHandshakeTimeout
	}
	maxStreams := opts.MaxConcurrentStreams
	if maxStreams == 0 {
		maxStreams = DefaultMaxConcurrentStreams
	}
	maxCall := opts.MaxCallDuration
	if maxCall <= 0 {
		maxCall = DefaultMaxCallDuration
	}
	maxConns := opts.MaxConnsPerIP
	if maxConns <= 0 {
		maxConns = DefaultMaxConnsPerIP
	}
	limit, err := newConnLimit(maxConns, opts.Registerer)
	if err != nil {
		return nil, err
	}
	unaudited := append([]string{healthCheck, healthList, healthWatch}, opts.Unaudited...)
	auditOpts := audit.InterceptorOptions{Mutating: opts.Mutating, Unaudited: unaudited}
	serverOpts := []grpc.ServerOption{
		grpc.Creds(&limitedCreds{TransportCredentials: creds, limit: limit}),
		// The server's only tap handle (gRPC takes one).
		grpc.InTapHandle(callDeadline(maxCall)),
		// The audit interceptor runs first, so that every refusal after it
		// (Unauthenticated or PermissionDenied from the caller's admission,
		// PermissionDenied from a handler) is on record, even for the
		// Unaudited methods.
		grpc.UnaryInterceptor(admitted(audit.UnaryServerInterceptor(opts.Audit, auditOpts), policy)),
		// Cairn's own services do not stream; the only streams served are
		// read-only (health watches, reflection), and they are
		// authenticated, audited and authorized like unary calls. Any other
		// stream is refused (PermissionDenied, audited) before a handler
		// sees it.
		grpc.ChainStreamInterceptor(
			audit.StreamServerInterceptor(opts.Audit, auditOpts),
			identity.StreamServerInterceptor(),
			streamsOnly(policy),
			identity.StreamAuthorizeInterceptor(policy),
		),
		grpc.MaxRecvMsgSize(maxRecv),
		grpc.NumStreamWorkers(uint32(max(opts.StreamWorkers, 0))),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: maxConnectionIdle}),
		grpc.ConnectionTimeout(handshake),
		grpc.MaxConcurrentStreams(maxStreams),
		// Stop returns only once every handler has: a server's Close can
		// then trust that no call changes its state afterwards.
		grpc.WaitForHandlers(true),
	}
	if opts.Codec != nil {
		serverOpts = append(serverOpts, grpc.ForceServerCodecV2(opts.Codec))
	}
	s := grpc.NewServer(serverOpts...)
	// The services are fixed once Serve runs (gRPC refuses a late
	// registration), and health is asked only after: read them once.
	healthpb.RegisterHealthServer(s, &health{ready: opts.Ready, services: sync.OnceValue(s.GetServiceInfo)})
	if opts.Reflection {
		reflection.Register(s)
	}
	return s, nil
}

// admitted is the server's one unary interceptor: the audit interceptor
// around the admission of the caller (identity.Policy.Admit: a verified
// identity, else Unauthenticated; allowed by the policy, else
// PermissionDenied) and then the handler. It does what
// ChainUnaryInterceptor(audit, identity, authorize) did, without the
// chain's closure and stack frames per link and the identity's context
// value on every call (identity.FromContext reads the verified peer).
func admitted(auditCall grpc.UnaryServerInterceptor, policy identity.Policy) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		return auditCall(ctx, req, info, func(ctx context.Context, req any) (any, error) {
			if err := policy.Admit(ctx, info.FullMethod); err != nil {
				return nil, err
			}
			return handler(ctx, req)
		})
	}
}

// Reflection method names (both protocol versions grpcurl speaks).
const (
	reflectionV1      = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
	reflectionV1Alpha = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
)

// streamsOnly refuses, with PermissionDenied (a refusal, so it is audited
// as one), every stream but the read-only ones this package serves (the
// health watch and reflection, when on).
func streamsOnly(policy identity.Policy) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		switch info.FullMethod {
		case healthWatch, reflectionV1, reflectionV1Alpha:
			if _, ok := policy[info.FullMethod]; ok {
				return handler(srv, ss)
			}
		}
		return status.Errorf(codes.PermissionDenied, "grpcserver: %s: streaming calls other than health watches and reflection are not served", info.FullMethod)
	}
}
