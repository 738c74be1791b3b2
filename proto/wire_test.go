// Package proto_test pins the wire format of every persisted message: Raft
// commands and snapshots, config bundles, genesis manifests and sealed shares
// are stored for years and replayed by future binaries. Each sample message
// sets every field; its deterministic encoding is compared with a golden file
// in testdata/, and the golden bytes must decode back to the same message. A
// renumbered, retyped or removed field fails here. Run with -update only for
// an intended, additive change (and say so in the commit).
package proto_test

import (
	"encoding/hex"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
)

var update = flag.Bool("update", false, "rewrite the golden files")

var (
	t0 = timestamppb.New(time.Date(2026, 11, 23, 10, 0, 0, 123456789, time.UTC))
	t1 = timestamppb.New(time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC))
)

func keyVersion(id uint32) *cryptov1.KeyVersionInfo {
	return &cryptov1.KeyVersionInfo{
		KeyId: id, Status: cryptov1.KeyStatus_KEY_STATUS_PRIMARY,
		TypeUrl:   "type.googleapis.com/google.crypto.tink.AesGcmKey",
		CreatedAt: t0, PrimarySince: t0, SupersededAt: t1, RetiredAt: t1,
	}
}

func encryptedKeyset() *cryptov1.EncryptedKeyset {
	return &cryptov1.EncryptedKeyset{
		Name: "payments/ledger", Region: "us-east", RegionKeyVersion: 2,
		Ciphertext: []byte("encrypted-keyset-bytes"), Versions: []*cryptov1.KeyVersionInfo{keyVersion(0x01020304)},
		PrimaryKeyId: 0x01020304,
	}
}

func wrapped(v uint32) *statev1.WrappedRegionKeyVersion {
	return &statev1.WrappedRegionKeyVersion{Version: v, WrappedKey: []byte("wrapped-under-rmk"), RmkKcv: []byte("kcv-bytes")}
}

func command(op func(*statev1.Command)) *statev1.Command {
	c := &statev1.Command{FormatVersion: 1, Time: t0, RequestId: "req-1", Identity: "spiffe://cairn.test/regionctl/global/regionctl"}
	op(c)
	return c
}

// rolloutRecord is a rollout record with every field set.
func rolloutRecord() *statev1.RolloutRecord {
	return &statev1.RolloutRecord{
		Id: "r-20261203-1", Regions: []string{"eu-west", "us-east"}, InFlight: true, Epoch: 2,
		Owner: "spiffe://cairn.test/regionctl/global/regionctl#host-1", Revision: 7, CreatedAt: t0, UpdatedAt: t1,
		StartedBy: "spiffe://cairn.test/regionctl/global/regionctl", Reason: "ticket SRE-42",
		BodyFormat: "cairn.rollout.v1+json", Body: []byte(`{"stage":1}`),
	}
}

// keysetRecord is a keyset record with every field set.
func keysetRecord() *statev1.KeysetRecord {
	return &statev1.KeysetRecord{
		Name: "payments/ledger", Regions: []string{"eu-west", "us-east"}, CreatedAt: t0,
		CreatedBy: "spiffe://cairn.test/regionctl/global/regionctl", RotationPeriod: durationpb.New(30 * 24 * time.Hour),
		TtlHistory: []*statev1.TtlPeriod{{Ttl: durationpb.New(time.Hour), From: t0, Until: t1}},
		Versions: []*statev1.KeysetVersionRecord{{
			KeyId: 7, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROYED, Template: "AES256_GCM", CreatedAt: t0,
			Propagated: []*statev1.RegionTime{{Region: "us-east", At: t0}}, PrimarySince: t0, SupersededAt: t1, DisabledAt: t1,
			DestroyAfter: t1, DestroyedAt: t1, EncryptCount: 11,
			Usage:  []*statev1.RegionUsage{{Region: "us-east", ObservedAt: t1, LastEncrypt: t0, LastUse: t1, EncryptCount: 11, DecryptCount: 12, ServedAsPrimary: true}},
			Golden: &statev1.GoldenCiphertext{Ciphertext: []byte("golden-ciphertext"), AssociatedData: []byte("cairn/golden"), PlaintextSha256: []byte("sha256-of-plaintext")},
		}},
		Copies: []*cryptov1.EncryptedKeyset{encryptedKeyset()}, Revision: 5, UpdatedAt: t1, Purpose: 1,
	}
}

func samples() map[string]proto.Message {
	bundle := &bundlev1.Bundle{
		FormatVersion: 1, Region: "us-east", Serial: 42, RegionKeyVersions: []uint32{1, 2},
		CreatedAt: t0, CreatedBy: "spiffe://cairn.test/regionctl/global/regionctl",
		Keysets: []*bundlev1.KeysetConfig{{
			Name: "payments/ledger", OwnerTeam: "payments", Purpose: bundlev1.Purpose_PURPOSE_ENVELOPE,
			Keyset: encryptedKeyset(),
			Acl: &bundlev1.Acl{
				Encrypt: []string{"client/us-east/*"}, Decrypt: []string{"client/us-east/*", "client/eu-west/ledger"},
				GenerateDataKey: []string{"client/us-east/*"}, Rewrap: []string{"regionctl/global/regionctl"},
			},
			RotationPeriod: durationpb.New(90 * 24 * time.Hour), CiphertextTtl: durationpb.New(365 * 24 * time.Hour),
			Regions:           []string{"us-east", "eu-west"},
			TtlHistory:        []*bundlev1.TtlPeriod{{Ttl: durationpb.New(730 * 24 * time.Hour), From: t0, Until: t1}},
			Lifecycle:         []*bundlev1.VersionLifecycle{{KeyId: 7, PropagatedEverywhere: t0, PrimarySince: t1, SupersededAt: t1, EncryptCount: 3}},
			PropagationWindow: durationpb.New(10 * time.Minute),
			EncryptLimit:      1 << 32,
			DestroyedKeyIds:   []uint32{0x01020300, 0x01020301},
		}},
		Parent:         &bundlev1.BundleRef{Region: "us-east", Serial: 41, Sha256: []byte("sha256-of-parent")},
		ShrinkOverride: &bundlev1.ShrinkOverride{Reason: "retiring payments/old, ticket SRE-42", ForcedBy: "spiffe://cairn.test/regionctl/global/regionctl"},
		Partial:        &bundlev1.PartialBuild{Reason: "incident 7", BuiltBy: "spiffe://cairn.test/regionctl/global/regionctl", LeftOut: []string{"search/index: not in the record"}},
		NotAfter:       t1,
		Quotas:         []*bundlev1.Quota{{Pattern: "client/us-east/*", RequestsPerSecond: 100, Burst: 10, MaxConcurrent: 8}},
		DefaultQuota:   &bundlev1.Quota{Pattern: "wire-sample-only", RequestsPerSecond: 1000, Burst: 100, MaxConcurrent: 32},
	}
	bundleBytes, err := proto.MarshalOptions{Deterministic: true}.Marshal(bundle)
	if err != nil {
		panic(err)
	}
	return map[string]proto.Message{
		"rootkms_command_create_region": command(func(c *statev1.Command) {
			c.Op = &statev1.Command_CreateRegion{CreateRegion: &statev1.CreateRegionCommand{Region: "us-east", FirstVersion: wrapped(1)}}
		}),
		"rootkms_command_add_region_key_version": command(func(c *statev1.Command) {
			c.Op = &statev1.Command_AddRegionKeyVersion{AddRegionKeyVersion: &statev1.AddRegionKeyVersionCommand{Region: "us-east", Version: wrapped(2), MakePrimary: true}}
		}),
		"rootkms_command_set_region_key_version_status": command(func(c *statev1.Command) {
			c.Op = &statev1.Command_SetRegionKeyVersionStatus{SetRegionKeyVersionStatus: &statev1.SetRegionKeyVersionStatusCommand{Region: "us-east", Version: 1, Status: cryptov1.KeyStatus_KEY_STATUS_DISABLED}}
		}),
		"rootkms_snapshot": &statev1.Snapshot{
			FormatVersion: 1, GenesisId: "0123456789abcdef0123456789abcdef", RmkKcv: []byte("kcv-bytes"),
			Regions: []*statev1.RegionRecord{{
				Name: "us-east", CreatedAt: t0,
				Versions:          []*statev1.RegionKeyVersionRecord{{Key: wrapped(1), Info: keyVersion(1)}},
				ServedKeyVersions: []uint32{1}, ServedObservedAt: t1, BundleSerialFloor: 42,
			}},
			Members:  []*statev1.MemberRecord{{Id: "rootkms-1", ApiAddress: "127.0.0.1:7201"}},
			Keysets:  []*statev1.KeysetRecord{keysetRecord()},
			Rollouts: []*statev1.RolloutRecord{rolloutRecord()},
			Requests: []*statev1.RequestRecord{{Identity: "spiffe://cairn.test/regionctl/global/regionctl", RequestId: "req-1", Index: 9,
				ErrorKind: "reserved", Error: "reserved", Subject: "keyset/payments/ledger", KeyId: 7, Operation: "update_keyset/PROMOTE"}},
		},
		"rootkms_command_create_keyset": command(func(c *statev1.Command) {
			c.Op = &statev1.Command_CreateKeyset{CreateKeyset: &statev1.CreateKeysetCommand{Keyset: keysetRecord()}}
		}),
		"rootkms_command_update_keyset": command(func(c *statev1.Command) {
			c.Op = &statev1.Command_UpdateKeyset{UpdateKeyset: &statev1.UpdateKeysetCommand{Name: "payments/ledger", ExpectedRevision: 3,
				Step: statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY, KeyId: 7, Template: "AES256_GCM", DestroyAfter: t1,
				Copies: []*cryptov1.EncryptedKeyset{encryptedKeyset()},
				Golden: &statev1.GoldenCiphertext{Ciphertext: []byte("golden-ciphertext"), AssociatedData: []byte("cairn/golden"), PlaintextSha256: []byte("sha256-of-plaintext")}}}
		}),
		"rootkms_command_record_propagation": command(func(c *statev1.Command) {
			c.Op = &statev1.Command_RecordPropagation{RecordPropagation: &statev1.RecordPropagationCommand{Region: "us-east", ObservedAt: t1,
				Keysets: []*statev1.KeysetObservation{{Keyset: "payments/ledger", Versions: []*statev1.VersionObservation{{
					KeyId: 7, ServedByAll: true, LastEncrypt: t0, LastUse: t1, EncryptCount: 5, DecryptCount: 6, ServedAsPrimary: true}}}},
				RegionKeyVersions: []uint32{1, 2}}}
		}),
		"rootkms_command_put_rollout": command(func(c *statev1.Command) {
			c.Op = &statev1.Command_PutRollout{PutRollout: &statev1.PutRolloutCommand{Rollout: rolloutRecord(), ExpectedRevision: 6}}
		}),
		"rootkms_command_set_keyset_policy": command(func(c *statev1.Command) {
			c.Op = &statev1.Command_SetKeysetPolicy{SetKeysetPolicy: &statev1.SetKeysetPolicyCommand{Name: "payments/ledger", ExpectedRevision: 4,
				RotationPeriod: durationpb.New(30 * 24 * time.Hour), CiphertextTtl: durationpb.New(90 * 24 * time.Hour)}}
		}),
		"rootkms_command_record_bundle_serial": command(func(c *statev1.Command) {
			c.Op = &statev1.Command_RecordBundleSerial{RecordBundleSerial: &statev1.RecordBundleSerialCommand{Region: "us-east", Serial: 42}}
		}),
		"rootkms_command_register_member": command(func(c *statev1.Command) {
			c.Op = &statev1.Command_RegisterMember{RegisterMember: &statev1.RegisterMemberCommand{Member: &statev1.MemberRecord{Id: "rootkms-1", ApiAddress: "127.0.0.1:7201"}}}
		}),
		"rootkms_command_deregister_member": command(func(c *statev1.Command) {
			c.Op = &statev1.Command_DeregisterMember{DeregisterMember: &statev1.DeregisterMemberCommand{Id: "rootkms-2"}}
		}),
		"bundle": bundle,
		"signed_bundle": &bundlev1.SignedBundle{
			Bundle: bundleBytes, Signature: []byte("ed25519-signature"), SigningKeyId: "0011223344556677",
		},
		"safe_genesis_manifest": &safev1.GenesisManifest{
			FormatVersion: 1, GenesisId: "0123456789abcdef0123456789abcdef", Epoch: 1, Threshold: 3,
			Slots: []*safev1.ShareSlot{{Index: 1, SafeLabel: "safe-1", SafeKind: "pkcs11", Commitment: []byte("commitment"), Officer: "spiffe://cairn.test/officer/global/officer-1"}},
			Kcv:   []byte("kcv-bytes"), CreatedAt: t0, PreviousManifestSha256: []byte("sha256-of-previous"),
		},
		"safe_sealed_share": &safev1.SealedShare{
			FormatVersion: 1, GenesisId: "0123456789abcdef0123456789abcdef", Epoch: 1, Index: 2,
			KeyLabel: "cairn-share-key", Nonce: []byte("twelve-bytes"), Ciphertext: []byte("sealed"),
		},
		"safe_released_share": &safev1.ReleasedShare{
			GenesisId: "0123456789abcdef0123456789abcdef", Epoch: 1, Index: 2, Share: []byte("share"),
		},
		"crypto_encrypted_keyset": encryptedKeyset(),
	}
}

func TestPersistedWireFormat(t *testing.T) {
	for name, msg := range samples() {
		t.Run(name, func(t *testing.T) {
			assertAllFieldsSet(t, msg.ProtoReflect())
			got, err := proto.MarshalOptions{Deterministic: true}.Marshal(msg)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", name+".hex")
			if *update {
				if err := os.MkdirAll("testdata", 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(wrapHex(got)), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			golden, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("reading golden file (run `go test ./proto -update` once for a new message): %v", err)
			}
			want, err := hex.DecodeString(strings.Join(strings.Fields(string(golden)), ""))
			if err != nil {
				t.Fatalf("golden file %s: %v", path, err)
			}
			if string(got) != string(want) {
				t.Errorf("encoding of %s changed:\n got %x\nwant %x\nA persisted format must stay readable: add fields, never renumber or retype them.", name, got, want)
			}
			decoded := msg.ProtoReflect().New().Interface()
			if err := proto.Unmarshal(want, decoded); err != nil {
				t.Fatalf("golden bytes of %s no longer decode: %v", name, err)
			}
			if !proto.Equal(decoded, msg) {
				t.Errorf("golden bytes of %s decode to %v, want %v", name, decoded, msg)
			}
		})
	}
}

// assertAllFieldsSet makes sure a sample exercises every field (recursively,
// one oneof case per sample), so the golden file pins each field number.
func assertAllFieldsSet(t *testing.T, m protoreflect.Message) {
	t.Helper()
	fields := m.Descriptor().Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		if od := fd.ContainingOneof(); od != nil && !od.IsSynthetic() {
			if m.WhichOneof(od) == nil {
				t.Errorf("%s: oneof %s unset", m.Descriptor().FullName(), od.Name())
			}
			if m.WhichOneof(od) != fd {
				continue
			}
		}
		if !m.Has(fd) {
			t.Errorf("%s: field %s unset in the sample", m.Descriptor().FullName(), fd.Name())
			continue
		}
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := m.Get(fd).List()
			for j := 0; j < l.Len(); j++ {
				assertAllFieldsSet(t, l.Get(j).Message())
			}
		case fd.Message() != nil && !fd.IsMap() && !strings.HasPrefix(string(fd.Message().FullName()), "google.protobuf."):
			assertAllFieldsSet(t, m.Get(fd).Message())
		}
	}
}

func wrapHex(b []byte) string {
	s := hex.EncodeToString(b)
	var sb strings.Builder
	for len(s) > 64 {
		sb.WriteString(s[:64] + "\n")
		s = s[64:]
	}
	sb.WriteString(s + "\n")
	return sb.String()
}
