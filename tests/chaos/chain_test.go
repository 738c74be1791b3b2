package chaos

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/tests/framework"
)

// The chain's shape: two regions of two KMS servers, three voters, three
// distributors (full peer mesh, so a restarted one unseals from a peer).
var (
	regions      = []string{"eu-west", "us-east"}
	kmsNames     = []string{"kms-1", "kms-2"}
	voterCount   = 3
	distributors = 3
)

// keysetSpec is one keyset of the chaos team and the regions it is in.
type keysetSpec struct {
	name    string
	regions []string
}

// keysets: one in both regions (decrypts fall back to the other region),
// and one of each region alone (no fallback).
var keysets = []keysetSpec{
	{"chaos/shared", []string{"eu-west", "us-east"}},
	{"chaos/east", []string{"us-east"}},
	{"chaos/west", []string{"eu-west"}},
}

// clientOf is the identity of region's workload clients (made by `cairn dev
// certs`).
func clientOf(region string) string { return "client/" + region + "/demo" }

// chain is the running chain of one soak.
type chain struct {
	t      *testing.T
	w      *framework.World
	m      *safev1.GenesisManifest
	safes  []framework.SafeConfig
	ds     []*framework.Distributor
	voters []*framework.Replica
	kms    map[string][]*framework.KMSServer // by region
	// raftProxy is, by voter ID, the fault proxy the voter's peers reach
	// its Raft transport through (its --raft-advertise); rootProxies are
	// the ones the KMS servers reach the root KMS API through (their
	// --rootkms), one per voter.
	raftProxy   map[string]*framework.FaultProxy
	rootProxies []*framework.FaultProxy
	dir         string // regionctl's files
	config      string // regionctl's config file
	// drv is the SRE driver; startChain creates the regions through it.
	drv *driver

	mu sync.Mutex
	// serial is, by region, the last bundle a push applied on every
	// server of the region (set by startChain and the driver).
	serial map[string]uint64

	// paused are the voters that were ever paused (a deposed leader may
	// hang on SIGTERM: a known hashicorp/raft defect).
	paused map[string]bool
	// violations are the invariants the fault steps found broken;
	// firstViolation is when the step of the first one began.
	violations     []string
	firstViolation time.Time
	// regionKeys are every region key version the voters served at the
	// end (the secret scan looks for them; RequireNoSecrets clears them).
	regionKeys []framework.Secret
}

// topology is what the schedule may fault.
func (c *chain) topology() Topology {
	t := Topology{KMS: map[string][]string{}}
	for _, r := range regions {
		t.KMS[r] = slices.Clone(kmsNames)
	}
	for _, v := range c.voters {
		t.Voters = append(t.Voters, v.ID)
	}
	for i := range c.ds {
		t.Distributors = append(t.Distributors, fmt.Sprintf("distributor-%d", i+1))
	}
	return t
}

// startChain starts the whole chain: dev certs, 3 file safes with a 2-of-3
// genesis into every distributor, the voters (fast Raft timeouts), regionctl
// (signing keys, config, the chaos team), both regions with their keysets,
// and a bundle built and pushed to every KMS server.
func startChain(t *testing.T) *chain {
	t.Helper()
	start := time.Now()
	w := framework.NewWorld(t, bin)
	c := &chain{t: t, w: w, kms: map[string][]*framework.KMSServer{}, serial: map[string]uint64{}, paused: map[string]bool{}, dir: filepath.Join(w.Dir, "regionctl")}
	for _, r := range regions {
		w.Mint("kms/" + r + "/kms-2") // `cairn dev certs` made kms-1
	}
	safes := w.FileSafes(3)
	c.safes = safes
	c.ds = w.Distributors(distributors, true)
	var dAddrs []string
	for _, d := range c.ds {
		d.Start()
		dAddrs = append(dAddrs, d.Addr)
	}
	for _, d := range c.ds {
		d.WaitState(distributorv1.SealState_SEAL_STATE_SEALED)
	}
	c.m = w.Genesis(2, safes, c.ds...)
	for _, d := range c.ds {
		c.waitUnsealed(d)
	}

	var specs []framework.ReplicaSpec
	for i := 1; i <= voterCount; i++ {
		specs = append(specs, framework.Voter(i))
	}
	opts := framework.FastRaft(w.ManifestPath(), dAddrs...)
	opts.SafetyWindow = safetyWindow
	c.voters = w.RootKMSCluster(opts, specs...)
	c.raftProxy = map[string]*framework.FaultProxy{}
	var rootAPIs []string
	for _, v := range c.voters {
		p := framework.NewFaultProxy(t, "raft of "+v.ID, v.RaftAddr)
		v.AppendArgs("--raft-advertise", p.Addr())
		c.raftProxy[v.ID] = p
		api := framework.NewFaultProxy(t, "API of "+v.ID, v.API)
		c.rootProxies = append(c.rootProxies, api)
		rootAPIs = append(rootAPIs, api.Addr())
	}
	c.voters[0].Start()
	framework.WaitLeader(c.voters[0])
	for _, v := range c.voters[1:] {
		v.Start()
	}
	for _, v := range c.voters {
		v.WaitServing()
	}

	keys, teams := filepath.Join(c.dir, "keys"), filepath.Join(c.dir, "teams")
	w.RegionctlOK("keys", "generate", "--out", keys)
	cfgRegions := map[string][]string{}
	for _, r := range regions {
		var ids []string
		for _, n := range kmsNames {
			ids = append(ids, "kms/"+r+"/"+n)
		}
		c.kms[r] = w.KMSServers(r, filepath.Join(keys, "bundle-signing.pub"), rootAPIs, ids...)
		for _, k := range c.kms[r] {
			k.Start()
			cfgRegions[r] = append(cfgRegions[r], k.Addr)
		}
	}
	for _, k := range c.allKMS() {
		k.WaitStatus("answering GetStatus", func(*kmsv1.GetStatusResponse) bool { return true })
	}
	c.config = filepath.Join(c.dir, "regionctl.json")
	c.writeJSON(c.config, map[string]any{
		"trust_domain": framework.TrustDomain,
		"identity":     map[string]string{"dev_certs": w.Certs, "name": framework.Regionctl},
		"rootkms":      framework.Addrs(c.voters...),
		"regions":      cfgRegions,
		"signing_key":  filepath.Join(keys, "bundle-signing.key"),
		"signing_pubs": []string{filepath.Join(keys, "bundle-signing.pub")},
		"teams":        teams,
		// The window the bundles carry and regionctl's checks use: the
		// root KMS's (compressed clock).
		"propagation_window": safetyWindow.String(),
	})
	c.writeJSON(filepath.Join(teams, "chaos.json"), chaosTeam())
	// The regions are created as `regionctl region create` does (one
	// CreateRegion), through the driver's recorded client.
	c.drv = newDriver(c)
	c.drv.connect()
	c.drv.createRegions(t)
	if r := c.rcOK("keyset", "create"); !strings.Contains(r.Stdout, fmt.Sprintf("%d created", len(keysets))) {
		t.Fatalf("keyset create printed %q, want %d created", r.Stdout, len(keysets))
	}
	for _, r := range regions {
		c.buildPush(r)
	}
	t.Logf("chain up (3 distributors, %d voters, %d regions × %d KMS servers, %d keysets) in %s",
		voterCount, len(regions), len(kmsNames), len(keysets), time.Since(start).Round(time.Millisecond))
	return c
}

// chaosTeam is the team file: each keyset in its regions, on the
// compressed clock (rotationPeriod, ciphertextTTL), usable (encrypt and
// decrypt) by the clients of every region of the chain, so that a client
// decrypts in its fallback region under its own identity.
func chaosTeam() map[string]any {
	var acl []string
	for _, r := range regions {
		acl = append(acl, "client/"+r+"/*")
	}
	var kss []any
	for _, k := range keysets {
		kss = append(kss, map[string]any{"name": k.name, "regions": k.regions, "purpose": "envelope",
			"rotation_period": rotationPeriod.String(), "ciphertext_ttl": ciphertextTTL.String(), "acl": map[string]any{"encrypt": acl, "decrypt": acl}})
	}
	return map[string]any{"team": "chaos", "keysets": kss}
}

func (c *chain) writeJSON(path string, v any) {
	c.t.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		c.t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		c.t.Fatal(err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o600); err != nil {
		c.t.Fatal(err)
	}
}

// rcOK runs regionctl with the chain's config file and fails the test
// unless it exits 0.
func (c *chain) rcOK(args ...string) framework.Result {
	c.t.Helper()
	return c.w.RegionctlOK(append(args, "--config", c.config)...)
}

var serialRE = regexp.MustCompile(`bundle \S+ serial (\d+) sha256`)

// buildPush builds region's next bundle, pushes it, and waits until every
// server of the region serves it.
func (c *chain) buildPush(region string) {
	c.t.Helper()
	out := filepath.Join(c.dir, fmt.Sprintf("%s-start.bundle", region))
	r := c.rcOK("bundle", "build", "--region", region, "--out", out)
	m := serialRE.FindStringSubmatch(r.Stdout)
	if m == nil {
		c.t.Fatalf("bundle build printed %q, want the serial", r.Stdout)
	}
	serial, err := strconv.ParseUint(m[1], 10, 64)
	if err != nil {
		c.t.Fatal(err)
	}
	c.rcOK("bundle", "push", "--bundle", out)
	for _, k := range c.kms[region] {
		k.WaitServing(serial)
	}
	c.served(region, serial)
}

// served records that every server of region applied bundle serial.
func (c *chain) served(region string, serial uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.serial[region] = max(c.serial[region], serial)
}

// servedSerial is the last bundle of region a push applied on every
// server.
func (c *chain) servedSerial(region string) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.serial[region]
}

func (c *chain) waitUnsealed(d *framework.Distributor) {
	c.t.Helper()
	st, _ := d.WaitState(distributorv1.SealState_SEAL_STATE_UNSEALED)
	if st.GetGenesisId() != c.m.GetGenesisId() {
		c.t.Fatalf("%s unsealed with genesis %s, want %s", d.Name, st.GetGenesisId(), c.m.GetGenesisId())
	}
}

// allKMS is every KMS server, region by region.
func (c *chain) allKMS() []*framework.KMSServer {
	var out []*framework.KMSServer
	for _, r := range regions {
		out = append(out, c.kms[r]...)
	}
	return out
}

// kmsServer returns the KMS server "<region>/<name>".
func (c *chain) kmsServer(target string) *framework.KMSServer {
	c.t.Helper()
	region, name, _ := strings.Cut(target, "/")
	for _, k := range c.kms[region] {
		if k.Identity == "kms/"+region+"/"+name {
			return k
		}
	}
	c.t.Fatalf("no KMS server %q", target)
	return nil
}

func (c *chain) voter(id string) *framework.Replica {
	c.t.Helper()
	for _, v := range c.voters {
		if v.ID == id {
			return v
		}
	}
	c.t.Fatalf("no voter %q", id)
	return nil
}

func (c *chain) distributor(name string) *framework.Distributor {
	c.t.Helper()
	for _, d := range c.ds {
		if strings.HasSuffix(d.Name, "/"+name) {
			return d
		}
	}
	c.t.Fatalf("no distributor %q", name)
	return nil
}
