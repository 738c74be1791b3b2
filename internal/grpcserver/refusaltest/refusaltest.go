// Package refusaltest checks a running Cairn server's promise that every
// refusal is audited: it calls every method of the services it is given
// (enumerated from their descriptors, so a new method is covered without a
// change to the test), as a caller the server refuses, and finds each
// refusal's denied record, with the caller's identity, in the audit log.
package refusaltest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/cairnkms/cairn/internal/audit"
)

// Config says what to call and how to find the records.
type Config struct {
	// Conn is a connection to the server as Identity.
	Conn     *grpc.ClientConn
	Identity string
	// Services are the services to call every method of.
	Services []protoreflect.ServiceDescriptor
	// Request returns the request for a method (for example one naming a
	// keyset whose ACL refuses the caller); nil, or a nil result, means an
	// empty request.
	Request func(protoreflect.MethodDescriptor) proto.Message
	// NotRefusable names the full methods ("/pkg.Svc/Method") that anyone
	// the TLS handshake admits may call and no handler refuses (health,
	// reflection, status polls): for them Run asserts that the call is
	// not refused.
	NotRefusable map[string]bool
	// Records reads the server's audit log.
	Records func(t *testing.T) []audit.Record
}

// FullMethod returns "/<service>/<method>".
func FullMethod(m protoreflect.MethodDescriptor) string {
	return "/" + string(m.Parent().FullName()) + "/" + string(m.Name())
}

// Services returns the services the files declare.
func Services(files ...protoreflect.FileDescriptor) []protoreflect.ServiceDescriptor {
	var out []protoreflect.ServiceDescriptor
	for _, f := range files {
		for i := range f.Services().Len() {
			out = append(out, f.Services().Get(i))
		}
	}
	return out
}

// Invoke calls m with req (unary or streaming, reading a stream to its
// end) under request ID rid, and returns the call's error.
func Invoke(ctx context.Context, conn *grpc.ClientConn, m protoreflect.MethodDescriptor, req proto.Message, rid string) error {
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, audit.RequestIDHeader, rid), 20*time.Second)
	defer cancel()
	out := dynamicpb.NewMessage(m.Output())
	if !m.IsStreamingClient() && !m.IsStreamingServer() {
		return conn.Invoke(ctx, FullMethod(m), req, out)
	}
	s, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: m.IsStreamingServer(), ClientStreams: m.IsStreamingClient()}, FullMethod(m))
	if err != nil {
		return err
	}
	_ = s.SendMsg(req) // io.EOF if the server already ended the stream: RecvMsg has its status
	_ = s.CloseSend()
	for {
		if err := s.RecvMsg(out); err != nil {
			return err
		}
		if m.Name() == "Watch" {
			return nil // a health watch never ends by itself: its first answer is the answer
		}
	}
}

// Run calls every method and checks the outcome and the audit records.
func Run(t *testing.T, cfg Config) {
	t.Helper()
	type call struct {
		full, rid string
		refused   bool
	}
	var calls []call
	for _, sd := range cfg.Services {
		for i := range sd.Methods().Len() {
			m := sd.Methods().Get(i)
			full := FullMethod(m)
			var req proto.Message
			if cfg.Request != nil {
				req = cfg.Request(m)
			}
			if req == nil {
				req = dynamicpb.NewMessage(m.Input())
			}
			rid := fmt.Sprintf("refusal-%d", len(calls))
			err := Invoke(t.Context(), cfg.Conn, m, req, rid)
			code := status.Code(err)
			refused := code == codes.PermissionDenied || code == codes.Unauthenticated
			switch {
			case cfg.NotRefusable[full] && refused:
				t.Errorf("%s as %s = %v; it is listed as not refusable", full, cfg.Identity, err)
			case !cfg.NotRefusable[full] && code != codes.PermissionDenied:
				t.Errorf("%s as %s = %v, want PermissionDenied (find a refusal path, or list it as not refusable)", full, cfg.Identity, err)
			}
			calls = append(calls, call{full, rid, refused})
		}
	}
	byRID := map[string]audit.Record{}
	for _, r := range cfg.Records(t) {
		if r.Outcome == audit.OutcomeDenied {
			byRID[r.RequestID] = r
		}
	}
	for _, c := range calls {
		if !c.refused {
			continue
		}
		r, ok := byRID[c.rid]
		switch {
		case !ok:
			t.Errorf("%s refused %s: no denied audit record (request ID %s)", c.full, cfg.Identity, c.rid)
		case r.Operation != c.full || r.Identity != cfg.Identity:
			t.Errorf("denied record of %s = {operation %s, identity %s}, want {%s, %s}", c.rid, r.Operation, r.Identity, c.full, cfg.Identity)
		}
	}
}
