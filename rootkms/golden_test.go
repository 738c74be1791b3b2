package rootkms_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/keyset"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/cairnkms/cairn/internal/keysets"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmstest/live"
)

// TestGoldenCiphertexts: CreateKeyset and ADD_VERSION record a golden
// ciphertext on the version they make; it carries that key's TINK prefix,
// decrypts to the recorded SHA-256 with every region's copy, and with no
// other version's key. Later steps keep it.
func TestGoldenCiphertexts(t *testing.T) {
	c := newChain(t)
	r1 := c.startReplica("rootkms-1", true, false)
	if err := r1.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	admin := c.client(regionctlID, r1.api)
	createRegion(t, admin, "us-east")
	createRegion(t, admin, "eu-west")
	const name = "payments/ledger"
	ks, err := keysetCall(t, admin, func(ctx context.Context, cl rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return cl.CreateKeyset(ctx, &rootkmsv1.CreateKeysetRequest{Name: name, Regions: []string{"us-east", "eu-west"}, CiphertextTtl: durationpb.New(time.Hour)})
	})
	if err != nil {
		t.Fatalf("CreateKeyset = %v", err)
	}
	first := ks.GetRecord().GetVersions()[0]
	if first.GetGolden() == nil {
		t.Fatalf("CreateKeyset: version %d has no golden ciphertext", first.GetKeyId())
	}
	ks, err = keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_ADD_VERSION, 0))
	if err != nil {
		t.Fatalf("ADD_VERSION = %v", err)
	}
	second := ks.GetRecord().GetVersions()[1]
	if second.GetGolden() == nil {
		t.Fatalf("ADD_VERSION: version %d has no golden ciphertext", second.GetKeyId())
	}
	// Kept by later steps (a rewrap re-encrypts every copy).
	if ks, err = keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_REWRAP, 0)); err != nil {
		t.Fatalf("REWRAP = %v", err)
	}
	ks, err = keysetCall(t, admin, func(ctx context.Context, cl rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return cl.GetKeyset(ctx, &rootkmsv1.GetKeysetRequest{Name: name, IncludeCopies: true})
	})
	if err != nil {
		t.Fatal(err)
	}
	versions := ks.GetRecord().GetVersions()
	for i, want := range []*statev1.KeysetVersionRecord{first, second} {
		if got := versions[i].GetGolden(); !bytes.Equal(got.GetCiphertext(), want.GetGolden().GetCiphertext()) {
			t.Errorf("after REWRAP version %d golden ciphertext = %x, want the one made at its creation %x", want.GetKeyId(), got.GetCiphertext(), want.GetGolden().GetCiphertext())
		}
	}
	if bytes.Equal(first.GetGolden().GetCiphertext(), second.GetGolden().GetCiphertext()) ||
		bytes.Equal(first.GetGolden().GetPlaintextSha256(), second.GetGolden().GetPlaintextSha256()) {
		t.Errorf("two versions share a golden ciphertext or plaintext")
	}

	// Open every region's copy as that region's KMS server would.
	handles := map[string]*keyset.Handle{}
	for _, cp := range ks.GetRecord().GetCopies() {
		id := map[string]string{"us-east": kmsEast, "eu-west": kmsWest}[cp.GetRegion()]
		mat, err := c.unwrap(id, r1.api, cp.GetRegion())
		if err != nil {
			t.Fatal(err)
		}
		h, err := keysets.Decrypt(cp, live.AEADsOf(t, mat)[cp.GetRegionKeyVersion()])
		if err != nil {
			t.Fatalf("decrypting the %s copy = %v", cp.GetRegion(), err)
		}
		handles[cp.GetRegion()] = h
	}
	for _, v := range versions {
		g := v.GetGolden()
		id := v.GetKeyId()
		if got, want := g.GetAssociatedData(), binary.BigEndian.AppendUint32([]byte("cairn/golden/v1\x00"+name+"\x00"), id); !bytes.Equal(got, want) {
			t.Errorf("version %d golden associated data = %q, want %q", id, got, want)
		}
		if ct := g.GetCiphertext(); len(ct) < 5 || ct[0] != 1 || binary.BigEndian.Uint32(ct[1:5]) != id {
			t.Errorf("version %d golden ciphertext %x does not start with its TINK prefix", id, ct)
		}
		for region, h := range handles {
			a, err := aead.New(h)
			if err != nil {
				t.Fatal(err)
			}
			pt, err := a.Decrypt(g.GetCiphertext(), g.GetAssociatedData())
			if err != nil {
				t.Errorf("%s copy: Decrypt(version %d golden) = %v", region, id, err)
				continue
			}
			if sum := sha256.Sum256(pt); !bytes.Equal(sum[:], g.GetPlaintextSha256()) || len(pt) != 32 {
				t.Errorf("%s copy: version %d golden decrypts to %d bytes with SHA-256 %x, want 32 with %x", region, id, len(pt), sum, g.GetPlaintextSha256())
			}
			if _, err := a.Decrypt(g.GetCiphertext(), []byte("other")); err == nil {
				t.Errorf("%s copy: version %d golden decrypts with other associated data", region, id)
			}
		}
	}

	// Not with another version's key: a keyset holding only the other key,
	// and the golden ciphertext re-labelled with the other key's prefix.
	h := handles["us-east"]
	for _, pair := range [][2]*statev1.KeysetVersionRecord{{first, second}, {second, first}} {
		v, other := pair[0], pair[1]
		m := keyset.NewManagerFromHandle(h)
		if err := m.SetPrimary(other.GetKeyId()); err != nil {
			t.Fatal(err)
		}
		if err := m.Delete(v.GetKeyId()); err != nil {
			t.Fatal(err)
		}
		oh, err := m.Handle()
		if err != nil {
			t.Fatal(err)
		}
		a, err := aead.New(oh)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := a.Decrypt(v.GetGolden().GetCiphertext(), v.GetGolden().GetAssociatedData()); err == nil {
			t.Errorf("version %d golden decrypts with a keyset holding only version %d", v.GetKeyId(), other.GetKeyId())
		}
		full, err := aead.New(h)
		if err != nil {
			t.Fatal(err)
		}
		relabelled := bytes.Clone(v.GetGolden().GetCiphertext())
		binary.BigEndian.PutUint32(relabelled[1:5], other.GetKeyId())
		if _, err := full.Decrypt(relabelled, v.GetGolden().GetAssociatedData()); err == nil {
			t.Errorf("version %d golden, routed to version %d by its prefix, decrypts", v.GetKeyId(), other.GetKeyId())
		}
	}
	// The copies' public metadata says the keys are there; the record's
	// golden ciphertexts say they are the right keys.
	if got := ks.GetRecord().GetCopies()[0].GetVersions(); len(got) != 2 || got[0].GetStatus() != cryptov1.KeyStatus_KEY_STATUS_PRIMARY {
		t.Errorf("copy versions = %v, want the first primary and the second", got)
	}
	scanNoSecrets(t, c, []*replica{r1})
}
