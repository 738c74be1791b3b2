package tests

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/tests/framework"
)

// oneRegion is what startOneRegion sets up.
type oneRegion struct {
	// team is one team file's JSON: the keysets regionctl creates.
	team string
	// regionctlConfig, if set, is regionctl's config file (JSON) for
	// `bundle build` (quotas, for example).
	regionctlConfig string
	// kmsArgs are added to the KMS server's flags.
	kmsArgs []string
}

// oneRegionChain is the chain startOneRegionChain brings up.
type oneRegionChain struct {
	w     *framework.World
	m     *safev1.GenesisManifest
	safes []framework.SafeConfig
	d     *framework.Distributor
	root  *framework.Replica
	k     *framework.KMSServer
	// rc is regionctl's directory: its keys, team files and the bundle.
	rc string
}

// startOneRegion is startOneRegionChain for the callers that need only the
// world and the KMS server (the benchmarks).
func startOneRegion(t testing.TB, o oneRegion) (*framework.World, *framework.KMSServer) {
	t.Helper()
	c := startOneRegionChain(t, o)
	return c.w, c.k
}

// requireNoSecrets ends a test of the chain: it fetches every version of
// the us-east key from the root KMS and opens the keyset copies of the
// bundle, stops every process still running (SIGTERM, a clean exit), and
// scans every file of the world and the extra roots for those keys, the
// RMK, the shares, the safes' passphrases and the extra secrets.
func (c *oneRegionChain) requireNoSecrets(t *testing.T, extra []framework.Secret, extraRoots ...string) {
	t.Helper()
	secrets := append(chainSecrets(t, c.root, c.rc, kmsRegion), extra...)
	for _, p := range []*framework.Process{c.k.Process, c.root.Process, c.d.Process} {
		if p.Running() {
			p.Stop()
		}
	}
	requireNoSecrets(t, c.w, c.m, c.safes, nil, secrets, extraRoots...)
}

// startOneRegionChain brings up the smallest whole chain (dev certs, two
// file safes, one distributor, one root KMS replica), creates the keysets
// of o.team with regionctl, and starts one us-east KMS server
// (kms/us-east/kms-1, audit log on disk) serving bundle serial 1.
func startOneRegionChain(t testing.TB, o oneRegion) *oneRegionChain {
	t.Helper()
	start := time.Now()
	w := framework.NewWorld(t, bin)
	safes := w.FileSafes(2)
	d := w.Distributors(1, false)[0]
	d.Start()
	d.WaitState(sealed)
	m := w.Genesis(2, safes, d)
	d.WaitState(unsealed)
	root := w.RootKMSCluster(framework.FastRaft(w.ManifestPath(), d.Addr), framework.Voter(1))[0]
	root.Start()
	framework.WaitLeader(root)
	root.WaitServing()

	rc := filepath.Join(w.Dir, "regionctl")
	keysDir, teams := filepath.Join(rc, "keys"), filepath.Join(rc, "teams")
	bundlePath := filepath.Join(rc, "us-east-1.bundle")
	if err := os.MkdirAll(teams, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(teams, "team.json"), []byte(o.team), 0o600); err != nil {
		t.Fatal(err)
	}
	build := []string{"bundle", "build", "--region", kmsRegion, "--serial", "1", "--teams", teams,
		"--signing-key", filepath.Join(keysDir, "bundle-signing.key"), "--out", bundlePath}
	if o.regionctlConfig != "" {
		config := filepath.Join(rc, "regionctl.json")
		if err := os.WriteFile(config, []byte(o.regionctlConfig), 0o600); err != nil {
			t.Fatal(err)
		}
		build = append(build, "--config", config)
	}
	rootFlags := append([]string{"--rootkms", root.API}, w.IDFlags(framework.Regionctl)...)
	w.RegionctlOK("keys", "generate", "--out", keysDir)
	w.RegionctlOK(append([]string{"region", "create", "--region", kmsRegion}, rootFlags...)...)
	w.RegionctlOK(append([]string{"keyset", "create", "--teams", teams}, rootFlags...)...)
	w.RegionctlOK(append(build, rootFlags...)...)

	k := w.KMSServers(kmsRegion, filepath.Join(keysDir, "bundle-signing.pub"), []string{root.API}, "kms/us-east/kms-1")[0]
	k.AddArgs(o.kmsArgs...)
	k.Start()
	k.WaitStatus("NOT_READY waiting for a bundle", func(st *kmsv1.GetStatusResponse) bool {
		return st.GetState() == kmsv1.ServingState_SERVING_STATE_NOT_READY
	})
	w.RegionctlOK(append([]string{"bundle", "push", "--kms", k.Addr, "--bundle", bundlePath}, rootFlags...)...)
	k.WaitServing(1)
	t.Logf("chain up, %s serving bundle 1, in %s", k.Identity, time.Since(start).Round(time.Millisecond))
	return &oneRegionChain{w: w, m: m, safes: safes, d: d, root: root, k: k, rc: rc}
}
