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
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
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

func wrapped(v uint32) *rootkmsv1.WrappedRegionKeyVersion {
	return &rootkmsv1.WrappedRegionKeyVersion{Version: v, WrappedKey: []byte("wrapped-under-rmk"), RmkKcv: []byte("kcv-bytes")}
}

func command(op func(*rootkmsv1.Command)) *rootkmsv1.Command {
	c := &rootkmsv1.Command{FormatVersion: 1, Time: t0, RequestId: "req-1", Identity: "spiffe://cairn.test/regionctl/global/regionctl"}
	op(c)
	return c
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
			Regions: []string{"us-east", "eu-west"},
		}},
		Parent: &bundlev1.BundleRef{Region: "us-east", Serial: 41, Sha256: []byte("sha256-of-parent")},
	}
	bundleBytes, err := proto.MarshalOptions{Deterministic: true}.Marshal(bundle)
	if err != nil {
		panic(err)
	}
	return map[string]proto.Message{
		"rootkms_command_create_region": command(func(c *rootkmsv1.Command) {
			c.Op = &rootkmsv1.Command_CreateRegion{CreateRegion: &rootkmsv1.CreateRegionCommand{Region: "us-east", FirstVersion: wrapped(1)}}
		}),
		"rootkms_command_add_region_key_version": command(func(c *rootkmsv1.Command) {
			c.Op = &rootkmsv1.Command_AddRegionKeyVersion{AddRegionKeyVersion: &rootkmsv1.AddRegionKeyVersionCommand{Region: "us-east", Version: wrapped(2), MakePrimary: true}}
		}),
		"rootkms_command_set_region_key_version_status": command(func(c *rootkmsv1.Command) {
			c.Op = &rootkmsv1.Command_SetRegionKeyVersionStatus{SetRegionKeyVersionStatus: &rootkmsv1.SetRegionKeyVersionStatusCommand{Region: "us-east", Version: 1, Status: cryptov1.KeyStatus_KEY_STATUS_DISABLED}}
		}),
		"rootkms_snapshot": &rootkmsv1.Snapshot{
			FormatVersion: 1, GenesisId: "0123456789abcdef0123456789abcdef", RmkKcv: []byte("kcv-bytes"),
			Regions: []*rootkmsv1.RegionRecord{{
				Name: "us-east", CreatedAt: t0,
				Versions: []*rootkmsv1.RegionKeyVersionRecord{{Key: wrapped(1), Info: keyVersion(1)}},
			}},
			Members: []*rootkmsv1.MemberRecord{{Id: "rootkms-1", ApiAddress: "127.0.0.1:7201"}},
		},
		"rootkms_command_register_member": command(func(c *rootkmsv1.Command) {
			c.Op = &rootkmsv1.Command_RegisterMember{RegisterMember: &rootkmsv1.RegisterMemberCommand{Member: &rootkmsv1.MemberRecord{Id: "rootkms-1", ApiAddress: "127.0.0.1:7201"}}}
		}),
		"rootkms_command_deregister_member": command(func(c *rootkmsv1.Command) {
			c.Op = &rootkmsv1.Command_DeregisterMember{DeregisterMember: &rootkmsv1.DeregisterMemberCommand{Id: "rootkms-2"}}
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
