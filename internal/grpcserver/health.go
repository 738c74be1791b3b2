package grpcserver

import (
	"context"
	"time"

	"github.com/cairnkms/cairn/internal/ops"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// Readiness is ops.Readiness: whether a server really serves and, when
// not, why. The same function backs grpc.health.v1 and /readyz.
type Readiness = ops.Readiness

// Health method names: Check and List are unary, Watch streams.
const (
	healthCheck = "/grpc.health.v1.Health/Check"
	healthList  = "/grpc.health.v1.Health/List"
	healthWatch = "/grpc.health.v1.Health/Watch"
)

// healthPoll is how often a Watch re-reads the readiness.
const healthPoll = time.Second

// health is grpc.health.v1 answered from a Readiness function: the server
// ("") and each of its services are SERVING exactly when the server is
// ready. It keeps no state of its own, so it can never disagree with the
// server.
type health struct {
	healthpb.UnimplementedHealthServer
	ready    Readiness
	services func() map[string]grpc.ServiceInfo
}

// status is the status of service ("": the server) and, when not serving,
// why; the readiness is read once, so the two agree.
func (h *health) status(service string) (healthpb.HealthCheckResponse_ServingStatus, string, error) {
	if service != "" {
		if _, ok := h.services()[service]; !ok {
			return healthpb.HealthCheckResponse_SERVICE_UNKNOWN, "", status.Errorf(codes.NotFound, "grpcserver: no service %q on this server", truncate(service))
		}
	}
	if ok, reason := h.ready(); !ok {
		return healthpb.HealthCheckResponse_NOT_SERVING, reason, nil
	}
	return healthpb.HealthCheckResponse_SERVING, "", nil
}

// Check implements grpc.health.v1.Health. A not-ready server answers
// NOT_SERVING (not an error), and says why in the response header
// "cairn-not-ready-reason", which grpcurl -v shows.
func (h *health) Check(ctx context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	st, reason, err := h.status(req.GetService())
	if err != nil {
		return nil, err
	}
	if reason != "" {
		_ = grpc.SetHeader(ctx, map[string][]string{"cairn-not-ready-reason": {reason}})
	}
	return &healthpb.HealthCheckResponse{Status: st}, nil
}

// List implements grpc.health.v1.Health: the server ("") and every service.
func (h *health) List(context.Context, *healthpb.HealthListRequest) (*healthpb.HealthListResponse, error) {
	st, _, _ := h.status("")
	out := &healthpb.HealthListResponse{Statuses: map[string]*healthpb.HealthCheckResponse{"": {Status: st}}}
	for name := range h.services() {
		out.Statuses[name] = &healthpb.HealthCheckResponse{Status: st}
	}
	return out, nil
}

// Watch implements grpc.health.v1.Health: the status now, then every change,
// until the caller goes away or the server stops. An unknown service is
// reported SERVICE_UNKNOWN (as the protocol asks), not refused.
func (h *health) Watch(req *healthpb.HealthCheckRequest, stream grpc.ServerStreamingServer[healthpb.HealthCheckResponse]) error {
	last := healthpb.HealthCheckResponse_ServingStatus(-1)
	t := time.NewTicker(healthPoll)
	defer t.Stop()
	for {
		st, _, _ := h.status(req.GetService())
		if st != last {
			if err := stream.Send(&healthpb.HealthCheckResponse{Status: st}); err != nil {
				return err
			}
			last = st
		}
		select {
		case <-stream.Context().Done():
			return status.FromContextError(stream.Context().Err()).Err()
		case <-t.C:
		}
	}
}

// truncate bounds a client-supplied string echoed in an error.
func truncate(s string) string {
	if len(s) > 128 {
		return s[:128] + "..."
	}
	return s
}
