package tests

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/tink-crypto/tink-go/v2/keyset"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/internal/secret"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/regionctl/compile"
	"github.com/cairnkms/cairn/regionctl/config"
	"github.com/cairnkms/cairn/tests/framework"
)

// The rotation scenarios are issue 8's done-when: "the two-step TTL bypass,
// the partial-push bypass and the promote-before-propagate case are refused
// with a message that names the version, the regions or servers in the way,
// and the earliest safe time; what every server serves is unchanged". Each
// runs the real chain (file safes, a distributor, one root KMS replica with
// a short --safety-window, KMS servers) and regionctl as a process with a
// config file, the way an SRE runs it. Bundles regionctl would never build
// are made in the test process from the record (regionctl/compile), edited,
// and signed with regionctl's signing key: they stand for a buggy or
// hand-edited build, and show that the KMS's own guard holds without
// regionctl. Each ends with the secret scan (rotChain.requireNoSecrets): no
// file holds the RMK, a share, a passphrase, a version of a region key, a
// key of any keyset copy a bundle carried, or the plaintext encrypted.

const (
	rotLedger = "payments/ledger"
	rotAudit  = "payments/audit"
	longTTL   = 8760 * time.Hour
)

// rotTeam is the payments team file: payments/ledger (if withLedger, with
// ciphertext TTL ttl) and payments/audit, both in regions, usable by every
// demo client of those regions.
func rotTeam(regions []string, ttl time.Duration, withLedger bool) string {
	var acl []string
	for _, r := range regions {
		acl = append(acl, "client/"+r+"/*")
	}
	ks := func(name string, ttl time.Duration) map[string]any {
		return map[string]any{"name": name, "regions": regions, "purpose": "envelope", "rotation_period": "2160h",
			"ciphertext_ttl": ttl.String(), "acl": map[string]any{"encrypt": acl, "decrypt": acl}}
	}
	team := map[string]any{"team": "payments", "keysets": []any{ks(rotAudit, longTTL)}}
	if withLedger {
		team["keysets"] = []any{ks(rotLedger, ttl), ks(rotAudit, longTTL)}
	}
	b, err := json.MarshalIndent(team, "", "  ")
	if err != nil {
		panic(err)
	}
	return string(b)
}

// rotChain is a running chain with regionctl configured for it.
type rotChain struct {
	t *testing.T
	w *framework.World
	// m and safes are the genesis and its safes; d is the distributor.
	m      *safev1.GenesisManifest
	safes  []framework.SafeConfig
	d      *framework.Distributor
	root   *framework.Replica
	kms    map[string][]*framework.KMSServer // by region
	dir    string
	config string // regionctl's config file
	teams  string
	keys   string
	window time.Duration
	regs   []string
	builds int
}

// startRotationChain starts the chain: file safes, a distributor, one root
// KMS replica with the Safety Condition window set to window, and for each
// region the KMS servers named (kms/<region>/<name>); it writes regionctl's
// config file (same window), creates the regions and the payments keysets,
// and builds and pushes bundle serial 1 to every region.
func startRotationChain(t *testing.T, window time.Duration, servers map[string][]string) *rotChain {
	t.Helper()
	start := time.Now()
	w := framework.NewWorld(t, bin)
	c := &rotChain{t: t, w: w, kms: map[string][]*framework.KMSServer{}, dir: filepath.Join(w.Dir, "regionctl"), window: window}
	c.teams, c.keys, c.config = filepath.Join(c.dir, "teams"), filepath.Join(c.dir, "keys"), filepath.Join(c.dir, "regionctl.json")
	for region, names := range servers {
		c.regs = append(c.regs, region)
		for _, n := range names {
			if n != "kms-1" { // `cairn dev certs` made kms/<region>/kms-1
				w.Mint("kms/" + region + "/" + n)
			}
		}
	}
	slices.Sort(c.regs)
	safes := w.FileSafes(2)
	d := w.Distributors(1, false)[0]
	d.Start()
	d.WaitState(sealed)
	m := w.Genesis(2, safes, d)
	waitUnsealed(t, d, m)
	c.m, c.safes, c.d = m, safes, d
	opts := framework.FastRaft(w.ManifestPath(), d.Addr)
	opts.SafetyWindow = window
	c.root = w.RootKMSCluster(opts, framework.Voter(1))[0]
	c.root.Start()
	framework.WaitLeader(c.root)
	c.root.WaitServing()

	w.RegionctlOK("keys", "generate", "--out", c.keys)
	cfgRegions := map[string][]string{}
	for _, region := range c.regs {
		var ids []string
		for _, n := range servers[region] {
			ids = append(ids, "kms/"+region+"/"+n)
		}
		c.kms[region] = w.KMSServers(region, filepath.Join(c.keys, "bundle-signing.pub"), []string{c.root.API}, ids...)
		for _, k := range c.kms[region] {
			k.Start()
			cfgRegions[region] = append(cfgRegions[region], k.Addr)
		}
	}
	// regionctl talks to every server next: wait until each answers (a
	// loaded machine can take a moment to start ten processes).
	for _, region := range c.regs {
		for _, k := range c.kms[region] {
			k.WaitStatus("answering GetStatus", func(*kmsv1.GetStatusResponse) bool { return true })
		}
	}
	cfg := map[string]any{
		"trust_domain": framework.TrustDomain,
		"identity":     map[string]string{"dev_certs": w.Certs, "name": framework.Regionctl},
		"rootkms":      []string{c.root.API},
		"regions":      cfgRegions,
		"signing_key":  filepath.Join(c.keys, "bundle-signing.key"),
		"signing_pubs": []string{filepath.Join(c.keys, "bundle-signing.pub")},
		"teams":        c.teams,
		// The window the bundles carry (the KMS servers' window) and
		// regionctl's fleet-wide checks use.
		"propagation_window": window.String(),
	}
	data, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	c.writeFile(c.config, string(data))
	c.writeTeam(longTTL, true)
	for _, region := range c.regs {
		c.rcOK("region", "create", "--region", region)
	}
	r := c.rcOK("keyset", "create")
	if !strings.Contains(r.Stdout, "2 created") {
		t.Fatalf("keyset create printed %q, want 2 created", r.Stdout)
	}
	for _, region := range c.regs {
		c.buildPush(region)
	}
	t.Logf("chain up (%d region(s), window %v), bundle serial 1 served everywhere, in %s", len(c.regs), window, time.Since(start).Round(time.Millisecond))
	return c
}

// requireNoSecrets ends the scenario: it fetches every version of each
// region's key from the root KMS and opens every keyset copy of every bundle
// regionctl or the test wrote (built, crafted, rolled out), stops every
// process of the chain (SIGTERM, clean exit: their last lines are written),
// and scans every file of the world for those keys, the RMK, the shares,
// the safes' passphrases and the extra secrets (the plaintexts the test
// chose).
func (c *rotChain) requireNoSecrets(extra ...framework.Secret) {
	c.t.Helper()
	secrets := append(chainSecrets(c.t, c.root, c.dir, c.regs...), extra...)
	for _, region := range c.regs {
		for _, k := range c.kms[region] {
			if k.Running() {
				k.Stop()
			}
		}
	}
	c.root.Stop()
	c.d.Stop()
	requireNoSecrets(c.t, c.w, c.m, c.safes, nil, secrets)
}

func (c *rotChain) writeFile(path, data string) {
	c.t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		c.t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		c.t.Fatal(err)
	}
}

// writeTeam rewrites the team file (payments/ledger with TTL ttl if
// withLedger).
func (c *rotChain) writeTeam(ttl time.Duration, withLedger bool) {
	c.t.Helper()
	c.writeFile(filepath.Join(c.teams, "payments.json"), rotTeam(c.regs, ttl, withLedger))
}

// rc runs regionctl with the chain's config file.
func (c *rotChain) rc(args ...string) framework.Result {
	c.t.Helper()
	name := "regionctl"
	for _, a := range args[:min(2, len(args))] {
		name += "-" + a
	}
	return c.w.Run(name, bin.RegionctlBinary(), append(args, "--config", c.config)...)
}

// rcOK is rc that fails the test unless regionctl exits 0.
func (c *rotChain) rcOK(args ...string) framework.Result {
	c.t.Helper()
	r := c.rc(args...)
	if r.ExitCode != 0 {
		c.t.Fatalf("regionctl failed:\n%s", r)
	}
	return r
}

// rcRefused is rc that fails the test unless regionctl exits 1.
func (c *rotChain) rcRefused(args ...string) framework.Result {
	c.t.Helper()
	r := c.rc(args...)
	if r.ExitCode != 1 {
		c.t.Fatalf("regionctl exited %d, want 1 (refused):\n%s", r.ExitCode, r)
	}
	return r
}

// buildPush builds the region's next bundle with regionctl and pushes it,
// and waits until every server of the region serves it. It returns the
// serial.
func (c *rotChain) buildPush(region string) uint64 {
	c.t.Helper()
	c.builds++
	out := filepath.Join(c.dir, fmt.Sprintf("%s-%d.bundle", region, c.builds))
	r := c.rcOK("bundle", "build", "--region", region, "--out", out)
	m := regexp.MustCompile(`bundle \S+ serial (\d+) sha256`).FindStringSubmatch(r.Stdout)
	if m == nil {
		c.t.Fatalf("bundle build printed %q, want the serial", r.Stdout)
	}
	serial, _ := strconv.ParseUint(m[1], 10, 64)
	c.rcOK("bundle", "push", "--bundle", out)
	for _, k := range c.kms[region] {
		k.WaitServing(serial)
	}
	return serial
}

// served is what each server of every region serves: its state and bundle
// serial and sha256, by identity.
func (c *rotChain) served() map[string]string {
	c.t.Helper()
	out := map[string]string{}
	for _, region := range c.regs {
		for _, k := range c.kms[region] {
			st, err := k.Status()
			if err != nil {
				c.t.Fatalf("GetStatus(%s) = %v", k.Identity, err)
			}
			out[k.Identity] = fmt.Sprintf("%v serial %d sha256 %s", st.GetState(), st.GetBundle().GetSerial(), hex.EncodeToString(st.GetBundle().GetSha256()))
		}
	}
	return out
}

// requireServedUnchanged fails unless every server serves what before says.
func (c *rotChain) requireServedUnchanged(before map[string]string, after string) {
	c.t.Helper()
	now := c.served()
	for id, was := range before {
		if now[id] != was {
			c.t.Errorf("after %s, %s serves %s; want it unchanged: %s", after, id, now[id], was)
		}
	}
}

// record reads the record of the region's keysets, with their copies, as
// regionctl.
func (c *rotChain) record(region string) map[string]*statev1.KeysetRecord {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), kmsCallTTL)
	defer cancel()
	resp, err := c.root.Client(framework.Regionctl).ListKeysets(ctx, &rootkmsv1.ListKeysetsRequest{Region: region, IncludeCopies: true})
	if err != nil {
		c.t.Fatalf("ListKeysets(%s) = %v", region, err)
	}
	out := map[string]*statev1.KeysetRecord{}
	for _, k := range resp.GetKeysets() {
		out[k.GetRecord().GetName()] = k.GetRecord()
	}
	return out
}

// craft compiles the region's bundle at serial from the record and the
// team files as regionctl would, lets edit change it, checks it is still a
// valid bundle, and signs it with regionctl's signing key. It returns the
// signed bundle and the file it is written to.
func (c *rotChain) craft(region string, serial uint64, edit func(*bundlev1.Bundle, map[string]*statev1.KeysetRecord)) (*bundlev1.SignedBundle, string) {
	c.t.Helper()
	good, bad, err := config.LoadDir(c.teams, spiffeid.RequireTrustDomainFromString(framework.TrustDomain))
	if err != nil || len(bad) > 0 {
		c.t.Fatalf("config.LoadDir(%s) = %v, %v", c.teams, bad, err)
	}
	recs := c.record(region)
	var list []*statev1.KeysetRecord
	for _, r := range recs {
		list = append(list, r)
	}
	res, err := compile.Compile(compile.Input{Region: region, Serial: serial, CreatedBy: framework.SPIFFEID(framework.Regionctl),
		CreatedAt: time.Now(), Teams: good, Record: list, Window: c.window})
	if err != nil || len(res.Problems) > 0 {
		c.t.Fatalf("compile.Compile(%s) = %v, %v", region, res, err)
	}
	edit(res.Bundle, recs)
	if err := bundle.Validate(res.Bundle); err != nil {
		c.t.Fatalf("the hand-made bundle is not valid: %v", err)
	}
	key, err := bundle.ReadPrivateKey(filepath.Join(c.keys, "bundle-signing.key"))
	if err != nil {
		c.t.Fatal(err)
	}
	defer clear(key)
	sb, err := bundle.Sign(res.Bundle, key)
	if err != nil {
		c.t.Fatal(err)
	}
	data, err := proto.Marshal(sb)
	if err != nil {
		c.t.Fatal(err)
	}
	path := filepath.Join(c.dir, fmt.Sprintf("crafted-%s-%d.bundle", region, serial))
	c.writeFile(path, string(data))
	return sb, path
}

// rewriteKeyset changes the keys of keyset name in b (a region's bundle):
// it opens the copy with the region key (fetched as a KMS of the region
// would), lets change edit the keyset, and puts the re-encrypted copy and
// its lifecycle from the record in its place.
func (c *rotChain) rewriteKeyset(b *bundlev1.Bundle, rec *statev1.KeysetRecord, change func(*keyset.Manager) error) {
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
	m := keyset.NewManagerFromHandle(h)
	if err := change(m); err != nil {
		c.t.Fatalf("changing %s: %v", rec.GetName(), err)
	}
	nh, err := m.Handle()
	if err != nil {
		c.t.Fatal(err)
	}
	nek, err := keysets.Encrypt(nh, rec.GetName(), region, ek.GetRegionKeyVersion(), aead)
	if err != nil {
		c.t.Fatal(err)
	}
	kc.Keyset = nek
	kc.Lifecycle = compile.Lifecycle(rec, nek)
}

// overridden returns sb re-signed with a shrink override: the strongest
// force there is, which must still not get past the Safety Condition.
func (c *rotChain) overridden(sb *bundlev1.SignedBundle) *bundlev1.SignedBundle {
	c.t.Helper()
	var b bundlev1.Bundle
	if err := proto.Unmarshal(sb.GetBundle(), &b); err != nil {
		c.t.Fatal(err)
	}
	b.ShrinkOverride = &bundlev1.ShrinkOverride{Reason: "e2e: the Safety Condition is never forceable", ForcedBy: framework.SPIFFEID(framework.Regionctl)}
	key, err := bundle.ReadPrivateKey(filepath.Join(c.keys, "bundle-signing.key"))
	if err != nil {
		c.t.Fatal(err)
	}
	defer clear(key)
	out, err := bundle.Sign(&b, key)
	if err != nil {
		c.t.Fatal(err)
	}
	return out
}

// applyDirect sends sb straight to k's ApplyBundle as regionctl, as a
// script or a buggy tool could, bypassing regionctl's checks.
func applyDirect(k *framework.KMSServer, sb *bundlev1.SignedBundle, dryRun bool) (*kmsv1.ApplyBundleResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), kmsCallTTL)
	defer cancel()
	return k.Admin(framework.Regionctl).ApplyBundle(ctx, &kmsv1.ApplyBundleRequest{Bundle: sb, DryRun: dryRun})
}

// rotPlaintext is what encryptOn encrypts: a sentinel the secret scan
// looks for.
const rotPlaintext = "rotation e2e plaintext, never logged"

// encryptOn encrypts through k as the region's demo client and returns the
// key ID that encrypted.
func encryptOn(t *testing.T, k *framework.KMSServer, keysetName string) uint32 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), kmsCallTTL)
	defer cancel()
	r, err := k.Client("client/"+k.Region+"/demo").Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: keysetName, Plaintext: []byte(rotPlaintext)})
	if err != nil {
		t.Fatalf("Encrypt(%s) on %s = %v", keysetName, k.Identity, err)
	}
	return r.GetKeyId()
}

var (
	earliestRE = regexp.MustCompile(`earliest safe time (\S+?)(?:;|\s|$)`)
	addedRE    = regexp.MustCompile(`added version (\d+) \(enabled, decrypt-only\)`)
)

// earliest returns the earliest safe time msg names, failing the test if
// it names none.
func earliest(t *testing.T, what, msg string) time.Time {
	t.Helper()
	m := earliestRE.FindStringSubmatch(msg)
	if m == nil {
		t.Fatalf("%s = %q, want an earliest safe time", what, msg)
	}
	at, err := time.Parse(time.RFC3339, m[1])
	if err != nil {
		t.Fatalf("%s names earliest safe time %q, want RFC 3339 (%v); message %q", what, m[1], err, msg)
	}
	return at
}

// requireFarEarliest checks that msg refuses version id of keyset name
// leaving the decrypt set with the long (pre-cut) TTL and an earliest safe
// time about that TTL away: the TTL cut did not count yet.
func requireFarEarliest(t *testing.T, what, msg, name string, id uint32) {
	t.Helper()
	for _, want := range []string{fmt.Sprintf("keyset %q version %d cannot leave the decrypt set", name, id), "effective TTL " + longTTL.String()} {
		if !strings.Contains(msg, want) {
			t.Errorf("%s = %q, want it to contain %q", what, msg, want)
		}
	}
	if at := earliest(t, what, msg); at.Before(time.Now().Add(longTTL - time.Hour)) {
		t.Errorf("%s names earliest safe time %s, want at least the old TTL (%v) from now: the cut TTL counted before the old one passed", what, at, longTTL)
	}
}

// keyIDFromAdd parses the version `keyset rotate` added.
func keyIDFromAdd(t *testing.T, r framework.Result) uint32 {
	t.Helper()
	m := addedRE.FindStringSubmatch(r.Stdout)
	if m == nil {
		t.Fatalf("keyset rotate printed %q, want the version added", r.Stdout)
	}
	id, _ := strconv.ParseUint(m[1], 10, 32)
	return uint32(id)
}

// primaryOf returns the primary version of keyset name in the record.
func (c *rotChain) primaryOf(name string) uint32 {
	c.t.Helper()
	for _, v := range c.record(c.regs[0])[name].GetVersions() {
		if v.GetState() == statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY {
			return v.GetKeyId()
		}
	}
	c.t.Fatalf("keyset %s has no primary version in the record", name)
	return 0
}

// promoteWhenSafe observes and promotes until the root KMS accepts (the
// observation must be recent and every region must have served the version
// for the window), within 15 s.
func (c *rotChain) promoteWhenSafe(name string, id uint32) {
	c.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		c.rcOK("observe")
		r := c.rc("keyset", "promote", name, "--version", fmt.Sprint(id))
		if r.ExitCode == 0 {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("promote %s version %d still refused after 15 s:\n%s", name, id, r)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestRotationTTLCutThenDrop is the two-step TTL bypass: payments/ledger has
// a year's TTL and version 1 encrypted through kms-1; version 2 is added,
// propagated and promoted; the TTL is cut to 1 s (allowed, and pushed), and
// once 1 s + the window have passed since every use, version 1 is retired.
// Judged on the new TTL alone, that would be safe; a ciphertext of version 1
// may still be within the year it was promised. The root KMS refuses the
// disable, bundle build refuses a team file that drops the keyset, and a
// hand-made bundle that drops version 1 is refused by regionctl's
// fleet-wide check and, pushed straight to each KMS (forced too), by every
// KMS, each naming the keyset, the version and an earliest safe time a year
// away. Every server keeps serving what it served.
func TestRotationTTLCutThenDrop(t *testing.T) {
	start := time.Now()
	window := 2 * time.Second
	c := startRotationChain(t, window, map[string][]string{"us-east": {"kms-1", "kms-2"}})
	k1, k2 := c.kms["us-east"][0], c.kms["us-east"][1]

	v1 := encryptOn(t, k1, rotLedger)
	lastUse := time.Now()
	if p := c.primaryOf(rotLedger); p != v1 {
		t.Fatalf("kms-1 encrypted with version %d, the record's primary is %d", v1, p)
	}
	v2 := keyIDFromAdd(t, c.rcOK("keyset", "rotate", rotLedger))
	c.buildPush("us-east")
	c.promoteWhenSafe(rotLedger, v2)
	promoted := time.Now()
	c.buildPush("us-east")
	if got := encryptOn(t, k2, rotLedger); got != v2 {
		t.Fatalf("after the promotion kms-2 encrypted with version %d, want %d", got, v2)
	}
	t.Logf("version %d used, version %d promoted and served (%s)", v1, v2, time.Since(start).Round(time.Millisecond))

	// Step 1: cut the TTL to 1 s; the bundle with the new TTL is accepted.
	r := c.rcOK("keyset", "set-policy", rotLedger, "--ttl", "1s")
	if !strings.Contains(r.Stdout, "ciphertext TTL 1s") {
		t.Errorf("set-policy printed %q, want ciphertext TTL 1s", r.Stdout)
	}
	c.writeTeam(time.Second, true)
	cutSerial := c.buildPush("us-east")

	// Step 2, once the new TTL and the window have passed since version 1
	// was last used and superseded: retire version 1.
	sleepUntil(promoted.Add(time.Second + window + 500*time.Millisecond))
	if lastUse.After(promoted) {
		t.Fatal("version 1 used after its supersession")
	}
	c.rcOK("observe")
	r = c.rcRefused("keyset", "disable", rotLedger, "--version", fmt.Sprint(v1))
	if !strings.Contains(r.Stderr, "REFUSED by the root KMS") {
		t.Errorf("keyset disable stderr = %q, want REFUSED by the root KMS", r.Stderr)
	}
	requireFarEarliest(t, "keyset disable stderr", r.Stderr, rotLedger, v1)

	// A bundle without version 1, made before the team file changes.
	sb, crafted := c.craft("us-east", cutSerial+1, func(b *bundlev1.Bundle, recs map[string]*statev1.KeysetRecord) {
		c.rewriteKeyset(b, recs[rotLedger], func(m *keyset.Manager) error {
			if err := m.Disable(v1); err != nil {
				return err
			}
			return m.Delete(v1)
		})
	})

	// Drop the keyset from the team file: bundle build refuses.
	c.writeTeam(time.Second, false)
	out := filepath.Join(c.dir, "dropped.bundle")
	r = c.rcRefused("bundle", "build", "--region", "us-east", "--out", out)
	for _, want := range []string{"REFUSED: the us-east bundle cannot hold every keyset; no bundle written",
		"keyset payments/ledger: the record serves it in us-east, but no valid team file lists it"} {
		if !strings.Contains(r.Stderr, want) {
			t.Errorf("bundle build without the keyset: stderr %q, want %q", r.Stderr, want)
		}
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("bundle build refused but %s exists (%v)", out, err)
	}

	before := c.served()
	r = c.rcRefused("bundle", "push", "--bundle", crafted)
	for _, want := range []string{"REFUSED (Safety Condition, fleet-wide)", "nothing was applied anywhere", "region us-east server " + k1.Addr + " encrypted with it at"} {
		if !strings.Contains(r.Stderr, want) {
			t.Errorf("bundle push of the bundle without version %d: stderr %q, want %q", v1, r.Stderr, want)
		}
	}
	requireFarEarliest(t, "bundle push stderr", r.Stderr, rotLedger, v1)
	if strings.Contains(r.Stdout, "dry run ok") || strings.Contains(r.Stdout, "applied") {
		t.Errorf("bundle push refused fleet-wide but reached the servers: %q", r.Stdout)
	}
	c.requireServedUnchanged(before, "regionctl bundle push")

	for _, k := range c.kms["us-east"] {
		for _, force := range []bool{false, true} {
			b := sb
			if force {
				b = c.overridden(sb)
			}
			_, err := applyDirect(k, b, false)
			what := fmt.Sprintf("ApplyBundle(no version %d, shrink override %t) on %s", v1, force, k.Identity)
			if status.Code(err) != codes.FailedPrecondition {
				t.Errorf("%s = %v, want FailedPrecondition", what, err)
				continue
			}
			requireFarEarliest(t, what, status.Convert(err).Message(), rotLedger, v1)
			t.Logf("%s: %s", what, status.Convert(err).Message())
		}
	}
	c.requireServedUnchanged(before, "ApplyBundle straight to every KMS")
	// Version 1's ciphertexts still decrypt everywhere.
	if got := encryptOn(t, k1, rotLedger); got != v2 {
		t.Errorf("kms-1 encrypts with version %d, want %d", got, v2)
	}
	c.requireNoSecrets(sentinel("the plaintext encrypted", []byte(rotPlaintext)))
	t.Logf("scenario took %s", time.Since(start).Round(time.Millisecond))
}

// TestRotationPartialPush is the partial-push bypass: kms-1 encrypted with
// payments/ledger's version 1, since superseded by version 2; kms-2
// restarted on a fresh state directory and serves nothing, so its own check
// has no evidence and would accept a bundle that drops version 1. regionctl
// bundle push refuses that bundle, naming kms-1 and the earliest safe time,
// and applies it nowhere: pushed to the region, and pushed to kms-2 alone.
func TestRotationPartialPush(t *testing.T) {
	start := time.Now()
	c := startRotationChain(t, 2*time.Second, map[string][]string{"us-east": {"kms-1", "kms-2"}})
	k1, k2 := c.kms["us-east"][0], c.kms["us-east"][1]
	v1 := encryptOn(t, k1, rotLedger)
	v2 := keyIDFromAdd(t, c.rcOK("keyset", "rotate", rotLedger))
	serial := c.buildPush("us-east")
	c.promoteWhenSafe(rotLedger, v2)
	serial = c.buildPush("us-east")

	k2.Stop()
	if err := os.RemoveAll(k2.StateDir); err != nil {
		t.Fatal(err)
	}
	k2.Start()
	k2.WaitStatus("NOT_READY with a fresh state directory", func(st *kmsv1.GetStatusResponse) bool {
		return st.GetState() == kmsv1.ServingState_SERVING_STATE_NOT_READY && st.GetBundle() == nil
	})

	// The bundle without version 1.
	sb, crafted := c.craft("us-east", serial+1, func(b *bundlev1.Bundle, recs map[string]*statev1.KeysetRecord) {
		c.rewriteKeyset(b, recs[rotLedger], func(m *keyset.Manager) error {
			if err := m.Disable(v1); err != nil {
				return err
			}
			return m.Delete(v1)
		})
	})
	// kms-2 alone would take it: it has no evidence of the use.
	if _, err := applyDirect(k2, sb, true); err != nil {
		t.Errorf("dry run of the bundle without version %d on the fresh kms-2 = %v; want accepted (it has no usage of its own)", v1, err)
	}

	before := c.served()
	for _, tc := range []struct {
		name  string
		flags []string
	}{
		{"to the region", nil},
		{"to the fresh kms-2 alone", []string{"--kms", k2.Addr}},
	} {
		r := c.rc(append([]string{"bundle", "push", "--bundle", crafted}, tc.flags...)...)
		if r.ExitCode != 1 {
			t.Errorf("bundle push %s of the bundle without version %d: exit %d, want 1:\n%s", tc.name, v1, r.ExitCode, r)
			c.requireServedUnchanged(before, "bundle push "+tc.name)
			continue
		}
		for _, want := range []string{
			fmt.Sprintf("keyset %q version %d cannot leave the decrypt set", rotLedger, v1),
			"region us-east server " + k1.Addr + " encrypted with it at",
			"nothing was applied anywhere",
		} {
			if !strings.Contains(r.Stderr, want) {
				t.Errorf("bundle push %s: stderr %q, want %q", tc.name, r.Stderr, want)
			}
		}
		if at := earliest(t, "bundle push "+tc.name, r.Stderr); at.Before(time.Now().Add(longTTL - time.Hour)) {
			t.Errorf("bundle push %s names earliest safe time %s, want about the TTL (%v) from now", tc.name, at, longTTL)
		}
		if strings.Contains(r.Stdout, ": applied ") {
			t.Errorf("bundle push %s refused but applied: %q", tc.name, r.Stdout)
		}
		c.requireServedUnchanged(before, "bundle push "+tc.name)
	}
	c.requireNoSecrets(sentinel("the plaintext encrypted", []byte(rotPlaintext)))
	t.Logf("scenario took %s", time.Since(start).Round(time.Millisecond))
}

// TestRotationPromoteBeforePropagate: a version added and promoted at once
// is refused by the root KMS, naming both regions; a hand-made bundle that
// adds and promotes it in one go is refused by regionctl and by the KMS it
// is pushed to straight; once each region serves it, a promotion inside the
// window is refused naming both regions and the earliest safe time, and one
// after it is accepted.
func TestRotationPromoteBeforePropagate(t *testing.T) {
	start := time.Now()
	window := 3 * time.Second
	c := startRotationChain(t, window, map[string][]string{"us-east": {"kms-1"}, "eu-west": {"kms-1"}})
	east, west := c.kms["us-east"][0], c.kms["eu-west"][0]
	v1 := encryptOn(t, east, rotLedger)

	v2 := keyIDFromAdd(t, c.rcOK("keyset", "rotate", rotLedger))
	r := c.rcRefused("keyset", "promote", rotLedger, "--version", fmt.Sprint(v2))
	for _, want := range []string{"REFUSED by the root KMS", fmt.Sprintf("keyset %q version %d cannot become primary", rotLedger, v2),
		"region eu-west has not served it decrypting on every server yet", "region us-east has not served it decrypting on every server yet"} {
		if !strings.Contains(r.Stderr, want) {
			t.Errorf("promote at once: stderr %q, want %q", r.Stderr, want)
		}
	}

	// A bundle that adds version 2 and makes it primary in one go.
	sb, crafted := c.craft("us-east", 2, func(b *bundlev1.Bundle, recs map[string]*statev1.KeysetRecord) {
		c.rewriteKeyset(b, recs[rotLedger], func(m *keyset.Manager) error { return m.SetPrimary(v2) })
	})
	before := c.served()
	r = c.rcRefused("bundle", "push", "--bundle", crafted)
	for _, want := range []string{"REFUSED (Safety Condition, fleet-wide)", fmt.Sprintf("keyset %q version %d cannot become primary", rotLedger, v2),
		"region us-east is pushed a bundle that adds it and makes it primary at once", "nothing was applied anywhere"} {
		if !strings.Contains(r.Stderr, want) {
			t.Errorf("bundle push of the add-and-promote bundle: stderr %q, want %q", r.Stderr, want)
		}
	}
	for _, force := range []bool{false, true} {
		b := sb
		if force {
			b = c.overridden(sb)
		}
		_, err := applyDirect(east, b, false)
		what := fmt.Sprintf("ApplyBundle(add and promote %d, shrink override %t) on %s", v2, force, east.Identity)
		if status.Code(err) != codes.FailedPrecondition {
			t.Errorf("%s = %v, want FailedPrecondition", what, err)
			continue
		}
		msg := status.Convert(err).Message()
		for _, want := range []string{fmt.Sprintf("keyset %q version %d cannot become primary", rotLedger, v2), "region us-east", "ship it decrypt-only first"} {
			if !strings.Contains(msg, want) {
				t.Errorf("%s = %q, want %q", what, msg, want)
			}
		}
	}
	c.requireServedUnchanged(before, "the add-and-promote bundle")
	if got := encryptOn(t, east, rotLedger); got != v1 {
		t.Errorf("us-east encrypts with version %d after the refusals, want %d", got, v1)
	}

	// us-east serves version 2 decrypt-only: eu-west is still in the way.
	c.buildPush("us-east")
	c.rcOK("observe")
	r = c.rcRefused("keyset", "promote", rotLedger, "--version", fmt.Sprint(v2))
	for _, want := range []string{"region eu-west has not served it decrypting on every server yet", "region us-east has served it decrypting only since"} {
		if !strings.Contains(r.Stderr, want) {
			t.Errorf("promote with only us-east serving it: stderr %q, want %q", r.Stderr, want)
		}
	}

	// Both serve it: refused until the window has passed, naming both
	// regions and when.
	c.buildPush("eu-west")
	c.rcOK("observe")
	observed := time.Now()
	r = c.rcRefused("keyset", "promote", rotLedger, "--version", fmt.Sprint(v2))
	for _, want := range []string{"region eu-west has served it decrypting only since", "region us-east has served it decrypting only since", fmt.Sprintf("(window %v)", window)} {
		if !strings.Contains(r.Stderr, want) {
			t.Errorf("promote inside the window: stderr %q, want %q", r.Stderr, want)
		}
	}
	at := earliest(t, "promote inside the window", r.Stderr)
	if at.Before(observed.Add(window-time.Second)) || at.After(observed.Add(window+time.Second)) {
		t.Errorf("promote inside the window names earliest safe time %s, want about %s (the observation + %v)", at, observed.Add(window), window)
	}
	t.Logf("promote inside the window refused: %s", strings.TrimSpace(r.Stderr))

	// After the window: accepted, and served.
	sleepUntil(at)
	c.promoteWhenSafe(rotLedger, v2)
	for _, region := range c.regs {
		c.buildPush(region)
	}
	for _, k := range []*framework.KMSServer{east, west} {
		if got := encryptOn(t, k, rotLedger); got != v2 {
			t.Errorf("%s encrypts with version %d after the promotion, want %d", k.Identity, got, v2)
		}
	}
	c.requireNoSecrets(sentinel("the plaintext encrypted", []byte(rotPlaintext)))
	t.Logf("scenario took %s", time.Since(start).Round(time.Millisecond))
}

// TestRotateDueStagedRollout: regionctl rotate --due, the cron path, run as
// the real binary against real KMS processes in two regions. The version it
// adds goes out as one staged rollout: the canary (one us-east server),
// then the rest of us-east, then eu-west, each stage applied only once the
// stage before has baked and passed its gates. Every server then serves the
// new version, decrypt-only, and the rollout is on record; a second run with
// nothing due rolls nothing out.
func TestRotateDueStagedRollout(t *testing.T) {
	start := time.Now()
	c := startRotationChain(t, 2*time.Second, map[string][]string{"us-east": {"kms-1", "kms-2"}, "eu-west": {"kms-1"}})
	// payments/ledger comes due for rotation: its period is now a second,
	// in the record and in the team file (a build refuses them differing).
	c.rcOK("keyset", "set-policy", rotLedger, "--rotation-period", "1s")
	team := rotTeam(c.regs, longTTL, true) // payments/ledger first
	if !strings.Contains(team, `"rotation_period": "2160h"`) {
		t.Fatalf("the team file has no rotation period to shorten:\n%s", team)
	}
	c.writeFile(filepath.Join(c.teams, "payments.json"), strings.Replace(team, `"rotation_period": "2160h"`, `"rotation_period": "1s"`, 1))
	before := c.served()
	v1 := c.primaryOf(rotLedger)
	time.Sleep(1500 * time.Millisecond)

	// Its bundles are kept in the regionctl directory: the secret scan at
	// the end opens them for the new version's key.
	r := c.rcOK("rotate", "--due", "--bake", "1s", "--order", "us-east,eu-west", "--out-dir", filepath.Join(c.dir, "rotate"))
	added := regexp.MustCompile(`done: keyset ` + regexp.QuoteMeta(rotLedger) + `: added version (\d+)`).FindStringSubmatch(r.Stdout)
	if added == nil {
		t.Fatalf("rotate --due added no version of %s:\n%s", rotLedger, r)
	}
	// The plan: one us-east server, the other, then eu-west.
	for _, line := range []string{
		"stage 1/3 canary: us-east [" + c.kms["us-east"][0].Addr + "]",
		"stage 2/3 region us-east: us-east [" + c.kms["us-east"][1].Addr + "]",
		"stage 3/3 wave 1: eu-west [" + c.kms["eu-west"][0].Addr + "]",
	} {
		if !strings.Contains(r.Stdout, line) {
			t.Fatalf("rotate --due's rollout plan lacks %q:\n%s", line, r.Stdout)
		}
	}
	// Each stage applies only after the one before passed its gates.
	var at []int
	for _, line := range []string{
		"stage 1/3 canary: applying", "stage 1/3 canary passed its gates",
		"stage 2/3 region us-east: applying", "stage 2/3 region us-east passed its gates",
		"stage 3/3 wave 1: applying", "stage 3/3 wave 1 passed its gates",
		"completed: every stage passed",
	} {
		i := strings.Index(r.Stdout, line)
		if i < 0 || len(at) > 0 && i < at[len(at)-1] {
			t.Fatalf("rotate --due's output lacks %q after the stage before it:\n%s", line, r.Stdout)
		}
		at = append(at, i)
	}
	for id, was := range before {
		if now := c.served()[id]; now == was {
			t.Errorf("%s still serves %s after the rollout", id, was)
		}
	}
	for _, region := range c.regs {
		for _, k := range c.kms[region] {
			st, err := k.Status()
			if err != nil {
				t.Fatal(err)
			}
			for _, ks := range st.GetKeysets() {
				if ks.GetKeyset() == rotLedger && (ks.GetPrimaryKeyId() != v1 || len(ks.GetVersions()) != 2) {
					t.Errorf("%s serves %s with primary %d and %d versions, want primary %d and the added version %s decrypt-only",
						k.Identity, rotLedger, ks.GetPrimaryKeyId(), len(ks.GetVersions()), v1, added[1])
				}
			}
		}
	}
	// The rollout is on record in the root KMS.
	id := regexp.MustCompile(`rollout (\S+) stored`).FindStringSubmatch(r.Stdout)
	if id == nil {
		t.Fatalf("rotate --due stored no rollout:\n%s", r.Stdout)
	}
	if st := c.rcOK("rollout", "status", id[1]); !strings.Contains(st.Stdout, "rotate --due") || !strings.Contains(st.Stdout, "completed") {
		t.Errorf("rollout status %s does not show rotate --due's completed rollout:\n%s", id[1], st.Stdout)
	}

	// Nothing due (the window has not passed): nothing rolled out.
	after := c.served()
	r = c.rcOK("rotate", "--due", "--bake", "1s")
	if strings.Contains(r.Stdout, "rollout ") {
		t.Errorf("rotate --due with nothing due started a rollout:\n%s", r.Stdout)
	}
	c.requireServedUnchanged(after, "rotate --due with nothing due")
	c.requireNoSecrets()
	t.Logf("scenario took %s", time.Since(start).Round(time.Millisecond))
}
