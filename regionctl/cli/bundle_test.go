package cli_test

import (
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/internal/keysets"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
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

// brokenTeam has a bad ACL pattern: the whole file is invalid.
const brokenTeam = `{"team":"ads","keysets":[
  {"name":"ads/clicks","regions":["us-east"],"purpose":"envelope","rotation_period":"720h","ciphertext_ttl":"24h",
   "acl":{"encrypt":["client/us-east"]}}]}`

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

// env is a fake root KMS with regions us-east and eu-west, the payments and
// search teams created, a signing key, and a config file naming it all.
type env struct {
	pki              *identitytest.PKI
	fake             *fakeRootKMS
	keys             *regionKeys
	dir, teams       string
	priv, pub        string
	rootAddr, config string
	idFlags          []string
}

func newEnv(t *testing.T, kms map[string][]string) *env {
	t.Helper()
	return newEnvWithPKI(t, identitytest.New(t, identitytest.TrustDomain), kms)
}

func newEnvWithPKI(t *testing.T, pki *identitytest.PKI, kms map[string][]string) *env {
	t.Helper()
	e := &env{pki: pki, keys: &regionKeys{}, dir: t.TempDir()}
	e.fake = &fakeRootKMS{keys: e.keys}
	e.rootAddr = startFakeRootKMS(t, e.pki, e.fake)
	e.idFlags = identityFlags(e.pki, regionctlID)
	e.teams = filepath.Join(e.dir, "teams")
	writeFile(t, filepath.Join(e.teams, "payments.json"), paymentsTeam)
	writeFile(t, filepath.Join(e.teams, "search.json"), searchTeam)
	keysDir := filepath.Join(e.dir, "keys")
	mustRun(t, "keys", "generate", "--out", keysDir)
	e.priv, e.pub = filepath.Join(keysDir, "bundle-signing.key"), filepath.Join(keysDir, "bundle-signing.pub")
	var id struct{ cert, key, ca string }
	for i := 0; i < len(e.idFlags); i += 2 {
		switch e.idFlags[i] {
		case "--cert":
			id.cert = e.idFlags[i+1]
		case "--key":
			id.key = e.idFlags[i+1]
		case "--ca":
			id.ca = e.idFlags[i+1]
		}
	}
	cfg := map[string]any{"trust_domain": "cairn.test", "identity": map[string]string{"cert": id.cert, "key": id.key, "ca": id.ca},
		"rootkms": []string{e.rootAddr}, "signing_key": "keys/bundle-signing.key", "signing_pubs": []string{"keys/bundle-signing.pub"},
		"teams": "teams", "propagation_window": "5m"}
	if kms != nil {
		cfg["regions"] = kms
	}
	data, _ := json.Marshal(cfg)
	e.config = filepath.Join(e.dir, "regionctl.json")
	writeFile(t, e.config, string(data))
	for _, r := range []string{"us-east", "eu-west"} {
		mustRun(t, "region", "create", "--region", r, "--config", e.config)
	}
	mustRun(t, "keyset", "create", "--config", e.config)
	return e
}

func (e *env) verify(t *testing.T, path string) *bundlev1.Bundle {
	t.Helper()
	pub, err := bundle.ReadPublicKey(e.pub)
	if err != nil {
		t.Fatal(err)
	}
	b, err := bundle.Verify(readBundle(t, path), []ed25519.PublicKey{pub})
	if err != nil {
		t.Fatalf("Verify(%s) = %v", path, err)
	}
	return b
}

// TestBuildFromTheRecord builds from the team files and the record alone,
// and inspects the result.
func TestBuildFromTheRecord(t *testing.T) {
	e := newEnv(t, nil)
	out := filepath.Join(e.dir, "us-east.bundle")
	r := mustRun(t, "bundle", "build", "--config", e.config, "--region", "us-east", "--serial", "3", "--out", out)
	contains(t, "bundle build stdout", r.stdout, "bundle us-east serial 3 sha256 ", "3 keyset(s), region key versions [1]", "written to "+out)
	b := e.verify(t, out)
	if got, want := keysetNames(b), []string{"payments/ledger", "payments/new", "search/index"}; !cmp.Equal(got, want) {
		t.Errorf("bundle keysets = %v, want %v", got, want)
	}
	ledger := b.GetKeysets()[0]
	if ledger.GetCiphertextTtl().AsDuration() != 8760*time.Hour || len(ledger.GetTtlHistory()) != 1 || ledger.GetPropagationWindow().AsDuration() != 5*time.Minute ||
		len(ledger.GetLifecycle()) != 1 || ledger.GetLifecycle()[0].GetPrimarySince() == nil || !cmp.Equal(ledger.GetRegions(), []string{"eu-west", "us-east"}) {
		t.Errorf("payments/ledger config = %v; want the record's TTL history, lifecycle, regions and the 5m window", ledger)
	}
	if ledger.GetOwnerTeam() != "payments" || !cmp.Equal(ledger.GetAcl().GetEncrypt(), []string{"client/us-east/*"}) {
		t.Errorf("payments/ledger team/ACL = %q %v; want the team file's", ledger.GetOwnerTeam(), ledger.GetAcl())
	}
	aead, _ := e.keys.get("us-east", 1)
	for _, k := range b.GetKeysets() {
		if _, err := keysets.Decrypt(k.GetKeyset(), aead); err != nil {
			t.Errorf("Decrypt(%s from the bundle) = %v", k.GetName(), err)
		}
	}
	r = mustRun(t, "bundle", "inspect", "--config", e.config, "--bundle", out)
	contains(t, "bundle inspect", r.stdout, "signature: valid", "payments/ledger  team payments", "propagation window 5m0s", "primary since 2026-03-01T12:00:00Z")
}

// TestBuildRefuses: every problem is named in one run, the exit status is
// 1, and no bundle is written.
func TestBuildRefuses(t *testing.T) {
	tests := []struct {
		name   string
		region string
		setup  func(t *testing.T, e *env)
		want   []string
	}{
		{"truncated team file", "us-east", func(t *testing.T, e *env) {
			writeFile(t, filepath.Join(e.teams, "search.json"), searchTeam[:len(searchTeam)/2])
		}, []string{"team file " + "", "search.json", "keyset search/index: the record serves it in us-east, but no valid team file lists it"}},
		{"missing team file", "us-east", func(t *testing.T, e *env) {
			os.Remove(filepath.Join(e.teams, "search.json"))
		}, []string{"keyset search/index: the record serves it in us-east, but no valid team file lists it"}},
		{"keyset missing from the record", "us-east", func(t *testing.T, e *env) {
			writeFile(t, filepath.Join(e.teams, "maps.json"), `{"team":"maps","keysets":[{"name":"maps/tiles","regions":["us-east"],"purpose":"envelope","rotation_period":"1h","ciphertext_ttl":"1h"}]}`)
		}, []string{"keyset maps/tiles (team maps): not in the root KMS record for us-east (run regionctl keyset create)"}},
		{"unknown region", "ap-south", nil, []string{"region ap-south is unknown to the root KMS"}},
		{"policy mismatch", "us-east", func(t *testing.T, e *env) {
			writeFile(t, filepath.Join(e.teams, "search.json"), strings.Replace(strings.Replace(searchTeam, `"48h"`, `"72h"`, 1), `"720h"`, `"360h"`, 1))
		}, []string{"ciphertext_ttl is 72h0m0s in the team file but 48h0m0s in the record; run regionctl keyset set-policy search/index --ttl 72h0m0s",
			"rotation_period is 360h0m0s in the team file but 720h0m0s in the record; run regionctl keyset set-policy"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, nil)
			if tt.setup != nil {
				tt.setup(t, e)
			}
			out := filepath.Join(e.dir, "out.bundle")
			r := run(t, "bundle", "build", "--config", e.config, "--region", tt.region, "--serial", "2", "--out", out)
			if r.code != 1 {
				t.Fatalf("bundle build = %d, want 1\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
			}
			contains(t, "bundle build stderr", r.stderr, append([]string{"REFUSED", "no bundle written"}, tt.want...)...)
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Errorf("bundle build refused but %s exists (%v)", out, err)
			}
		})
	}
}

// TestLosingLocalFilesLosesNothing: a fresh regionctl with another working
// directory (a new copy of the team files, no other local state) sees and
// rotates the same keysets, and builds the same bundle content.
func TestLosingLocalFilesLosesNothing(t *testing.T) {
	e := newEnv(t, nil)
	first := filepath.Join(e.dir, "first.bundle")
	mustRun(t, "bundle", "build", "--config", e.config, "--region", "us-east", "--serial", "1", "--out", first)

	other := t.TempDir()
	teams := filepath.Join(other, "teams")
	writeFile(t, filepath.Join(teams, "payments.json"), paymentsTeam)
	writeFile(t, filepath.Join(teams, "search.json"), searchTeam)
	flags := append([]string{"--rootkms", e.rootAddr}, e.idFlags...)
	r := mustRun(t, append([]string{"keyset", "list"}, flags...)...)
	contains(t, "keyset list (fresh)", r.stdout, "payments/eu-only", "payments/ledger", "payments/new", "search/index")
	r = mustRun(t, append([]string{"keyset", "create", "--teams", teams}, flags...)...)
	contains(t, "keyset create (fresh)", r.stdout, "0 created, 4 already in the record")
	mustRun(t, append([]string{"keyset", "rotate", "payments/ledger"}, flags...)...)
	second := filepath.Join(other, "second.bundle")
	mustRun(t, append([]string{"bundle", "build", "--region", "us-east", "--serial", "2", "--teams", teams, "--signing-key", e.priv, "--out", second}, flags...)...)
	b1, b2 := e.verify(t, first), e.verify(t, second)
	if !cmp.Equal(keysetNames(b1), keysetNames(b2)) {
		t.Errorf("fresh build keysets = %v, want %v", keysetNames(b2), keysetNames(b1))
	}
	aead, _ := e.keys.get("us-east", 1)
	for i := range b1.GetKeysets() {
		h1, err1 := keysets.Decrypt(b1.GetKeysets()[i].GetKeyset(), aead)
		h2, err2 := keysets.Decrypt(b2.GetKeysets()[i].GetKeyset(), aead)
		if err1 != nil || err2 != nil {
			t.Fatalf("Decrypt = %v, %v", err1, err2)
		}
		// The same keys: every key of the first build is in the second.
		ids := map[uint32]bool{}
		for _, k := range h2.KeysetInfo().GetKeyInfo() {
			ids[k.GetKeyId()] = true
		}
		for _, k := range h1.KeysetInfo().GetKeyInfo() {
			if !ids[k.GetKeyId()] {
				t.Errorf("keyset %s: key %d of the first build is gone from the fresh build", b1.GetKeysets()[i].GetName(), k.GetKeyId())
			}
		}
	}
	if n := len(b2.GetKeysets()[0].GetKeyset().GetVersions()); n != 2 {
		t.Errorf("payments/ledger after rotate has %d versions in the fresh build, want 2", n)
	}
}

// TestSerialAuto: without --serial, the serial is one above the highest any
// server of the region serves, and the parent is what they all serve.
func TestSerialAuto(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	var addrs []string
	for i, serial := range []uint64{7, 9} {
		f := &fakeKMS{served: &bundlev1.BundleRef{Region: "us-east", Serial: serial, Sha256: []byte{byte(i)}}}
		addrs = append(addrs, startFakeKMS(t, pki, f, i+1))
	}
	e := newEnvWithPKI(t, pki, map[string][]string{"us-east": addrs})
	out := filepath.Join(e.dir, "auto.bundle")
	r := mustRun(t, "bundle", "build", "--config", e.config, "--region", "us-east", "--out", out)
	contains(t, "bundle build stdout", r.stdout, "serial 10 ")
	if b := e.verify(t, out); b.GetSerial() != 10 || b.GetParent() != nil {
		t.Errorf("auto serial bundle = serial %d parent %v, want 10 and no parent (the servers disagree)", b.GetSerial(), b.GetParent())
	}
}

func startFakeKMS(t *testing.T, pki *identitytest.PKI, f *fakeKMS, i int) string {
	srv := newServer(pki, "spiffe://cairn.test/kms/us-east/kms-"+string(rune('0'+i)))
	kmsv1.RegisterKMSAdminServer(srv, f)
	return serve(t, srv)
}

// TestBuildProvenance: a bundle's author is regionctl's own identity (the
// one it authenticates with), never a flag: --created-by is refused and
// nothing is written. Its not_after is created_at plus --valid-for.
func TestBuildProvenance(t *testing.T) {
	e := newEnv(t, nil)
	out := filepath.Join(e.dir, "us-east.bundle")
	forged := "spiffe://cairn.test/regionctl/global/mallory"
	r := run(t, "bundle", "build", "--config", e.config, "--region", "us-east", "--serial", "3", "--out", out, "--created-by", forged)
	if r.code != 2 || !strings.Contains(r.stderr, "--created-by is gone") || !strings.Contains(r.stderr, "regionctl's own SPIFFE identity") {
		t.Errorf("bundle build --created-by %s = %d, %q; want 2 saying the author is regionctl's own identity", forged, r.code, r.stderr)
	}
	if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("bundle build --created-by wrote %s (stat: %v), want nothing written", out, err)
	}
	for _, bad := range []string{"0s", "-1h", "9000h"} {
		if r := run(t, "bundle", "build", "--config", e.config, "--region", "us-east", "--serial", "3", "--out", out, "--valid-for", bad); r.code != 2 || !strings.Contains(r.stderr, "--valid-for") {
			t.Errorf("bundle build --valid-for %s = %d, %q; want 2 naming --valid-for", bad, r.code, r.stderr)
		}
	}

	mustRun(t, "bundle", "build", "--config", e.config, "--region", "us-east", "--serial", "3", "--out", out, "--valid-for", "72h")
	b := e.verify(t, out)
	if b.GetCreatedBy() != regionctlID {
		t.Errorf("bundle created_by = %q, want regionctl's identity %q", b.GetCreatedBy(), regionctlID)
	}
	if got, want := b.GetNotAfter().AsTime().Sub(b.GetCreatedAt().AsTime()), 72*time.Hour; got != want {
		t.Errorf("bundle not_after - created_at = %v, want %v (--valid-for)", got, want)
	}
	r = mustRun(t, "bundle", "inspect", "--config", e.config, "--bundle", out)
	contains(t, "bundle inspect", r.stdout, "not after "+b.GetNotAfter().AsTime().UTC().Format(time.RFC3339))
}
