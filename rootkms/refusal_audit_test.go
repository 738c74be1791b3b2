package rootkms_test

import (
	"testing"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionv1alphapb "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/grpcserver/refusaltest"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms"
)

// TestEveryRefusalAuditedRootKMS: every method a root KMS replica serves,
// called by a member of the trust domain that is no regionctl, operator,
// replica or KMS server, is refused and leaves a denied record with the
// caller's identity; the read-only region and cluster status methods (whose
// successes may not be audited), health and reflection are open to every
// member and cannot be refused.
func TestEveryRefusalAuditedRootKMS(t *testing.T) {
	const intruder = "spiffe://cairn.test/client/us-east/intruder"
	c := newChain(t)
	c.configure = func(_ string, cfg *rootkms.Config) { cfg.Reflection = true }
	r := c.startReplica("r1", true, false)
	conn, err := grpc.NewClient(r.api, grpc.WithTransportCredentials(c.pki.ClientCredentials(intruder)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	refusaltest.Run(t, refusaltest.Config{
		Conn: conn, Identity: intruder,
		Services: refusaltest.Services(rootkmsv1.File_cairn_rootkms_v1_rootkms_proto,
			healthpb.File_grpc_health_v1_health_proto, reflectionpb.File_grpc_reflection_v1_reflection_proto,
			reflectionv1alphapb.File_grpc_reflection_v1alpha_reflection_proto),
		NotRefusable: map[string]bool{
			"/cairn.rootkms.v1.RootKMS/GetRegion": true, "/cairn.rootkms.v1.RootKMS/ListRegions": true,
			"/cairn.rootkms.v1.RootKMS/GetClusterStatus": true,
			"/grpc.health.v1.Health/Check":               true, "/grpc.health.v1.Health/List": true, "/grpc.health.v1.Health/Watch": true,
			"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo":      true,
			"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": true,
		},
		Records: func(t *testing.T) []audit.Record {
			recs, err := audit.ReadFile(r.auditLog)
			if err != nil {
				t.Fatal(err)
			}
			return recs
		},
	})
}
