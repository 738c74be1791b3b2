package tests

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/backup"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/tests/framework"
)

// backupTeam has a keyset in us-east only and one in both regions.
const backupTeam = `{"team":"payments","keysets":[
  {"name":"payments/ledger","regions":["us-east"],"purpose":"envelope",
   "rotation_period":"2160h","ciphertext_ttl":"8760h",
   "acl":{"encrypt":["client/us-east/*"],"decrypt":["client/us-east/*"]}},
  {"name":"payments/cards","regions":["eu-west","us-east"],"purpose":"envelope",
   "rotation_period":"2160h","ciphertext_ttl":"8760h",
   "acl":{"encrypt":["client/*/*"],"decrypt":["client/*/*"]}}]}`

// rootRecord is a root KMS cluster's record as regionctl reads it: regions
// and keysets (with their encrypted copies), read through the leader.
type rootRecord struct {
	Regions []*rootkmsv1.Region
	Keysets []*rootkmsv1.Keyset
}

func readRootRecord(t *testing.T, c *rootkmsclient.Client) rootRecord {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var rec rootRecord
	if err := c.Do(ctx, func(ctx context.Context, rc rootkmsv1.RootKMSClient) error {
		regions, err := rc.ListRegions(ctx, &rootkmsv1.ListRegionsRequest{})
		if err != nil {
			return err
		}
		keysets, err := rc.ListKeysets(ctx, &rootkmsv1.ListKeysetsRequest{IncludeCopies: true})
		if err != nil {
			return err
		}
		rec = rootRecord{Regions: regions.GetRegions(), Keysets: keysets.GetKeysets()}
		return nil
	}); err != nil {
		t.Fatalf("reading the root KMS record: %v", err)
	}
	return rec
}

// waitNoBundle waits until a started KMS server answers, waiting for a
// bundle.
func waitNoBundle(k *framework.KMSServer) {
	k.WaitStatus("NOT_READY waiting for a bundle", func(st *kmsv1.GetStatusResponse) bool {
		return st.GetState() == kmsv1.ServingState_SERVING_STATE_NOT_READY
	})
}

// TestRootKMSBackupRestore is issue 15 item 5's done-when with the real
// binaries: a chain with two regions (one with a rotated key), two keysets
// and a KMS server that encrypted a DEK; `regionctl backup export` as an
// operator; the original root KMS stopped for good; a fresh two-replica root
// KMS cluster (new data directories, the same distributor and root key)
// restored with `regionctl backup restore` as an officer. The restored
// cluster holds the same regions (same key versions, same key material, on
// the follower too) and keysets, keeps its own members, and a new KMS server
// fed a bundle built from it decrypts the ciphertext made before the backup.
// No file (the backup included) holds the RMK, a share, a passphrase, a
// region key version, a keyset key or the DEK.
func TestRootKMSBackupRestore(t *testing.T) {
	start := time.Now()
	w := framework.NewWorld(t, bin)
	w.Mint(operator, "rootkms/global/restored-1", "rootkms/global/restored-2", "kms/us-east/kms-2")
	safes := w.FileSafes(2)
	d := w.Distributors(1, false)[0]
	d.Start()
	d.WaitState(sealed)
	m := w.Genesis(2, safes, d)
	waitUnsealed(t, d, m)
	opts := framework.FastRaft(w.ManifestPath(), d.Addr)
	orig := w.RootKMSCluster(opts, framework.Voter(1))[0]
	orig.Start()
	framework.WaitLeader(orig)
	orig.WaitServing()

	// The record: two regions, us-east's key rotated, two keysets.
	rc := filepath.Join(w.Dir, "regionctl")
	keysDir, teams := filepath.Join(rc, "keys"), filepath.Join(rc, "teams")
	if err := os.MkdirAll(teams, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(teams, "payments.json"), []byte(backupTeam), 0o600); err != nil {
		t.Fatal(err)
	}
	origFlags := append([]string{"--rootkms", orig.API}, w.IDFlags(framework.Regionctl)...)
	w.RegionctlOK("keys", "generate", "--out", keysDir)
	for _, region := range []string{"us-east", "eu-west"} {
		w.RegionctlOK(append([]string{"region", "create", "--region", region}, origFlags...)...)
	}
	w.RegionctlOK(append([]string{"region", "rotate-key", "--region", "us-east"}, origFlags...)...)
	w.RegionctlOK(append([]string{"keyset", "create", "--teams", teams}, origFlags...)...)
	build := func(serial int, flags []string) string {
		path := filepath.Join(rc, fmt.Sprintf("us-east-%d.bundle", serial))
		w.RegionctlOK(append([]string{"bundle", "build", "--region", kmsRegion, "--serial", fmt.Sprint(serial), "--teams", teams,
			"--signing-key", filepath.Join(keysDir, "bundle-signing.key"), "--out", path}, flags...)...)
		return path
	}
	pub := filepath.Join(keysDir, "bundle-signing.pub")

	// A KMS server of the original chain encrypts a DEK.
	k1 := w.KMSServers(kmsRegion, pub, []string{orig.API}, "kms/us-east/kms-1")[0]
	k1.Start()
	waitNoBundle(k1)
	w.RegionctlOK(append([]string{"bundle", "push", "--kms", k1.Addr, "--bundle", build(1, origFlags)}, origFlags...)...)
	k1.WaitServing(1)
	dek, ad := []byte("a DEK made before the backup, 32B"), []byte("backup e2e")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	enc, err := k1.Client(kmsClient).Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: kmsKeyset, Plaintext: dek, AssociatedData: ad})
	if err != nil {
		t.Fatalf("Encrypt on %s = %v", k1.Identity, err)
	}
	want := readRootRecord(t, w.RootKMSClient(framework.Regionctl, orig))
	wantKeys := map[string]*rootkmsv1.RegionKeyMaterial{}
	for _, region := range []string{"us-east", "eu-west"} {
		mat, _, err := orig.UnwrapRegionKey("kms/"+region+"/kms-1", region)
		if err != nil {
			t.Fatalf("UnwrapRegionKey(%s) from the original = %v", region, err)
		}
		wantKeys[region] = mat
	}
	defer func() {
		for _, mat := range wantKeys {
			for _, v := range mat.GetVersions() {
				clear(v.GetKey())
			}
		}
	}()
	t.Logf("original chain up with 2 regions, 2 keysets and a ciphertext in %s", time.Since(start).Round(time.Millisecond))

	// Export as an operator.
	backupFile := filepath.Join(w.Dir, "backups", "rootkms.backup")
	if err := os.MkdirAll(filepath.Dir(backupFile), 0o700); err != nil {
		t.Fatal(err)
	}
	r := w.RegionctlOK(append([]string{"backup", "export", "--rootkms", orig.API, "--out", backupFile}, w.IDFlags(operator)...)...)
	if !strings.Contains(r.Stdout, "2 regions, 2 keysets") || !strings.Contains(r.Stdout, "Raft index ") {
		t.Errorf("backup export printed %q, want the Raft index and 2 regions, 2 keysets", r.Stdout)
	}
	st, err := os.Stat(backupFile)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("backup file mode %v, want 0600", st.Mode().Perm())
	}
	data, err := os.ReadFile(backupFile)
	if err != nil {
		t.Fatal(err)
	}
	f, err := backup.Inspect(data)
	if err != nil {
		t.Fatalf("backup.Inspect(%s) = %v", backupFile, err)
	}
	for region, mat := range wantKeys {
		for _, v := range mat.GetVersions() {
			if bytes.Contains(data, v.GetKey()) {
				t.Fatalf("the backup file holds region %s key version %d in plaintext", region, v.GetVersion())
			}
		}
	}
	t.Logf("backup export: %d bytes at Raft index %d, term %d", len(data), f.Contents.GetIndex(), f.Contents.GetTerm())

	// The original root KMS is lost.
	k1.Stop()
	orig.Stop()

	// A fresh cluster: new data directories, the same distributor and root
	// key, two replicas.
	fresh := w.RootKMSCluster(opts,
		framework.ReplicaSpec{ID: "restored-1", Identity: "rootkms/global/restored-1"},
		framework.ReplicaSpec{ID: "restored-2", Identity: "rootkms/global/restored-2"})
	fresh[0].Start()
	framework.WaitLeader(fresh[0])
	fresh[1].Start()
	for _, rep := range fresh {
		rep.WaitServing()
	}
	freshFlags := append([]string{"--rootkms", strings.Join(framework.Addrs(fresh...), ",")}, w.IDFlags(framework.Regionctl)...)
	r = w.RegionctlOK(append([]string{"backup", "restore", "--rootkms", strings.Join(framework.Addrs(fresh...), ","), "--in", backupFile,
		"--reason", "e2e: the original root KMS is gone"}, w.IDFlags(framework.Officer(1))...)...)
	if !strings.Contains(r.Stdout, "2 regions, 2 keysets") || !strings.Contains(r.Stdout, fmt.Sprintf("Raft index %d", f.Contents.GetIndex())) {
		t.Errorf("backup restore printed %q, want the backup's Raft index %d and 2 regions, 2 keysets", r.Stdout, f.Contents.GetIndex())
	}

	// The same regions, key versions and keysets.
	got := readRootRecord(t, w.RootKMSClient(framework.Regionctl, fresh...))
	ignoreIndex := []cmp.Option{protocmp.Transform(),
		protocmp.IgnoreFields(&rootkmsv1.Region{}, "commit_index"), protocmp.IgnoreFields(&rootkmsv1.Keyset{}, "commit_index")}
	if diff := cmp.Diff(want, got, ignoreIndex...); diff != "" {
		t.Errorf("the restored cluster's record differs from the original's (-original +restored):\n%s", diff)
	}
	// The same key material, from each replica's own state (the follower
	// got the restored state from the leader).
	leader, status, _ := framework.WaitLeader(fresh...)
	for _, rep := range fresh {
		rep.WaitApplied(status.GetCommitIndex())
		for region, wantMat := range wantKeys {
			mat, _, err := rep.UnwrapRegionKey("kms/"+region+"/kms-1", region)
			if err != nil {
				t.Fatalf("UnwrapRegionKey(%s) from %s = %v", region, rep.ID, err)
			}
			if diff := cmp.Diff(wantMat, mat, protocmp.Transform()); diff != "" {
				t.Errorf("%s: region %s key material differs from the original's (-original +restored):\n%s", rep.ID, region, diff)
			}
			for _, v := range mat.GetVersions() {
				clear(v.GetKey())
			}
		}
	}
	// The fresh cluster's own members, with their API addresses.
	var members []string
	for _, mem := range status.GetMembers() {
		members = append(members, mem.GetId()+"@"+mem.GetApiAddress())
	}
	if diff := cmp.Diff([]string{"restored-1@" + fresh[0].API, "restored-2@" + fresh[1].API}, members); diff != "" {
		t.Errorf("members of the restored cluster (leader %s) (-want +got):\n%s", leader.ID, diff)
	}
	var restored int
	for _, rec := range fresh[0].Audit() {
		if rec.Operation == "/cairn.rootkms.v1.RootKMS/RestoreBackup" && rec.Outcome == "attempt" && rec.Reason == "e2e: the original root KMS is gone" {
			restored++
		}
	}
	if restored != 1 {
		t.Errorf("restore records with the reason in restored-1's audit log = %d, want 1", restored)
	}

	// A second restore into the now populated cluster is refused without
	// --overwrite, and changes nothing.
	refused := w.Run("regionctl-backup-restore-again", w.Bin.RegionctlBinary(), append([]string{"backup", "restore", "--rootkms", fresh[0].API,
		"--in", backupFile, "--reason", "again"}, w.IDFlags(framework.Officer(1))...)...)
	if refused.ExitCode != 1 || !strings.Contains(refused.Stderr, "holds 2 regions and 2 keysets") || !strings.Contains(refused.Stderr, "--overwrite") {
		t.Errorf("backup restore into the restored cluster = %d\n%s\nwant exit 1 naming 2 regions, 2 keysets and --overwrite", refused.ExitCode, refused.Stderr)
	}

	// A new KMS server of the restored chain, fed a bundle built from the
	// restored record (serial 2: the record's bundle serial floor is 1),
	// decrypts the ciphertext made before the backup.
	k2 := w.KMSServers(kmsRegion, pub, framework.Addrs(fresh...), "kms/us-east/kms-2")[0]
	k2.Start()
	waitNoBundle(k2)
	w.RegionctlOK(append([]string{"bundle", "push", "--kms", k2.Addr, "--bundle", build(2, freshFlags)}, freshFlags...)...)
	k2.WaitServing(2)
	dec, err := k2.Client(kmsClient).Decrypt(ctx, &kmsv1.DecryptRequest{Keyset: kmsKeyset, Ciphertext: enc.GetCiphertext(), AssociatedData: ad})
	if err != nil {
		t.Fatalf("Decrypt on %s (restored chain) of a ciphertext made before the backup = %v", k2.Identity, err)
	}
	if !bytes.Equal(dec.GetPlaintext(), dek) || dec.GetKeyId() != enc.GetKeyId() {
		t.Errorf("Decrypt on the restored chain = key %d, another plaintext; want key %d and the DEK", dec.GetKeyId(), enc.GetKeyId())
	}
	clear(dec.GetPlaintext())

	// No secret in any file: the region keys (every version, as the
	// restored cluster serves them), the keyset keys of both bundles, the
	// DEK, and the backup file, which holds the record sealed, not in
	// plaintext.
	secrets := append(chainSecrets(t, fresh[0], rc, "us-east", "eu-west"), sentinel("the DEK encrypted before the backup", dek))
	k2.Stop()
	for _, rep := range fresh {
		rep.Stop()
	}
	d.Stop()
	requireNoSecrets(t, w, m, safes, nil, secrets)
	t.Logf("backup, restore into a fresh cluster and decrypt on the restored chain in %s", time.Since(start).Round(time.Millisecond))
}
