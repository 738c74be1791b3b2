package chain

import (
	"encoding/json"

	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/cairnkms/cairn/internal/atomicfile"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/identity"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	"github.com/cairnkms/cairn/safe"
)

// regionctlName is regionctl's identity, also used to watch every
// component's status.
const regionctlName = "regionctl/global/regionctl"

// officerName is officer i's identity name.
func officerName(i int) string { return fmt.Sprintf("officer/global/officer-%d", i) }

// idFlags are the identity flags that make a binary run as name
// (<tier>/<region>/<name>).
func (c *Chain) idFlags(name string) []string {
	return []string{"--trust-domain", c.s.TrustDomain.Name(), "--dev-certs", c.layout.certs(), "--name", name}
}

// spiffeID is the full SPIFFE ID of name.
func (c *Chain) spiffeID(name string) string {
	return "spiffe://" + c.s.TrustDomain.Name() + "/" + name
}

func (c *Chain) bin(name string) string { return filepath.Join(c.s.BinDir, name) }

// describe sets up every component's command line; none is started.
func (c *Chain) describe() {
	logFile := func(name string) string {
		return filepath.Join(c.layout.logs(), strings.ReplaceAll(name, "/", "-")+".log")
	}
	for i := 1; i <= numDistributors; i++ {
		name := distributorName(i)
		p := &proc{Component: Component{Name: name, Kind: "distributor", SPIFFEID: c.spiffeID("distributor/global/" + name),
			Address: c.ports.distributors[i-1], MetricsAddress: c.ports.distributorMetrics[i-1], Log: logFile(name), StateDir: c.layout.distributor(i)},
			path: c.bin("distributor")}
		var peers []string
		for j, a := range c.ports.distributors {
			if j != i-1 {
				peers = append(peers, a)
			}
		}
		p.args = append(c.idFlags("distributor/global/"+name), "--listen", p.Address, "--metrics-listen", p.MetricsAddress, "--reflection", "--state-dir", p.StateDir,
			"--officers", "officer/global/*", "--root-key-readers", "rootkms/*/*", "--peer-ids", "distributor/*/*",
			"--peers", strings.Join(peers, ","))
		c.dists = append(c.dists, p)
	}
	for i := 1; i <= numRootKMS; i++ {
		name := rootKMSName(i)
		p := &proc{Component: Component{Name: name, Kind: "rootkms", SPIFFEID: c.spiffeID("rootkms/global/" + name),
			Address: c.ports.rootAPI[i-1], RaftAddress: c.ports.rootRaft[i-1], MetricsAddress: c.ports.rootMetrics[i-1], Log: logFile(name), StateDir: c.layout.rootKMS(i)},
			path: c.bin("rootkms")}
		p.args = append(c.idFlags("rootkms/global/"+name), "--id", name, "--listen", p.Address, "--raft-listen", p.RaftAddress,
			"--metrics-listen", p.MetricsAddress, "--reflection",
			"--data-dir", p.StateDir, "--manifest", c.layout.manifest(), "--distributors", strings.Join(c.ports.distributors, ","))
		// A first run makes the cluster: voter 1 bootstraps it, the others
		// join through the voters before them. A re-run restarts from the
		// Raft data: no --bootstrap (which, on a lost data dir, would make
		// a second cluster) and no --join.
		if !c.s.Rerun {
			if i == 1 {
				p.args = append(p.args, "--bootstrap")
			} else {
				p.args = append(p.args, "--join", strings.Join(c.ports.rootAPI[:i-1], ","))
			}
		}
		c.roots = append(c.roots, p)
	}
	for ri, r := range c.s.Regions {
		var servers []*proc
		for j := 1; j <= kmsPerRegion; j++ {
			name := kmsName(r, j)
			idName := fmt.Sprintf("kms/%s/kms-%d", r, j)
			p := &proc{Component: Component{Name: name, Kind: "kms", Region: r, SPIFFEID: c.spiffeID(idName),
				Address: c.ports.kms[ri][j-1], MetricsAddress: c.ports.metrics[ri][j-1], TransitAddress: c.ports.transit[ri][j-1], Log: logFile("kms-" + r + "-" + fmt.Sprint(j)),
				StateDir: c.layout.kms(r, j)}, path: c.bin("kms")}
			p.args = append(c.idFlags(idName), "--region", r, "--listen", p.Address, "--metrics-listen", p.MetricsAddress, "--reflection",
				"--transit-listen", p.TransitAddress,
				"--state-dir", p.StateDir, "--rootkms", strings.Join(c.ports.rootAPI, ","), "--signing-key", c.layout.signingPub())
			servers = append(servers, p)
		}
		c.kms = append(c.kms, servers)
	}
}

// allKMS returns every KMS server, region by region.
func (c *Chain) allKMS() []*proc {
	var out []*proc
	for _, ps := range c.kms {
		out = append(out, ps...)
	}
	return out
}

// firstRunSteps are the steps of a first run.
func (c *Chain) firstRunSteps(ctx context.Context) []step {
	regions := strings.Join(c.s.Regions, ", ")
	steps := []step{
		{fmt.Sprintf("preflight: %d binaries, %d ports free on 127.0.0.1", len(binaries), len(c.ports.all)), c.preflight},
		{"dev certs: a CA and every identity", c.devCerts},
		{fmt.Sprintf("safes: %d %s", numSafes, safesLabel(c.s.Safes)), func() (string, error) {
			if c.s.Safes == SafesSoftHSM {
				return c.makeSoftHSMSafes(ctx)
			}
			return c.makeFileSafes()
		}},
		{"distributor-1: start, sealed and waiting for genesis", func() (string, error) {
			return "", c.startDistributors(ctx, c.dists[:1])
		}},
		{fmt.Sprintf("genesis: %d-of-%d into %d %s, the key to distributor-1", threshold, numSafes, numSafes, safesLabel(c.s.Safes)), func() (string, error) {
			return c.genesis(ctx)
		}},
		{fmt.Sprintf("distributors 2-%d: pin the manifest, start, unseal from a peer", numDistributors), func() (string, error) {
			return c.joinDistributors(ctx)
		}},
		{fmt.Sprintf("root KMS: rootkms-1 bootstraps, rootkms-2..%d join", numRootKMS), func() (string, error) {
			return c.startRootKMS(ctx)
		}},
		{"regionctl: bundle-signing key, regions " + regions, func() (string, error) {
			return c.regions(ctx)
		}},
		{fmt.Sprintf("keysets: %s for team %s in %s", strings.Join(demoKeysets, ", "), demoTeam, regions), func() (string, error) {
			return c.keysets(ctx)
		}},
		{"bundles: serial 1 for " + regions, func() (string, error) {
			return c.buildBundles(ctx)
		}},
		{fmt.Sprintf("KMS: start %d servers per region, waiting for a bundle", kmsPerRegion), func() (string, error) {
			return c.startKMS(ctx, "NOT_READY, waiting for a bundle", answering)
		}},
		{c.rolloutTitle(), watched(c.out, func(progress func(string)) (string, error) {
			return c.rolloutBundles(ctx, progress)
		})},
		{"chain.json: what runs where", c.writeInfo},
	}
	return c.withDemo(ctx, steps)
}

// rerunSteps are the steps of a re-run.
func (c *Chain) rerunSteps(ctx context.Context) []step {
	steps := []step{
		{fmt.Sprintf("preflight: %d binaries, %d ports free on 127.0.0.1", len(binaries), len(c.ports.all)), c.preflight},
		{"dev certs: keep the CA and every identity", c.devCerts},
		{fmt.Sprintf("distributors: start %d, sealed", numDistributors), func() (string, error) {
			return "", c.startDistributors(ctx, c.dists)
		}},
		{fmt.Sprintf("unseal ceremony: officers 1 and 2 release their shares into distributor-1 from %s", safesLabel(c.s.Safes)), func() (string, error) {
			return c.unsealCeremony(ctx)
		}},
		{fmt.Sprintf("root KMS: %d voters restart from their Raft data", numRootKMS), func() (string, error) {
			return c.startRootKMS(ctx)
		}},
		{fmt.Sprintf("KMS: %d servers restart from their persisted bundles", kmsPerRegion*len(c.s.Regions)), func() (string, error) {
			return c.startKMS(ctx, "SERVING its persisted bundle", serving)
		}},
		{"chain.json: what runs where", c.writeInfo},
	}
	return c.withDemo(ctx, steps)
}

func (c *Chain) withDemo(ctx context.Context, steps []step) []step {
	if !c.s.Demo {
		return steps
	}
	return append(steps, step{fmt.Sprintf("demo: Tink envelope encryption with %s", KeyURI(c.s.Regions[0], notesKeyset)), func() (string, error) {
		return runDemo(ctx, c.Info())
	}})
}

// preflight checks the binaries and that every port is free. It starts
// nothing and writes nothing.
func (c *Chain) preflight() (string, error) {
	var missing []string
	for _, b := range binaries {
		if fi, err := os.Stat(c.bin(b)); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			missing = append(missing, b)
		}
	}
	if len(missing) > 0 {
		return "", fmt.Errorf("chain: no %s in %s: run `make build` (or give --bin-dir the directory of Cairn's binaries)",
			strings.Join(missing, ", "), c.display(c.s.BinDir))
	}
	if err := checkPorts(c.ports.all); err != nil {
		return "", c.explainTakenPorts(err)
	}
	detail := fmt.Sprintf("%s; ports %d-%d", c.display(c.s.BinDir), c.ports.basePort+1, c.ports.lastPort)
	if lo, hi := EphemeralPorts(); c.ports.basePort+1 <= hi && c.ports.lastPort >= lo {
		detail += fmt.Sprintf(" (inside the kernel's ephemeral range %d-%d: an outgoing connection may take one; a --base-port below %d avoids it)", lo, hi, lo-100)
	}
	return detail, nil
}

// devCerts writes (or keeps) the dev CA and every identity, as
// `cairn dev certs --regions ...` does, and loads the observer identity.
func (c *Chain) devCerts() (string, error) {
	if err := os.MkdirAll(c.s.StateDir, 0o700); err != nil {
		return "", fmt.Errorf("chain: %w", err)
	}
	plan := devca.DefaultPlan(c.s.TrustDomain)
	plan.Regions = c.s.Regions
	plan.Distributors, plan.RootKMS, plan.KMSPerRegion = numDistributors, numRootKMS, kmsPerRegion
	_, written, err := devca.WriteChain(c.layout.certs(), plan, time.Now())
	if err != nil {
		return "", fmt.Errorf("chain: dev certs: %w", err)
	}
	issued := 0
	for _, w := range written {
		if !w.Reused {
			issued++
		}
	}
	f := identity.Flags{TrustDomain: c.s.TrustDomain.Name(), DevCerts: c.layout.certs(), Name: regionctlName}
	if c.observer, err = f.Source(nil); err != nil {
		return "", fmt.Errorf("chain: %w", err)
	}
	return fmt.Sprintf("%d identities (%d issued, %d kept) in %s", len(written), issued, len(written)-issued, c.display(c.layout.certs())), nil
}

// startDistributors starts ds and waits until each answers, sealed.
func (c *Chain) startDistributors(ctx context.Context, ds []*proc) error {
	for _, d := range ds {
		if err := os.MkdirAll(d.StateDir, 0o700); err != nil {
			return fmt.Errorf("chain: %w", err)
		}
		if err := c.start(d); err != nil {
			return err
		}
	}
	for _, d := range ds {
		if _, err := c.waitDistributor(ctx, d, distributorv1.SealState_SEAL_STATE_SEALED); err != nil {
			return err
		}
	}
	return nil
}

// safeArgs are the --safe flags of every safe.
func (c *Chain) safeArgs() []string {
	var out []string
	for i := 1; i <= numSafes; i++ {
		out = append(out, "--safe", c.layout.safeConfig(i))
	}
	return out
}

// genesis runs `safe genesis` as officer-1: the root key split 2-of-3 into
// the safes, share i bound to officer i, handed to distributor-1.
func (c *Chain) genesis(ctx context.Context) (string, error) {
	var officers []string
	for i := 1; i <= numSafes; i++ {
		officers = append(officers, c.spiffeID(officerName(i)))
	}
	args := append([]string{"genesis"}, c.idFlags(officerName(1))...)
	args = append(args, "--threshold", fmt.Sprint(threshold), "--officers", strings.Join(officers, ","),
		"--manifest", c.layout.manifest(), "--distributor", c.dists[0].Address)
	args = append(args, c.safeArgs()...)
	if _, err := c.run(ctx, "safe-genesis", c.bin("safe"), args, c.safeEnv()...); err != nil {
		return "", err
	}
	m, err := safe.ReadManifest(c.layout.manifest())
	if err != nil {
		return "", fmt.Errorf("chain: %w", err)
	}
	c.genesisID = m.GetGenesisId()
	if _, err := c.waitDistributor(ctx, c.dists[0], distributorv1.SealState_SEAL_STATE_UNSEALED); err != nil {
		return "", err
	}
	return fmt.Sprintf("genesis %s, manifest %s, distributor-1 unsealed", c.genesisID, c.display(c.layout.manifest())), nil
}

// joinDistributors starts the other distributors with the public genesis
// manifest to pin (--manifest: what an operator gives a new distributor) and
// waits until they unsealed from a peer.
func (c *Chain) joinDistributors(ctx context.Context) (string, error) {
	for _, d := range c.dists[1:] {
		d.args = append(d.args, "--manifest", c.layout.manifest())
		if err := c.start(d); err != nil {
			return "", err
		}
	}
	how, err := c.waitPeersUnsealed(ctx)
	if err != nil {
		return "", err
	}
	return "unsealed: " + how, nil
}

// waitPeersUnsealed waits until every distributor but the first is unsealed
// (from a peer) and says by whom.
func (c *Chain) waitPeersUnsealed(ctx context.Context) (string, error) {
	var how []string
	for _, d := range c.dists[1:] {
		st, err := c.waitDistributor(ctx, d, distributorv1.SealState_SEAL_STATE_UNSEALED)
		if err != nil {
			return "", err
		}
		how = append(how, fmt.Sprintf("%s by %s", d.Name, st.GetUnsealedBy()))
	}
	return strings.Join(how, ", "), nil
}

// ceremonyLine is how `safe ceremony open` prints the new ceremony.
var ceremonyLine = regexp.MustCompile(`(?m)^ceremony ([0-9a-f]{32}) \(UNSEAL\): OPEN, `)

// unsealCeremony runs the dev unseal ceremony on distributor-1: officer-1
// opens it, officers 1 and 2 release their shares from safes 1 and 2; the
// other distributors then unseal from distributor-1.
func (c *Chain) unsealCeremony(ctx context.Context) (string, error) {
	m, err := safe.ReadManifest(c.layout.manifest())
	if err != nil {
		return "", fmt.Errorf("chain: %w", err)
	}
	c.genesisID = m.GetGenesisId()
	d1 := c.dists[0]
	out, err := c.run(ctx, "safe-ceremony-open", c.bin("safe"),
		append([]string{"ceremony", "open", "--distributor", d1.Address}, c.idFlags(officerName(1))...))
	if err != nil {
		return "", err
	}
	match := ceremonyLine.FindStringSubmatch(out)
	if match == nil {
		return "", &logError{err: fmt.Errorf("chain: safe ceremony open printed no open ceremony (want a line matching %s)", ceremonyLine),
			name: "safe-ceremony-open", log: filepath.Join(c.layout.logs(), "safe-ceremony-open.log")}
	}
	id := match[1]
	for i := 1; i <= threshold; i++ {
		args := append([]string{"release", "--distributor", d1.Address, "--ceremony", id,
			"--safe", c.layout.safeConfig(i), "--manifest", c.layout.manifest()}, c.idFlags(officerName(i))...)
		if _, err := c.run(ctx, fmt.Sprintf("safe-release-officer-%d", i), c.bin("safe"), args, c.safeEnv()...); err != nil {
			return "", err
		}
	}
	if _, err := c.waitDistributor(ctx, d1, distributorv1.SealState_SEAL_STATE_UNSEALED); err != nil {
		return "", err
	}
	how, err := c.waitPeersUnsealed(ctx)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("ceremony %s: distributor-1 unsealed; %s", id, how), nil
}

// startRootKMS starts the voters (on a first run voter 1 first, until it
// leads) and waits until all serve in a cluster of all of them.
func (c *Chain) startRootKMS(ctx context.Context) (string, error) {
	rest := c.roots
	if !c.s.Rerun {
		// The bootstrapping voter must lead before the others can join.
		if err := c.startDataDir(c.roots[0]); err != nil {
			return "", err
		}
		if _, err := c.waitRootKMS(ctx, c.roots[0], c.roots[0].Name, 1); err != nil {
			return "", err
		}
		rest = c.roots[1:]
	}
	for _, r := range rest {
		if err := c.startDataDir(r); err != nil {
			return "", err
		}
	}
	var leader string
	for _, r := range c.roots {
		st, err := c.waitRootKMS(ctx, r, r.Name, numRootKMS)
		if err != nil {
			return "", err
		}
		leader = leaderOf(st)
	}
	return fmt.Sprintf("leader %s; %d voters hold the root key", leader, numRootKMS), nil
}

// startDataDir makes p's state dir (0700) and starts it.
func (c *Chain) startDataDir(p *proc) error {
	if err := os.MkdirAll(p.StateDir, 0o700); err != nil {
		return fmt.Errorf("chain: %w", err)
	}
	return c.start(p)
}

// regionctlEnv is regionctl's environment beyond the launcher's: no config
// file but the one a command names with --config (an SRE's exported
// REGIONCTL_CONFIG may point at another chain).
var regionctlEnv = []string{"REGIONCTL_CONFIG="}

// regionctl runs regionctl with args; name names its log.
func (c *Chain) regionctl(ctx context.Context, name string, args ...string) (string, error) {
	return c.run(ctx, "regionctl-"+name, c.bin("regionctl"), args, regionctlEnv...)
}

// rootFlags are regionctl's flags for commands that call the root KMS.
func (c *Chain) rootFlags() []string {
	return append([]string{"--rootkms", strings.Join(c.ports.rootAPI, ",")}, c.idFlags(regionctlName)...)
}

// regions makes the bundle-signing key pair and creates every region.
func (c *Chain) regions(ctx context.Context) (string, error) {
	if err := os.MkdirAll(filepath.Dir(c.layout.keys()), 0o700); err != nil {
		return "", fmt.Errorf("chain: %w", err)
	}
	if _, err := c.regionctl(ctx, "keys-generate", "keys", "generate", "--out", c.layout.keys()); err != nil {
		return "", err
	}
	for _, r := range c.s.Regions {
		if _, err := c.regionctl(ctx, "region-create-"+r, append([]string{"region", "create", "--region", r}, c.rootFlags()...)...); err != nil {
			return "", err
		}
	}
	if err := c.writeRegionctlConfig(); err != nil {
		return "", err
	}
	return fmt.Sprintf("signing key %s, %d regions, %s", c.display(c.layout.signingPub()), len(c.s.Regions), c.display(c.layout.regionctlConfig())), nil
}

// writeRegionctlConfig writes the config file an SRE points regionctl at
// (REGIONCTL_CONFIG): identity, root KMS, every region's KMS servers,
// signing key and team files, so no call needs flags.
func (c *Chain) writeRegionctlConfig() error {
	regions := map[string][]string{}
	for ri, r := range c.s.Regions {
		regions[r] = c.ports.kms[ri]
	}
	f := map[string]any{
		"trust_domain": c.s.TrustDomain.Name(),
		"identity":     map[string]string{"dev_certs": c.layout.certs(), "name": regionctlName},
		"rootkms":      c.ports.rootAPI,
		"regions":      regions,
		"signing_key":  c.layout.signingKey(),
		"signing_pubs": []string{c.layout.signingPub()},
		"teams":        c.layout.teams(),
	}
	data, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return fmt.Errorf("chain: %w", err)
	}
	if err := atomicfile.Create(c.layout.regionctlConfig(), append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("chain: writing the regionctl config: %w", err)
	}
	return nil
}

// keysets writes the demo team file and has the root KMS generate its
// keysets.
func (c *Chain) keysets(ctx context.Context) (string, error) {
	if err := writeDemoTeam(c.layout.teams(), c.s.Regions); err != nil {
		return "", err
	}
	out, err := c.regionctl(ctx, "keyset-create", append([]string{"keyset", "create", "--teams", c.layout.teams()}, c.rootFlags()...)...)
	if err != nil {
		return "", err
	}
	want := fmt.Sprintf("%d created, 0 already in the record, 0 failed", len(demoKeysets))
	if !strings.Contains(out, want) {
		return "", &logError{err: fmt.Errorf("chain: regionctl keyset create did not report %q", want),
			name: "regionctl-keyset-create", log: filepath.Join(c.layout.logs(), "regionctl-keyset-create.log")}
	}
	return fmt.Sprintf("team file %s, keysets in the root KMS record", c.display(filepath.Join(c.layout.teams(), demoTeam+".json"))), nil
}

// buildBundles builds and signs bundle serial 1 of every region.
func (c *Chain) buildBundles(ctx context.Context) (string, error) {
	if err := os.MkdirAll(filepath.Dir(c.layout.bundle("x", 1)), 0o700); err != nil {
		return "", fmt.Errorf("chain: %w", err)
	}
	for _, r := range c.s.Regions {
		args := append([]string{"bundle", "build", "--region", r, "--serial", "1", "--teams", c.layout.teams(),
			"--signing-key", c.layout.signingKey(), "--out", c.layout.bundle(r, 1)}, c.rootFlags()...)
		if _, err := c.regionctl(ctx, "bundle-build-"+r, args...); err != nil {
			return "", err
		}
	}
	return "in " + c.display(filepath.Dir(c.layout.bundle("x", 1))), nil
}

// startKMS starts every KMS server and waits until each is in a state ok
// accepts (what names it).
func (c *Chain) startKMS(ctx context.Context, what string, ok func(*kmsv1.GetStatusResponse) bool) (string, error) {
	for _, p := range c.allKMS() {
		if err := c.startDataDir(p); err != nil {
			return "", err
		}
	}
	var states []string
	for _, p := range c.allKMS() {
		st, err := c.waitKMS(ctx, p, what, ok)
		if err != nil {
			return "", err
		}
		states = append(states, kmsState(p, st))
	}
	return strings.Join(states, "; "), nil
}

// kmsState is a KMS server's state for a progress line.
func kmsState(p *proc, st *kmsv1.GetStatusResponse) string {
	s := fmt.Sprintf("%s %s", p.Name, strings.TrimPrefix(st.GetState().String(), "SERVING_STATE_"))
	if st.GetBundle() != nil {
		s += fmt.Sprintf(" serial %d, %d keysets", st.GetBundle().GetSerial(), st.GetKeysetCount())
	}
	return s
}

// Bounds of the first run's rollout.
const (
	// rolloutID is the ID of the first run's rollout in the root KMS's
	// record (regionctl rollout status cairn-up-first-bundles).
	rolloutID = "cairn-up-first-bundles"
	// rolloutReason is its reason, recorded and audited.
	rolloutReason = "cairn up: first bundles"
	// rolloutBake is the bake of each of its stages: long enough to see
	// the stages go one after the other, short enough for a quick start
	// (a real rollout bakes for 10m to 1h per stage). No traffic reaches
	// the servers during it: the gates see 0 requests, 0 errors.
	rolloutBake = 2 * time.Second
)

// rolloutTitle is the progress line of the first run's rollout.
func (c *Chain) rolloutTitle() string {
	r0 := c.s.Regions[0]
	t := fmt.Sprintf("rollout: bundle serial 1, canary %s, then the rest of %s", c.kms[0][0].Name, r0)
	if rest := c.s.Regions[1:]; len(rest) > 0 {
		t += ", then " + strings.Join(rest, ", then ")
	}
	return t + fmt.Sprintf("; %s bake per stage", rolloutBake)
}

// rolloutBundles rolls every region's bundle serial 1 out with `regionctl
// rollout start`, as an SRE rolls out a change: the regions in config
// order, the first server of the first region as the canary, then the
// rest of that region, then one region per stage, each stage dry-run
// everywhere first, applied, baked and gated (readiness, error rate, p99,
// golden probes), the record in the root KMS. It hands each stage's
// progress to progress, waits until every server serves serial 1, and
// records the completed first run.
func (c *Chain) rolloutBundles(ctx context.Context, progress func(string)) (string, error) {
	var bundles []string
	for _, r := range c.s.Regions {
		bundles = append(bundles, c.layout.bundle(r, 1))
	}
	args := []string{"rollout", "start", "--config", c.layout.regionctlConfig(), "--id", rolloutID,
		"--bundles", strings.Join(bundles, ","), "--regions", strings.Join(c.s.Regions, ","),
		"--bake", rolloutBake.String(), "--reason", rolloutReason}
	names := c.kmsNames()
	if _, err := c.runWatching(ctx, "regionctl-rollout-start", c.bin("regionctl"), args, regionctlEnv, func(line string) {
		if text, ok := rolloutProgress(line); ok {
			progress(names.Replace(text))
		}
	}); err != nil {
		return "", err
	}
	var states []string
	for ri := range c.s.Regions {
		for _, p := range c.kms[ri] {
			st, err := c.waitKMS(ctx, p, "SERVING bundle serial 1", func(st *kmsv1.GetStatusResponse) bool {
				return serving(st) && st.GetBundle().GetSerial() == 1
			})
			if err != nil {
				return "", err
			}
			if got, want := sortedKeysetNames(st), slices.Sorted(slices.Values(demoKeysets)); !slices.Equal(got, want) {
				return "", p.errorf("serves keysets %v, want %v", got, want)
			}
			states = append(states, kmsState(p, st))
		}
	}
	rec := &setupRecord{TrustDomain: c.s.TrustDomain.Name(), Regions: c.s.Regions, Safes: c.s.Safes, BasePort: c.s.BasePort,
		GenesisID: c.genesisID, CreatedAt: time.Now().UTC()}
	if c.s.Safes == SafesSoftHSM {
		rec.PKCS11Module = c.hsm.module
	}
	if err := writeSetupRecord(c.layout.setup(), rec); err != nil {
		return "", err
	}
	return fmt.Sprintf("rollout %s completed; %s", rolloutID, strings.Join(states, "; ")), nil
}

// kmsNames replaces every KMS server's address with its name.
func (c *Chain) kmsNames() *strings.Replacer {
	var oldnew []string
	for _, p := range c.allKMS() {
		oldnew = append(oldnew, p.Address, p.Name)
	}
	return strings.NewReplacer(oldnew...)
}

// rolloutProgress picks the lines of `regionctl rollout start`'s output
// that show a rollout going stage by stage: of its timestamped report lines
// ("2026-01-02T15:04:05Z  stage 1/3 canary: ..."), without the time, all
// but the steps inside a stage that pass (its start, dry run, apply and
// bake): a stage's servers, its gates passed, a halt, a rollback, the end.
func rolloutProgress(line string) (string, bool) {
	stamp, text, ok := strings.Cut(line, "  ")
	if !ok {
		return "", false
	}
	if _, err := time.Parse(time.RFC3339, stamp); err != nil {
		return "", false
	}
	for _, quiet := range []string{" started: ", ": dry run passed on all ", ": applying to ", ": applied on all ", ": baked; evaluating the gates"} {
		if strings.Contains(text, quiet) {
			return "", false
		}
	}
	return text, true
}

// writeInfo builds the Info of the running chain and writes chain.json.
func (c *Chain) writeInfo() (string, error) {
	certs := c.layout.certs()
	ca := filepath.Join(certs, "ca.pem")
	ident := func(name string) Identity {
		id := identity.MustParse(c.spiffeID(name))
		cert, key := devca.LeafPaths(certs, id.SPIFFEID())
		return Identity{SPIFFEID: id.String(), Cert: cert, Key: key, CA: ca}
	}
	info := Info{
		Version: InfoVersion, StateDir: c.s.StateDir, TrustDomain: c.s.TrustDomain.Name(), BasePort: c.s.BasePort,
		Safes: c.s.Safes, LauncherPID: os.Getpid(), StartedAt: time.Now().UTC(), CA: ca, CertsDir: certs,
		Manifest: c.layout.manifest(), BundleSigningPub: c.layout.signingPub(),
		Regionctl: Regionctl{Identity: ident(regionctlName), IdentityFlags: c.idFlags(regionctlName), RootKMS: c.ports.rootAPI,
			Teams: c.layout.teams(), SigningKey: c.layout.signingKey(), Config: c.layout.regionctlConfig()},
	}
	for _, p := range c.started() {
		info.Components = append(info.Components, p.Component)
	}
	for ri, r := range c.s.Regions {
		reg := Region{Name: r, KMS: c.ports.kms[ri], Bundle: c.layout.bundle(r, 1), Client: ident("client/" + r + "/demo")}
		for _, k := range demoKeysets {
			reg.Keysets = append(reg.Keysets, KeyURI(r, k))
		}
		info.Regions = append(info.Regions, reg)
	}
	if err := info.Validate(); err != nil {
		return "", err
	}
	if err := info.write(); err != nil {
		return "", err
	}
	c.mu.Lock()
	c.info = info
	c.mu.Unlock()
	return c.display(c.layout.chainJSON()), nil
}
