package kms_test

import (
	"testing"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionv1alphapb "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/grpcserver/refusaltest"
	"github.com/cairnkms/cairn/kms"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// TestEveryRefusalAuditedKMS: every method a KMS server serves, called by a
// member of the trust domain that no keyset ACL and no admin list names, is
// refused and leaves a denied record with the caller's identity (the data
// plane by the keyset's ACL, the admin service by the policy, GetStatus
// included though its successes are not audited); health and reflection
// cannot be refused.
func TestEveryRefusalAuditedKMS(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "", func(c *kms.Config) { c.Reflection = true })
	e.apply(s, e.bundle(e.ks))
	waitReady(t, s)
	refusaltest.Run(t, refusaltest.Config{
		Conn: e.conn(otherID, s.addr), Identity: otherID,
		Services: refusaltest.Services(kmsv1.File_cairn_kms_v1_kms_proto, kmsv1.File_cairn_kms_v1_admin_proto,
			healthpb.File_grpc_health_v1_health_proto, reflectionpb.File_grpc_reflection_v1_reflection_proto,
			reflectionv1alphapb.File_grpc_reflection_v1alpha_reflection_proto),
		// A data-plane request names the keyset the caller may not use.
		Request: func(m protoreflect.MethodDescriptor) proto.Message {
			req := dynamicpb.NewMessage(m.Input())
			if f := m.Input().Fields().ByName("keyset"); f != nil {
				req.Set(f, protoreflect.ValueOfString(ledger))
			}
			return req
		},
		NotRefusable: map[string]bool{
			"/grpc.health.v1.Health/Check": true, "/grpc.health.v1.Health/List": true, "/grpc.health.v1.Health/Watch": true,
			"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo":      true,
			"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": true,
		},
		Records: func(t *testing.T) []audit.Record {
			recs, err := audit.ReadFile(s.auditPath)
			if err != nil {
				t.Fatal(err)
			}
			return recs
		},
	})
}
