package kms

import (
	"context"
	"crypto/ed25519"
	"io"
	"testing"

	"github.com/tink-crypto/tink-go/v2/aead"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/kms/keystore"
	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

const testRegion = "us-east"

// newUnstarted returns a server that is built but not listening, a signer
// it pins, and a keyset it may serve; handlers are called directly.
func newUnstarted(tb testing.TB) (*Server, *kmstest.Signer, *kmstest.RegionKeys, *kmstest.Keyset) {
	tb.Helper()
	pki := identitytest.New(tb, identitytest.TrustDomain)
	keys := kmstest.NewRegionKeys()
	keys.AddVersion(tb, testRegion)
	signer := kmstest.NewSigner(tb)
	alog := audit.NewWriter(io.Discard, audit.Options{})
	s, err := New(Config{Region: testRegion, StateDir: tb.TempDir(), Source: pki.Source("spiffe://cairn.test/kms/us-east/kms-1"),
		RegionKeys: keys, SigningKeys: []ed25519.PublicKey{signer.Public}, Audit: alog})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close(); alog.Close() })
	ks := kmstest.NewKeyset(tb, "payments/ledger", kmstest.ACL("client/us-east/app"))
	return s, signer, keys, ks
}

func TestRequestPathAllocations(t *testing.T) {
	s, signer, keys, ks := newUnstarted(t)
	sb := signer.Sign(t, kmstest.Bundle(t, keys, testRegion, 1, ks))
	if _, err := s.apply(t.Context(), &kmsv1.ApplyBundleRequest{Bundle: sb}); err != nil {
		t.Fatal(err)
	}
	ctx := identity.NewContext(t.Context(), identity.MustParse("spiffe://cairn.test/client/us-east/app"))
	api := &kmsAPI{s: s}
	dek := make([]byte, 32)
	enc, err := api.Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: "payments/ledger", Plaintext: dek})
	if err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(100, func() {
		if _, err := s.keyset(ctx, "payments/ledger", keystore.OpDecrypt); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("keyset lookup + ACL allocs = %v, want 0", n)
	}
	bare, err := aead.New(ks.Handle())
	if err != nil {
		t.Fatal(err)
	}
	req := &kmsv1.DecryptRequest{Keyset: "payments/ledger", Ciphertext: enc.GetCiphertext()}
	aeadOnly := testing.AllocsPerRun(100, func() { bare.Decrypt(req.Ciphertext, nil) })
	handler := testing.AllocsPerRun(100, func() {
		if _, err := api.Decrypt(ctx, req); err != nil {
			t.Fatal(err)
		}
	})
	t.Logf("allocs: AEAD %v, Decrypt handler %v", aeadOnly, handler)
	// The handler adds only its response message to what the AEAD needs.
	if handler > aeadOnly+1 {
		t.Errorf("Decrypt handler allocs = %v, want at most the AEAD's %v + 1 (the response)", handler, aeadOnly)
	}
}

func FuzzBundleDecode(f *testing.F) {
	s, signer, keys, ks := newUnstarted(f)
	good := signer.Sign(f, kmstest.Bundle(f, keys, testRegion, 1, ks))
	empty := signer.Sign(f, kmstest.Bundle(f, keys, testRegion, 2))
	for _, sb := range []*bundlev1.SignedBundle{good, empty, {Bundle: good.Bundle}, {Bundle: []byte{0x08, 0x01}, Signature: good.Signature}} {
		b, err := proto.Marshal(sb)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var sb bundlev1.SignedBundle
		if proto.Unmarshal(data, &sb) != nil {
			return
		}
		_, err := s.apply(context.Background(), &kmsv1.ApplyBundleRequest{Bundle: &sb, DryRun: true})
		if err != nil {
			return
		}
		msg := append([]byte("cairn/bundle/v1\x00"), sb.GetBundle()...)
		if !ed25519.Verify(signer.Public, msg, sb.GetSignature()) {
			t.Fatalf("ApplyBundle accepted %x without a valid signature", data)
		}
	})
}
