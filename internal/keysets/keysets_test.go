package keysets_test

import (
	"errors"
	"testing"

	"github.com/tink-crypto/tink-go/v2/aead"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/keysets"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestRoundTripAndBinding(t *testing.T) {
	rk, err := keysets.NewRegionKey()
	if err != nil {
		t.Fatal(err)
	}
	defer rk.Wipe()
	regionAEAD, err := keysets.RegionAEAD(rk)
	if err != nil {
		t.Fatal(err)
	}
	otherKey, _ := keysets.NewRegionKey()
	otherAEAD, _ := keysets.RegionAEAD(otherKey)

	for _, tmpl := range []string{"", "AES128_GCM", "AES256_GCM", "AES256_GCM_SIV", "CHACHA20_POLY1305", "XCHACHA20_POLY1305"} {
		h, err := keysets.Generate(tmpl)
		if err != nil {
			t.Fatalf("Generate(%q) = %v", tmpl, err)
		}
		ek, err := keysets.Encrypt(h, "payments/ledger", "us-east", 3, regionAEAD)
		if err != nil {
			t.Fatal(err)
		}
		if len(ek.GetVersions()) != 1 || ek.GetVersions()[0].GetStatus() != cryptov1.KeyStatus_KEY_STATUS_PRIMARY || ek.GetPrimaryKeyId() != ek.GetVersions()[0].GetKeyId() {
			t.Errorf("Encrypt(%q) metadata = %v", tmpl, ek)
		}
		got, err := keysets.Decrypt(ek, regionAEAD)
		if err != nil {
			t.Fatalf("Decrypt(%q) = %v", tmpl, err)
		}
		// The decrypted keyset encrypts, and the original decrypts it.
		a1, _ := aead.New(h)
		a2, _ := aead.New(got)
		ct, _ := a2.Encrypt([]byte("dek"), []byte("ad"))
		if pt, err := a1.Decrypt(ct, []byte("ad")); err != nil || string(pt) != "dek" {
			t.Errorf("keyset %q did not survive the round trip: %v", tmpl, err)
		}
	}
	h, _ := keysets.Generate("")
	ek, _ := keysets.Encrypt(h, "payments/ledger", "us-east", 3, regionAEAD)
	moved := func(f func(*cryptov1.EncryptedKeyset)) *cryptov1.EncryptedKeyset {
		c := proto.Clone(ek).(*cryptov1.EncryptedKeyset)
		f(c)
		return c
	}
	for name, bad := range map[string]*cryptov1.EncryptedKeyset{
		"renamed":            moved(func(c *cryptov1.EncryptedKeyset) { c.Name = "payments/other" }),
		"other region":       moved(func(c *cryptov1.EncryptedKeyset) { c.Region = "eu-west" }),
		"other version":      moved(func(c *cryptov1.EncryptedKeyset) { c.RegionKeyVersion = 4 }),
		"flipped ciphertext": moved(func(c *cryptov1.EncryptedKeyset) { c.Ciphertext[len(c.Ciphertext)/2] ^= 1 }),
		"truncated":          moved(func(c *cryptov1.EncryptedKeyset) { c.Ciphertext = c.Ciphertext[:10] }),
	} {
		if _, err := keysets.Decrypt(bad, regionAEAD); !errors.Is(err, keysets.ErrDecrypt) {
			t.Errorf("Decrypt(%s) = %v, want ErrDecrypt", name, err)
		}
	}
	if _, err := keysets.Decrypt(ek, otherAEAD); !errors.Is(err, keysets.ErrDecrypt) {
		t.Errorf("Decrypt under another region key = %v, want ErrDecrypt", err)
	}
	lying := moved(func(c *cryptov1.EncryptedKeyset) { c.PrimaryKeyId++ })
	if _, err := keysets.Decrypt(lying, regionAEAD); err == nil {
		t.Errorf("Decrypt with public metadata that lies about the primary = nil error")
	}
	// Fingerprints tell equal keysets from different ones.
	f1, _ := keysets.Fingerprint(h)
	h2, _ := keysets.Decrypt(ek, regionAEAD)
	f2, _ := keysets.Fingerprint(h2)
	other, _ := keysets.Generate("")
	f3, _ := keysets.Fingerprint(other)
	if !f1.Equal(f2) || f1.Equal(f3) {
		t.Errorf("Fingerprint: same keyset equal = %v, different equal = %v", f1.Equal(f2), f1.Equal(f3))
	}
}

func TestValidNameAndTemplate(t *testing.T) {
	for name, ok := range map[string]bool{
		"payments/ledger": true, "a": true, "a.b_c-d/e": true,
		"": false, "/a": false, "a/": false, "a//b": false, "A": false, "a b": false, "../x": false,
	} {
		if err := keysets.ValidName(name); (err == nil) != ok {
			t.Errorf("ValidName(%q) = %v, want ok=%v", name, err, ok)
		}
	}
	if _, err := keysets.Template("DES"); err == nil {
		t.Errorf("Template(DES) = nil error")
	}
}
