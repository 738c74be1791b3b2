package kms

import (
	"bytes"
	"encoding/hex"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/keysets"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// regionKeyBytes is a fresh serialized region key version.
func regionKeyBytes(tb testing.TB) []byte {
	tb.Helper()
	k, err := keysets.NewRegionKey()
	if err != nil {
		tb.Fatal(err)
	}
	defer k.Wipe()
	return k.Data()
}

func marshalMaterial(tb testing.TB, m *rootkmsv1.RegionKeyMaterial) []byte {
	tb.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

const (
	statusPrimary  = cryptov1.KeyStatus_KEY_STATUS_PRIMARY
	statusEnabled  = cryptov1.KeyStatus_KEY_STATUS_ENABLED
	statusDisabled = cryptov1.KeyStatus_KEY_STATUS_DISABLED
)

// checkRegionAEADs checks regionAEADs(region, data): accepted, it returns an
// AEAD for every PRIMARY or ENABLED version the material holds, each of which
// encrypts and decrypts; refused, its error holds none of the key bytes.
func checkRegionAEADs(t *testing.T, region string, data []byte) {
	t.Helper()
	var m rootkmsv1.RegionKeyMaterial
	decodes := proto.Unmarshal(data, &m) == nil
	in := bytes.Clone(data)
	got, err := regionAEADs(region, in)
	if err != nil {
		if got != nil {
			t.Fatalf("regionAEADs(%x) = %v, %v, want no AEADs with the error", data, got, err)
		}
		if !strings.HasPrefix(err.Error(), "kms: ") {
			t.Fatalf("regionAEADs(%x) error = %q, want the kms: prefix", data, err)
		}
		for _, v := range m.GetVersions() {
			if k := v.GetKey(); len(k) >= 8 && (strings.Contains(err.Error(), string(k)) || strings.Contains(err.Error(), hex.EncodeToString(k))) {
				t.Fatalf("regionAEADs error %q echoes key material %x", err, k)
			}
		}
		return
	}
	if !decodes {
		t.Fatalf("regionAEADs accepted %x, which does not decode", data)
	}
	if m.GetRegion() != region {
		t.Fatalf("regionAEADs(%q) accepted the keys of region %q", region, m.GetRegion())
	}
	var want []uint32
	for _, v := range m.GetVersions() {
		if s := v.GetStatus(); s == statusPrimary || s == statusEnabled {
			want = append(want, v.GetVersion())
		}
	}
	if len(got) == 0 || len(got) != len(want) {
		t.Fatalf("regionAEADs(%x) = %d AEADs, want one for each of the usable versions %v", data, len(got), want)
	}
	for _, v := range want {
		a, ok := got[v]
		if !ok {
			t.Fatalf("regionAEADs(%x) has no AEAD for usable version %d", data, v)
		}
		ct, err := a.Encrypt([]byte("dek"), []byte("ad"))
		if err != nil {
			t.Fatalf("version %d Encrypt = %v", v, err)
		}
		pt, err := a.Decrypt(ct, []byte("ad"))
		if err != nil || string(pt) != "dek" {
			t.Fatalf("version %d Decrypt(Encrypt(dek)) = %q, %v, want dek", v, pt, err)
		}
		if _, err := a.Decrypt(ct, []byte("other")); err == nil {
			t.Fatalf("version %d Decrypt with other associated data succeeded", v)
		}
	}
}

// FuzzRegionAEADs feeds arbitrary bytes to regionAEADs, which turns the
// plaintext of an UnwrapRegionKey response into the region's AEADs.
func FuzzRegionAEADs(f *testing.F) {
	k1, k2 := regionKeyBytes(f), regionKeyBytes(f)
	two := slices.Concat(k1, k2) // two keysets back to back: one proto, merged keys
	for _, m := range []*rootkmsv1.RegionKeyMaterial{
		{Region: testRegion, Versions: []*rootkmsv1.RegionKeyVersionMaterial{{Version: 1, Status: statusPrimary, Key: k1}}},
		{Region: testRegion, Versions: []*rootkmsv1.RegionKeyVersionMaterial{{Version: 1, Status: statusEnabled, Key: k1}, {Version: 2, Status: statusPrimary, Key: k2}}},
		{Region: testRegion, Versions: []*rootkmsv1.RegionKeyVersionMaterial{{Version: 1, Status: statusDisabled, Key: k1}}},
		{Region: testRegion, Versions: []*rootkmsv1.RegionKeyVersionMaterial{{Version: 1, Status: statusPrimary, Key: k1}, {Version: 1, Status: statusEnabled, Key: k2}}},
		{Region: "eu-west", Versions: []*rootkmsv1.RegionKeyVersionMaterial{{Version: 1, Status: statusPrimary, Key: k1}}},
		{Region: testRegion, Versions: []*rootkmsv1.RegionKeyVersionMaterial{{Version: 1, Status: statusPrimary, Key: two}}},
		{Region: testRegion, Versions: []*rootkmsv1.RegionKeyVersionMaterial{{Version: 1, Status: statusPrimary, Key: k1[:len(k1)/2]}}},
		{Region: testRegion, Versions: []*rootkmsv1.RegionKeyVersionMaterial{{Version: 1, Status: statusPrimary}}},
		{Region: testRegion},
	} {
		f.Add(marshalMaterial(f, m))
	}
	f.Add([]byte{})
	f.Add([]byte{0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		checkRegionAEADs(t, testRegion, data)
	})
}

// FuzzRegionKeyMaterial fuzzes the key bytes themselves: well-formed
// material whose one version holds arbitrary key bytes and status.
func FuzzRegionKeyMaterial(f *testing.F) {
	k := regionKeyBytes(f)
	f.Add(k, uint32(1), int32(statusPrimary))
	f.Add(k, uint32(0), int32(statusEnabled))
	f.Add(k, uint32(7), int32(statusDisabled))
	f.Add(k[:len(k)-1], uint32(1), int32(statusPrimary))
	f.Add(slices.Concat(k, k), uint32(1), int32(statusPrimary))
	f.Add([]byte{}, uint32(1), int32(statusPrimary))
	f.Add(bytes.Repeat([]byte{0x41}, 32), uint32(1), int32(statusPrimary))
	f.Add(k, uint32(1), int32(99))
	f.Fuzz(func(t *testing.T, key []byte, version uint32, status int32) {
		data := marshalMaterial(t, &rootkmsv1.RegionKeyMaterial{Region: testRegion,
			Versions: []*rootkmsv1.RegionKeyVersionMaterial{{Version: version, Status: cryptov1.KeyStatus(status), Key: key}}})
		checkRegionAEADs(t, testRegion, data)
	})
}
