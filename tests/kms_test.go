package tests

import (
	"bytes"
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
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
	kmsCallTTL = 5 * time.Second
)

// ledgerTeam is the one team file: payments/ledger in us-east, encrypt and
// decrypt for every us-east client.
const ledgerTeam = `{"team":"payments","keysets":[` + ledgerKeyset + `]}`

// ledgerKeyset is ledgerTeam's keyset; newKeysetTeam and lateKeysetTeam are
// the keysets TestKMSServesWithRootKMSDown adds to the team.
const (
	ledgerKeyset = `
  {"name":"payments/ledger","regions":["us-east"],"purpose":"envelope",
   "rotation_period":"2160h","ciphertext_ttl":"8760h",
   "acl":{"encrypt":["client/us-east/*"],"decrypt":["client/us-east/*"]}}`
	kmsNewKeyset  = "payments/refunds"
	newKeysetTeam = `
  {"name":"payments/refunds","regions":["us-east"],"purpose":"envelope",
   "rotation_period":"2160h","ciphertext_ttl":"8760h",
   "acl":{"encrypt":["client/us-east/*"],"decrypt":["client/us-east/*"]}}`
	kmsLateKeyset  = "payments/payouts"
	lateKeysetTeam = `
  {"name":"payments/payouts","regions":["us-east"],"purpose":"envelope",
   "rotation_period":"2160h","ciphertext_ttl":"8760h",
   "acl":{"encrypt":["client/us-east/*"],"decrypt":["client/us-east/*"]}}`
)

// outageFlag is how long TestKMSServesWithRootKMSDown keeps the root tier
// down. The default fits in make test; make soak-outage runs the 10 minutes
// of tests/RELIABILITY.md row 23 (-kms.outage=10m).
var outageFlag = flag.Duration("kms.outage", 20*time.Second, "how long TestKMSServesWithRootKMSDown keeps the root KMS, the distributor and the safes down (make soak-outage OUTAGE=10m)")

// outageRate is the pace of the round trips through the outage, per
// second: each is an Encrypt and a Decrypt.
const outageRate = 20

// outageSampleEvery: one DEK of this many made by the outage load is kept
// for the secret scan (all of them would make a 10-minute run's scan
// slow); the others are cleared once their round trip is done.
const outageSampleEvery = 100

// TestKMSServesWithRootKMSDown is issue 5's done-when and tests/RELIABILITY.md
// row 23: two us-east KMS servers get a bundle built by regionctl from
// keysets the root KMS made; a DEK wrapped on one unwraps on the other. Then
// the root KMS and the distributor are killed and the safes moved away for
// -kms.outage (20 s by default, 10 minutes in make soak-outage). Through the
// whole outage a paced load of round trips on the loaded keyset (20 a
// second, each an Encrypt and a Decrypt) all succeed, and the count planned
// is made. New keyset fetches fail with Unavailable: a bundle carrying a new
// keyset under a region key version the servers do not hold is refused by
// the server (it keeps serving the old bundle), and regionctl's keyset
// create and bundle push fail naming Unavailable. A KMS server restarted
// half-way stays not ready and refuses the data plane with Unavailable
// while it retries. Once the root tier is back (the distributor unsealed by
// a ceremony, the root KMS restarted), the restarted server serves without
// a restart, the keyset create and the push succeed on retry and the new
// keyset serves on both servers; no region key, keyset key or DEK is in any
// file afterwards.
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

	// Before the outage: the region key is rotated and a second keyset is
	// made under the new region key version, into bundle 2, not pushed
	// yet. The KMS servers hold only region key version 1 (what bundle 1
	// needs), so applying bundle 2 means fetching version 2 from the root
	// KMS: the new keyset fetch the outage must refuse.
	w.RegionctlOK(append([]string{"region", "rotate-key", "--region", kmsRegion}, rootFlags...)...)
	teams2, teams3 := filepath.Join(rc, "teams2"), filepath.Join(rc, "teams3")
	writeTeam(t, teams2, ledgerKeyset, newKeysetTeam)
	writeTeam(t, teams3, ledgerKeyset, newKeysetTeam, lateKeysetTeam)
	if r := w.RegionctlOK(append([]string{"keyset", "create", "--teams", teams2}, rootFlags...)...); !strings.Contains(r.Stdout, "1 created") {
		t.Errorf("keyset create of %s printed %q, want 1 created", kmsNewKeyset, r.Stdout)
	}
	bundle2 := filepath.Join(rc, "us-east-2.bundle")
	w.RegionctlOK(append([]string{"bundle", "build", "--region", kmsRegion, "--serial", "2", "--teams", teams2,
		"--signing-key", filepath.Join(keysDir, "bundle-signing.key"), "--out", bundle2}, rootFlags...)...)
	mat, _, err = root.UnwrapRegionKey("kms/us-east/kms-1", kmsRegion)
	if err != nil || len(mat.GetVersions()) != 2 {
		t.Fatalf("UnwrapRegionKey(%s) after the rotation = %d versions, %v; want 2", kmsRegion, len(mat.GetVersions()), err)
	}
	for _, v := range mat.GetVersions() {
		if keys[v.GetVersion()] == nil {
			keys[v.GetVersion()] = v.GetKey()
		} else {
			clear(v.GetKey())
		}
	}
	secrets = append(secrets, keysetSecrets(t, bundle2, kmsNewKeyset, kmsRegion, keys)...)
	secrets = append(secrets, regionKeySecrets(t, map[string]regionKeys{kmsRegion: {2: keys[2]}})...)
	for _, k := range kmss {
		if st, err := k.Status(); err != nil || st.GetBundle().GetSerial() != 1 || len(st.GetRegionKeyVersions()) != 1 {
			t.Fatalf("%s before the outage: %v, %v; want serial 1 with one region key version", k.Identity, st, err)
		}
	}

	// The outage: the root KMS and the distributor are killed and the safes
	// are moved away (file safes are not processes: their directory is
	// what an officer would open). It lasts -kms.outage.
	outage := *outageFlag
	safesDir := filepath.Join(w.Dir, "safes")
	root.Kill()
	d.Kill()
	if err := os.Rename(safesDir, safesDir+".down"); err != nil {
		t.Fatal(err)
	}
	outageStart := time.Now()
	t.Logf("root KMS and distributor killed, safes moved away: the outage lasts %s", outage)

	// A paced load of round trips on the loaded keyset through the whole
	// outage: kms-1 -> kms-2 and back while kms-2 is up, then kms-1 alone.
	l := startRoundTrips(t, k1, k2, outage)

	// New keyset fetches during the outage fail with Unavailable, and a
	// KMS server keeps serving what it had: at the start, and again later.
	applyFails := 0
	tryBundle2 := func(when string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := k1.Admin(framework.Regionctl).ApplyBundle(ctx, &kmsv1.ApplyBundleRequest{Bundle: readSigned(t, bundle2)})
		if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "region") {
			t.Errorf("ApplyBundle(bundle 2, needing region key version 2) on kms-1 %s = %v, want Unavailable naming the region keys", when, err)
		} else {
			applyFails++
		}
		if st, err := k1.Status(); err != nil || st.GetState() != kmsv1.ServingState_SERVING_STATE_SERVING || st.GetBundle().GetSerial() != 1 {
			t.Errorf("kms-1 after the refused bundle %s: %v, %v; want SERVING serial 1", when, st, err)
		}
		t.Logf("%s: ApplyBundle(bundle 2) on kms-1 refused: %v", when, err)
	}
	tryBundle2("outage start")
	cr := w.Run("regionctl-keyset-create-down", w.Bin.RegionctlBinary(), append([]string{"keyset", "create", "--teams", teams3}, rootFlags...)...)
	if cr.ExitCode == 0 || !strings.Contains(cr.Stdout+cr.Stderr, "Unavailable") {
		t.Errorf("regionctl keyset create with the root KMS down: exit %d, want a failure naming Unavailable:\n%s", cr.ExitCode, cr)
	}
	pr := w.Run("regionctl-bundle-push-down", w.Bin.RegionctlBinary(), append([]string{"bundle", "push", "--kms", k1.Addr + "," + k2.Addr, "--bundle", bundle2}, rootFlags...)...)
	if pr.ExitCode == 0 || !strings.Contains(pr.Stdout+pr.Stderr, "Unavailable") {
		t.Errorf("regionctl bundle push with the root KMS down: exit %d, want a failure naming Unavailable:\n%s", pr.ExitCode, pr)
	}
	t.Logf("with the root tier down: keyset create of %s exits %d, bundle push exits %d", kmsLateKeyset, cr.ExitCode, pr.ExitCode)

	// Half-way: kms-2 is restarted; it cannot fetch the region key, so it
	// stays not ready and refuses the data plane with Unavailable, and
	// keeps retrying.
	sleepUntil(outageStart.Add(outage / 2))
	l.dropSecond(func() { k2.Stop() })
	k2.Start()
	k2PID := k2.PID()
	st, took := k2.WaitStatus("NOT_READY because it cannot fetch the region key", func(st *kmsv1.GetStatusResponse) bool {
		return st.GetState() == kmsv1.ServingState_SERVING_STATE_NOT_READY && strings.Contains(st.GetNotReadyReason(), "keys of region "+kmsRegion)
	})
	t.Logf("restarted kms-2: %v after %s: %s", st.GetState(), took.Round(time.Millisecond), st.GetNotReadyReason())
	if !strings.Contains(st.GetNotReadyReason(), "UnwrapRegionKey") {
		t.Errorf("not-ready reason %q does not name the root KMS call (UnwrapRegionKey)", st.GetNotReadyReason())
	}
	probes := 0
	for time.Since(outageStart) < outage*9/10 {
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
		probes++
		time.Sleep(time.Second)
	}
	tryBundle2("late in the outage")
	l.wait()
	secrets = append(secrets, l.secrets()...)
	outageEnd := time.Now()
	rt, fails := l.counts()
	t.Logf("outage of %s: %d round trips (%d Encrypt + %d Decrypt calls, %.1f calls/s) on the loaded keyset, %d failed; restarted kms-2 probed %d times, never SERVING, Encrypt Unavailable",
		outageEnd.Sub(outageStart).Round(time.Millisecond), rt, rt, rt, float64(2*rt)/outageEnd.Sub(outageStart).Seconds(), fails, probes)
	if want := l.planned; rt != want {
		t.Errorf("the load made %d round trips through the outage, want the %d planned", rt, want)
	}
	if fails > 0 {
		t.Fatalf("with the root tier down, %d of %d round trips failed, want 0", fails, rt)
	}
	if st, err := k2.Status(); err != nil || st.GetState() != kmsv1.ServingState_SERVING_STATE_NOT_READY {
		t.Errorf("restarted kms-2 at the end of the outage: status %v, error %v; want NOT_READY", st, err)
	}

	// The root tier comes back: the safes return, the distributor restarts
	// sealed and a 2-of-3 ceremony unseals it, the root KMS restarts and
	// loads the root key from it.
	if err := os.Rename(safesDir+".down", safesDir); err != nil {
		t.Fatal(err)
	}
	d.Start()
	d.WaitState(sealed)
	id := w.OpenCeremony(d, 1)
	release(t, w, d, id, safes, 1)
	release(t, w, d, id, safes, 2)
	waitUnsealed(t, d, m)
	root.Start()
	framework.WaitLeader(root)
	root.WaitServing()
	backAt := time.Now()
	t.Logf("root tier back (ceremony, root KMS serving) %s after the outage ended", backAt.Sub(outageEnd).Round(time.Millisecond))

	// kms-2 retried its fetch and serves without a restart. Its wait is
	// longer than WaitServing's: its connection to the root KMS may still
	// be in gRPC's reconnect backoff.
	st, took = waitServingAfterOutage(t, k2, 1)
	if k2.PID() != k2PID {
		t.Errorf("kms-2 has pid %d, want %d: it must recover by retrying, not by a restart", k2.PID(), k2PID)
	}
	retries := strings.Count(k2.Stderr(), "loading the persisted bundle failed; retrying")
	t.Logf("kms-2 (same process) SERVING serial %d %s after the root tier came back, after %d failed fetches", st.GetBundle().GetSerial(), took.Round(time.Millisecond), retries)
	if retries == 0 {
		t.Errorf("kms-2's log shows no failed fetch retried")
	}

	// The fetches refused during the outage succeed on retry: the keyset
	// create, and the push of bundle 2 (both servers fetch region key
	// version 2); the new keyset then serves.
	createTries, r := regionctlRetry(t, w, "keyset-create-retry", append([]string{"keyset", "create", "--teams", teams3}, rootFlags...)...)
	if !strings.Contains(r.Stdout, "1 created") {
		t.Errorf("keyset create of %s after the outage printed %q, want 1 created", kmsLateKeyset, r.Stdout)
	}
	pushStart = time.Now()
	pushTries, _ := regionctlRetry(t, w, "bundle-push-retry", append([]string{"bundle", "push", "--kms", k1.Addr + "," + k2.Addr, "--bundle", bundle2}, rootFlags...)...)
	pushTook := time.Since(pushStart)
	for _, k := range kmss {
		st, _ := k.WaitServing(2)
		if st.GetKeysetCount() != 2 || len(st.GetRegionKeyVersions()) != 2 {
			t.Errorf("%s after the retried push: %v, want 2 keysets under 2 region key versions", k.Identity, st)
		}
	}
	for i := range 20 {
		for _, pair := range [][2]*framework.KMSServer{{k1, k2}, {k2, k1}} {
			if err := roundTripKeyset(pair[0], pair[1], kmsNewKeyset, newDEK(), fmt.Appendf(nil, "new keyset %d", i)); err != nil {
				t.Fatalf("%s after the retried push, %s -> %s: %v", kmsNewKeyset, pair[0].Identity, pair[1].Identity, err)
			}
		}
	}
	t.Logf("after the outage: %s created on retry (attempts after the outage: %d), bundle 2 pushed on retry (attempts after the outage: %d, %s, after %d ApplyBundle refusals and a failed push during it); %s serves on both KMS servers (20 round trips each way)",
		kmsLateKeyset, createTries, pushTries, pushTook.Round(time.Millisecond), applyFails, kmsNewKeyset)

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
	return roundTripKeyset(enc, dec, kmsKeyset, dek, ad)
}

// roundTripKeyset is roundTrip with another keyset than kmsKeyset.
func roundTripKeyset(enc, dec *framework.KMSServer, keyset string, dek, ad []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), kmsCallTTL)
	defer cancel()
	er, err := enc.Client(kmsClient).Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: keyset, Plaintext: dek, AssociatedData: ad})
	if err != nil {
		return fmt.Errorf("Encrypt on %s: %w", enc.Identity, err)
	}
	if bytes.Contains(er.GetCiphertext(), dek) {
		return fmt.Errorf("Encrypt on %s: the ciphertext holds the plaintext", enc.Identity)
	}
	dr, err := dec.Client(kmsClient).Decrypt(ctx, &kmsv1.DecryptRequest{Keyset: keyset, Ciphertext: er.GetCiphertext(), AssociatedData: ad})
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
	_, b := readBundleFile(t, bundlePath)
	for _, k := range b.GetKeysets() {
		if k.GetName() == name && k.GetKeyset().GetRegion() == region {
			return copySecrets(t, k.GetKeyset(), keys)
		}
	}
	t.Fatalf("bundle %s holds no %s copy of %s", bundlePath, region, name)
	return nil
}

// copySecrets opens ek, a keyset copy, with the region key version it is
// under (keys, by version) and returns, for the scan, each key's serialized
// key data and, for AES-GCM keys, the raw key.
func copySecrets(t *testing.T, ek *cryptov1.EncryptedKeyset, keys regionKeys) []framework.Secret {
	t.Helper()
	name, region := ek.GetName(), ek.GetRegion()
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

// roundTrips is a paced load of envelope round trips on kmsKeyset, bounded
// in count (planned) and time: through first and second in turn, then,
// once dropSecond was called, through first alone.
type roundTrips struct {
	planned int
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	// mu is held (read) by a round trip through second: dropSecond takes it
	// to stop using second with none in flight.
	mu     sync.RWMutex
	second bool

	made, failed atomic.Int64
	sampleMu     sync.Mutex
	sample       []framework.Secret
}

// startRoundTrips starts outageRate round trips a second for d. A late one
// (a slow call) starts at once; the load stops after planned round trips,
// or a minute after d (it then made fewer than planned), or when the test
// ends.
func startRoundTrips(t *testing.T, first, second *framework.KMSServer, d time.Duration) *roundTrips {
	ctx, cancel := context.WithCancel(context.Background())
	l := &roundTrips{planned: int(int64(outageRate) * int64(d) / int64(time.Second)), cancel: cancel, second: true}
	t.Cleanup(func() { l.cancel(); l.wait() })
	start := time.Now()
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for n := 0; n < l.planned && ctx.Err() == nil && time.Since(start) < d+time.Minute; n++ {
			sleepUntil(start.Add(time.Duration(n) * time.Second / outageRate))
			dek := make([]byte, 32)
			rand.Read(dek)
			l.mu.RLock()
			enc, dec := first, first
			if l.second && n%2 == 0 {
				dec = second
			} else if l.second {
				enc = second
			}
			err := roundTrip(enc, dec, dek, fmt.Appendf(nil, "outage %d", n))
			l.mu.RUnlock()
			l.made.Add(1)
			if err != nil {
				if l.failed.Add(1) <= 5 {
					t.Errorf("with the root tier down, round trip %d %s -> %s: %v", n, enc.Identity, dec.Identity, err)
				}
			}
			if n%outageSampleEvery == 0 {
				l.sampleMu.Lock()
				l.sample = append(l.sample, framework.Secret{Name: fmt.Sprintf("outage DEK %d", n), Value: dek})
				l.sampleMu.Unlock()
			} else {
				clear(dek)
			}
		}
	}()
	return l
}

// dropSecond stops the round trips through the second server (once those
// in flight are done), then calls stop.
func (l *roundTrips) dropSecond(stop func()) {
	l.mu.Lock()
	l.second = false
	l.mu.Unlock()
	stop()
}

func (l *roundTrips) wait() { l.wg.Wait() }

// counts returns the round trips made and how many failed.
func (l *roundTrips) counts() (made, failed int) {
	return int(l.made.Load()), int(l.failed.Load())
}

// secrets returns the DEKs kept for the secret scan.
func (l *roundTrips) secrets() []framework.Secret {
	l.sampleMu.Lock()
	defer l.sampleMu.Unlock()
	return slices.Clone(l.sample)
}

// writeTeam writes a team file of the payments team with the given keysets
// into dir.
func writeTeam(t *testing.T, dir string, keysets ...string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	team := `{"team":"payments","keysets":[` + strings.Join(keysets, ",") + `]}`
	if err := os.WriteFile(filepath.Join(dir, "payments.json"), []byte(team), 0o600); err != nil {
		t.Fatal(err)
	}
}

// readSigned reads a signed bundle file.
func readSigned(t *testing.T, path string) *bundlev1.SignedBundle {
	t.Helper()
	sb, _ := readBundleFile(t, path)
	return sb
}

// readBundleFile reads a signed bundle file (bundle build's output) and
// decodes the bundle it signs.
func readBundleFile(t *testing.T, path string) (*bundlev1.SignedBundle, *bundlev1.Bundle) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var sb bundlev1.SignedBundle
	var b bundlev1.Bundle
	if err := proto.Unmarshal(data, &sb); err != nil {
		t.Fatalf("bundle %s: %v", path, err)
	}
	if err := proto.Unmarshal(sb.GetBundle(), &b); err != nil {
		t.Fatalf("bundle %s: %v", path, err)
	}
	return &sb, &b
}

// regionctlRetryFor bounds how long a regionctl command refused during the
// outage is retried once the root tier is back: a KMS server's connection
// to the root KMS may still be in gRPC's reconnect backoff (at most 120 s
// with jitter) after failing through the outage.
const regionctlRetryFor = 3 * time.Minute

// regionctlRetry runs regionctl with args until it exits 0, every 2 s for at
// most regionctlRetryFor, and fails the test if it never does. It returns
// the attempts made and the successful result.
func regionctlRetry(t *testing.T, w *framework.World, name string, args ...string) (int, framework.Result) {
	t.Helper()
	deadline := time.Now().Add(regionctlRetryFor)
	for n := 1; ; n++ {
		r := w.Run("regionctl-"+name, w.Bin.RegionctlBinary(), args...)
		if r.ExitCode == 0 {
			return n, r
		}
		if time.Now().After(deadline) {
			t.Fatalf("regionctl %s still fails after %d attempts in %s:\n%s", strings.Join(args[:2], " "), n, regionctlRetryFor, r)
		}
		t.Logf("regionctl %s attempt %d: exit %d; retrying", strings.Join(args[:2], " "), n, r.ExitCode)
		time.Sleep(2 * time.Second)
	}
}

// waitServingAfterOutage waits until k serves the bundle of the given
// serial, polling for at most regionctlRetryFor (see there), and returns
// its status and how long it took.
func waitServingAfterOutage(t *testing.T, k *framework.KMSServer, serial uint64) (*kmsv1.GetStatusResponse, time.Duration) {
	t.Helper()
	start := time.Now()
	for {
		st, err := k.Status()
		if err == nil && st.GetState() == kmsv1.ServingState_SERVING_STATE_SERVING && st.GetBundle().GetSerial() == serial {
			return st, time.Since(start)
		}
		if time.Since(start) > regionctlRetryFor {
			t.Fatalf("%s not SERVING serial %d within %s of the root tier's return: %v, %v", k.Identity, serial, regionctlRetryFor, st, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
