package tests

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/aead"

	"github.com/cairnkms/cairn/kmsclient"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/tests/framework"
)

// The ports every host uses: on hosts of their own, the servers keep the
// example configs' ports.
const (
	distributorPort = 7101
	rootAPIPort     = 7201
	rootRaftPort    = 7301
	kmsPort         = 7401
	transitPort     = 8200
)

// Bounds of the partition windows.
const (
	// hostsWindow is how long the clients call during each partition.
	hostsWindow = 4 * time.Second
	// hostsMaxCalls bounds the round trips of one client in one window.
	hostsMaxCalls = 100000
	// hostsMinCalls is the fewest round trips a client of a region that
	// kept its KMS servers must have made in a window for its zero errors
	// to mean something.
	hostsMinCalls = 100
	// hostsKeyset is the keyset of both regions.
	hostsKeyset = "payments/ledger"
)

var hostsRegions = []string{"us-east", "eu-west"}

// hostsTeam is the one team file: payments/ledger in both regions, for the
// demo client of each.
const hostsTeam = `{"team":"payments","keysets":[
  {"name":"payments/ledger","regions":["us-east","eu-west"],"purpose":"envelope",
   "rotation_period":"2160h","ciphertext_ttl":"8760h",
   "acl":{"encrypt":["client/us-east/*","client/eu-west/*"],"decrypt":["client/us-east/*","client/eu-west/*"]}}]}`

// hostsChain is the chain of TestDistinctHosts: every component on a host
// of its own.
type hostsChain struct {
	t *testing.T
	w *framework.World
	// officer runs the safe tool; ops runs regionctl and is where the
	// test's own status calls come from.
	officer, ops *framework.Host
	hosts        []*framework.Host
	safes        []framework.SafeConfig
	m            *safev1.GenesisManifest
	dists        []*framework.Distributor
	voters       []*framework.Replica
	kms          map[string][]*framework.KMSServer
	hostOf       map[*framework.Process]*framework.Host
	clientHost   map[string]*framework.Host
	rcConfig     string
	runs         int
}

// TestDistinctHosts is issue 15's distinct-hosts test: 3 distributors, 3
// root KMS voters, and two KMS servers in each of us-east and eu-west, each
// on a host of its own (a network namespace with its own IP on a bridge),
// started with --config files made from deploy/config's examples; genesis
// and an unseal ceremony from an officer's host; regionctl from an
// operator's host; a kmsclient per region calling from a client host.
//
// Partitions: (1) the root KMS leader's host is cut off: the others elect a
// leader and take a regionctl write, and once the link is back the old
// leader catches up to the same applied index; (2) the root KMS hosts and
// eu-west's KMS hosts are cut off together: us-east, which kept its KMS
// servers, sees no client error, and eu-west no success; once healed the
// root KMS takes writes again, a restarted us-east KMS server fetches its
// region key across the network, and eu-west serves again.
func TestDistinctHosts(t *testing.T) {
	start := time.Now()
	c := startHostsChain(t)
	var hosts []string
	for _, h := range c.hosts {
		hosts = append(hosts, h.Name+"="+h.IP)
	}
	t.Logf("chain up on %d hosts in %s: %s", len(c.hosts), time.Since(start).Round(time.Millisecond), strings.Join(hosts, " "))

	clients := map[string]*kmsclient.EnvelopeAEAD{}
	for _, region := range hostsRegions {
		timeout, attempt := 5*time.Second, time.Second
		if region == "eu-west" {
			// Its servers go away in the second partition: fail fast there.
			timeout, attempt = time.Second, 250*time.Millisecond
		}
		clients[region] = c.envelopeClient(region, timeout, attempt)
		for i := range 20 {
			if err := hostsRoundTrip(context.Background(), clients[region], i); err != nil {
				t.Fatalf("%s client: envelope round trip %d: %v", region, i, err)
			}
		}
	}
	t.Logf("both regions: 20 envelope round trips each from their client hosts")

	// (1) The root KMS leader's host is cut off.
	old, _, _ := framework.WaitLeader(c.voters...)
	var others []*framework.Replica
	for _, v := range c.voters {
		if v != old {
			others = append(others, v)
		}
	}
	cutAt := time.Now()
	c.hostOf[old.Process].Partition()
	loads := c.startLoads(clients)
	newLeader, _, _ := framework.WaitLeader(others...)
	t.Logf("partition 1: %s (leader) cut off; %s leads %s later", old.ID, newLeader.ID, time.Since(cutAt).Round(time.Millisecond))
	c.regionctlOK("region", "create", "--region", "ap-south")
	st, err := newLeader.Status()
	if err != nil {
		t.Fatalf("GetClusterStatus(%s) = %v", newLeader.ID, err)
	}
	index := st.GetAppliedIndex()
	t.Logf("partition 1: regionctl region create through %s: applied index %d, %s after the cut", newLeader.ID, index, time.Since(cutAt).Round(time.Millisecond))
	if probe, err := old.Status(); err == nil {
		t.Errorf("GetClusterStatus(%s) while its host is cut off = %v, want no answer", old.ID, probe)
	}
	for _, r := range loads.wait() {
		r.require(t, "partition 1", true)
	}
	healAt := time.Now()
	c.hostOf[old.Process].Heal()
	caughtUp := old.WaitApplied(index)
	leader, _, _ := framework.WaitLeader(c.voters...)
	old.WaitStatus("at the leader's applied index", func(st *rootkmsv1.ClusterStatus) bool {
		lst, err := leader.Status()
		return err == nil && st.GetLeaderId() == leader.ID && st.GetAppliedIndex() == lst.GetAppliedIndex() && st.GetAppliedIndex() >= index
	})
	t.Logf("partition 1 healed: %s applied index %d after %s, at %s's applied index after %s", old.ID, index,
		caughtUp.Round(time.Millisecond), leader.ID, time.Since(healAt).Round(time.Millisecond))

	// (2) The root KMS tier and eu-west's KMS servers are cut off; us-east
	// keeps its KMS servers and its client host.
	var cut []*framework.Host
	for _, v := range c.voters {
		cut = append(cut, c.hostOf[v.Process])
	}
	for _, k := range c.kms["eu-west"] {
		cut = append(cut, c.hostOf[k.Process])
	}
	for _, h := range cut {
		h.Partition()
	}
	cutAt = time.Now()
	loads = c.startLoads(clients)
	for _, v := range c.voters {
		if probe, err := v.Status(); err == nil {
			t.Errorf("GetClusterStatus(%s) while the root KMS hosts are cut off = %v, want no answer", v.ID, probe)
		}
	}
	for _, r := range loads.wait() {
		r.require(t, "partition 2", r.region == "us-east")
	}
	for _, h := range cut {
		h.Heal()
	}
	healAt = time.Now()
	t.Logf("partition 2: healed after %s", healAt.Sub(cutAt).Round(time.Millisecond))
	leader, _, took := framework.WaitLeader(c.voters...)
	c.regionctlOK("region", "create", "--region", "ap-east")
	t.Logf("partition 2 healed: %s leads (%s), regionctl region create ok %s after the heal", leader.ID, took.Round(time.Millisecond), time.Since(healAt).Round(time.Millisecond))
	// A us-east KMS server restarted now fetches its region key from the
	// root KMS across the network again.
	k := c.kms["us-east"][1]
	k.Stop()
	k.Start()
	_, took = k.WaitServing(1)
	t.Logf("%s restarted after the heal: SERVING bundle 1 (region key from the root KMS) in %s", k.Identity, took.Round(time.Millisecond))
	for _, region := range hostsRegions {
		n, took := c.waitRoundTrip(clients[region])
		t.Logf("%s client after the heal: a round trip succeeded after %d failed attempts, %s", region, n, took.Round(time.Millisecond))
		for i := range 20 {
			if err := hostsRoundTrip(context.Background(), clients[region], i); err != nil {
				t.Errorf("%s client after the heal: round trip %d: %v", region, i, err)
			}
		}
	}
	requireNoKeyMaterial(t, c.w, c.m, c.safes, nil)
	t.Logf("scenario took %s", time.Since(start).Round(time.Millisecond))
}

// startHostsChain makes the network and starts the chain on it, ready to
// serve bundle serial 1 in both regions.
func startHostsChain(t *testing.T) *hostsChain {
	t.Helper()
	w := framework.NewWorld(t, bin)
	n := framework.NewNetwork(t)
	c := &hostsChain{t: t, w: w, kms: map[string][]*framework.KMSServer{},
		hostOf: map[*framework.Process]*framework.Host{}, clientHost: map[string]*framework.Host{}}
	addHost := func(name string) *framework.Host {
		h := n.AddHost(name)
		c.hosts = append(c.hosts, h)
		return h
	}
	c.officer, c.ops = addHost("officer"), addHost("ops")
	w.Dialer = c.ops.Dial
	for _, region := range hostsRegions {
		w.Mint("kms/" + region + "/kms-2")
	}

	distHosts := make([]*framework.Host, 3)
	rootHosts := make([]*framework.Host, 3)
	for i := range 3 {
		distHosts[i] = addHost(fmt.Sprintf("dist-%d", i+1))
		rootHosts[i] = addHost(fmt.Sprintf("rootkms-%d", i+1))
	}
	kmsHosts := map[string][]*framework.Host{}
	for _, region := range hostsRegions {
		for i := range 2 {
			kmsHosts[region] = append(kmsHosts[region], addHost(fmt.Sprintf("kms-%d-%s", i+1, region)))
		}
		c.clientHost[region] = addHost("client-" + region)
	}
	hostAddrs := func(hs []*framework.Host, port int) []string {
		var out []string
		for _, h := range hs {
			out = append(out, h.Addr(port))
		}
		return out
	}
	distAddrs, rootAPIs := hostAddrs(distHosts, distributorPort), hostAddrs(rootHosts, rootAPIPort)

	// Genesis on the officer's host: the key goes to no distributor; the
	// fleet gets it through an unseal ceremony.
	safes := w.FileSafes(3)
	c.safes = safes
	args := append([]string{"genesis"}, w.IDFlags(framework.Officer(1))...)
	args = append(args, "--threshold", "2", "--manifest", w.ManifestPath())
	var officers []string
	for i, s := range safes {
		args = append(args, "--safe", s.Path)
		officers = append(officers, framework.SPIFFEID(framework.Officer(i+1)))
	}
	c.runOK(c.officer, "safe-genesis", bin.Safe, append(args, "--officers", strings.Join(officers, ","))...)
	m, err := safe.ReadManifest(w.ManifestPath())
	if err != nil {
		t.Fatalf("safe.ReadManifest = %v", err)
	}
	c.m = m

	for i, h := range distHosts {
		name := fmt.Sprintf("distributor/global/distributor-%d", i+1)
		state := filepath.Join(w.Dir, "state", fmt.Sprintf("distributor-%d", i+1))
		var peers []string
		for j, a := range distAddrs {
			if j != i {
				peers = append(peers, a)
			}
		}
		cfg := c.config(h, fmt.Sprintf("distributor-%d.yaml", i+1), c.identity(name), map[string]any{
			"listen": h.Addr(distributorPort), "state_dir": state, "manifest": w.ManifestPath(), "peers": peers,
			"metrics_listen": h.Addr(9101),
		})
		p := c.process(h, fmt.Sprintf("distributor-%d", i+1), bin.Distributor, "--config", cfg)
		d := w.NewDistributorAt(p, name, h.Addr(distributorPort), state)
		d.Start()
		c.dists = append(c.dists, d)
	}
	for _, d := range c.dists {
		d.WaitState(sealed)
	}
	ceremonyStart := time.Now()
	d1 := c.dists[0]
	open := c.runOK(c.officer, "safe-ceremony-open", bin.Safe, append([]string{"ceremony", "open", "--distributor", d1.Addr}, w.IDFlags(framework.Officer(1))...)...)
	id := regexp.MustCompile(`(?m)^ceremony ([0-9a-f]{32}) \(UNSEAL\): OPEN, `).FindStringSubmatch(open.Stdout)
	if id == nil {
		t.Fatalf("safe ceremony open printed %q, want the ceremony id", open.Stdout)
	}
	for _, i := range []int{1, 2} {
		c.runOK(c.officer, fmt.Sprintf("safe-release-%d", i), bin.Safe, append([]string{"release", "--distributor", d1.Addr, "--ceremony", id[1],
			"--safe", safes[i-1].Path, "--manifest", w.ManifestPath()}, w.IDFlags(framework.Officer(i))...)...)
	}
	requireUnsealedBy(t, d1, waitUnsealed(t, d1, m), "ceremony:"+id[1])
	for _, d := range c.dists[1:] {
		requireUnsealedBy(t, d, waitUnsealed(t, d, m), "peer:")
	}
	t.Logf("distributors unsealed: a 2-of-3 ceremony from the officer's host on %s, the others from a peer, in %s", d1.Name, time.Since(ceremonyStart).Round(time.Millisecond))

	for i, h := range rootHosts {
		spec := framework.Voter(i + 1)
		dataDir := filepath.Join(w.Dir, "state", spec.ID)
		set := map[string]any{
			"listen": h.Any() + ":" + strconv.Itoa(rootAPIPort), "api_advertise": h.Addr(rootAPIPort),
			"raft_listen": h.Any() + ":" + strconv.Itoa(rootRaftPort), "raft_advertise": h.Addr(rootRaftPort),
			"data_dir": dataDir, "manifest": w.ManifestPath(), "distributors": distAddrs,
			"metrics_listen": h.Addr(9201), "mlock": c.mlock(),
		}
		if i > 0 {
			var join []string
			for j, a := range rootAPIs {
				if j != i {
					join = append(join, a)
				}
			}
			set["join"] = join
		}
		cfg := c.config(h, fmt.Sprintf("rootkms-%d.yaml", i+1), c.identity(spec.Identity), set)
		args := []string{"--config", cfg}
		if i == 0 {
			args = append(args, "--bootstrap") // the first start of the first voter only
		}
		r := w.NewReplicaAt(c.process(h, spec.ID, bin.RootKMS, args...), spec, h.Addr(rootAPIPort), h.Addr(rootRaftPort), dataDir)
		c.voters = append(c.voters, r)
	}
	c.voters[0].Start()
	framework.WaitLeader(c.voters[0])
	for _, r := range c.voters[1:] {
		r.Start()
	}
	for _, r := range c.voters {
		r.WaitServing()
	}
	if _, st, _ := framework.WaitLeader(c.voters...); len(st.GetMembers()) != 3 {
		t.Fatalf("the leader's configuration has %d members, want 3: %v", len(st.GetMembers()), st.GetMembers())
	}

	// regionctl on the operator's host: signing keys, its config, the
	// regions, the keyset, then a bundle per region once the KMS servers run.
	rc := filepath.Join(w.Dir, "regionctl")
	keys, teams := filepath.Join(rc, "keys"), filepath.Join(rc, "teams")
	writeHostsFile(t, filepath.Join(teams, "payments.json"), hostsTeam)
	c.runOK(c.ops, "regionctl-keys", bin.RegionctlBinary(), "keys", "generate", "--out", keys)
	admins := filepath.Join(rc, "kms-admins.txt")
	writeHostsFile(t, admins, "# who may call KMSAdmin\nregionctl/global/*\n")
	regions := map[string][]string{}
	for _, region := range hostsRegions {
		for i, h := range kmsHosts[region] {
			name := fmt.Sprintf("kms/%s/kms-%d", region, i+1)
			state := filepath.Join(w.Dir, "state", strings.ReplaceAll(name, "/", "-"))
			cfg := c.config(h, fmt.Sprintf("kms-%s-%d.yaml", region, i+1), c.identity(name), map[string]any{
				"listen": h.Any() + ":" + strconv.Itoa(kmsPort), "transit_listen": h.Any() + ":" + strconv.Itoa(transitPort),
				"state_dir": state, "rootkms": rootAPIs, "signing_key": []string{filepath.Join(keys, "bundle-signing.pub")},
				"admins_file": admins, "metrics_listen": h.Addr(9401), "mlock": c.mlock(),
			})
			k := w.NewKMSServerAt(c.process(h, strings.ReplaceAll(name, "/", "-"), bin.KMSBinary(), "--config", cfg), name, region, h.Addr(kmsPort), state)
			k.Start()
			c.kms[region] = append(c.kms[region], k)
			regions[region] = append(regions[region], k.Addr)
		}
	}
	c.rcConfig = filepath.Join(rc, "regionctl.json")
	data, err := json.MarshalIndent(map[string]any{
		"trust_domain": framework.TrustDomain,
		"identity":     map[string]string{"dev_certs": w.Certs, "name": framework.Regionctl},
		"rootkms":      rootAPIs,
		"regions":      regions,
		"signing_key":  filepath.Join(keys, "bundle-signing.key"),
		"signing_pubs": []string{filepath.Join(keys, "bundle-signing.pub")},
		"teams":        teams,
	}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	writeHostsFile(t, c.rcConfig, string(data))
	for _, region := range hostsRegions {
		c.regionctlOK("region", "create", "--region", region)
	}
	if r := c.regionctlOK("keyset", "create"); !strings.Contains(r.Stdout, "1 created") {
		t.Fatalf("keyset create printed %q, want 1 created", r.Stdout)
	}
	for _, region := range hostsRegions {
		for _, k := range c.kms[region] {
			k.WaitStatus("NOT_READY waiting for a bundle", func(st *kmsv1.GetStatusResponse) bool {
				return st.GetState() == kmsv1.ServingState_SERVING_STATE_NOT_READY
			})
		}
		out := filepath.Join(rc, region+"-1.bundle")
		c.regionctlOK("bundle", "build", "--region", region, "--serial", "1", "--out", out)
		c.regionctlOK("bundle", "push", "--bundle", out)
		for _, k := range c.kms[region] {
			if st, _ := k.WaitServing(1); st.GetKeysetCount() != 1 || st.GetRegion() != region {
				t.Fatalf("%s: status %v, want region %s with 1 keyset", k.Identity, st, region)
			}
		}
	}
	return c
}

// identity is the config keys that make a server run as name: the dev CA's
// files for it, as a deployment's cert, key and ca.
func (c *hostsChain) identity(name string) map[string]any {
	dir := filepath.Join(append([]string{c.w.Certs}, strings.Split(name, "/")...)...)
	return map[string]any{"trust_domain": framework.TrustDomain, "cert": filepath.Join(dir, "cert.pem"),
		"key": filepath.Join(dir, "key.pem"), "ca": filepath.Join(c.w.Certs, "ca.pem")}
}

// mlock is the examples' mlock: "on", which needs root (or CAP_IPC_LOCK);
// in the loopback fallback run by another user, "auto".
func (c *hostsChain) mlock() string {
	if os.Geteuid() == 0 {
		return "on"
	}
	return "auto"
}

// config writes the host's config file: deploy/config/<example> with the
// values of the keys in id and set replaced (each must be a key of the
// example, so the test follows the examples' shape), and returns its path.
func (c *hostsChain) config(h *framework.Host, example string, id, set map[string]any) string {
	c.t.Helper()
	root, err := framework.ModuleRoot()
	if err != nil {
		c.t.Fatal(err)
	}
	src, err := os.ReadFile(filepath.Join(root, "deploy", "config", example))
	if err != nil {
		c.t.Fatal(err)
	}
	all := maps.Clone(id)
	maps.Copy(all, set)
	seen := map[string]bool{}
	var out []string
	key := regexp.MustCompile(`^([a-z_]+):`)
	for line := range strings.Lines(string(src)) {
		line = strings.TrimRight(line, "\n")
		if m := key.FindStringSubmatch(line); m != nil {
			if v, ok := all[m[1]]; ok {
				line = m[1] + ": " + yamlValue(v)
				seen[m[1]] = true
			}
		}
		out = append(out, line)
	}
	for k := range all {
		if !seen[k] {
			c.t.Fatalf("deploy/config/%s has no key %s to set", example, k)
		}
	}
	path := filepath.Join(c.w.Dir, "hosts", h.Name, example)
	writeHostsFile(c.t, path, fmt.Sprintf("# %s, from deploy/config/%s, on host %s (%s)\n%s\n", filepath.Base(path), example, h.Name, h.IP, strings.Join(out, "\n")))
	return path
}

// yamlValue is v as a YAML flow value: a double-quoted string or a list of
// them.
func yamlValue(v any) string {
	switch v := v.(type) {
	case string:
		return strconv.Quote(v)
	case []string:
		var q []string
		for _, s := range v {
			q = append(q, strconv.Quote(s))
		}
		return "[" + strings.Join(q, ", ") + "]"
	default:
		panic(fmt.Sprintf("yamlValue(%T)", v))
	}
}

func writeHostsFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}

// process describes a server process on host h.
func (c *hostsChain) process(h *framework.Host, name, path string, args ...string) *framework.Process {
	p := h.NewProcess(name, c.w.Logs, path, args)
	c.hostOf[p] = h
	return p
}

// runOK runs a one-shot command on host h and fails the test unless it
// exits 0.
func (c *hostsChain) runOK(h *framework.Host, name, path string, args ...string) framework.Result {
	c.t.Helper()
	c.runs++
	r := h.Run(fmt.Sprintf("h%03d-%s", c.runs, name), c.w.Logs, path, args...)
	if r.ExitCode != 0 {
		c.t.Fatalf("%s on host %s failed:\n%s", name, h.Name, r)
	}
	return r
}

// regionctlOK runs regionctl with the chain's config on the operator's
// host.
func (c *hostsChain) regionctlOK(args ...string) framework.Result {
	c.t.Helper()
	name := "regionctl"
	for _, a := range args[:min(2, len(args))] {
		name += "-" + a
	}
	return c.runOK(c.ops, name, bin.RegionctlBinary(), append(args, "--config", c.rcConfig)...)
}

// envelopeClient is the demo client of region on its client host:
// kmsclient with the region's KMS servers as endpoints, reached through
// forwarders that dial from the client host, under an envelope AEAD.
func (c *hostsChain) envelopeClient(region string, timeout, attempt time.Duration) *kmsclient.EnvelopeAEAD {
	c.t.Helper()
	var eps []string
	for _, k := range c.kms[region] {
		eps = append(eps, c.clientHost[region].Forward(k.Addr))
	}
	kc, err := kmsclient.New(kmsclient.WithSource(c.w.Source("client/"+region+"/demo")), kmsclient.WithEndpoints(region, eps...),
		kmsclient.WithTimeout(timeout), kmsclient.WithAttemptTimeout(attempt))
	if err != nil {
		c.t.Fatalf("kmsclient.New(%s) = %v", region, err)
	}
	c.t.Cleanup(func() { kc.Close() })
	kek, err := kc.AEAD(region, hostsKeyset)
	if err != nil {
		c.t.Fatal(err)
	}
	env, err := kmsclient.NewEnvelopeAEAD(aead.AES256GCMKeyTemplate(), kek)
	if err != nil {
		c.t.Fatal(err)
	}
	return env
}

// waitRoundTrip retries envelope round trips until one succeeds, at most
// framework.WaitTimeout, and returns how many failed first and how long it
// took.
func (c *hostsChain) waitRoundTrip(env *kmsclient.EnvelopeAEAD) (int, time.Duration) {
	c.t.Helper()
	start := time.Now()
	var err error
	for n := 0; time.Since(start) < framework.WaitTimeout; n++ {
		if err = hostsRoundTrip(context.Background(), env, n); err == nil {
			return n, time.Since(start)
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.t.Fatalf("no envelope round trip succeeded within %s: last error %v", framework.WaitTimeout, err)
	return 0, 0
}

// hostsRoundTrip encrypts a random object with env and decrypts it.
func hostsRoundTrip(ctx context.Context, env *kmsclient.EnvelopeAEAD, i int) error {
	obj := make([]byte, 256)
	rand.Read(obj)
	ad := fmt.Appendf(nil, "object %d", i)
	ct, err := env.EncryptWithContext(ctx, obj, ad)
	if err != nil {
		return fmt.Errorf("Encrypt: %w", err)
	}
	if bytes.Contains(ct, obj) {
		return fmt.Errorf("Encrypt: the ciphertext holds the plaintext")
	}
	back, err := env.DecryptWithContext(ctx, ct, ad)
	if err != nil {
		return fmt.Errorf("Decrypt: %w", err)
	}
	if !bytes.Equal(back, obj) {
		return fmt.Errorf("Decrypt: another object came back")
	}
	return nil
}

// loadResult is what one client saw in one partition window.
type loadResult struct {
	region      string
	calls, errs int
	first       error
	took        time.Duration
}

// require checks a window's result: a region that kept its KMS servers
// (served) made at least hostsMinCalls round trips and none failed; one
// that lost them had none succeed.
func (r loadResult) require(t *testing.T, when string, served bool) {
	t.Helper()
	rate := float64(r.calls) / r.took.Seconds()
	t.Logf("%s: %s client: %d round trips, %d errors in %s (%.0f/s); first error: %v", when, r.region, r.calls, r.errs, r.took.Round(time.Millisecond), rate, r.first)
	if served && (r.errs != 0 || r.calls < hostsMinCalls) {
		t.Errorf("%s: %s client: %d errors in %d round trips (first: %v), want 0 errors in at least %d", when, r.region, r.errs, r.calls, r.first, hostsMinCalls)
	}
	if !served && (r.calls == 0 || r.errs != r.calls) {
		t.Errorf("%s: %s client: %d of %d round trips succeeded with its KMS hosts cut off, want none (and at least one tried)", when, r.region, r.calls-r.errs, r.calls)
	}
}

// loads are the clients' load loops of one window.
type loads struct {
	wg      sync.WaitGroup
	results []loadResult
}

// startLoads starts a loop of envelope round trips per client, each for
// hostsWindow and at most hostsMaxCalls calls. If the test ends first, the
// loops are stopped and waited for.
func (c *hostsChain) startLoads(clients map[string]*kmsclient.EnvelopeAEAD) *loads {
	l := &loads{results: make([]loadResult, len(hostsRegions))}
	ctx, cancel := context.WithCancel(context.Background())
	c.t.Cleanup(func() { cancel(); l.wg.Wait() })
	for i, region := range hostsRegions {
		env := clients[region]
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			r := loadResult{region: region}
			start := time.Now()
			for r.calls < hostsMaxCalls && time.Since(start) < hostsWindow && ctx.Err() == nil {
				r.calls++
				if err := hostsRoundTrip(ctx, env, r.calls); err != nil {
					r.errs++
					if r.first == nil {
						r.first = err
					}
				}
			}
			r.took = time.Since(start)
			l.results[i] = r
		}()
	}
	return l
}

// wait waits for the loops (each ends after hostsWindow plus one call's
// timeout) and returns their results.
func (l *loads) wait() []loadResult {
	l.wg.Wait()
	return l.results
}
