package distributor_test

import (
	"path/filepath"
	"testing"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionv1alphapb "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"

	"github.com/cairnkms/cairn/distributor"
	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/grpcserver/refusaltest"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
)

// TestEveryRefusalAuditedDistributor: every method a distributor serves,
// called by a member of the trust domain that is no officer, root KMS
// replica or peer, is refused and leaves a denied record with the caller's
// identity; the status polls (whose successes are not audited), health and
// reflection are open to every member and cannot be refused.
func TestEveryRefusalAuditedDistributor(t *testing.T) {
	const intruder = "spiffe://cairn.test/client/us-east/intruder"
	w := newWorld(t, 2, 3)
	w.configure = func(_ string, c *distributor.Config) { c.Reflection = true }
	n := w.start("d1", true)
	conn, err := grpc.NewClient(n.addr, grpc.WithTransportCredentials(w.pki.ClientCredentials(intruder)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	refusaltest.Run(t, refusaltest.Config{
		Conn: conn, Identity: intruder,
		Services: refusaltest.Services(distributorv1.File_cairn_distributor_v1_distributor_proto,
			healthpb.File_grpc_health_v1_health_proto, reflectionpb.File_grpc_reflection_v1_reflection_proto,
			reflectionv1alphapb.File_grpc_reflection_v1alpha_reflection_proto),
		NotRefusable: map[string]bool{
			"/cairn.distributor.v1.Distributor/GetStatus": true, "/cairn.distributor.v1.Distributor/GetCeremony": true,
			"/grpc.health.v1.Health/Check": true, "/grpc.health.v1.Health/List": true, "/grpc.health.v1.Health/Watch": true,
			"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo":      true,
			"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": true,
		},
		Records: func(t *testing.T) []audit.Record {
			recs, err := audit.ReadFile(filepath.Join(n.dir, "audit.log"))
			if err != nil {
				t.Fatal(err)
			}
			return recs
		},
	})
}
