package rootkms_test

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/cairnkms/cairn/distributor"
	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/internal/secret"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/rootkms"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/rootkms/rootkmstest/live"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/officer"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func distributorClient(conn *grpc.ClientConn) distributorv1.DistributorClient {
	return distributorv1.NewDistributorClient(conn)
}

var td = identitytest.TrustDomain

const (
	regionctlID = "spiffe://cairn.test/regionctl/global/regionctl"
	kmsEast     = "spiffe://cairn.test/kms/us-east/kms-1"
	kmsWest     = "spiffe://cairn.test/kms/eu-west/kms-1"
)

// chain is a distributor holding an RMK and the manifest that pins it.
type chain struct {
	t        testing.TB
	pki      *identitytest.PKI
	dir      string
	manifest *safev1.GenesisManifest
	rmk      secret.Bytes
	distAddr string
	// skew moves every replica's clock forward (Advance), so lifecycle
	// tests can pass TTLs and windows without waiting for them.
	skew atomic.Int64
	// configure, if set, adjusts each replica's config (by replica ID).
	configure func(id string, cfg *rootkms.Config)
}

// testWindow is the replicas' propagation window.
const testWindow = time.Minute

func (c *chain) now() time.Time { return time.Now().Add(time.Duration(c.skew.Load())) }

// Advance moves the replicas' clocks forward by d.
func (c *chain) Advance(d time.Duration) { c.skew.Add(int64(d)) }

func newChain(t testing.TB) *chain {
	t.Helper()
	c := &chain{t: t, pki: identitytest.New(t, td), dir: t.TempDir()}
	var safes []safe.Safe
	for i := range 2 {
		s, err := safe.OpenFileSafe(safe.FileSafeConfig{Dir: filepath.Join(c.dir, "safes", fmt.Sprint(i)), Label: fmt.Sprintf("safe-%d", i),
			Passphrase: secret.New([]byte("test passphrase")), KDFMemoryKiB: 8 * 1024, AttemptDir: filepath.Join(c.dir, "attempts")})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		safes = append(safes, s)
	}
	m, rmk, err := safe.Genesis(context.Background(), safe.SplitConfig{Threshold: 2, Safes: safes})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rmk.Wipe)
	c.manifest, c.rmk = m, rmk
	c.distAddr = c.startDistributor(true)
	return c
}

// startDistributor starts a distributor; provisioned ones hold the RMK.
func (c *chain) startDistributor(provisioned bool) string {
	c.t.Helper()
	dir := filepath.Join(c.t.TempDir(), "distributor")
	log, err := audit.Open(filepath.Join(dir, "audit.log"), audit.Options{})
	if err != nil {
		c.t.Fatal(err)
	}
	officers, _ := identity.ParseAllowlist(td, "officer/global/*")
	readers, _ := identity.ParseAllowlist(td, "rootkms/*/*")
	d, err := distributor.New(distributor.Config{ManifestPath: filepath.Join(dir, "genesis.json"),
		Source: c.pki.Source("spiffe://cairn.test/distributor/global/distributor-1"), Officers: officers, RootKeyReaders: readers, Audit: log})
	if err != nil {
		c.t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		c.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = d.Serve(lis) }()
	c.t.Cleanup(func() { d.Close(); <-done; log.Close() })
	if provisioned {
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(c.pki.ClientCredentials("spiffe://cairn.test/officer/global/officer-1")))
		if err != nil {
			c.t.Fatal(err)
		}
		defer conn.Close()
		if err := officer.Provision(context.Background(), distributorClient(conn), c.manifest, c.rmk); err != nil {
			c.t.Fatal(err)
		}
	}
	return lis.Addr().String()
}

type replica struct {
	srv      *rootkms.Server
	id       string
	api      string
	dataDir  string
	auditLog string
	raft     string
	log      *audit.Log
	stopped  bool
}

// startReplica starts replica id; join names replicas to join through.
func (c *chain) startReplica(id string, bootstrap bool, nonVoter bool, join ...string) *replica {
	c.t.Helper()
	return c.startReplicaAt("127.0.0.1:0", "127.0.0.1:0", id, bootstrap, nonVoter, join...)
}

// restart starts a stopped replica again on its directories and
// addresses (the cluster's configuration names its Raft address).
func (c *chain) restart(r *replica) *replica {
	c.t.Helper()
	return c.startReplicaAt(r.api, r.raft, r.id, false, false)
}

// startReplicaAt starts replica id with its API and Raft transport on the
// given addresses.
func (c *chain) startReplicaAt(api, raftAddr, id string, bootstrap bool, nonVoter bool, join ...string) *replica {
	c.t.Helper()
	dir := filepath.Join(c.dir, id)
	log, err := audit.Open(filepath.Join(dir, "audit.log"), audit.Options{})
	if err != nil {
		c.t.Fatal(err)
	}
	region := "global"
	if nonVoter {
		region = "us-east"
	}
	cfg := rootkms.Config{
		ID: id, DataDir: filepath.Join(dir, "raft"), Bootstrap: bootstrap, Join: join, NonVoter: nonVoter,
		Manifest: c.manifest, Distributors: []string{c.distAddr},
		Source: c.pki.Source(fmt.Sprintf("spiffe://cairn.test/rootkms/%s/%s", region, id)), Audit: log,
		HeartbeatTimeout: 200 * time.Millisecond, ElectionTimeout: 200 * time.Millisecond, LeaderLeaseTimeout: 100 * time.Millisecond,
		Safety: rootkms.SafetyConfig{Window: testWindow}, Now: c.now,
	}
	if c.configure != nil {
		c.configure(id, &cfg)
	}
	srv, err := rootkms.New(cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	apiLis, err := net.Listen("tcp", api)
	if err != nil {
		c.t.Fatal(err)
	}
	raftLis, err := net.Listen("tcp", raftAddr)
	if err != nil {
		c.t.Fatal(err)
	}
	if err := srv.Start(apiLis, raftLis); err != nil {
		c.t.Fatal(err)
	}
	r := &replica{srv: srv, id: id, api: apiLis.Addr().String(), raft: raftLis.Addr().String(), dataDir: filepath.Join(dir, "raft"), auditLog: filepath.Join(dir, "audit.log"), log: log}
	c.t.Cleanup(r.stop)
	return r
}

// stop closes the replica and its audit log, so that it can be started
// again on the same directories.
func (r *replica) stop() {
	if !r.stopped {
		r.stopped = true
		r.srv.Close()
		if r.log != nil { // nil: the test that made r owns its log
			r.log.Close()
		}
	}
}

func (c *chain) client(id string, addrs ...string) *rootkmsclient.Client {
	cl := rootkmsclient.New(c.pki.Source(id), addrs)
	c.t.Cleanup(cl.Close)
	return cl
}

func bg(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// cluster starts three voters and one non-voter and waits until all hold
// the root key and see four members.
func (c *chain) cluster() []*replica {
	c.t.Helper()
	r1 := c.startReplica("rootkms-1", true, false)
	r2 := c.startReplica("rootkms-2", false, false, r1.api)
	r3 := c.startReplica("rootkms-3", false, false, r1.api)
	r4 := c.startReplica("replica-east", false, true, r1.api)
	all := []*replica{r1, r2, r3, r4}
	ctx := bg(c.t)
	for _, r := range all {
		if err := r.srv.WaitReady(ctx); err != nil {
			c.t.Fatal(err)
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		f := r1.srv.Raft().GetConfiguration()
		if f.Error() == nil && len(f.Configuration().Servers) == 4 {
			break
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("cluster never reached 4 members")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return all
}

// waitCaughtUp waits until every replica has applied the leader's last
// log index.
func waitCaughtUp(t testing.TB, rs []*replica) {
	t.Helper()
	var last uint64
	for _, r := range rs {
		last = max(last, r.srv.AppliedIndex())
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, r := range rs {
		for r.srv.AppliedIndex() < last {
			if time.Now().After(deadline) {
				t.Fatalf("%s applied %d, want %d", r.id, r.srv.AppliedIndex(), last)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func addrs(rs []*replica) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.api)
	}
	return out
}

func createRegion(t testing.TB, cl *rootkmsclient.Client, region string) *rootkmsv1.Region {
	t.Helper()
	var out *rootkmsv1.Region
	err := cl.Do(bg(t), func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		var err error
		out, err = c.CreateRegion(ctx, &rootkmsv1.CreateRegionRequest{Region: region})
		return err
	})
	if err != nil {
		t.Fatalf("CreateRegion(%s) = %v", region, err)
	}
	return out
}

// unwrap fetches a region's key material as KMS identity id from addr.
func (c *chain) unwrap(id, addr, region string) (*rootkmsv1.RegionKeyMaterial, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(c.pki.ClientCredentials(id)))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	r, err := hpkeseal.NewRecipient()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	resp, err := rootkmsv1.NewRootKMSClient(conn).UnwrapRegionKey(bg(c.t), &rootkmsv1.UnwrapRegionKeyRequest{Region: region, Recipient: r.PublicKey()})
	if err != nil {
		return nil, err
	}
	info, _ := hpkeseal.Info("cairn/rootkms/v1/region-key", region, id)
	plain, err := r.Open(resp.GetSealedKeys(), info)
	if err != nil {
		return nil, err
	}
	defer plain.Wipe()
	var m rootkmsv1.RegionKeyMaterial
	b := plain.Data()
	defer clear(b)
	if err := proto.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	return &m, nil
}

func TestRegionsAndKeysets(t *testing.T) {
	c := newChain(t)
	rs := c.cluster()
	admin := c.client(regionctlID, addrs(rs[1:])...) // start at followers: the client must find the leader
	r := createRegion(t, admin, "us-east")
	if r.GetPrimaryVersion() != 1 || len(r.GetVersions()) != 1 {
		t.Fatalf("new region = %v, want version 1 primary", r)
	}
	createRegion(t, admin, "eu-west")
	err := admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
		_, err := cl.CreateRegion(ctx, &rootkmsv1.CreateRegionRequest{Region: "us-east"})
		return err
	})
	if status.Code(err) != codes.AlreadyExists {
		t.Errorf("CreateRegion(existing) = %v, want AlreadyExists", err)
	}
	for _, bad := range []string{"", "US-East", "-x", strings.Repeat("a", 70), "a_b"} {
		err := admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.CreateRegion(ctx, &rootkmsv1.CreateRegionRequest{Region: bad})
			return err
		})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("CreateRegion(%q) = %v, want InvalidArgument", bad, err)
		}
	}

	// A keyset for both regions, made inside the root KMS.
	var ks *rootkmsv1.Keyset
	if err := admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
		var err error
		ks, err = cl.CreateKeyset(ctx, &rootkmsv1.CreateKeysetRequest{Name: "payments/ledger", Regions: []string{"us-east", "eu-west"}, CiphertextTtl: durationpb.New(time.Hour)})
		return err
	}); err != nil {
		t.Fatalf("CreateKeyset = %v", err)
	}
	copies := ks.GetRecord().GetCopies() // sorted by region
	if len(copies) != 2 || copies[1].GetRegion() != "us-east" || copies[1].GetRegionKeyVersion() != 1 {
		t.Fatalf("CreateKeyset copies = %v", copies)
	}

	// Rotate us-east's key: version 2 becomes primary, 1 stays usable.
	if err := admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
		r, err := cl.RotateRegionKey(ctx, &rootkmsv1.RotateRegionKeyRequest{Region: "us-east"})
		if err == nil && (r.GetPrimaryVersion() != 2 || len(r.GetVersions()) != 2) {
			return fmt.Errorf("rotated region = %v", r)
		}
		return err
	}); err != nil {
		t.Fatalf("RotateRegionKey = %v", err)
	}

	// A us-east KMS gets both versions, from a voter and from the non-voter
	// (which serves its local state: wait until it has replicated), and can
	// open the us-east copy of the keyset, bound to its name.
	waitCaughtUp(t, rs)
	for _, addr := range []string{rs[0].api, rs[3].api} {
		mat, err := c.unwrap(kmsEast, addr, "us-east")
		if err != nil {
			t.Fatalf("UnwrapRegionKey from %s = %v", addr, err)
		}
		aeads := live.AEADsOf(t, mat)
		if len(aeads) != 2 {
			t.Fatalf("region key versions = %d, want 2", len(aeads))
		}
		east := copies[1]
		if _, err := keysets.Decrypt(east, aeads[1]); err != nil {
			t.Errorf("decrypting the us-east keyset with version 1 = %v", err)
		}
		moved := proto.Clone(east).(*cryptov1.EncryptedKeyset)
		moved.Name = "payments/other"
		if _, err := keysets.Decrypt(moved, aeads[1]); err == nil {
			t.Errorf("a keyset renamed in its metadata still decrypts; the associated data must bind the name")
		}
	}

	// Every replica converged on the same regions.
	scanNoSecrets(t, c, rs)
}

func TestAccessControl(t *testing.T) {
	c := newChain(t)
	r1 := c.startReplica("rootkms-1", true, false)
	if err := r1.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	createRegion(t, c.client(regionctlID, r1.api), "us-east")
	// A KMS of another region, and a regionctl, may not unwrap us-east.
	for _, id := range []string{kmsWest, regionctlID, "spiffe://cairn.test/client/us-east/demo"} {
		if _, err := c.unwrap(id, r1.api, "us-east"); status.Code(err) != codes.PermissionDenied {
			t.Errorf("UnwrapRegionKey(us-east) as %s = %v, want PermissionDenied", id, err)
		}
	}
	// A KMS may not generate keysets or create regions.
	kms := c.client(kmsEast, r1.api)
	err := kms.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
		_, err := cl.CreateKeyset(ctx, &rootkmsv1.CreateKeysetRequest{Name: "x", Regions: []string{"us-east"}, CiphertextTtl: durationpb.New(time.Hour)})
		return err
	})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("CreateKeyset as a KMS = %v, want PermissionDenied", err)
	}
	// Nor read or change the keyset record, or the evidence it is judged on.
	for name, call := range map[string]func(context.Context, rootkmsv1.RootKMSClient) error{
		"GetKeyset": func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.GetKeyset(ctx, &rootkmsv1.GetKeysetRequest{Name: "x"})
			return err
		},
		"ListKeysets": func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.ListKeysets(ctx, &rootkmsv1.ListKeysetsRequest{})
			return err
		},
		"UpdateKeyset": func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.UpdateKeyset(ctx, &rootkmsv1.UpdateKeysetRequest{Name: "x", Step: statev1.KeysetStep_KEYSET_STEP_ADD_VERSION})
			return err
		},
		"SetKeysetPolicy": func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.SetKeysetPolicy(ctx, &rootkmsv1.SetKeysetPolicyRequest{Name: "x", CiphertextTtl: durationpb.New(time.Second)})
			return err
		},
		"RecordPropagation": func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.RecordPropagation(ctx, &rootkmsv1.RecordPropagationRequest{Region: "us-east", RegionKeyVersions: []uint32{1}})
			return err
		},
		"RetireRegionKeyVersion": func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.RetireRegionKeyVersion(ctx, &rootkmsv1.RetireRegionKeyVersionRequest{Region: "us-east", Version: 1})
			return err
		},
	} {
		if err := kms.Do(bg(t), call); status.Code(err) != codes.PermissionDenied {
			t.Errorf("%s as a KMS = %v, want PermissionDenied", name, err)
		}
	}
	recs, err := audit.ReadFile(r1.auditLog)
	if err != nil {
		t.Fatal(err)
	}
	denied := map[string]bool{}
	for _, r := range recs {
		if r.Outcome == audit.OutcomeDenied {
			denied[strings.TrimPrefix(r.Operation, "/cairn.rootkms.v1.RootKMS/")+" "+r.Identity] = true
		}
	}
	for _, want := range []string{"UnwrapRegionKey " + kmsWest, "CreateKeyset " + kmsEast} {
		if !denied[want] {
			t.Errorf("no denied audit record for %s; have %v", want, denied)
		}
	}
}

func TestNotReadyWithoutRootKey(t *testing.T) {
	c := newChain(t)
	c.distAddr = c.startDistributor(false) // sealed: it has no key to give
	r := c.startReplica("rootkms-1", true, false)
	cl := c.client(regionctlID, r.api)
	var st *rootkmsv1.ClusterStatus
	if err := cl.Do(bg(t), func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		var err error
		st, err = c.GetClusterStatus(ctx, &rootkmsv1.GetClusterStatusRequest{})
		return err
	}); err != nil {
		t.Fatalf("GetClusterStatus = %v", err)
	}
	if st.GetHasRootKey() || !strings.Contains(st.GetNotReadyReason(), "root key") {
		t.Errorf("status = %v, want no root key and a reason", st)
	}
	conn, _ := grpc.NewClient(r.api, grpc.WithTransportCredentials(c.pki.ClientCredentials(regionctlID)))
	defer conn.Close()
	_, err := rootkmsv1.NewRootKMSClient(conn).CreateRegion(bg(t), &rootkmsv1.CreateRegionRequest{Region: "us-east"})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "root key") {
		t.Errorf("CreateRegion before the root key = %v, want Unavailable naming the root key", err)
	}
}

// scanNoSecrets looks for the RMK and every region key in every replica's
// files (Raft log, stable store, snapshots, audit log).
func scanNoSecrets(t *testing.T, c *chain, rs []*replica) {
	t.Helper()
	needles := [][]byte{c.rmk.Data()}
	for _, region := range []string{"us-east"} {
		mat, err := c.unwrap(kmsEast, rs[0].api, region)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range mat.GetVersions() {
			needles = append(needles, v.GetKey())
		}
	}
	for _, r := range rs {
		if err := r.srv.Raft().Snapshot().Error(); err != nil {
			t.Fatalf("snapshot on %s: %v", r.id, err)
		}
	}
	for _, r := range rs {
		root := filepath.Dir(r.dataDir)
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			for _, n := range needles {
				if bytes.Contains(data, n) || bytes.Contains(data, []byte(fmt.Sprintf("%x", n))) {
					t.Errorf("%s contains plaintext key material", p)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}
