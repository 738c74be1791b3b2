package keystore

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/keyset"
	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/keysets"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
)

// TestLoadedAEADInteroperatesWithTink holds the keystore's AEADs (built
// straight from the key material for AES-GCM keysets, through Tink for the
// rest) to Tink's own primitive, both ways, for every template a keyset may
// use, with three keys per keyset (an enabled one, the primary, a disabled
// one): a ciphertext Tink makes under any enabled key decrypts, routed by its
// prefix; the keystore's ciphertexts carry the primary's prefix and Tink
// decrypts them; the disabled key's ciphertexts, tampered ones and wrong
// associated data do not decrypt.
func TestLoadedAEADInteroperatesWithTink(t *testing.T) {
	for _, tc := range []struct {
		template string
		direct   bool // built from key material, not through Tink
	}{
		{"AES128_GCM", true},
		{"AES256_GCM", true},
		{"AES256_GCM_SIV", false},
		{"CHACHA20_POLY1305", false},
		{"XCHACHA20_POLY1305", false},
	} {
		t.Run(tc.template, func(t *testing.T) {
			tmpl, err := keysets.Template(tc.template)
			if err != nil {
				t.Fatal(err)
			}
			m := keyset.NewManager()
			ids := make([]uint32, 3)
			for i := range ids {
				if ids[i], err = m.Add(tmpl); err != nil {
					t.Fatal(err)
				}
			}
			enabled, primary, disabled := ids[0], ids[1], ids[2]
			// Tink's primitive with each key as primary, for ciphertexts
			// under every key.
			under := map[uint32]tink.AEAD{}
			for _, id := range ids {
				if err := m.SetPrimary(id); err != nil {
					t.Fatal(err)
				}
				h, err := m.Handle()
				if err != nil {
					t.Fatal(err)
				}
				if under[id], err = aead.New(h); err != nil {
					t.Fatal(err)
				}
			}
			if err := m.SetPrimary(primary); err != nil {
				t.Fatal(err)
			}
			if err := m.Disable(disabled); err != nil {
				t.Fatal(err)
			}
			h, err := m.Handle()
			if err != nil {
				t.Fatal(err)
			}
			tinkAEAD, err := aead.New(h)
			if err != nil {
				t.Fatal(err)
			}
			k := loadOne(t, h)
			if _, isDirect := k.aead.(*gcmKeyset); isDirect != tc.direct {
				t.Fatalf("keyset AEAD %T; built from key material = %v, want %v", k.aead, isDirect, tc.direct)
			}
			for i, id := range ids {
				e, err := h.Entry(i)
				if err != nil {
					t.Fatal(err)
				}
				v, ok := k.Version(id)
				if !ok {
					t.Fatalf("Version(%d) missing", id)
				}
				if v.Parameters() == nil || !v.Parameters().Equal(e.Key().Parameters()) {
					t.Errorf("Version(%d).Parameters() = %v, want %v", id, v.Parameters(), e.Key().Parameters())
				}
			}

			pt, ad := []byte("a data key of 32 bytes, roughly."), []byte("associated")
			now := time.Unix(1_800_000_000, 0)
			// Tink → keystore, under each enabled key.
			for _, id := range []uint32{enabled, primary} {
				ct, err := under[id].Encrypt(pt, ad)
				if err != nil {
					t.Fatal(err)
				}
				got, v, err := k.Decrypt(ct, ad, now)
				if err != nil || !bytes.Equal(got, pt) || v.KeyID() != id {
					t.Errorf("Decrypt(Tink's ciphertext under key %d) = %q, %v, %v; want %q under that key", id, got, v, err, pt)
				}
				if _, _, err := k.Decrypt(ct, []byte("other"), now); !errors.Is(err, ErrDecrypt) {
					t.Errorf("Decrypt(wrong associated data) = %v, want ErrDecrypt", err)
				}
				bad := bytes.Clone(ct)
				bad[len(bad)-1] ^= 1
				if _, _, err := k.Decrypt(bad, ad, now); !errors.Is(err, ErrDecrypt) {
					t.Errorf("Decrypt(tampered) = %v, want ErrDecrypt", err)
				}
			}
			ct, err := under[disabled].Encrypt(pt, ad)
			if err != nil {
				t.Fatal(err)
			}
			if _, _, err := k.Decrypt(ct, ad, now); !errors.Is(err, ErrVersionGone) {
				t.Errorf("Decrypt(ciphertext under the disabled key) = %v, want ErrVersionGone", err)
			}
			// Keystore → Tink.
			ct, v, err := k.Encrypt(pt, ad, now)
			if err != nil || v.KeyID() != primary {
				t.Fatalf("Encrypt = %v, %v; want the primary %d", v, err, primary)
			}
			if id, _ := KeyIDOf(ct); id != primary {
				t.Errorf("Encrypt's ciphertext names key %d, want the primary %d", id, primary)
			}
			if got, err := tinkAEAD.Decrypt(ct, ad); err != nil || !bytes.Equal(got, pt) {
				t.Errorf("Tink's Decrypt(keystore's ciphertext) = %q, %v; want %q", got, err, pt)
			}
			if _, err := tinkAEAD.Decrypt(ct, []byte("other")); err == nil {
				t.Error("Tink's Decrypt(keystore's ciphertext, wrong associated data) succeeded")
			}
		})
	}
}

// loadOne encrypts h for the test region and loads it as buildKeyset does
// at a boot.
func loadOne(t *testing.T, h *keyset.Handle) *Keyset {
	t.Helper()
	m, err := keysets.NewRegionKey()
	if err != nil {
		t.Fatal(err)
	}
	rk, err := keysets.RegionAEAD(m)
	m.Wipe()
	if err != nil {
		t.Fatal(err)
	}
	const name, region = "payments/ledger", "us-east"
	ek, err := keysets.Encrypt(h, name, region, 1, rk)
	if err != nil {
		t.Fatal(err)
	}
	acl := []string{"client/us-east/app"}
	cfg := &bundlev1.KeysetConfig{Name: name, Keyset: ek, CiphertextTtl: durationpb.New(time.Hour),
		Acl: &bundlev1.Acl{Encrypt: acl, Decrypt: acl, GenerateDataKey: acl, Rewrap: acl}}
	acls := aclCache{td: spiffeid.RequireTrustDomainFromString("cairn.test"), parsed: map[string]*[numOps]identity.Allowlist{}}
	k, err := buildKeyset(cfg, region, &acls, map[uint32]tink.AEAD{1: rk}, nil, time.Unix(1_800_000_000, 0))
	if err != nil {
		t.Fatalf("buildKeyset = %v", err)
	}
	return k
}
