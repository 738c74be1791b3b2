package tests

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/insecurecleartextkeyset"
	gcmpb "github.com/tink-crypto/tink-go/v2/proto/aes_gcm_go_proto"
	tinkpb "github.com/tink-crypto/tink-go/v2/proto/tink_go_proto"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/internal/secret"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/regionctl/compile"
	"github.com/cairnkms/cairn/regionctl/rollout"
	"github.com/cairnkms/cairn/tests/framework"
)

// goldenPlaintext is what the demo client encrypts before the change: a
// sentinel the secret scan looks for.
const goldenPlaintext = "golden e2e plaintext, never logged"

// aesGCMKeyURL is the Tink type URL of an AES-GCM key (the keysets'
// default template, AES256_GCM).
const aesGCMKeyURL = "type.googleapis.com/google.crypto.tink.AesGcmKey"

// swapKeyMaterial replaces, in b (a region's bundle), the key material of
// version keyID of keyset rec with fresh random bytes of the same length,
// keeping the key's ID, status and output prefix: the copy loads and
// serves, but no longer decrypts what that version encrypted (its golden
// ciphertext included). As rewriteKeyset, it opens the copy with the
// region key fetched as a KMS of the region would, re-encrypts it with the
// same region key version, and puts the lifecycle from the record in place.
func (c *rotChain) swapKeyMaterial(b *bundlev1.Bundle, rec *statev1.KeysetRecord, keyID uint32) {
	c.t.Helper()
	region := b.GetRegion()
	i := slices.IndexFunc(b.GetKeysets(), func(k *bundlev1.KeysetConfig) bool { return k.GetName() == rec.GetName() })
	if i < 0 {
		c.t.Fatalf("the %s bundle has no keyset %s", region, rec.GetName())
	}
	kc := b.GetKeysets()[i]
	ek := kc.GetKeyset()
	mat, _, err := c.root.UnwrapRegionKey("kms/"+region+"/kms-1", region)
	if err != nil {
		c.t.Fatalf("UnwrapRegionKey(%s) = %v", region, err)
	}
	var raw []byte
	for _, v := range mat.GetVersions() {
		if v.GetVersion() == ek.GetRegionKeyVersion() {
			raw = bytes.Clone(v.GetKey())
		}
		clear(v.GetKey())
	}
	if raw == nil {
		c.t.Fatalf("region %s has no key version %d", region, ek.GetRegionKeyVersion())
	}
	aead, err := keysets.RegionAEAD(secret.New(raw))
	if err != nil {
		c.t.Fatal(err)
	}
	h, err := keysets.Decrypt(ek, aead)
	if err != nil {
		c.t.Fatalf("keysets.Decrypt(%s) = %v", rec.GetName(), err)
	}
	ks := proto.Clone(insecurecleartextkeyset.KeysetMaterial(h)).(*tinkpb.Keyset)
	swapped := false
	for _, k := range ks.GetKey() {
		if k.GetKeyId() != keyID {
			continue
		}
		kd := k.GetKeyData()
		if kd.GetTypeUrl() != aesGCMKeyURL {
			c.t.Fatalf("keyset %s version %d is a %s, want an AES-GCM key", rec.GetName(), keyID, kd.GetTypeUrl())
		}
		var old gcmpb.AesGcmKey
		if err := proto.Unmarshal(kd.GetValue(), &old); err != nil {
			c.t.Fatal(err)
		}
		fresh := &gcmpb.AesGcmKey{Version: old.GetVersion(), KeyValue: make([]byte, len(old.GetKeyValue()))}
		if _, err := rand.Read(fresh.KeyValue); err != nil {
			c.t.Fatal(err)
		}
		if bytes.Equal(fresh.GetKeyValue(), old.GetKeyValue()) {
			c.t.Fatal("the fresh key material equals the old")
		}
		value, err := proto.Marshal(fresh)
		if err != nil {
			c.t.Fatal(err)
		}
		k.KeyData = &tinkpb.KeyData{TypeUrl: kd.GetTypeUrl(), Value: value, KeyMaterialType: kd.GetKeyMaterialType()}
		swapped = true
	}
	if !swapped {
		c.t.Fatalf("the %s copy of %s holds no version %d", region, rec.GetName(), keyID)
	}
	nh := insecurecleartextkeyset.KeysetHandle(ks)
	nek, err := keysets.Encrypt(nh, rec.GetName(), region, ek.GetRegionKeyVersion(), aead)
	if err != nil {
		c.t.Fatal(err)
	}
	if nek.GetPrimaryKeyId() != ek.GetPrimaryKeyId() || !slices.EqualFunc(nek.GetVersions(), ek.GetVersions(), func(a, b *cryptov1.KeyVersionInfo) bool { return proto.Equal(a, b) }) {
		c.t.Fatalf("the swapped copy's metadata changed: primary %d versions %v, was %d %v", nek.GetPrimaryKeyId(), nek.GetVersions(), ek.GetPrimaryKeyId(), ek.GetVersions())
	}
	kc.Keyset = nek
	kc.Lifecycle = compile.Lifecycle(rec, nek)
}

// servedBundle is the bundle k serves, as GetStatus returns it.
func servedBundle(t *testing.T, k *framework.KMSServer) *bundlev1.Bundle {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), kmsCallTTL)
	defer cancel()
	st, err := k.Admin(framework.Regionctl).GetStatus(ctx, &kmsv1.GetStatusRequest{IncludeBundle: true})
	if err != nil {
		t.Fatalf("GetStatus(%s, include bundle) = %v", k.Identity, err)
	}
	var b bundlev1.Bundle
	if err := proto.Unmarshal(st.GetServedBundle().GetBundle(), &b); err != nil {
		t.Fatalf("the bundle %s serves: %v", k.Identity, err)
	}
	return &b
}

// TestRolloutGoldenProbe: a change whose us-east bundle swaps in a copy of
// payments/ledger holding, under the ID of the recorded primary version,
// other key material (a buggy or hand-edited build, signed with the real
// key): every check before the apply passes (the copy loads, its key IDs,
// statuses and lifecycle are the record's), but the copy cannot decrypt
// the version's golden ciphertext. The canary's gate fails on that golden
// probe alone, naming the keyset and the version; the canary is rolled
// back (a new serial serving the old content, which decrypts what the
// version encrypted before), the rest of us-east and eu-west never see the
// change (not even a dry run), and rollout start exits 1. No file holds a
// key of the chain, the swapped-in key material or the plaintext.
func TestRolloutGoldenProbe(t *testing.T) {
	start := time.Now()
	c, canary, rest, west := startRolloutChain(t)
	before := c.served()
	oldBundle := servedBundle(t, canary)
	v := c.primaryOf(rotLedger)
	// A ciphertext of the version, made through the canary before the
	// change: the old content must decrypt it after the rollback.
	demo := canary.Client("client/us-east/demo")
	ctx, cancel := context.WithTimeout(context.Background(), kmsCallTTL)
	enc, err := demo.Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: rotLedger, Plaintext: []byte(goldenPlaintext)})
	cancel()
	if err != nil || enc.GetKeyId() != v {
		t.Fatalf("Encrypt(%s) on the canary = key %d, %v; want version %d", rotLedger, enc.GetKeyId(), err, v)
	}

	// The change: us-east's bundle with the swapped copy, eu-west's honest.
	sb, us := c.craft("us-east", 2, func(b *bundlev1.Bundle, recs map[string]*statev1.KeysetRecord) {
		c.swapKeyMaterial(b, recs[rotLedger], v)
	})
	usSum := sumHex(sb)
	eu, euSum := c.buildChange("golden", "eu-west")
	// The swapped copy loads: the canary's own checks accept it.
	if _, err := applyDirect(canary, sb, true); err != nil {
		t.Fatalf("dry run of the swapped-copy bundle on the canary = %v, want accepted (it loads)", err)
	}

	r := c.rc("rollout", "start", "--bundles", us+","+eu, "--regions", "us-east,eu-west", "--bake", rollBake.String(),
		"--reason", "e2e: a bundle whose ledger copy holds other key material", "--id", "golden")
	if r.ExitCode != 1 {
		t.Fatalf("rollout start = %d, want 1 (halted)\n%s", r.ExitCode, r)
	}
	probeFail := fmt.Sprintf("golden probe failed on %s: keyset %s version %d", canary.Addr, rotLedger, v)
	for _, want := range []string{"HALTED: stage 1/3 canary failed its gates: ", probeFail, "rolling back 1 server(s) of the stage",
		"rolled back: every server that applied serves its last good content again"} {
		if !strings.Contains(r.Stdout, want) {
			t.Errorf("rollout start stdout lacks %q:\n%s", want, r.Stdout)
		}
	}
	rec := c.rolloutRecord("golden")
	if rec.Phase != rollout.PhaseRolledBack || rec.Stage != 0 {
		t.Fatalf("record at stage %d %s, want stage 1 rolled-back\n%s", rec.Stage+1, rec.Phase, rollout.Status(rec))
	}
	gate := rec.Stages[0].Gate
	if gate == nil || gate.Pass {
		t.Fatalf("the canary's gate %+v, want failed", gate)
	}
	// The golden probe alone failed the gate: no traffic, no error rate.
	if len(gate.Reasons) == 0 {
		t.Errorf("the canary's gate failed with no reason")
	}
	for _, reason := range gate.Reasons {
		if !strings.HasPrefix(reason, probeFail) {
			t.Errorf("the canary's gate failed for %q, want only the golden probe of %s version %d", reason, rotLedger, v)
		}
	}
	if i := slices.IndexFunc(gate.Probes, func(p rollout.ProbeFailure) bool {
		return p.Server == canary.Addr && p.Keyset == rotLedger && p.KeyID == v
	}); i < 0 || len(gate.Probes) != 1 {
		t.Errorf("the gate's probe failures %+v, want one: %s version %d on %s", gate.Probes, rotLedger, v, canary.Addr)
	}
	sr := rec.Servers[canary.Addr]
	if sr.Applied != 2 || sr.LastGood.Serial != 1 || sr.RolledBack != 3 {
		t.Errorf("the canary's result %+v, want applied 2, last good 1, rolled back at 3", sr)
	}

	// The canary serves serial 3 with serial 1's content.
	if got := serialOf(t, canary); got != 3 {
		t.Errorf("the canary serves serial %d, want the rollback's 3", got)
	}
	nowBundle := servedBundle(t, canary)
	if nowBundle.GetSerial() != 3 || len(nowBundle.GetKeysets()) != len(oldBundle.GetKeysets()) {
		t.Errorf("the canary serves serial %d with %d keysets, want serial 3 with serial 1's %d", nowBundle.GetSerial(), len(nowBundle.GetKeysets()), len(oldBundle.GetKeysets()))
	}
	for i, k := range oldBundle.GetKeysets() {
		if i < len(nowBundle.GetKeysets()) && !proto.Equal(k, nowBundle.GetKeysets()[i]) {
			t.Errorf("after the rollback the canary serves keyset %s as %v, want serial 1's %v", k.GetName(), nowBundle.GetKeysets()[i], k)
		}
	}
	ctx, cancel = context.WithTimeout(context.Background(), kmsCallTTL)
	dec, err := demo.Decrypt(ctx, &kmsv1.DecryptRequest{Keyset: rotLedger, Ciphertext: enc.GetCiphertext()})
	cancel()
	if err != nil || string(dec.GetPlaintext()) != goldenPlaintext {
		t.Errorf("after the rollback, the canary decrypts version %d's ciphertext made before the change to %q, %v", v, dec.GetPlaintext(), err)
	}
	if p := c.rc("probe", "--region", "us-east"); p.ExitCode != 0 {
		t.Errorf("regionctl probe of us-east after the rollback = %d, want 0\n%s", p.ExitCode, p)
	}

	// The rest of us-east and eu-west never saw the change.
	for _, k := range []*framework.KMSServer{rest, west} {
		if sr := rec.Servers[k.Addr]; sr.DryRun != rollout.DryRunNone || sr.Applied != 0 {
			t.Errorf("%s was touched by the rollout: %+v", k.Identity, sr)
		}
		sum := usSum
		if k.Region == "eu-west" {
			sum = euSum
		}
		if n := bundleCalls(t, k, sum); n != 0 {
			t.Errorf("%s's audit log holds %d ApplyBundle call(s) of the change, want none (not even a dry run)", k.Identity, n)
		}
	}
	// The test's own dry run, the rollout's dry run and its apply.
	if n := bundleCalls(t, canary, usSum); n != 3 {
		t.Errorf("the canary's audit log holds %d ApplyBundle call(s) of the change, want 3 (the test's dry run, the rollout's dry run and apply)", n)
	}
	now := c.served()
	for _, k := range []*framework.KMSServer{rest, west} {
		if now[k.Identity] != before[k.Identity] {
			t.Errorf("%s serves %s, want unchanged: %s", k.Identity, now[k.Identity], before[k.Identity])
		}
	}
	t.Logf("the canary's gate: %s", strings.Join(gate.Reasons, "; "))
	// The swapped-in key material is among the keys scanned for: the
	// crafted bundle is under regionctl's directory with the others.
	c.requireNoSecrets(sentinel("the demo client's plaintext", []byte(goldenPlaintext)))
	t.Logf("bad canary: applied %s → gate failed %s → rolled back by %s (bake %v); scenario took %s",
		sr.AppliedAt.Format("15:04:05.000"), gate.At.Format("15:04:05.000"), rec.Updated.Format("15:04:05.000"), rollBake,
		time.Since(start).Round(time.Millisecond))
}

// sumHex is the sha256 (hex) of sb's bundle bytes, as regionctl names a
// bundle.
func sumHex(sb *bundlev1.SignedBundle) string {
	h := sha256.Sum256(sb.GetBundle())
	return hex.EncodeToString(h[:])
}
