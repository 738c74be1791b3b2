package grpcserver_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/grpcserver"
)

// withUnknown returns a health check request with raw (an unknown field's
// encoding, which the server skips) appended.
func withUnknown(raw []byte) *healthpb.HealthCheckRequest {
	m := &healthpb.HealthCheckRequest{}
	m.ProtoReflect().SetUnknown(raw)
	return m
}

// paddedCheck is a health check request of exactly size bytes: one unknown
// bytes field.
func paddedCheck(t *testing.T, size int) *healthpb.HealthCheckRequest {
	t.Helper()
	const field = 1000
	for n := size - protowire.SizeTag(field) - 1; n >= 0; n-- {
		if protowire.SizeTag(field)+protowire.SizeBytes(n) == size {
			m := withUnknown(protowire.AppendBytes(protowire.AppendTag(nil, field, protowire.BytesType), make([]byte, n)))
			if got := proto.Size(m); got != size {
				t.Fatalf("padded request is %d bytes, want %d", got, size)
			}
			return m
		}
	}
	t.Fatalf("cannot pad a health check request to %d bytes", size)
	return nil
}

// nestedCheck is a health check request holding depth nested unknown groups.
func nestedCheck(depth int) *healthpb.HealthCheckRequest {
	b := make([]byte, 0, 2*depth)
	for range depth {
		b = protowire.AppendTag(b, 15, protowire.StartGroupType)
	}
	for range depth {
		b = protowire.AppendTag(b, 15, protowire.EndGroupType)
	}
	return withUnknown(b)
}

// TestDefaultLimitsRefuseOversizeAndDeepNesting: with the default receive
// limit (DefaultMaxRecvMsgSize, 64 KiB), a request of exactly the limit is
// served, one byte more is refused with RESOURCE_EXHAUSTED naming the
// limit, and a request under the limit nested deeper than protobuf-go's
// recursion limit (protowire.DefaultRecursionLimit: 10001 levels parse,
// 10002 do not) is refused with INTERNAL "failed to unmarshal"; after each
// refusal the server answers the next call on the same connection.
func TestDefaultLimitsRefuseOversizeAndDeepNesting(t *testing.T) {
	s := startWith(t, grpcserver.Options{})
	s.ready.Store(true)
	h := healthpb.NewHealthClient(s.dial(t))
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	serves := func(after string) {
		t.Helper()
		if r, err := h.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("Check after %s = %v, %v; want SERVING", after, r, err)
		}
	}
	limit := grpcserver.DefaultMaxRecvMsgSize

	if r, err := h.Check(ctx, paddedCheck(t, limit)); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("Check of exactly %d bytes = %v, %v; want SERVING", limit, r, err)
	}
	_, err := h.Check(ctx, paddedCheck(t, limit+1))
	if st, _ := status.FromError(err); st.Code() != codes.ResourceExhausted || !strings.Contains(st.Message(), fmt.Sprint(limit)) {
		t.Errorf("Check of %d bytes = %v, want RESOURCE_EXHAUSTED naming %d", limit+1, err, limit)
	}
	serves("an oversized request")

	depth := protowire.DefaultRecursionLimit
	if r, err := h.Check(ctx, nestedCheck(depth+1)); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("Check with %d nested groups = %v, %v; want SERVING (within protobuf's limit)", depth+1, r, err)
	}
	for _, d := range []int{depth + 2, (limit - 16) / 2} {
		_, err := h.Check(ctx, nestedCheck(d))
		if st, _ := status.FromError(err); st.Code() != codes.Internal || !strings.Contains(st.Message(), "failed to unmarshal") {
			t.Errorf("Check with %d nested groups (%d bytes) = %v, want INTERNAL failed to unmarshal", d, 2*d, err)
		}
		serves(fmt.Sprintf("%d nested groups", d))
	}
}
