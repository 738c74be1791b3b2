package distributor

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/secret"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
)

// fuzzGenesis makes a 2-of-3 manifest with file safes and returns one valid
// share (index 1) for seeding.
func fuzzGenesis(f *testing.F) (*safev1.GenesisManifest, []byte) {
	dir := f.TempDir()
	var safes []safe.Safe
	for i := range 3 {
		s, err := safe.OpenFileSafe(safe.FileSafeConfig{Dir: filepath.Join(dir, fmt.Sprint(i)), Label: fmt.Sprintf("s%d", i),
			Passphrase: secret.New([]byte("fuzz passphrase")), KDFMemoryKiB: 8 * 1024, AttemptDir: filepath.Join(dir, "a")})
		if err != nil {
			f.Fatal(err)
		}
		f.Cleanup(func() { s.Close() })
		safes = append(safes, s)
	}
	m, rmk, err := safe.Genesis(context.Background(), safe.SplitConfig{Threshold: 2, Safes: safes})
	if err != nil {
		f.Fatal(err)
	}
	rmk.Wipe()
	share, err := safes[0].Unseal(context.Background(), safe.ShareRef{GenesisID: m.GetGenesisId(), Index: 1})
	if err != nil {
		f.Fatal(err)
	}
	return m, share.Data()
}

// FuzzSubmitReleasedShare fuzzes the plaintext inside a correctly sealed
// envelope (the ReleasedShare decoder and every check after it): whatever
// the bytes, submit never panics, accepts only the one valid share, and a
// refusal leaves the ceremony unchanged.
func FuzzSubmitReleasedShare(f *testing.F) {
	m, good := fuzzGenesis(f)
	valid, _ := proto.Marshal(&safev1.ReleasedShare{GenesisId: m.GetGenesisId(), Index: 1, Share: good})
	f.Add(valid, uint32(1))
	f.Add([]byte{}, uint32(1))
	f.Add([]byte{0x0a, 0x20}, uint32(2))
	f.Add(valid[:len(valid)-1], uint32(1))
	officer := identity.MustParse("spiffe://cairn.test/officer/global/officer-1")
	f.Fuzz(func(t *testing.T, plaintext []byte, index uint32) {
		c, err := openCeremony(distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL, m, time.Now(), time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		defer c.end(distributorv1.CeremonyState_CEREMONY_STATE_CANCELLED, "")
		info, _ := hpkeseal.Info(infoShare, c.id, m.GetGenesisId(), fmt.Sprint(index))
		var sealed *cryptov1.HpkeSealed
		if len(plaintext) > 0 {
			if sealed, err = hpkeseal.Seal(c.recipient.PublicKey(), info, plaintext); err != nil {
				t.Fatal(err)
			}
		}
		_, err = c.submit(officer, index, sealed, time.Now())
		if err == nil && (index != 1 || !proto.Equal(mustUnmarshal(plaintext), mustUnmarshal(valid))) {
			t.Fatalf("submit accepted index %d with plaintext %x", index, plaintext)
		}
		if err != nil && (len(c.accepted) != 0 || len(c.officers) != 0 || c.state != distributorv1.CeremonyState_CEREMONY_STATE_OPEN) {
			t.Fatalf("a refused submission changed the ceremony: accepted %v, state %v", c.accepted, c.state)
		}
		// What the officer is told: a share this officer may submit that
		// does not check out is INVALID_ARGUMENT; a slot of another officer
		// is PERMISSION_DENIED; never INTERNAL or anything else.
		if err == nil {
			return
		}
		if code := status.Code(toStatus(err)); code != codes.InvalidArgument && !(index != 1 && code == codes.PermissionDenied) {
			t.Fatalf("submit of index %d refused with %v (%v), want InvalidArgument (or PermissionDenied for another officer's slot)", index, code, err)
		}
	})
}

func mustUnmarshal(b []byte) *safev1.ReleasedShare {
	var r safev1.ReleasedShare
	if proto.Unmarshal(b, &r) != nil {
		return nil
	}
	return &r
}

// FuzzSubmitEnvelope fuzzes the HPKE envelope itself: arbitrary bytes never
// open, never panic, never change the ceremony.
func FuzzSubmitEnvelope(f *testing.F) {
	m, _ := fuzzGenesis(f)
	f.Add([]byte{}, uint32(0x20), uint32(1), uint32(2))
	f.Add(make([]byte, 80), uint32(0x20), uint32(1), uint32(2))
	officer := identity.MustParse("spiffe://cairn.test/officer/global/officer-1")
	f.Fuzz(func(t *testing.T, ct []byte, kem, kdf, aead uint32) {
		c, err := openCeremony(distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL, m, time.Now(), time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		defer c.end(distributorv1.CeremonyState_CEREMONY_STATE_CANCELLED, "")
		_, err = c.submit(officer, 1, &cryptov1.HpkeSealed{KemId: kem, KdfId: kdf, AeadId: aead, Ciphertext: ct}, time.Now())
		if err == nil {
			t.Fatalf("submit accepted an envelope of arbitrary bytes %x", ct)
		}
		if code := status.Code(toStatus(err)); code != codes.InvalidArgument {
			t.Fatalf("an envelope of arbitrary bytes refused with %v (%v), want InvalidArgument", code, err)
		}
		if len(c.accepted) != 0 || c.state != distributorv1.CeremonyState_CEREMONY_STATE_OPEN {
			t.Fatalf("a refused envelope changed the ceremony")
		}
	})
}
