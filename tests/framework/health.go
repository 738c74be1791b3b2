package framework

import (
	"context"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// Health asks the KMS server's grpc.health.v1 service for the server's
// status, calling as Observer.
func (s *KMSServer) Health() (healthpb.HealthCheckResponse_ServingStatus, error) {
	s.w.T.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), pollRPCTimeout)
	defer cancel()
	resp, err := healthpb.NewHealthClient(s.conn(Observer)).Check(ctx, &healthpb.HealthCheckRequest{})
	return resp.GetStatus(), err
}

// Health asks the distributor's grpc.health.v1 service for the server's
// status, calling as Observer.
func (d *Distributor) Health() (healthpb.HealthCheckResponse_ServingStatus, error) {
	d.w.T.Helper()
	_, conn := d.Dial(Observer)
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), pollRPCTimeout)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return resp.GetStatus(), err
}
