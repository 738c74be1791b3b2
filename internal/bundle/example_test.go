package bundle_test

import (
	"bytes"
	"crypto/ed25519"
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/bundle"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
)

// A bundle is signed by regionctl and verified, against the pinned public
// key, by every KMS server before it parses a byte of it.
func Example() {
	// A fixed seed keeps the output stable; real keys come from GenerateKey.
	priv := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, ed25519.SeedSize))
	pub := priv.Public().(ed25519.PublicKey)

	b := &bundlev1.Bundle{
		FormatVersion: bundle.FormatVersion,
		Region:        "us-east",
		Serial:        1,
		CreatedAt:     timestamppb.New(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)),
		NotAfter:      timestamppb.New(time.Date(2026, 2, 1, 3, 4, 5, 0, time.UTC)),
		CreatedBy:     "spiffe://cairn.test/regionctl/global/regionctl",
	}
	sb, err := bundle.Sign(b, priv)
	if err != nil {
		fmt.Println(err)
		return
	}
	got, err := bundle.Verify(sb, []ed25519.PublicKey{pub})
	if err != nil {
		fmt.Println(err)
		return
	}
	ref := bundle.Ref(sb, got)
	fmt.Printf("signed by %s\n%s serial %d sha256 %x\n", sb.GetSigningKeyId(), ref.GetRegion(), ref.GetSerial(), ref.GetSha256())
	// Output:
	// signed by fe812c12f3ab4ce6
	// us-east serial 1 sha256 7b1634f0aea1f92e05e0823ab533a76531bf493ac71341c67584fd49c59f9d9f
}
