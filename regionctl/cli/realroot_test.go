package cli_test

import (
	"crypto/ed25519"
	"path/filepath"
	"testing"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/rootkms/rootkmstest/live"
)

// TestAgainstARealRootKMS drives region create, keyset create and bundle
// build against a real in-process root KMS, and checks that every keyset of
// the us-east bundle opens under the region key a us-east KMS unwraps.
func TestAgainstARealRootKMS(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	chain := live.Start(t, pki)
	addr := chain.Addr
	idFlags := identityFlags(pki, regionctlID)
	rootFlags := append([]string{"--rootkms", addr}, idFlags...)
	for _, region := range []string{"us-east", "eu-west"} {
		mustRun(t, append([]string{"region", "create", "--region", region}, rootFlags...)...)
	}
	dir := t.TempDir()
	teams, keysDir := filepath.Join(dir, "teams"), filepath.Join(dir, "keys")
	writeFile(t, filepath.Join(teams, "payments.json"), paymentsTeam)
	writeFile(t, filepath.Join(teams, "search.json"), searchTeam)
	r := mustRun(t, append([]string{"keyset", "create", "--teams", teams}, rootFlags...)...)
	contains(t, "keyset create stdout", r.stdout, "4 created, 0 already in the record, 0 failed")
	r = mustRun(t, append([]string{"keyset", "create", "--teams", teams}, rootFlags...)...)
	contains(t, "keyset create (again) stdout", r.stdout, "0 created, 4 already in the record, 0 failed")

	mustRun(t, "keys", "generate", "--out", keysDir)
	out := filepath.Join(dir, "us-east.bundle")
	mustRun(t, append([]string{"bundle", "build", "--region", "us-east", "--serial", "1", "--teams", teams,
		"--signing-key", filepath.Join(keysDir, "bundle-signing.key"), "--out", out}, rootFlags...)...)
	pub, err := bundle.ReadPublicKey(filepath.Join(keysDir, "bundle-signing.pub"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := bundle.Verify(readBundle(t, out), []ed25519.PublicKey{pub})
	if err != nil {
		t.Fatalf("Verify(bundle built from the real root KMS's keysets) = %v", err)
	}
	if got := len(b.GetKeysets()); got != 3 {
		t.Errorf("us-east bundle holds %d keysets, want 3 (payments/ledger, payments/new, search/index)", got)
	}
	aeads := chain.RegionAEADs(t, pki, "us-east")
	for _, k := range b.GetKeysets() {
		ek := k.GetKeyset()
		aead, ok := aeads[ek.GetRegionKeyVersion()]
		if !ok {
			t.Errorf("keyset %s is under region key version %d, which us-east does not have", k.GetName(), ek.GetRegionKeyVersion())
			continue
		}
		if _, err := keysets.Decrypt(ek, aead); err != nil {
			t.Errorf("Decrypt(%s from the bundle, us-east key) = %v", k.GetName(), err)
		}
	}
}
