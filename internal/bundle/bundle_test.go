package bundle_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/keysets"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

// umask is the process's file creation mask, read once before any test.
var umask os.FileMode

func TestMain(m *testing.M) {
	old := syscall.Umask(0)
	syscall.Umask(old)
	umask = os.FileMode(old)
	goleak.VerifyTestMain(m)
}

const (
	region    = "us-east"
	createdBy = "spiffe://cairn.test/regionctl/global/regionctl"
	// signingContext is the prefix the format documents for signatures.
	signingContext = "cairn/bundle/v1\x00"
)

// newKey makes a signing key pair.
func newKey(t testing.TB) (ed25519.PublicKey, ed25519.PrivateKey) {
	t.Helper()
	pub, priv, err := bundle.GenerateKey()
	if err != nil {
		t.Fatalf("GenerateKey() = %v", err)
	}
	return pub, priv
}

// encryptedKeyset is a real keyset encrypted for region under a fresh region
// key version.
func encryptedKeyset(t testing.TB, name, region string, version uint32) *cryptov1.EncryptedKeyset {
	t.Helper()
	rk, err := keysets.NewRegionKey()
	if err != nil {
		t.Fatalf("NewRegionKey() = %v", err)
	}
	defer rk.Wipe()
	aead, err := keysets.RegionAEAD(rk)
	if err != nil {
		t.Fatalf("RegionAEAD() = %v", err)
	}
	h, err := keysets.Generate("")
	if err != nil {
		t.Fatalf("Generate() = %v", err)
	}
	ek, err := keysets.Encrypt(h, name, region, version, aead)
	if err != nil {
		t.Fatalf("Encrypt(%s) = %v", name, err)
	}
	return ek
}

func keysetConfig(t testing.TB, name string) *bundlev1.KeysetConfig {
	return &bundlev1.KeysetConfig{
		Name:      name,
		OwnerTeam: strings.Split(name, "/")[0],
		Purpose:   bundlev1.Purpose_PURPOSE_ENVELOPE,
		Keyset:    encryptedKeyset(t, name, region, 1),
		Acl: &bundlev1.Acl{
			Encrypt:         []string{"client/us-east/*"},
			Decrypt:         []string{"client/*/ledger", "spiffe://cairn.test/client/eu-west/batch"},
			GenerateDataKey: []string{"client/us-east/ledger"},
		},
		RotationPeriod: durationpb.New(90 * 24 * time.Hour),
		CiphertextTtl:  durationpb.New(365 * 24 * time.Hour),
		Regions:        []string{"eu-west", region},
	}
}

// validBundle is a bundle Validate accepts: two keysets under region key
// version 1.
func validBundle(t testing.TB) *bundlev1.Bundle {
	t.Helper()
	return &bundlev1.Bundle{
		FormatVersion:     bundle.FormatVersion,
		Region:            region,
		Serial:            7,
		RegionKeyVersions: []uint32{1},
		CreatedAt:         timestamppb.New(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)),
		NotAfter:          timestamppb.New(time.Date(2026, 3, 31, 12, 0, 0, 0, time.UTC)),
		CreatedBy:         createdBy,
		Keysets:           []*bundlev1.KeysetConfig{keysetConfig(t, "payments/ledger"), keysetConfig(t, "payments/refunds")},
	}
}

// signRaw signs arbitrary bytes the way Sign does, without validating them.
func signRaw(priv ed25519.PrivateKey, raw []byte) *bundlev1.SignedBundle {
	msg := append([]byte(signingContext), raw...)
	return &bundlev1.SignedBundle{Bundle: raw, Signature: ed25519.Sign(priv, msg), SigningKeyId: bundle.KeyID(priv.Public().(ed25519.PublicKey))}
}

func marshal(t testing.TB, b *bundlev1.Bundle) []byte {
	t.Helper()
	raw, err := bundle.Marshal(b)
	if err != nil {
		t.Fatalf("Marshal() = %v", err)
	}
	return raw
}

func TestSignVerifyRoundTrip(t *testing.T) {
	pub, priv := newKey(t)
	otherPub, _ := newKey(t)
	b := validBundle(t)
	sb, err := bundle.Sign(b, priv)
	if err != nil {
		t.Fatalf("Sign() = %v", err)
	}
	if got, want := sb.GetSigningKeyId(), bundle.KeyID(pub); got != want {
		t.Errorf("Sign().SigningKeyId = %q, want %q", got, want)
	}
	if got, want := sb.GetBundle(), marshal(t, b); !bytes.Equal(got, want) {
		t.Errorf("Sign().Bundle is not Marshal(b)")
	}
	// The pinned key need not be first.
	got, err := bundle.Verify(sb, []ed25519.PublicKey{otherPub, pub})
	if err != nil {
		t.Fatalf("Verify(Sign(b)) = %v", err)
	}
	if diff := cmp.Diff(b, got, protocmp.Transform()); diff != "" {
		t.Errorf("Verify(Sign(b)) differs from b (-want +got):\n%s", diff)
	}
	// Signing the same content again gives the same bytes (and hash).
	again, err := bundle.Sign(got, priv)
	if err != nil {
		t.Fatalf("Sign(Verify(...)) = %v", err)
	}
	if !bytes.Equal(again.GetBundle(), sb.GetBundle()) {
		t.Errorf("Sign(Verify(Sign(b))).Bundle differs from Sign(b).Bundle")
	}
	// A signed bundle survives its own wire encoding.
	wire, err := proto.Marshal(sb)
	if err != nil {
		t.Fatal(err)
	}
	var decoded bundlev1.SignedBundle
	if err := proto.Unmarshal(wire, &decoded); err != nil {
		t.Fatal(err)
	}
	if _, err := bundle.Verify(&decoded, []ed25519.PublicKey{pub}); err != nil {
		t.Errorf("Verify(decoded SignedBundle) = %v, want nil", err)
	}
	// An empty bundle (a new region, no keysets yet) is fine too.
	empty := &bundlev1.Bundle{FormatVersion: 1, Region: region, Serial: 1, CreatedBy: createdBy}
	esb, err := bundle.Sign(empty, priv)
	if err != nil {
		t.Fatalf("Sign(empty) = %v", err)
	}
	if _, err := bundle.Verify(esb, []ed25519.PublicKey{pub}); err != nil {
		t.Errorf("Verify(Sign(empty)) = %v, want nil", err)
	}
}

func TestSignRefusesInvalid(t *testing.T) {
	_, priv := newKey(t)
	b := validBundle(t)
	b.Serial = 0
	if sb, err := bundle.Sign(b, priv); !errors.Is(err, bundle.ErrInvalid) {
		t.Errorf("Sign(serial 0) = %v, %v; want ErrInvalid", sb, err)
	}
}

func TestRef(t *testing.T) {
	_, priv := newKey(t)
	b := validBundle(t)
	sb, err := bundle.Sign(b, priv)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(sb.GetBundle())
	want := &bundlev1.BundleRef{Region: region, Serial: 7, Sha256: sum[:]}
	if diff := cmp.Diff(want, bundle.Ref(sb, b), protocmp.Transform()); diff != "" {
		t.Errorf("Ref() (-want +got):\n%s", diff)
	}
}

// appendUnknown appends an unknown length-delimited field to raw.
func appendUnknown(raw []byte, num protowire.Number, val []byte) []byte {
	out := protowire.AppendTag(append([]byte(nil), raw...), num, protowire.BytesType)
	return protowire.AppendBytes(out, val)
}

func TestVerifyRefuses(t *testing.T) {
	pub, priv := newKey(t)
	otherPub, otherPriv := newKey(t)
	b := validBundle(t)
	good, err := bundle.Sign(b, priv)
	if err != nil {
		t.Fatal(err)
	}
	raw := good.GetBundle()
	pinned := []ed25519.PublicKey{pub}

	flip := func(in []byte, i int) []byte {
		out := bytes.Clone(in)
		out[i] ^= 0x01
		return out
	}
	invalid := func(mutate func(*bundlev1.Bundle)) []byte {
		c := proto.CloneOf(b)
		mutate(c)
		return marshal(t, c)
	}
	// Reordered: the keysets field (7) before the region field (2).
	reordered := protowire.AppendTag(nil, 7, protowire.BytesType)
	reordered = protowire.AppendBytes(reordered, func() []byte {
		r, _ := proto.MarshalOptions{Deterministic: true}.Marshal(b.GetKeysets()[0])
		return r
	}())
	reordered = append(reordered, marshal(t, &bundlev1.Bundle{FormatVersion: 1, Region: region, Serial: 7, RegionKeyVersions: []uint32{1}, CreatedBy: createdBy, CreatedAt: b.GetCreatedAt()})...)
	// A field given twice: proto keeps the last, so the bytes are not the
	// canonical encoding of what is decoded.
	duplicated := append(bytes.Clone(raw), protowire.AppendString(protowire.AppendTag(nil, 2, protowire.BytesType), region)...)
	// An unknown field inside a keyset (not at the end of the bundle).
	nestedUnknown := func() []byte {
		c := proto.CloneOf(b)
		ks, _ := proto.MarshalOptions{Deterministic: true}.Marshal(c.GetKeysets()[1])
		ks = appendUnknown(ks, 99, []byte("x"))
		c.Keysets = c.Keysets[:1]
		out := marshal(t, c)
		out = protowire.AppendTag(out, 7, protowire.BytesType)
		return protowire.AppendBytes(out, ks)
	}()

	tests := []struct {
		name   string
		sb     *bundlev1.SignedBundle
		pinned []ed25519.PublicKey
		want   error
	}{
		{"nil signed bundle", nil, pinned, bundle.ErrInvalid},
		{"empty bundle bytes", &bundlev1.SignedBundle{Signature: good.GetSignature()}, pinned, bundle.ErrInvalid},
		{"oversize", &bundlev1.SignedBundle{Bundle: make([]byte, bundle.MaxSize+1), Signature: good.GetSignature()}, pinned, bundle.ErrInvalid},
		{"wrong key", good, []ed25519.PublicKey{otherPub}, bundle.ErrSignature},
		{"no key", good, nil, bundle.ErrSignature},
		{"malformed pinned key", good, []ed25519.PublicKey{pub[:31]}, bundle.ErrSignature},
		{"signed by another key", signRaw(otherPriv, raw), pinned, bundle.ErrSignature},
		{"flipped first byte of bundle", &bundlev1.SignedBundle{Bundle: flip(raw, 0), Signature: good.GetSignature()}, pinned, bundle.ErrSignature},
		{"flipped middle byte of bundle", &bundlev1.SignedBundle{Bundle: flip(raw, len(raw)/2), Signature: good.GetSignature()}, pinned, bundle.ErrSignature},
		{"flipped last byte of bundle", &bundlev1.SignedBundle{Bundle: flip(raw, len(raw)-1), Signature: good.GetSignature()}, pinned, bundle.ErrSignature},
		{"truncated bundle", &bundlev1.SignedBundle{Bundle: raw[:len(raw)-1], Signature: good.GetSignature()}, pinned, bundle.ErrSignature},
		{"flipped first byte of signature", &bundlev1.SignedBundle{Bundle: raw, Signature: flip(good.GetSignature(), 0)}, pinned, bundle.ErrSignature},
		{"flipped last byte of signature", &bundlev1.SignedBundle{Bundle: raw, Signature: flip(good.GetSignature(), ed25519.SignatureSize-1)}, pinned, bundle.ErrSignature},
		{"truncated signature", &bundlev1.SignedBundle{Bundle: raw, Signature: good.GetSignature()[:ed25519.SignatureSize-1]}, pinned, bundle.ErrSignature},
		{"no signature", &bundlev1.SignedBundle{Bundle: raw}, pinned, bundle.ErrSignature},
		{"signature without context", &bundlev1.SignedBundle{Bundle: raw, Signature: ed25519.Sign(priv, raw)}, pinned, bundle.ErrSignature},
		{"signature of another context", &bundlev1.SignedBundle{Bundle: raw, Signature: ed25519.Sign(priv, append([]byte("cairn/golden/v1\x00"), raw...))}, pinned, bundle.ErrSignature},
		{"signature of the context without its separator", &bundlev1.SignedBundle{Bundle: raw, Signature: ed25519.Sign(priv, append([]byte("cairn/bundle/v1"), raw...))}, pinned, bundle.ErrSignature},
		{"signed garbage", signRaw(priv, []byte{0xff, 0xff, 0xff}), pinned, bundle.ErrInvalid},
		{"signed invalid bundle", signRaw(priv, invalid(func(c *bundlev1.Bundle) { c.Serial = 0 })), pinned, bundle.ErrInvalid},
		{"signed bundle for an unlisted region key version", signRaw(priv, invalid(func(c *bundlev1.Bundle) { c.RegionKeyVersions = []uint32{2} })), pinned, bundle.ErrInvalid},
		{"unknown field appended", signRaw(priv, appendUnknown(raw, 99, []byte("hidden"))), pinned, bundle.ErrInvalid},
		{"unknown field inside a keyset", signRaw(priv, nestedUnknown), pinned, bundle.ErrInvalid},
		{"fields out of order", signRaw(priv, reordered), pinned, bundle.ErrInvalid},
		{"field given twice", signRaw(priv, duplicated), pinned, bundle.ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := bundle.Verify(tt.sb, tt.pinned)
			if !errors.Is(err, tt.want) || got != nil {
				t.Errorf("Verify(%s) = (bundle returned: %t), %v; want (bundle returned: false), %v", tt.name, got != nil, err, tt.want)
			}
		})
	}
}

// TestVerifyNamesANewerFormat: a bundle from a newer regionctl (format
// version 3, with a field this binary does not know) is refused with the
// format version named, which is what an operator needs mid-upgrade, rather
// than as "not in deterministic encoding" (the unknown field is discarded, so
// both checks fail).
func TestVerifyNamesANewerFormat(t *testing.T) {
	pub, priv := newKey(t)
	c := validBundle(t)
	c.FormatVersion = 3
	raw := appendUnknown(marshal(t, c), 99, []byte("a field of format 3"))
	_, err := bundle.Verify(signRaw(priv, raw), []ed25519.PublicKey{pub})
	if !errors.Is(err, bundle.ErrInvalid) || !strings.Contains(err.Error(), "format version 3") {
		t.Errorf("Verify(format 3 bundle with a new field) = %v, want ErrInvalid naming format version 3", err)
	}
}

// TestVerifyReadsFormat1: a format 1 bundle (built before not_after
// existed, e.g. the one a server persisted before an upgrade) still
// verifies, and never expires.
func TestVerifyReadsFormat1(t *testing.T) {
	pub, priv := newKey(t)
	b := validBundle(t)
	b.FormatVersion, b.NotAfter = 1, nil
	sb, err := bundle.Sign(b, priv)
	if err != nil {
		t.Fatalf("Sign(format 1) = %v", err)
	}
	got, err := bundle.Verify(sb, []ed25519.PublicKey{pub})
	if err != nil {
		t.Fatalf("Verify(format 1) = %v, want nil", err)
	}
	far := time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC)
	if bundle.Expired(got, far) || bundle.CheckFresh(got, far) != nil {
		t.Errorf("Expired(format 1 bundle, 2100) = true, want false (it has no not_after)")
	}
}

func TestCheckFresh(t *testing.T) {
	b := validBundle(t) // not_after 2026-03-31T12:00:00Z
	notAfter := b.GetNotAfter().AsTime()
	tests := []struct {
		name string
		now  time.Time
		want bool // expired
	}{
		{"at creation", b.GetCreatedAt().AsTime(), false},
		{"at not_after", notAfter, false},
		{"a nanosecond past", notAfter.Add(time.Nanosecond), true},
		{"a year past", notAfter.AddDate(1, 0, 0), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := bundle.Expired(b, tt.now); got != tt.want {
				t.Errorf("Expired(b, %s) = %v, want %v", tt.now, got, tt.want)
			}
			err := bundle.CheckFresh(b, tt.now)
			if !tt.want {
				if err != nil {
					t.Errorf("CheckFresh(b, %s) = %v, want nil", tt.now, err)
				}
				return
			}
			if !errors.Is(err, bundle.ErrExpired) || !strings.Contains(err.Error(), "2026-03-31T12:00:00Z") {
				t.Errorf("CheckFresh(b, %s) = %v, want ErrExpired naming the not_after 2026-03-31T12:00:00Z", tt.now, err)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(*bundlev1.Bundle)
		wantErr string // "" means valid
	}{
		{"valid", func(*bundlev1.Bundle) {}, ""},
		{"no keysets and no versions", func(b *bundlev1.Bundle) { b.Keysets, b.RegionKeyVersions = nil, nil }, ""},
		{"no ACL at all (nobody may call)", func(b *bundlev1.Bundle) { b.Keysets[0].Acl = nil }, ""},
		{"full-URI ACL pattern of another trust domain", func(b *bundlev1.Bundle) {
			b.Keysets[0].Acl.Encrypt = []string{"spiffe://other.test/client/us-east/*"}
		}, ""},
		{"no rotation period", func(b *bundlev1.Bundle) { b.Keysets[0].RotationPeriod = nil }, ""},
		{"extra region key versions", func(b *bundlev1.Bundle) { b.RegionKeyVersions = []uint32{1, 2} }, ""},

		{"format version 0", func(b *bundlev1.Bundle) { b.FormatVersion = 0 }, "format version 0"},
		{"format version 3", func(b *bundlev1.Bundle) { b.FormatVersion = 3 }, "format version 3"},
		{"format 1 without not_after", func(b *bundlev1.Bundle) { b.FormatVersion, b.NotAfter = 1, nil }, ""},
		{"format 1 with a not_after", func(b *bundlev1.Bundle) { b.FormatVersion = 1 }, "format version 1 has no not_after"},
		{"no not_after", func(b *bundlev1.Bundle) { b.NotAfter = nil }, "no not_after"},
		{"no created_at", func(b *bundlev1.Bundle) { b.CreatedAt = nil }, "no valid created_at"},
		{"not_after at created_at", func(b *bundlev1.Bundle) { b.NotAfter = b.CreatedAt }, "is not after created_at"},
		{"not_after before created_at", func(b *bundlev1.Bundle) {
			b.NotAfter = timestamppb.New(b.GetCreatedAt().AsTime().Add(-time.Second))
		}, "is not after created_at"},
		{"not_after too far", func(b *bundlev1.Bundle) {
			b.NotAfter = timestamppb.New(b.GetCreatedAt().AsTime().Add(bundle.MaxValidity + time.Second))
		}, "more than"},
		{"not_after invalid", func(b *bundlev1.Bundle) { b.NotAfter = &timestamppb.Timestamp{Seconds: 1, Nanos: -1} }, "not_after"},
		{"no region", func(b *bundlev1.Bundle) { b.Region = "" }, `region ""`},
		{"uppercase region", func(b *bundlev1.Bundle) { b.Region = "US-East" }, `region "US-East"`},
		{"region starting with a digit", func(b *bundlev1.Bundle) { b.Region = "1east" }, `region "1east"`},
		{"serial 0", func(b *bundlev1.Bundle) { b.Serial = 0 }, "serial 0"},
		{"keysets but no region key versions", func(b *bundlev1.Bundle) { b.RegionKeyVersions = nil }, "no region key versions"},
		{"no created_by", func(b *bundlev1.Bundle) { b.CreatedBy = "" }, "created_by"},
		{"created_by not a SPIFFE ID", func(b *bundlev1.Bundle) { b.CreatedBy = "regionctl" }, "created_by"},
		{"created_by with two path segments", func(b *bundlev1.Bundle) { b.CreatedBy = "spiffe://cairn.test/regionctl/x" }, "created_by"},
		{"invalid keyset name", func(b *bundlev1.Bundle) { b.Keysets[0].Name = "Payments/Ledger" }, "invalid name"},
		{"keysets out of order", func(b *bundlev1.Bundle) { b.Keysets[0], b.Keysets[1] = b.Keysets[1], b.Keysets[0] }, "sorted by name and unique"},
		{"keyset twice", func(b *bundlev1.Bundle) { b.Keysets[1] = proto.CloneOf(b.Keysets[0]) }, "sorted by name and unique"},
		{"no owner team", func(b *bundlev1.Bundle) { b.Keysets[0].OwnerTeam = "" }, "no owner team"},
		{"purpose unspecified", func(b *bundlev1.Bundle) { b.Keysets[0].Purpose = bundlev1.Purpose_PURPOSE_UNSPECIFIED }, "only PURPOSE_ENVELOPE"},
		{"purpose unknown", func(b *bundlev1.Bundle) { b.Keysets[0].Purpose = 7 }, "only PURPOSE_ENVELOPE"},
		{"no encrypted keyset", func(b *bundlev1.Bundle) { b.Keysets[0].Keyset = nil }, "no encrypted keyset"},
		{"encrypted keyset of another name", func(b *bundlev1.Bundle) { b.Keysets[0].Keyset.Name = "payments/other" }, `encrypted keyset is "payments/other"`},
		{"encrypted keyset of another region", func(b *bundlev1.Bundle) { b.Keysets[0].Keyset.Region = "eu-west" }, `for region "eu-west"`},
		{"encrypted under an unlisted region key version", func(b *bundlev1.Bundle) { b.Keysets[1].Keyset.RegionKeyVersion = 2 }, "region key version 2"},
		{"no ciphertext TTL", func(b *bundlev1.Bundle) { b.Keysets[0].CiphertextTtl = nil }, "ciphertext TTL must be positive"},
		{"zero ciphertext TTL", func(b *bundlev1.Bundle) { b.Keysets[0].CiphertextTtl = durationpb.New(0) }, "ciphertext TTL must be positive"},
		{"negative ciphertext TTL", func(b *bundlev1.Bundle) { b.Keysets[0].CiphertextTtl = durationpb.New(-time.Hour) }, "ciphertext TTL must be positive"},
		{"negative rotation period", func(b *bundlev1.Bundle) { b.Keysets[0].RotationPeriod = durationpb.New(-time.Hour) }, "negative rotation period"},
		{"regions without the bundle's", func(b *bundlev1.Bundle) { b.Keysets[0].Regions = []string{"eu-west"} }, `do not include "us-east"`},
		{"no regions", func(b *bundlev1.Bundle) { b.Keysets[0].Regions = nil }, `do not include "us-east"`},
		{"bad encrypt pattern", func(b *bundlev1.Bundle) { b.Keysets[0].Acl.Encrypt = []string{"client/us-east"} }, "ACL encrypt"},
		{"bad decrypt pattern", func(b *bundlev1.Bundle) { b.Keysets[0].Acl.Decrypt = []string{"client/*/led*"} }, "ACL decrypt"},
		{"bad generate_data_key pattern", func(b *bundlev1.Bundle) { b.Keysets[0].Acl.GenerateDataKey = []string{"spiffe://*/client/a/b"} }, "ACL generate_data_key"},
		{"bad rewrap pattern", func(b *bundlev1.Bundle) { b.Keysets[0].Acl.Rewrap = []string{""} }, "ACL rewrap"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := validBundle(t)
			tt.mutate(b)
			err := bundle.Validate(b)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("Validate(%s) = %v, want nil", tt.name, err)
			case tt.wantErr != "" && (!errors.Is(err, bundle.ErrInvalid) || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("Validate(%s) = %v, want ErrInvalid containing %q", tt.name, err, tt.wantErr)
			}
		})
	}
	if err := bundle.Validate(nil); !errors.Is(err, bundle.ErrInvalid) {
		t.Errorf("Validate(nil) = %v, want ErrInvalid", err)
	}
}

func TestTrustDomain(t *testing.T) {
	b := validBundle(t)
	td, err := bundle.TrustDomain(b)
	if err != nil || td.Name() != "cairn.test" {
		t.Errorf("TrustDomain() = %v, %v; want cairn.test, nil", td, err)
	}
	b.CreatedBy = "nonsense"
	if _, err := bundle.TrustDomain(b); err == nil {
		t.Errorf("TrustDomain(created_by %q) = nil error, want an error", b.CreatedBy)
	}
}

func TestKeyID(t *testing.T) {
	seed := bytes.Repeat([]byte{0x42}, ed25519.SeedSize)
	pub := ed25519.NewKeyFromSeed(seed).Public().(ed25519.PublicKey)
	sum := sha256.Sum256(pub)
	tests := []struct {
		name string
		pub  ed25519.PublicKey
		want string
	}{
		{"fixed key", pub, hex.EncodeToString(sum[:8])},
		{"all-zero key", make(ed25519.PublicKey, ed25519.PublicKeySize), "66687aadf862bd77"}, // SHA-256 of 32 zero bytes
	}
	for _, tt := range tests {
		if got := bundle.KeyID(tt.pub); got != tt.want {
			t.Errorf("KeyID(%s) = %q, want %q", tt.name, got, tt.want)
		}
	}
	other, _ := newKey(t)
	if bundle.KeyID(pub) == bundle.KeyID(other) {
		t.Errorf("KeyID(two keys) = %q for both", bundle.KeyID(pub))
	}
}

func TestKeyFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	privPath, pubPath := filepath.Join(dir, "bundle-signing.key"), filepath.Join(dir, "bundle-signing.pub")
	pub, priv := newKey(t)
	if err := bundle.WriteKeys(privPath, pubPath, priv); err != nil {
		t.Fatalf("WriteKeys() = %v", err)
	}
	for _, f := range []struct {
		path string
		want os.FileMode
	}{{privPath, 0o600}, {pubPath, 0o644 &^ umask}} {
		fi, err := os.Stat(f.path)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != f.want {
			t.Errorf("mode of %s = %v, want %v", filepath.Base(f.path), got, f.want)
		}
	}
	gotPriv, err := bundle.ReadPrivateKey(privPath)
	if err != nil || !gotPriv.Equal(priv) {
		t.Errorf("ReadPrivateKey(written) = %v, %v; want the written key", err, gotPriv.Equal(priv))
	}
	gotPub, err := bundle.ReadPublicKey(pubPath)
	if err != nil || !gotPub.Equal(pub) {
		t.Errorf("ReadPublicKey(written) = %v, %v; want the written key", err, gotPub.Equal(pub))
	}

	// Refuse to overwrite, and leave the files as they were.
	before, _ := os.ReadFile(privPath)
	_, priv2 := newKey(t)
	if err := bundle.WriteKeys(privPath, pubPath, priv2); !errors.Is(err, os.ErrExist) {
		t.Errorf("WriteKeys(existing) = %v, want ErrExist", err)
	}
	if after, _ := os.ReadFile(privPath); !bytes.Equal(before, after) {
		t.Errorf("WriteKeys(existing) changed the private key file")
	}

	// The wrong file for the wrong reader, garbage, wrong lengths.
	writeFile := func(name string, data []byte) string {
		p := filepath.Join(t.TempDir(), name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	shortSeed := writeFile("short.key", pem.EncodeToMemory(&pem.Block{Type: "CAIRN BUNDLE SIGNING KEY", Bytes: make([]byte, 31)}))
	shortPub := writeFile("short.pub", pem.EncodeToMemory(&pem.Block{Type: "CAIRN BUNDLE PUBLIC KEY", Bytes: make([]byte, 31)}))
	garbage := writeFile("garbage", []byte("not a key"))
	pubData, err := os.ReadFile(pubPath)
	if err != nil {
		t.Fatal(err)
	}
	pubAsPriv := writeFile("pub-0600", pubData)
	privTests := []struct {
		name, path, want string
	}{
		{"public key file (mode 0600)", pubAsPriv, "not a Cairn bundle signing key"},
		{"short seed", shortSeed, "not a Cairn bundle signing key"},
		{"garbage", garbage, "not a Cairn bundle signing key"},
		{"missing", filepath.Join(dir, "nope"), "no such file"},
	}
	for _, tt := range privTests {
		if _, err := bundle.ReadPrivateKey(tt.path); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ReadPrivateKey(%s) = %v, want an error containing %q", tt.name, err, tt.want)
		}
	}
	pubTests := []struct {
		name, path, want string
	}{
		{"private key file", privPath, "not a Cairn bundle public key"},
		{"short key", shortPub, "not a Cairn bundle public key"},
		{"garbage", garbage, "not a Cairn bundle public key"},
		{"missing", filepath.Join(dir, "nope"), "no such file"},
	}
	for _, tt := range pubTests {
		if _, err := bundle.ReadPublicKey(tt.path); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ReadPublicKey(%s) = %v, want an error containing %q", tt.name, err, tt.want)
		}
	}

	// A private key readable by others is refused.
	for _, mode := range []os.FileMode{0o644, 0o640, 0o604} {
		if err := os.Chmod(privPath, mode); err != nil {
			t.Fatal(err)
		}
		if _, err := bundle.ReadPrivateKey(privPath); err == nil || !strings.Contains(err.Error(), "chmod 600") {
			t.Errorf("ReadPrivateKey(mode %v) = %v, want an error asking to chmod 600", mode, err)
		}
	}
}

// FuzzVerify feeds arbitrary signed bytes and signatures to Verify. Each
// input is tried twice: with the given signature (which must essentially
// never verify) and freshly signed by the pinned key, so the fuzzer reaches
// decoding, validation and the determinism check. Whatever Verify accepts
// must be valid and in canonical encoding.
func FuzzVerify(f *testing.F) {
	_, priv := newKey(f)
	pub := priv.Public().(ed25519.PublicKey)
	b := validBundle(f)
	good, err := bundle.Sign(b, priv)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good.GetBundle(), good.GetSignature())
	f.Add(appendUnknown(good.GetBundle(), 99, []byte("x")), good.GetSignature())
	f.Add(marshal(f, &bundlev1.Bundle{FormatVersion: 1, Region: region, Serial: 1, CreatedBy: createdBy}), []byte{})
	f.Add(marshal(f, &bundlev1.Bundle{FormatVersion: 2, Region: region, Serial: 1, CreatedBy: createdBy, CreatedAt: b.GetCreatedAt(), NotAfter: b.GetNotAfter()}), []byte{})
	f.Add([]byte{}, []byte{})
	f.Fuzz(func(t *testing.T, raw, sig []byte) {
		for _, sb := range []*bundlev1.SignedBundle{{Bundle: raw, Signature: sig}, signRaw(priv, raw)} {
			got, err := bundle.Verify(sb, []ed25519.PublicKey{pub})
			if err != nil {
				if !errors.Is(err, bundle.ErrInvalid) && !errors.Is(err, bundle.ErrSignature) {
					t.Fatalf("Verify() = %v, want ErrInvalid or ErrSignature", err)
				}
				continue
			}
			if err := bundle.Validate(got); err != nil {
				t.Fatalf("Verify() accepted a bundle Validate refuses: %v", err)
			}
			if re := marshal(t, got); !bytes.Equal(re, raw) {
				t.Fatalf("Verify() accepted bytes that are not the canonical encoding of what they decode to")
			}
		}
	})
}

// TestValidateLargeBundleReportsFirstError checks the parallel path of
// Validate (bundles of thousands of keysets): valid is valid, and with bad
// keysets in several chunks the error names the lowest-indexed one, exactly
// as a check in order would.
func TestValidateLargeBundleReportsFirstError(t *testing.T) {
	const n = 10_000
	base := keysetConfig(t, "team/k")
	b := validBundle(t)
	b.Keysets = make([]*bundlev1.KeysetConfig, n)
	for i := range b.Keysets {
		k := proto.CloneOf(base)
		k.Name = fmt.Sprintf("team/k%05d", i)
		k.Keyset.Name = k.Name
		b.Keysets[i] = k
	}
	if err := bundle.Validate(b); err != nil {
		t.Fatalf("Validate(%d valid keysets) = %v", n, err)
	}
	for _, bad := range [][]int{{n - 1}, {9000, 2}, {5001, 5000, 7777}, {0, n - 1}} {
		c := proto.CloneOf(b)
		for _, i := range bad {
			c.Keysets[i].OwnerTeam = ""
		}
		want := fmt.Sprintf("keyset %d (%q): no owner team", slices.Min(bad), c.Keysets[slices.Min(bad)].GetName())
		if err := bundle.Validate(c); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate(bad owner at %v) = %v, want an error containing %q", bad, err, want)
		}
	}
	// The order check spans chunk boundaries: a duplicate at any index is
	// found.
	for _, i := range []int{1, n / 2, n/2 + 1, n - 1} {
		c := proto.CloneOf(b)
		c.Keysets[i] = proto.CloneOf(c.Keysets[i-1])
		if err := bundle.Validate(c); err == nil || !strings.Contains(err.Error(), "sorted by name and unique") {
			t.Errorf("Validate(keyset %d = keyset %d) = %v, want a sort/unique error", i, i-1, err)
		}
	}
}

// TestValidateSafetyFields covers what a keyset carries from the record for
// the Safety Condition: ttl_history, lifecycle and propagation_window.
func TestValidateSafetyFields(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	const year = 365 * 24 * time.Hour // keysetConfig's ciphertext TTL
	period := func(ttl time.Duration, from, until time.Time) *bundlev1.TtlPeriod {
		p := &bundlev1.TtlPeriod{Ttl: durationpb.New(ttl), From: timestamppb.New(from)}
		if !until.IsZero() {
			p.Until = timestamppb.New(until)
		}
		return p
	}
	keyOf := func(b *bundlev1.Bundle) uint32 { return b.Keysets[0].Keyset.Versions[0].KeyId }
	tests := []struct {
		name    string
		mutate  func(*bundlev1.Bundle)
		wantErr string // "" means valid
	}{
		{"none (a bundle built before the fields)", func(*bundlev1.Bundle) {}, ""},
		{"one open period", func(b *bundlev1.Bundle) {
			b.Keysets[0].TtlHistory = []*bundlev1.TtlPeriod{period(year, t0, time.Time{})}
		}, ""},
		{"a cut, then the period in force", func(b *bundlev1.Bundle) {
			b.Keysets[0].TtlHistory = []*bundlev1.TtlPeriod{period(2*year, t0, t0.Add(time.Hour)), period(year, t0.Add(time.Hour), time.Time{})}
		}, ""},
		{"an empty closed period", func(b *bundlev1.Bundle) {
			b.Keysets[0].TtlHistory = []*bundlev1.TtlPeriod{period(2*year, t0, t0), period(year, t0, time.Time{})}
		}, ""},
		{"lifecycle of the copy's version", func(b *bundlev1.Bundle) {
			b.Keysets[0].Lifecycle = []*bundlev1.VersionLifecycle{{KeyId: keyOf(b), PropagatedEverywhere: timestamppb.New(t0), PrimarySince: timestamppb.New(t0)}}
		}, ""},
		{"zero propagation window", func(b *bundlev1.Bundle) { b.Keysets[0].PropagationWindow = durationpb.New(0) }, ""},

		{"zero TTL in a period", func(b *bundlev1.Bundle) {
			b.Keysets[0].TtlHistory = []*bundlev1.TtlPeriod{period(0, t0, t0.Add(time.Hour)), period(year, t0.Add(time.Hour), time.Time{})}
		}, `keyset 0 ("payments/ledger"): ttl_history[0]: TTL must be positive`},
		{"negative TTL", func(b *bundlev1.Bundle) {
			b.Keysets[0].TtlHistory = []*bundlev1.TtlPeriod{period(-time.Hour, t0, time.Time{})}
		}, "ttl_history[0]: TTL must be positive"},
		{"no from", func(b *bundlev1.Bundle) {
			b.Keysets[0].TtlHistory = []*bundlev1.TtlPeriod{{Ttl: durationpb.New(year)}}
		}, "ttl_history[0]: no valid from"},
		{"last period closed", func(b *bundlev1.Bundle) {
			b.Keysets[0].TtlHistory = []*bundlev1.TtlPeriod{period(year, t0, t0.Add(time.Hour))}
		}, "ttl_history[0]: the last period must be open"},
		{"last period not ciphertext_ttl", func(b *bundlev1.Bundle) {
			b.Keysets[0].TtlHistory = []*bundlev1.TtlPeriod{period(time.Hour, t0, time.Time{})}
		}, "ttl_history[0]: the period in force has TTL 1h0m0s"},
		{"an earlier period open", func(b *bundlev1.Bundle) {
			b.Keysets[0].TtlHistory = []*bundlev1.TtlPeriod{period(2*year, t0, time.Time{}), period(year, t0.Add(time.Hour), time.Time{})}
		}, "ttl_history[0]: only the last period may be open"},
		{"until before from", func(b *bundlev1.Bundle) {
			b.Keysets[0].TtlHistory = []*bundlev1.TtlPeriod{period(2*year, t0, t0.Add(-time.Hour)), period(year, t0, time.Time{})}
		}, "ttl_history[0]: until is before from"},
		{"overlapping periods", func(b *bundlev1.Bundle) {
			b.Keysets[0].TtlHistory = []*bundlev1.TtlPeriod{period(2*year, t0, t0.Add(time.Hour)), period(year, t0.Add(time.Minute), time.Time{})}
		}, "ttl_history[1]: from 2026-01-01T00:01:00Z is before the previous period's until"},
		{"periods out of order", func(b *bundlev1.Bundle) {
			b.Keysets[1].TtlHistory = []*bundlev1.TtlPeriod{period(2*year, t0.Add(time.Hour), t0.Add(2*time.Hour)), period(year, t0, time.Time{})}
		}, `keyset 1 ("payments/refunds"): ttl_history[1]`},
		{"lifecycle key twice", func(b *bundlev1.Bundle) {
			b.Keysets[0].Lifecycle = []*bundlev1.VersionLifecycle{{KeyId: keyOf(b)}, {KeyId: keyOf(b)}}
		}, "lifecycle[1]: key"},
		{"lifecycle of a key the copy lacks", func(b *bundlev1.Bundle) {
			b.Keysets[0].Lifecycle = []*bundlev1.VersionLifecycle{{KeyId: keyOf(b) + 1}}
		}, "is not a version of the encrypted keyset"},
		{"invalid lifecycle time", func(b *bundlev1.Bundle) {
			b.Keysets[0].Lifecycle = []*bundlev1.VersionLifecycle{{KeyId: keyOf(b), SupersededAt: &timestamppb.Timestamp{Nanos: -1}}}
		}, "superseded_at"},
		{"destroyed versions named", func(b *bundlev1.Bundle) { b.Keysets[0].DestroyedKeyIds = []uint32{keyOf(b) + 1, keyOf(b) + 2} }, ""},
		{"destroyed versions out of order", func(b *bundlev1.Bundle) { b.Keysets[0].DestroyedKeyIds = []uint32{keyOf(b) + 2, keyOf(b) + 1} },
			"destroyed_key_ids[1]: key"},
		{"a destroyed version twice", func(b *bundlev1.Bundle) { b.Keysets[0].DestroyedKeyIds = []uint32{keyOf(b) + 1, keyOf(b) + 1} },
			"(the list must be sorted and unique)"},
		{"a destroyed version the copy holds", func(b *bundlev1.Bundle) { b.Keysets[0].DestroyedKeyIds = []uint32{keyOf(b)} },
			"is a version of the encrypted keyset, not destroyed"},
		{"negative propagation window", func(b *bundlev1.Bundle) { b.Keysets[0].PropagationWindow = durationpb.New(-time.Second) },
			`keyset 0 ("payments/ledger"): propagation_window -1s is negative`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := validBundle(t)
			tt.mutate(b)
			err := bundle.Validate(b)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("Validate(%s) = %v, want nil", tt.name, err)
			case tt.wantErr != "" && (!errors.Is(err, bundle.ErrInvalid) || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("Validate(%s) = %v, want ErrInvalid containing %q", tt.name, err, tt.wantErr)
			}
		})
	}
}

// FuzzValidate decodes arbitrary bytes as a Bundle (as a reader of an
// unsigned bundle would, e.g. regionctl bundle push naming its servers) and
// validates it. Validate must not panic, and what it accepts must keep the
// format's promises: a known format version, a serial, and for format 2 a
// not_after after created_at by at most MaxValidity, which Expired and
// CheckFresh agree on.
func FuzzValidate(f *testing.F) {
	b := validBundle(f)
	f.Add(marshal(f, b))
	b1 := validBundle(f)
	b1.FormatVersion, b1.NotAfter = 1, nil
	f.Add(marshal(f, b1))
	f.Add(marshal(f, &bundlev1.Bundle{FormatVersion: 2, Region: region, Serial: 1, CreatedBy: createdBy, CreatedAt: b.GetCreatedAt(), NotAfter: b.GetNotAfter()}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, raw []byte) {
		var got bundlev1.Bundle
		if err := proto.Unmarshal(raw, &got); err != nil {
			return
		}
		if err := bundle.Validate(&got); err != nil {
			if !errors.Is(err, bundle.ErrInvalid) {
				t.Fatalf("Validate() = %v, want ErrInvalid", err)
			}
			return
		}
		if v := got.GetFormatVersion(); v < bundle.OldestFormatVersion || v > bundle.FormatVersion || got.GetSerial() == 0 {
			t.Fatalf("Validate accepted format version %d serial %d", v, got.GetSerial())
		}
		na, ok := bundle.NotAfter(&got)
		if ok != (got.GetFormatVersion() >= 2) {
			t.Fatalf("Validate accepted format version %d with not_after present = %v", got.GetFormatVersion(), ok)
		}
		if !ok {
			return
		}
		created := got.GetCreatedAt().AsTime()
		if d := na.Sub(created); d <= 0 || d > bundle.MaxValidity {
			t.Fatalf("Validate accepted not_after - created_at = %v", d)
		}
		for _, now := range []time.Time{created, na, na.Add(time.Nanosecond)} {
			if exp, err := bundle.Expired(&got, now), bundle.CheckFresh(&got, now); exp != errors.Is(err, bundle.ErrExpired) || exp != now.After(na) {
				t.Fatalf("at %v: Expired = %v, CheckFresh = %v; not_after %v", now, exp, err, na)
			}
		}
	})
}
