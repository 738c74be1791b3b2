package cli_test

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/internal/keysets"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	"github.com/cairnkms/cairn/regionctl/bundle"
	"github.com/cairnkms/cairn/regionctl/store"
)

const paymentsTeam = `{"team":"payments","keysets":[
  {"name":"payments/ledger","regions":["us-east","eu-west"],"purpose":"envelope","template":"AES256_GCM",
   "rotation_period":"2160h","ciphertext_ttl":"8760h",
   "acl":{"encrypt":["client/us-east/*"],"decrypt":["client/*/ledger"],"generate_data_key":[],"rewrap":[]}},
  {"name":"payments/eu-only","regions":["eu-west"],"purpose":"envelope","rotation_period":"720h","ciphertext_ttl":"24h"},
  {"name":"payments/new","regions":["us-east"],"purpose":"envelope","rotation_period":"720h","ciphertext_ttl":"24h"}]}`

const searchTeam = `{"team":"search","keysets":[
  {"name":"search/index","regions":["us-east"],"purpose":"envelope","template":"CHACHA20_POLY1305","rotation_period":"720h","ciphertext_ttl":"48h",
   "acl":{"decrypt":["spiffe://cairn.test/client/us-east/indexer"],"rewrap":["regionctl/global/*"]}}]}`

// brokenTeam has a bad ACL pattern: the whole file is left out.
const brokenTeam = `{"team":"ads","keysets":[
  {"name":"ads/clicks","regions":["us-east"],"purpose":"envelope","rotation_period":"720h","ciphertext_ttl":"24h",
   "acl":{"encrypt":["client/us-east"]}}]}`

// fillStore stores real keysets encrypted under test region keys, as the
// root KMS would: every configured keyset but payments/new, plus ads/clicks.
// search/index is under us-east's region key version 2.
func fillStore(t *testing.T, dir string, keys *regionKeys) {
	t.Helper()
	st, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []struct {
		name, template string
		regions        []string
		version        uint32
	}{
		{"payments/ledger", "AES256_GCM", []string{"us-east", "eu-west"}, 1},
		{"payments/eu-only", "", []string{"eu-west"}, 1},
		{"search/index", "CHACHA20_POLY1305", []string{"us-east"}, 2},
		{"ads/clicks", "", []string{"us-east"}, 1},
	} {
		h, err := keysets.Generate(k.template)
		if err != nil {
			t.Fatal(err)
		}
		var copies []*cryptov1.EncryptedKeyset
		for _, r := range k.regions {
			aead, ok := keys.get(r, k.version)
			if !ok {
				aead = keys.add(t, r, k.version)
			}
			ek, err := keysets.Encrypt(h, k.name, r, k.version, aead)
			if err != nil {
				t.Fatal(err)
			}
			copies = append(copies, ek)
		}
		if err := st.Put(k.name, copies); err != nil {
			t.Fatal(err)
		}
	}
}

func readBundle(t *testing.T, path string) *bundlev1.SignedBundle {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var sb bundlev1.SignedBundle
	if err := proto.Unmarshal(data, &sb); err != nil {
		t.Fatalf("bundle file %s does not decode: %v", path, err)
	}
	return &sb
}

func keysetNames(b *bundlev1.Bundle) []string {
	var out []string
	for _, k := range b.GetKeysets() {
		out = append(out, k.GetName())
	}
	return out
}

// TestBuildAndInspect runs the whole offline flow in process: a signing key,
// team files (one bad), a store filled as the root KMS would, then bundle
// build and bundle inspect.
func TestBuildAndInspect(t *testing.T) {
	dir := t.TempDir()
	keysDir := filepath.Join(dir, "keys")
	gen := mustRun(t, "keys", "generate", "--out", keysDir)
	privPath, pubPath := filepath.Join(keysDir, "bundle-signing.key"), filepath.Join(keysDir, "bundle-signing.pub")
	pub, err := bundle.ReadPublicKey(pubPath)
	if err != nil {
		t.Fatal(err)
	}
	contains(t, "keys generate stdout", gen.stdout, bundle.KeyID(pub), privPath, pubPath)
	if fi, err := os.Stat(privPath); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("signing key mode = %v, %v; want 0600", fi.Mode().Perm(), err)
	}
	again := run(t, "keys", "generate", "--out", keysDir)
	if again.code != 1 || !strings.Contains(again.stderr, "refusing to overwrite") {
		t.Errorf("keys generate (again) = %d, %q; want 1, refusing to overwrite", again.code, again.stderr)
	}
	if got, _ := bundle.ReadPublicKey(pubPath); !got.Equal(pub) {
		t.Errorf("keys generate (again) changed the public key")
	}

	teams := filepath.Join(dir, "teams")
	writeFile(t, filepath.Join(teams, "payments.json"), paymentsTeam)
	writeFile(t, filepath.Join(teams, "search.json"), searchTeam)
	writeFile(t, filepath.Join(teams, "ads.json"), brokenTeam)
	storeDir := filepath.Join(dir, "store")
	var keys regionKeys
	fillStore(t, storeDir, &keys)

	out := filepath.Join(dir, "us-east.bundle")
	build := mustRun(t, "bundle", "build", "--region", "us-east", "--serial", "3", "--teams", teams, "--store", storeDir,
		"--signing-key", privPath, "--out", out, "--created-by", regionctlID)
	contains(t, "bundle build stderr", build.stderr,
		"WARNING: 1 team config file(s) are invalid", filepath.Join(teams, "ads.json"), "acl.encrypt", "their keysets are NOT in this bundle",
		"WARNING: 1 keyset(s) configured for us-east are NOT in this bundle", "payments/new (team payments): not in the store")

	sb := readBundle(t, out)
	b, err := bundle.Verify(sb, []ed25519.PublicKey{pub})
	if err != nil {
		t.Fatalf("Verify(built bundle) = %v", err)
	}
	sum := sha256.Sum256(sb.GetBundle())
	contains(t, "bundle build stdout", build.stdout, "us-east serial 3 sha256 "+hex.EncodeToString(sum[:]), "2 keyset(s)", "region key versions [1 2]", out)
	if got, want := keysetNames(b), []string{"payments/ledger", "search/index"}; !cmp.Equal(got, want) {
		t.Errorf("built bundle keysets = %v, want %v", got, want)
	}
	if got, want := b.GetRegionKeyVersions(), []uint32{1, 2}; !cmp.Equal(got, want) {
		t.Errorf("built bundle region key versions = %v, want %v", got, want)
	}
	if b.GetCreatedBy() != regionctlID || b.GetFormatVersion() != 1 || b.GetSerial() != 3 {
		t.Errorf("built bundle header = %q, v%d, serial %d; want %q, v1, serial 3", b.GetCreatedBy(), b.GetFormatVersion(), b.GetSerial(), regionctlID)
	}
	// Every keyset in the bundle is the us-east copy and opens under the
	// region key it names.
	for _, k := range b.GetKeysets() {
		ek := k.GetKeyset()
		aead, ok := keys.get(ek.GetRegion(), ek.GetRegionKeyVersion())
		if ek.GetRegion() != "us-east" || !ok {
			t.Errorf("keyset %s in the us-east bundle is for %s v%d", k.GetName(), ek.GetRegion(), ek.GetRegionKeyVersion())
			continue
		}
		if _, err := keysets.Decrypt(ek, aead); err != nil {
			t.Errorf("Decrypt(%s from the bundle) = %v", k.GetName(), err)
		}
	}
	ledger := b.GetKeysets()[0]
	if got, want := ledger.GetRegions(), []string{"eu-west", "us-east"}; !cmp.Equal(got, want) {
		t.Errorf("payments/ledger regions = %v, want %v", got, want)
	}
	if got, want := ledger.GetAcl().GetDecrypt(), []string{"client/*/ledger"}; !cmp.Equal(got, want) || ledger.GetOwnerTeam() != "payments" {
		t.Errorf("payments/ledger ACL decrypt = %v, owner %q; want %v, payments", got, ledger.GetOwnerTeam(), want)
	}
	if fi, err := os.Stat(out); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("bundle file mode = %v, %v; want 0600", fi.Mode().Perm(), err)
	}

	// inspect: verifies, summarizes, never prints key material.
	_, otherPriv, _ := ed25519.GenerateKey(nil)
	otherPub := filepath.Join(dir, "other", "bundle-signing.pub")
	if err := bundle.WriteKeys(filepath.Join(dir, "other", "bundle-signing.key"), otherPub, otherPriv); err != nil {
		t.Fatal(err)
	}
	ins := mustRun(t, "bundle", "inspect", "--bundle", out, "--signing-pub", otherPub+","+pubPath)
	contains(t, "bundle inspect stdout", ins.stdout,
		"bundle us-east serial 3 sha256 "+hex.EncodeToString(sum[:]),
		"signature: valid, key "+bundle.KeyID(pub),
		"by "+regionctlID,
		"region key versions: [1 2]",
		"keysets: 2",
		"payments/ledger  team payments, envelope, regions eu-west,us-east",
		"region key version 1, primary key ",
		"rotation period 2160h0m0s, ciphertext TTL 8760h0m0s",
		"encrypt: client/us-east/*",
		"generate_data_key: nobody",
		"search/index  team search, envelope, regions us-east",
		"decrypt: spiffe://cairn.test/client/us-east/indexer",
	)
	for _, k := range b.GetKeysets() {
		ct := k.GetKeyset().GetCiphertext()
		for _, enc := range []string{hex.EncodeToString(ct[:16]), base64.StdEncoding.EncodeToString(ct[:15]), string(ct[:16])} {
			if strings.Contains(ins.stdout, enc) {
				t.Errorf("bundle inspect printed %s's ciphertext", k.GetName())
			}
		}
	}

	// inspect refuses a bundle that does not verify.
	tampered := filepath.Join(dir, "tampered.bundle")
	bad := proto.CloneOf(sb)
	bad.Bundle[len(bad.Bundle)/2] ^= 1
	data, _ := proto.Marshal(bad)
	writeFile(t, tampered, string(data))
	garbage := filepath.Join(dir, "garbage.bundle")
	writeFile(t, garbage, "\xff\xff\xff")
	for _, tt := range []struct {
		name, bundle, pubs, want string
	}{
		{"another key", out, otherPub, "does not verify"},
		{"tampered", tampered, pubPath, "does not verify"},
		{"garbage", garbage, pubPath, "is not a signed bundle"},
		{"a private key as public key", out, privPath, "not a Cairn bundle public key"},
	} {
		r := run(t, "bundle", "inspect", "--bundle", tt.bundle, "--signing-pub", tt.pubs)
		if r.code != 1 || !strings.Contains(r.stderr, tt.want) {
			t.Errorf("bundle inspect (%s) = %d, %q; want 1 containing %q", tt.name, r.code, r.stderr, tt.want)
		}
	}

	// The other region's bundle gets that region's copies.
	euOut := filepath.Join(dir, "eu-west.bundle")
	mustRun(t, "bundle", "build", "--region", "eu-west", "--serial", "1", "--teams", teams, "--store", storeDir,
		"--signing-key", privPath, "--out", euOut, "--created-by", regionctlID)
	eu, err := bundle.Verify(readBundle(t, euOut), []ed25519.PublicKey{pub})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := keysetNames(eu), []string{"payments/eu-only", "payments/ledger"}; !cmp.Equal(got, want) {
		t.Errorf("eu-west bundle keysets = %v, want %v", got, want)
	}
	for _, k := range eu.GetKeysets() {
		if k.GetKeyset().GetRegion() != "eu-west" {
			t.Errorf("eu-west bundle keyset %s is the %s copy", k.GetName(), k.GetKeyset().GetRegion())
		}
	}

	// Rebuilding replaces the output file atomically.
	mustRun(t, "bundle", "build", "--region", "eu-west", "--serial", "2", "--teams", teams, "--store", storeDir,
		"--signing-key", privPath, "--out", euOut, "--created-by", regionctlID)
	if eu2, err := bundle.Verify(readBundle(t, euOut), []ed25519.PublicKey{pub}); err != nil || eu2.GetSerial() != 2 {
		t.Errorf("rebuilt bundle = serial %d, %v; want serial 2", eu2.GetSerial(), err)
	}

	// created_by defaults to the identity flags' ID.
	pki := identitytest.New(t, identitytest.TrustDomain)
	byID := filepath.Join(dir, "by-id.bundle")
	args := append([]string{"bundle", "build", "--region", "us-east", "--serial", "4", "--teams", teams, "--store", storeDir,
		"--signing-key", privPath, "--out", byID}, identityFlags(pki, "spiffe://cairn.test/regionctl/global/sre-1")...)
	mustRun(t, args...)
	if got, err := bundle.Verify(readBundle(t, byID), []ed25519.PublicKey{pub}); err != nil || got.GetCreatedBy() != "spiffe://cairn.test/regionctl/global/sre-1" {
		t.Errorf("bundle built with identity flags: created_by %q, %v; want spiffe://cairn.test/regionctl/global/sre-1", got.GetCreatedBy(), err)
	}

	// A signing key readable by others is refused, and nothing is written.
	if err := os.Chmod(privPath, 0o644); err != nil {
		t.Fatal(err)
	}
	loose := filepath.Join(dir, "loose.bundle")
	r := run(t, "bundle", "build", "--region", "us-east", "--serial", "5", "--teams", teams, "--store", storeDir,
		"--signing-key", privPath, "--out", loose, "--created-by", regionctlID)
	if _, err := os.Stat(loose); r.code != 1 || !strings.Contains(r.stderr, "chmod 600") || err == nil {
		t.Errorf("bundle build (signing key 0644) = %d, %q, output exists: %v; want 1, chmod 600, no output", r.code, r.stderr, err == nil)
	}
}
