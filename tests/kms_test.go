package tests

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tink-crypto/tink-go/v2/insecurecleartextkeyset"
	tinkaesgcm "github.com/tink-crypto/tink-go/v2/proto/aes_gcm_go_proto"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/internal/secret"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	"github.com/cairnkms/cairn/tests/framework"
)

const (
	kmsRegion  = "us-east"
	kmsKeyset  = "payments/ledger"
	kmsClient  = "client/us-east/demo"
	kmsBurst   = 200
	kmsCallTTL = 5 * time.Second
)

// ledgerTeam is the one team file: payments/ledger in us-east, encrypt and
// decrypt for every us-east client.
const ledgerTeam = `{"team":"payments","keysets":[
  {"name":"payments/ledger","regions":["us-east"],"purpose":"envelope",
   "rotation_period":"2160h","ciphertext_ttl":"8760h",
   "acl":{"encrypt":["client/us-east/*"],"decrypt":["client/us-east/*"]}}]}`

// TestKMSServesWithRootKMSDown is issue 5's done-when: two us-east KMS
// servers get a bundle built by regionctl from keysets the root KMS made; a
// DEK wrapped on one unwraps on the other; with the root KMS and the
// distributor stopped both keep answering every call; a KMS restarted while
// the root KMS is down stays not ready (and refuses the data plane) while the
// other keeps serving; and no region key or DEK is in any file afterwards.
func TestKMSServesWithRootKMSDown(t *testing.T) {
	start := time.Now()
	w := framework.NewWorld(t, bin)
	w.Mint("kms/us-east/kms-2")
	safes := w.FileSafes(3)
	d := w.Distributors(1, false)[0]
	d.Start()
	d.WaitState(sealed)
	requireHealth(t, "sealed distributor", d.Health, healthpb.HealthCheckResponse_NOT_SERVING)
	m := w.Genesis(2, safes, d)
	waitUnsealed(t, d, m)
	requireHealth(t, "unsealed distributor", d.Health, healthpb.HealthCheckResponse_SERVING)

	root := w.RootKMSCluster(framework.FastRaft(w.ManifestPath(), d.Addr), framework.Voter(1))[0]
	root.Start()
	framework.WaitLeader(root)
	root.WaitServing()
	t.Logf("chain up (dev certs, 3 safes, genesis, distributor, root KMS) in %s", time.Since(start).Round(time.Millisecond))

	// regionctl: signing keys, the region, the keyset, the bundle.
	rc := filepath.Join(w.Dir, "regionctl")
	keysDir, teams := filepath.Join(rc, "keys"), filepath.Join(rc, "teams")
	bundlePath := filepath.Join(rc, "us-east-1.bundle")
	if err := os.MkdirAll(teams, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(teams, "payments.json"), []byte(ledgerTeam), 0o600); err != nil {
		t.Fatal(err)
	}
	rcID := w.IDFlags(framework.Regionctl)
	rootFlags := append([]string{"--rootkms", root.API}, rcID...)
	w.RegionctlOK("keys", "generate", "--out", keysDir)
	w.RegionctlOK(append([]string{"region", "create", "--region", kmsRegion}, rootFlags...)...)
	r := w.RegionctlOK(append([]string{"keyset", "create", "--teams", teams}, rootFlags...)...)
	if !strings.Contains(r.Stdout, "1 created") {
		t.Errorf("keyset create printed %q, want 1 created", r.Stdout)
	}
	w.RegionctlOK(append([]string{"bundle", "build", "--region", kmsRegion, "--serial", "1", "--teams", teams,
		"--signing-key", filepath.Join(keysDir, "bundle-signing.key"), "--out", bundlePath}, rootFlags...)...)

	kmss := w.KMSServers(kmsRegion, filepath.Join(keysDir, "bundle-signing.pub"), []string{root.API}, "kms/us-east/kms-1", "kms/us-east/kms-2")
	k1, k2 := kmss[0], kmss[1]
	for _, k := range kmss {
		k.Start()
	}
	for _, k := range kmss {
		st, _ := k.WaitStatus("NOT_READY waiting for a bundle", func(st *kmsv1.GetStatusResponse) bool {
			return st.GetState() == kmsv1.ServingState_SERVING_STATE_NOT_READY
		})
		t.Logf("%s before the push: %v (%s)", k.Identity, st.GetState(), st.GetNotReadyReason())
		requireHealth(t, k.Identity+" without a bundle", k.Health, healthpb.HealthCheckResponse_NOT_SERVING)
	}
	pushStart := time.Now()
	w.RegionctlOK(append([]string{"bundle", "push", "--kms", k1.Addr + "," + k2.Addr, "--bundle", bundlePath}, rootFlags...)...)
	for _, k := range kmss {
		st, _ := k.WaitServing(1)
		if st.GetKeysetCount() != 1 || st.GetRegion() != kmsRegion {
			t.Errorf("%s: status %v, want region %s with 1 keyset", k.Identity, st, kmsRegion)
		}
		requireHealth(t, k.Identity+" serving", k.Health, healthpb.HealthCheckResponse_SERVING)
	}
	t.Logf("bundle pushed and both KMS servers SERVING in %s", time.Since(pushStart).Round(time.Millisecond))

	// The region key, for the scan: what a us-east KMS unwraps.
	mat, _, err := root.UnwrapRegionKey("kms/us-east/kms-1", kmsRegion)
	if err != nil {
		t.Fatalf("UnwrapRegionKey(%s) = %v", kmsRegion, err)
	}
	keys := regionKeys{}
	for _, v := range mat.GetVersions() {
		keys[v.GetVersion()] = v.GetKey()
	}
	secrets := append(keysetSecrets(t, bundlePath, kmsKeyset, kmsRegion, keys), regionKeySecrets(t, map[string]regionKeys{kmsRegion: keys})...)
	defer func() {
		for _, s := range secrets {
			clear(s.Value)
		}
	}()
	newDEK := func() []byte {
		dek := make([]byte, 32)
		rand.Read(dek)
		secrets = append(secrets, framework.Secret{Name: fmt.Sprintf("DEK %d", len(secrets)), Value: dek})
		return dek
	}

	// Wrapped on kms-1, unwrapped on kms-2.
	if err := roundTrip(k1, k2, newDEK(), []byte("e2e first")); err != nil {
		t.Fatalf("Encrypt on kms-1, Decrypt on kms-2: %v", err)
	}

	// The root KMS and the distributor go away; both KMS servers keep
	// serving from RAM.
	root.Stop()
	d.Stop()
	burstStart := time.Now()
	fails := 0
	for i := range kmsBurst {
		for _, pair := range [][2]*framework.KMSServer{{k1, k2}, {k2, k1}} {
			if err := roundTrip(pair[0], pair[1], newDEK(), fmt.Appendf(nil, "burst %d", i)); err != nil {
				fails++
				if fails <= 5 {
					t.Errorf("with the root KMS down, round trip %d %s -> %s: %v", i, pair[0].Identity, pair[1].Identity, err)
				}
			}
		}
	}
	if fails > 0 {
		t.Fatalf("with the root KMS down, %d of %d round trips failed, want 0", fails, 2*kmsBurst)
	}
	t.Logf("root KMS and distributor down: %d Encrypt + %d Decrypt on each KMS server, all correct, in %s",
		kmsBurst, kmsBurst, time.Since(burstStart).Round(time.Millisecond))

	// kms-2 restarted while the root KMS is down stays not ready.
	k2.Stop()
	k2.Start()
	st, took := k2.WaitStatus("NOT_READY because it cannot fetch the region key", func(st *kmsv1.GetStatusResponse) bool {
		return st.GetState() == kmsv1.ServingState_SERVING_STATE_NOT_READY && strings.Contains(st.GetNotReadyReason(), "keys of region "+kmsRegion)
	})
	t.Logf("restarted kms-2: %v after %s: %s", st.GetState(), took.Round(time.Millisecond), st.GetNotReadyReason())
	if !strings.Contains(st.GetNotReadyReason(), "UnwrapRegionKey") {
		t.Errorf("not-ready reason %q does not name the root KMS call (UnwrapRegionKey)", st.GetNotReadyReason())
	}
	// While kms-1 serves a burst, kms-2 never becomes ready and refuses the
	// data plane with Unavailable.
	burstStart = time.Now()
	fails = 0
	for i := range kmsBurst {
		if err := roundTrip(k1, k1, newDEK(), fmt.Appendf(nil, "after restart %d", i)); err != nil {
			fails++
			if fails <= 5 {
				t.Errorf("kms-1 with kms-2 down and the root KMS down, round trip %d: %v", i, err)
			}
		}
		if i%20 == 0 {
			st, err := k2.Status()
			if err != nil || st.GetState() == kmsv1.ServingState_SERVING_STATE_SERVING {
				t.Errorf("restarted kms-2 with the root KMS down: status %v, error %v; want not SERVING", st, err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), kmsCallTTL)
			_, err = k2.Client(kmsClient).Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: kmsKeyset, Plaintext: []byte("not a secret")})
			cancel()
			if status.Code(err) != codes.Unavailable {
				t.Errorf("Encrypt on the restarted kms-2 = %v, want Unavailable", err)
			}
		}
	}
	if fails > 0 {
		t.Fatalf("kms-1: %d of %d round trips failed, want 0", fails, kmsBurst)
	}
	t.Logf("kms-2 not ready, kms-1: %d Encrypt + %d Decrypt, all correct, in %s", kmsBurst, kmsBurst, time.Since(burstStart).Round(time.Millisecond))
	if st, err := k2.Status(); err != nil || st.GetState() != kmsv1.ServingState_SERVING_STATE_NOT_READY {
		t.Errorf("restarted kms-2 at the end: status %v, error %v; want NOT_READY", st, err)
	}

	for _, k := range kmss {
		k.Stop()
		for _, f := range []string{"audit.log"} {
			if fi, err := os.Stat(filepath.Join(k.StateDir, f)); err != nil || fi.Size() == 0 {
				t.Errorf("%s: %s in its state dir: %v, want a non-empty file for the scan", k.Identity, f, err)
			}
		}
		ents, err := os.ReadDir(k.StateDir)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Logf("%s state dir: %v", k.Identity, names)
	}
	requireNoSecrets(t, w, m, safes, nil, secrets)
	t.Logf("scenario took %s", time.Since(start).Round(time.Millisecond))
}

// roundTrip encrypts dek on enc as the demo client and decrypts the
// ciphertext on dec, and checks that the plaintext comes back.
func roundTrip(enc, dec *framework.KMSServer, dek, ad []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), kmsCallTTL)
	defer cancel()
	er, err := enc.Client(kmsClient).Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: kmsKeyset, Plaintext: dek, AssociatedData: ad})
	if err != nil {
		return fmt.Errorf("Encrypt on %s: %w", enc.Identity, err)
	}
	if bytes.Contains(er.GetCiphertext(), dek) {
		return fmt.Errorf("Encrypt on %s: the ciphertext holds the plaintext", enc.Identity)
	}
	dr, err := dec.Client(kmsClient).Decrypt(ctx, &kmsv1.DecryptRequest{Keyset: kmsKeyset, Ciphertext: er.GetCiphertext(), AssociatedData: ad})
	if err != nil {
		return fmt.Errorf("Decrypt on %s: %w", dec.Identity, err)
	}
	defer clear(dr.GetPlaintext())
	if !bytes.Equal(dr.GetPlaintext(), dek) || dr.GetKeyId() != er.GetKeyId() {
		return fmt.Errorf("Decrypt on %s: another plaintext or key ID (%d, want %d)", dec.Identity, dr.GetKeyId(), er.GetKeyId())
	}
	return nil
}

// keysetSecrets opens the bundle's copy of keyset name for region with the
// region key version it is under (keys, by version) and returns, for the
// scan, each key's serialized key data and, for AES-GCM keys, the raw key.
func keysetSecrets(t *testing.T, bundlePath, name, region string, keys regionKeys) []framework.Secret {
	t.Helper()
	data, err := os.ReadFile(bundlePath)
	if err != nil {
		t.Fatal(err)
	}
	var sb bundlev1.SignedBundle
	var b bundlev1.Bundle
	if err := proto.Unmarshal(data, &sb); err != nil {
		t.Fatal(err)
	}
	if err := proto.Unmarshal(sb.GetBundle(), &b); err != nil {
		t.Fatal(err)
	}
	var ek *cryptov1.EncryptedKeyset
	for _, k := range b.GetKeysets() {
		if k.GetName() == name && k.GetKeyset().GetRegion() == region {
			ek = k.GetKeyset()
		}
	}
	if ek == nil {
		t.Fatalf("bundle %s holds no %s copy of %s", bundlePath, region, name)
	}
	rk, ok := keys[ek.GetRegionKeyVersion()]
	if !ok {
		t.Fatalf("%s for %s is under region key version %d, which the root KMS did not serve", name, region, ek.GetRegionKeyVersion())
	}
	a, err := keysets.RegionAEAD(secret.New(bytes.Clone(rk)))
	if err != nil {
		t.Fatal(err)
	}
	h, err := keysets.Decrypt(ek, a)
	if err != nil {
		t.Fatalf("keysets.Decrypt(%s) = %v", name, err)
	}
	var out []framework.Secret
	for _, k := range insecurecleartextkeyset.KeysetMaterial(h).GetKey() {
		label := fmt.Sprintf("keyset %s key %d", name, k.GetKeyId())
		out = append(out, framework.Secret{Name: label + " (key data)", Value: k.GetKeyData().GetValue()})
		var aes tinkaesgcm.AesGcmKey
		if strings.HasSuffix(k.GetKeyData().GetTypeUrl(), "AesGcmKey") {
			if err := proto.Unmarshal(k.GetKeyData().GetValue(), &aes); err != nil || len(aes.GetKeyValue()) == 0 {
				t.Fatalf("%s: not an AES-GCM key (%v)", label, err)
			}
			out = append(out, framework.Secret{Name: label + " (AES key)", Value: aes.GetKeyValue()})
		}
	}
	if len(out) == 0 {
		t.Fatalf("keyset %s holds no keys", name)
	}
	return out
}

// requireHealth checks a server's grpc.health.v1 status.
func requireHealth(t *testing.T, what string, check func() (healthpb.HealthCheckResponse_ServingStatus, error), want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	if got, err := check(); err != nil || got != want {
		t.Errorf("grpc.health.v1 Check of the %s = %v, %v; want %v", what, got, err, want)
	}
}
