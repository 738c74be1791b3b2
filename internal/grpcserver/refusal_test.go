package grpcserver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionv1alphapb "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

const (
	refusalServerID = "spiffe://cairn.test/kms/us-east/kms-1"
	refusalCallerID = "spiffe://cairn.test/client/us-east/intruder"
)

// cairnFiles are the generated files of every Cairn gRPC service; builtin
// are the services grpcserver itself serves. Every method of every service
// in them is enumerated from the descriptors, so a new method is covered
// without touching the test.
var (
	cairnFiles = []protoreflect.FileDescriptor{
		distributorv1.File_cairn_distributor_v1_distributor_proto,
		rootkmsv1.File_cairn_rootkms_v1_rootkms_proto,
		kmsv1.File_cairn_kms_v1_kms_proto,
		kmsv1.File_cairn_kms_v1_admin_proto,
	}
	builtinFiles = []protoreflect.FileDescriptor{
		healthpb.File_grpc_health_v1_health_proto,
		reflectionpb.File_grpc_reflection_v1_reflection_proto,
		reflectionv1alphapb.File_grpc_reflection_v1alpha_reflection_proto,
	}
)

// wantServices are the services the test must see: if a file above stops
// declaring one, the test fails rather than silently covering less.
var wantServices = []string{
	"cairn.distributor.v1.Distributor", "cairn.rootkms.v1.RootKMS", "cairn.kms.v1.KMS", "cairn.kms.v1.KMSAdmin",
	"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
}

func methodsOf(files []protoreflect.FileDescriptor) []protoreflect.MethodDescriptor {
	var out []protoreflect.MethodDescriptor
	for _, f := range files {
		for i := range f.Services().Len() {
			sd := f.Services().Get(i)
			for j := range sd.Methods().Len() {
				out = append(out, sd.Methods().Get(j))
			}
		}
	}
	return out
}

func fullMethod(m protoreflect.MethodDescriptor) string {
	return "/" + string(m.Parent().FullName()) + "/" + string(m.Name())
}

// refusingService is a service with sd's methods whose handlers all refuse
// the caller with PermissionDenied, as a keyset ACL in a real handler does.
// Unary calls go through the server's interceptors like a generated
// handler's.
func refusingService(sd protoreflect.ServiceDescriptor) *grpc.ServiceDesc {
	desc := &grpc.ServiceDesc{ServiceName: string(sd.FullName()), HandlerType: (*any)(nil)}
	refuse := func() error {
		return status.Error(codes.PermissionDenied, "handler: the keyset's ACL does not name the caller")
	}
	for i := range sd.Methods().Len() {
		m := sd.Methods().Get(i)
		if m.IsStreamingClient() || m.IsStreamingServer() {
			desc.Streams = append(desc.Streams, grpc.StreamDesc{
				StreamName: string(m.Name()), ServerStreams: m.IsStreamingServer(), ClientStreams: m.IsStreamingClient(),
				Handler: func(any, grpc.ServerStream) error { return refuse() },
			})
			continue
		}
		full := fullMethod(m)
		desc.Methods = append(desc.Methods, grpc.MethodDesc{
			MethodName: string(m.Name()),
			Handler: func(_ any, ctx context.Context, dec func(any) error, icpt grpc.UnaryServerInterceptor) (any, error) {
				in := dynamicpb.NewMessage(m.Input())
				if err := dec(in); err != nil {
					return nil, err
				}
				h := func(context.Context, any) (any, error) { return nil, refuse() }
				if icpt == nil {
					return h(ctx, in)
				}
				return icpt(ctx, in, &grpc.UnaryServerInfo{FullMethod: full}, h)
			},
		})
	}
	return desc
}

// streamerService is a Cairn-like service with a streaming method, which
// grpcserver must refuse (streamsOnly) whatever the policy says.
var streamerService = grpc.ServiceDesc{
	ServiceName: "cairn.test.v1.Streamer", HandlerType: (*any)(nil),
	Streams: []grpc.StreamDesc{{StreamName: "Watch", ServerStreams: true,
		Handler: func(any, grpc.ServerStream) error { return errors.New("streamer: the handler ran") }}},
}

const streamerWatch = "/cairn.test.v1.Streamer/Watch"

// lockedBuffer is an audit sink the test reads while the server writes.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) records(t *testing.T) []audit.Record {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []audit.Record
	for line := range bytes.Lines(b.buf.Bytes()) {
		var r audit.Record
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		out = append(out, r)
	}
	return out
}

// refusalServer serves every Cairn service (handlers refusing), health,
// reflection and the streamer with grpcserver's chain over creds, and
// returns the address and the audit sink.
func refusalServer(t *testing.T, pki *identitytest.PKI, creds credentials.TransportCredentials, policy identity.Policy) (string, *lockedBuffer) {
	t.Helper()
	sink := &lockedBuffer{}
	alog := audit.NewWriter(sink, audit.Options{})
	srv, err := newServer(Options{
		Source: pki.Source(refusalServerID), Audit: alog, Policy: policy,
		Ready: func() (bool, string) { return true, "" }, Reflection: true,
		// Every Cairn method is Unaudited here: a refusal must be recorded
		// all the same.
		Unaudited: methodNames(methodsOf(cairnFiles)),
		Mutating:  []string{"/cairn.kms.v1.KMSAdmin/ApplyBundle"},
	}, creds)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range cairnFiles {
		for i := range f.Services().Len() {
			srv.RegisterService(refusingService(f.Services().Get(i)), struct{}{})
		}
	}
	srv.RegisterService(&streamerService, struct{}{})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Stop(); <-done; alog.Close() })
	return lis.Addr().String(), sink
}

func methodNames(ms []protoreflect.MethodDescriptor) []string {
	var out []string
	for _, m := range ms {
		out = append(out, fullMethod(m))
	}
	return out
}

// call invokes m (unary or streaming) with an empty request and request ID
// rid, and returns the call's error.
func call(ctx context.Context, conn *grpc.ClientConn, m protoreflect.MethodDescriptor, full, rid string) error {
	ctx = metadata.AppendToOutgoingContext(ctx, audit.RequestIDHeader, rid)
	in, out := dynamicpb.NewMessage(m.Input()), dynamicpb.NewMessage(m.Output())
	if !m.IsStreamingClient() && !m.IsStreamingServer() {
		return conn.Invoke(ctx, full, in, out)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: m.IsStreamingServer(), ClientStreams: m.IsStreamingClient()}, full)
	if err != nil {
		return err
	}
	_ = s.SendMsg(in) // io.EOF if the server already ended the stream: RecvMsg has its status
	_ = s.CloseSend()
	for {
		if err := s.RecvMsg(out); err != nil {
			return err
		}
	}
}

// TestEveryRefusalAudited calls every method of every service a Cairn
// server serves, as a caller who is refused (by the access policy, by the
// handler, and at the RPC layer for want of a verified identity), with every
// Cairn method on the Unaudited list, and finds each refusal's denied record
// with the caller's identity and the call's request ID.
func TestEveryRefusalAudited(t *testing.T) {
	pki := identitytest.New(t, spiffeid.RequireTrustDomainFromString("cairn.test"))
	all := methodsOf(append(append([]protoreflect.FileDescriptor{}, cairnFiles...), builtinFiles...))
	seen := map[string]bool{}
	for _, m := range all {
		seen[string(m.Parent().FullName())] = true
	}
	for _, s := range wantServices {
		if !seen[s] {
			t.Fatalf("the descriptors declare no service %s; the test would not cover it", s)
		}
	}
	deny := func(id identity.ID) error {
		return fmt.Errorf("%w: test policy refuses %s", identity.ErrPermissionDenied, id)
	}
	allowAll, denyAll := identity.Policy{}, identity.Policy{}
	for _, m := range all {
		allowAll[fullMethod(m)], denyAll[fullMethod(m)] = identity.AllowAny(), deny
	}
	allowAll[streamerWatch], denyAll[streamerWatch] = identity.AllowAny(), deny
	tlsCreds := identity.ServerCredentials(pki.Source(refusalServerID), identity.MemberOf(pki.CA.TrustDomain()))

	type target struct {
		m    protoreflect.MethodDescriptor
		full string
	}
	var cairnOnly, everything []target
	for _, m := range all {
		everything = append(everything, target{m, fullMethod(m)})
		if !strings.HasPrefix(fullMethod(m), "/grpc.") {
			cairnOnly = append(cairnOnly, target{m, fullMethod(m)})
		}
	}
	streamer := target{full: streamerWatch}
	for _, tc := range []struct {
		name     string
		creds    credentials.TransportCredentials
		client   credentials.TransportCredentials
		policy   identity.Policy
		targets  []target
		code     codes.Code
		identity string
	}{
		// The access policy refuses every method, health and reflection
		// included (a service's own policy entries win over grpcserver's).
		{"policy", tlsCreds, pki.ClientCredentials(refusalCallerID), denyAll, everything, codes.PermissionDenied, refusalCallerID},
		// The policy allows; the handler refuses (a keyset ACL). Health and
		// reflection have no such path: their handlers never refuse.
		{"handler", tlsCreds, pki.ClientCredentials(refusalCallerID), allowAll, cairnOnly, codes.PermissionDenied, refusalCallerID},
		// No verified identity: the identity interceptor refuses before the
		// policy is asked.
		{"unauthenticated", insecure.NewCredentials(), insecure.NewCredentials(), allowAll, everything, codes.Unauthenticated, ""},
		// A stream other than health and reflection, allowed by the policy:
		// streamsOnly refuses it.
		{"stream", tlsCreds, pki.ClientCredentials(refusalCallerID), allowAll, []target{streamer}, codes.PermissionDenied, refusalCallerID},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, sink := refusalServer(t, pki, tc.creds, tc.policy)
			conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(tc.client))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			want := map[string]string{} // request ID -> method
			for i, tg := range tc.targets {
				rid := fmt.Sprintf("%s-%d", tc.name, i)
				want[rid] = tg.full
				var err error
				if tg.m == nil {
					err = callStreamer(ctx, conn, rid)
				} else {
					err = call(ctx, conn, tg.m, tg.full, rid)
				}
				if status.Code(err) != tc.code {
					t.Errorf("%s as %q = %v, want %v", tg.full, tc.identity, err, tc.code)
				}
			}
			got := map[string]audit.Record{}
			for _, r := range sink.records(t) {
				got[r.RequestID] = r
			}
			for rid, full := range want {
				r, ok := got[rid]
				switch {
				case !ok:
					t.Errorf("%s refused with %v: no audit record (request ID %s)", full, tc.code, rid)
				case r.Operation != full || r.Outcome != audit.OutcomeDenied || r.Code != tc.code.String() || r.Identity != tc.identity:
					t.Errorf("%s: audit record = {op %s, outcome %s, code %s, identity %q}, want {op %s, outcome denied, code %v, identity %q}",
						rid, r.Operation, r.Outcome, r.Code, r.Identity, full, tc.code, tc.identity)
				}
			}
		})
	}
}

func callStreamer(ctx context.Context, conn *grpc.ClientConn, rid string) error {
	ctx = metadata.AppendToOutgoingContext(ctx, audit.RequestIDHeader, rid)
	s, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, streamerWatch)
	if err != nil {
		return err
	}
	_ = s.SendMsg(&healthpb.HealthCheckRequest{})
	_ = s.CloseSend()
	for {
		if err := s.RecvMsg(&healthpb.HealthCheckResponse{}); err != nil {
			return err
		}
	}
}
