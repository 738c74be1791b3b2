package safe_test

import (
	"testing"

	"github.com/cairnkms/cairn/safe"
)

// FuzzDecodeSealed: any stored bytes either decode to a record for exactly
// the requested share, or fail with ErrTampered; never a panic.
func FuzzDecodeSealed(f *testing.F) {
	ref := safe.ShareRef{GenesisID: "00112233445566778899aabbccddeeff", Epoch: 1, Index: 2}
	good, _ := safe.EncodeSealed(ref, "k", make([]byte, safe.NonceSize), make([]byte, 49))
	f.Add(good)
	f.Add([]byte{})
	f.Add([]byte{0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		rec, err := safe.DecodeSealed(data, ref)
		if err != nil {
			return
		}
		if rec.GetGenesisId() != ref.GenesisID || rec.GetEpoch() != ref.Epoch || rec.GetIndex() != ref.Index || len(rec.GetNonce()) != safe.NonceSize {
			t.Fatalf("DecodeSealed accepted a record for another share: %v", rec)
		}
	})
}
