package kms

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
)

// FuzzReadBundleFile feeds arbitrary file contents to readBundleFile, the
// reader of bundle.pb and previous-bundle.pb at startup. (FuzzBundleDecode
// covers ApplyBundle on a decoded message, not this file reader.) Anything
// it accepts must survive writeBundleFile and a second read unchanged;
// anything it refuses is an error naming the file.
func FuzzReadBundleFile(f *testing.F) {
	keys := kmstest.NewRegionKeys()
	keys.AddVersion(f, testRegion)
	signer := kmstest.NewSigner(f)
	ks := kmstest.NewKeyset(f, "payments/ledger", kmstest.ACL("client/us-east/app"))
	good := signer.Sign(f, kmstest.Bundle(f, keys, testRegion, 1, ks))
	empty := signer.Sign(f, kmstest.Bundle(f, keys, testRegion, 2))
	for _, sb := range []*bundlev1.SignedBundle{good, empty, {Bundle: good.Bundle}, {Signature: good.Signature}, {}} {
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(sb)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		if len(b) > 2 {
			f.Add(b[:len(b)/2]) // torn write
		}
	}
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f}) // length past the end
	f.Add([]byte("not a bundle"))

	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, PreviousBundleFile), data, 0o600); err != nil {
			t.Fatal(err)
		}
		sb, err := readBundleFile(dir, PreviousBundleFile)
		if err != nil {
			if sb != nil {
				t.Fatalf("readBundleFile(%x) = %v, %v, want no bundle with the error", data, sb, err)
			}
			if !strings.Contains(err.Error(), PreviousBundleFile) {
				t.Fatalf("readBundleFile(%x) error = %q, want it to name %s", data, err, PreviousBundleFile)
			}
			return
		}
		if sb == nil {
			t.Fatalf("readBundleFile(%x) = nil, nil for a file that exists", data)
		}
		if len(data) > maxBundleFile {
			t.Fatalf("readBundleFile accepted %d bytes, more than %d", len(data), maxBundleFile)
		}
		again := t.TempDir()
		if err := writeBundleFile(again, PreviousBundleFile, sb); err != nil {
			t.Fatalf("writeBundleFile(accepted %x) = %v", data, err)
		}
		got, err := readBundleFile(again, PreviousBundleFile)
		if err != nil {
			t.Fatalf("readBundleFile(rewritten %x) = %v", data, err)
		}
		if !proto.Equal(got, sb) {
			t.Fatalf("readBundleFile after writeBundleFile = %v, want %v", got, sb)
		}
	})
}
