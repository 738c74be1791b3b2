package tests

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/safeconfig"
	"github.com/cairnkms/cairn/tests/framework"
)

// rootKeyLoadedOp is the audit operation a root KMS replica records each
// time it loads the root key; the reason names the distributor it came
// from.
const rootKeyLoadedOp = "rootkms/root-key-loaded"

// fleetRegion is the region the distributor-tier tests write and unwrap.
var fleetRegion = regionNames[0]

// startFleetChain starts three peered distributors provisioned by a 2-of-3
// genesis and three root KMS voters that list the distributors in order
// (ds[0] first) and use the binary's default Raft timeouts, so that no
// election happens unless a test causes one. It creates fleetRegion.
func startFleetChain(t *testing.T) (w *framework.World, safes []framework.SafeConfig, m *safev1.GenesisManifest, ds []*framework.Distributor, voters []*framework.Replica) {
	t.Helper()
	w = framework.NewWorld(t, bin)
	w.Mint(kmsOf(fleetRegion))
	safes = w.FileSafes(3)
	ds = w.Distributors(3, true)
	for _, d := range ds {
		d.Start()
	}
	for _, d := range ds {
		d.WaitState(sealed)
	}
	m = w.Genesis(2, safes, ds...)
	var addrs []string
	for _, d := range ds {
		waitUnsealed(t, d, m)
		addrs = append(addrs, d.Addr)
	}
	voters = w.RootKMSCluster(framework.RootKMSOptions{Manifest: w.ManifestPath(), Distributors: addrs},
		framework.Voter(1), framework.Voter(2), framework.Voter(3))
	voters[0].Start()
	framework.WaitLeader(voters[0])
	for _, r := range voters[1:] {
		r.Start()
	}
	for _, r := range voters {
		r.WaitServing()
	}
	return w, safes, m, ds, voters
}

// rootKeyLoad is one load of the root key a replica recorded.
type rootKeyLoad struct {
	from string // the distributor's address
	at   time.Time
}

// rootKeyLoads returns the root key loads replica r recorded in its audit
// log, oldest first, across its runs.
func rootKeyLoads(t *testing.T, r *framework.Replica) []rootKeyLoad {
	t.Helper()
	var out []rootKeyLoad
	for _, rec := range r.Audit() {
		if rec.Operation == rootKeyLoadedOp && rec.Outcome == audit.OutcomeOK {
			from, ok := strings.CutPrefix(rec.Reason, "from distributor ")
			if !ok {
				t.Fatalf("audit log of %s: %s record with reason %q, want \"from distributor <addr>\"", r.ID, rootKeyLoadedOp, rec.Reason)
			}
			out = append(out, rootKeyLoad{from: from, at: rec.Time})
		}
	}
	return out
}

// loadedFrom returns the distributor addresses of loads.
func loadedFrom(loads []rootKeyLoad) []string {
	var out []string
	for _, l := range loads {
		out = append(out, l.from)
	}
	return out
}

// replicaHealth asks replica r's grpc.health.v1 service for the server's
// status, as Observer, and returns it with the reason it gives when not
// serving (the cairn-not-ready-reason header).
func replicaHealth(t *testing.T, w *framework.World, r *framework.Replica) (healthpb.HealthCheckResponse_ServingStatus, string, error) {
	t.Helper()
	src := w.Source(framework.Observer)
	only, err := identity.ParseAllowlist(src.TrustDomain(), "rootkms/*/*")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(r.API, grpc.WithTransportCredentials(identity.ClientCredentials(src, only.Authorize)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var hdr metadata.MD
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Header(&hdr))
	return resp.GetStatus(), strings.Join(hdr.Get("cairn-not-ready-reason"), "; "), err
}

// requireReplicaReady checks that r says it is ready: SERVING on
// grpc.health.v1, the root key held, no not-ready reason.
func requireReplicaReady(t *testing.T, w *framework.World, r *framework.Replica, when string) {
	t.Helper()
	if st, reason, err := replicaHealth(t, w, r); err != nil || st != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("%s: health of %s = %v (%q), %v; want SERVING", when, r.ID, st, reason, err)
	}
	if st, err := r.Status(); err != nil || !st.GetHasRootKey() || st.GetNotReadyReason() != "" {
		t.Errorf("%s: GetClusterStatus(%s) = root key %v, not-ready reason %q, %v; want the root key and ready", when, r.ID, st.GetHasRootKey(), st.GetNotReadyReason(), err)
	}
}

// requireUnwraps checks that r unwraps fleetRegion's key for its KMS.
func requireUnwraps(t *testing.T, r *framework.Replica, when string) {
	t.Helper()
	m, _, err := r.UnwrapRegionKey(kmsOf(fleetRegion), fleetRegion)
	if err != nil {
		t.Errorf("%s: UnwrapRegionKey(%s) from %s = %v, want the key", when, fleetRegion, r.ID, err)
	}
	for _, v := range m.GetVersions() {
		clear(v.GetKey())
	}
}

// TestRootKMSRestartsFromSurvivingDistributor (RELIABILITY row 11): with
// two of three distributors killed (-9), among them the first one every
// root KMS voter lists in --distributors, the running voters keep
// unwrapping region keys and taking writes from the key in memory; each
// voter in turn is then killed (-9) and restarted, and becomes ready
// (health SERVING, root key held) with the key from the surviving
// distributor (its audit log says so), while the other two keep unwrapping;
// once every voter holds only that key, writes go on and every replica
// serves the same region keys. The killed distributors restart and unseal
// from a peer (no safe); the survivor's audit log holds their fetches and
// the voters'. Finally the survivor dies too and a restarted voter loads the
// key from the rejoined first-listed distributor. Times are logged, not
// asserted.
func TestRootKMSRestartsFromSurvivingDistributor(t *testing.T) {
	w, safes, m, ds, voters := startFleetChain(t)
	rmk := fetchRMK(t, ds[0], m)
	defer clear(rmk)
	c := w.RootKMSClient(framework.Regionctl, voters...)
	writeOK(t, c, nil, 0, framework.OpCreate, fleetRegion)
	want := map[string]uint32{fleetRegion: 1}
	clearRegionKeys(requireReplicaState(t, voters, want))

	// k-1 of k distributors die, the first listed among them.
	ds[0].Kill()
	ds[1].Kill()
	survivor := ds[2]
	outage := time.Now()
	for _, r := range voters {
		requireReplicaReady(t, w, r, "distributors 1 and 2 killed")
	}
	writeOK(t, c, nil, 0, framework.OpRotate, fleetRegion)
	want[fleetRegion]++
	clearRegionKeys(requireReplicaState(t, voters, want))

	// A rolling kill -9 and restart of every voter, during the outage.
	for _, r := range voters {
		before := len(rootKeyLoads(t, r))
		r.Kill()
		for _, o := range voters {
			if o != r {
				requireUnwraps(t, o, r.ID+" killed")
			}
		}
		restarted := time.Now()
		r.Restart()
		r.WaitServing()
		ready := time.Since(restarted)
		loads := rootKeyLoads(t, r)[before:]
		if from := loadedFrom(loads); !slices.Equal(from, []string{survivor.Addr}) {
			t.Fatalf("%s after its restart: loaded the root key from %v, want once from the survivor %s (listed: %s first, killed)", r.ID, from, survivor.Addr, ds[0].Addr)
		}
		requireReplicaReady(t, w, r, r.ID+" restarted")
		requireUnwraps(t, r, r.ID+" restarted")
		writeOK(t, c, nil, 0, framework.OpRotate, fleetRegion)
		want[fleetRegion]++
		t.Logf("%s: kill -9 and restart %s into the outage; root key from the survivor %s %s after its restart (first listed %s down), ready %s after it; a write followed",
			r.ID, restarted.Sub(outage).Round(time.Millisecond), survivor.Addr, loads[0].at.Sub(restarted).Round(time.Millisecond), ds[0].Addr, ready.Round(time.Millisecond))
	}
	// Every voter now holds only the key the survivor handed out, so the
	// leader's writes use it.
	leader, _, _ := framework.WaitLeader(voters...)
	writeOK(t, c, nil, 0, framework.OpRotate, fleetRegion)
	want[fleetRegion]++
	keys := requireReplicaState(t, voters, want)
	t.Logf("every voter restarted from the survivor; %s leads and took a write: %s is at version %d on every voter", leader.ID, fleetRegion, want[fleetRegion])

	// The killed distributors come back and unseal from a peer.
	rejoin := time.Now()
	ds[0].Restart()
	ds[1].Restart()
	for _, d := range ds[:2] {
		st := waitUnsealed(t, d, m)
		requireUnsealedBy(t, d, st, "peer:")
		t.Logf("%s: unsealed %s after its restart (%s); the outage lasted %s", d.Name, time.Since(rejoin).Round(time.Millisecond), st.GetUnsealedBy(), time.Since(outage).Round(time.Millisecond))
	}
	requireSameRMK(t, m, rmk, ds...)
	recs := survivor.Audit()
	// ds[0] and ds[1] may have fetched from each other; at least one of
	// them fetched from the survivor, which no other distributor could.
	if !hasAuditRecord(recs, ds[0].Name, fetchRootKeyOp, audit.OutcomeOK) && !hasAuditRecord(recs, ds[1].Name, fetchRootKeyOp, audit.OutcomeOK) {
		t.Errorf("audit log of the survivor %s: no ok FetchRootKey record of %s or %s", survivor.Name, ds[0].Name, ds[1].Name)
	}
	for _, r := range voters {
		if !hasAuditRecord(recs, r.Identity, fetchRootKeyOp, audit.OutcomeOK) {
			t.Errorf("audit log of the survivor %s: no ok FetchRootKey record of %s", survivor.Name, r.Identity)
		}
	}

	// The rejoined first-listed distributor serves the root KMS again.
	survivor.Kill()
	r := voters[1]
	before := len(rootKeyLoads(t, r))
	r.Kill()
	r.Restart()
	r.WaitServing()
	if from := loadedFrom(rootKeyLoads(t, r)[before:]); !slices.Equal(from, []string{ds[0].Addr}) {
		t.Errorf("%s restarted with %s killed: loaded the root key from %v, want once from %s (first listed, rejoined)", r.ID, survivor.Name, from, ds[0].Addr)
	}
	requireUnwraps(t, r, r.ID+" restarted after the rejoin")

	for _, r := range voters {
		r.Stop()
	}
	for _, d := range ds[:2] {
		d.Stop()
	}
	requireNoSecrets(t, w, m, safes, rmk, regionKeySecrets(t, keys))
}

// clearRegionKeys clears what requireReplicaState returned.
func clearRegionKeys(keys map[string]regionKeys) {
	for _, k := range keys {
		clearKeys(k)
	}
}

// holdNotReady is how long a restarted voter is watched staying not ready
// while the distributors are sealed: several of its fetch rounds (200ms
// backoff doubling to the 5s cap).
const holdNotReady = 3 * time.Second

// TestRootKMSOutlivesEveryDistributor (RELIABILITY row 12): with every
// distributor killed (-9) under a running three-voter root KMS, each voter
// keeps unwrapping region keys and the cluster keeps taking writes from the
// key in memory. A voter killed (-9) and restarted then is not ready:
// health NOT_SERVING and UnwrapRegionKey UNAVAILABLE, both saying it waits
// for the root key from the distributors and naming one. It stays so while
// the distributors come back sealed (its reason then says they are sealed,
// so its fetch loop runs) and while the first officer's share is in, until
// a 2-of-3 unseal ceremony on one distributor completes; then the same process, not restarted, becomes ready, loads
// the key from a distributor, and serves the same region keys as the
// others.
func TestRootKMSOutlivesEveryDistributor(t *testing.T) {
	w, safes, m, ds, voters := startFleetChain(t)
	rmk := fetchRMK(t, ds[0], m)
	defer clear(rmk)
	c := w.RootKMSClient(framework.Regionctl, voters...)
	writeOK(t, c, nil, 0, framework.OpCreate, fleetRegion)
	want := map[string]uint32{fleetRegion: 1}
	clearRegionKeys(requireReplicaState(t, voters, want))

	for _, d := range ds {
		d.Kill()
	}
	killed := time.Now()
	// From memory: a few rounds of reads and writes, spread over a second.
	for round := range 3 {
		for _, r := range voters {
			requireReplicaReady(t, w, r, fmt.Sprintf("every distributor killed, round %d", round))
		}
		writeOK(t, c, nil, 0, framework.OpRotate, fleetRegion)
		want[fleetRegion]++
		clearRegionKeys(requireReplicaState(t, voters, want))
		time.Sleep(300 * time.Millisecond)
	}
	t.Logf("every distributor killed: the root KMS served reads and %d writes from memory for %s", want[fleetRegion]-1, time.Since(killed).Round(time.Millisecond))

	// A follower dies and restarts: nothing can hand it the key.
	leader, _, _ := framework.WaitLeader(voters...)
	var r *framework.Replica
	for _, v := range voters {
		if v != leader {
			r = v
			break
		}
	}
	before := len(rootKeyLoads(t, r))
	r.Kill()
	r.Restart()
	pid := r.PID()
	restarted := time.Now()
	const waiting = "waiting for the root key from the distributors (last: "
	st, _ := r.WaitStatus("not ready: waiting for the distributors", func(st *rootkmsv1.ClusterStatus) bool {
		return !st.GetHasRootKey() && strings.Contains(st.GetNotReadyReason(), waiting)
	})
	requireNamesDistributor(t, "GetClusterStatus.NotReadyReason of "+r.ID, st.GetNotReadyReason(), ds)
	t.Logf("%s restarted with every distributor down: not ready, %q", r.ID, st.GetNotReadyReason())
	t.Logf("%s: UnwrapRegionKey = %v", r.ID, requireNotReady(t, w, r, ds, "restarted with every distributor down"))
	for _, v := range voters {
		if v != r {
			requireReplicaReady(t, w, v, r.ID+" restarted, distributors down")
		}
	}
	writeOK(t, c, nil, 0, framework.OpRotate, fleetRegion)
	want[fleetRegion]++

	// The distributors come back sealed: nobody holds the key.
	for _, d := range ds {
		d.Restart()
	}
	for _, d := range ds {
		d.WaitState(sealed)
	}
	// The voter has asked a restarted distributor since (its fetch loop
	// runs): the reason now carries a distributor's refusal.
	st, _ = r.WaitStatus("not ready: the distributors are sealed", func(st *rootkmsv1.ClusterStatus) bool {
		return !st.GetHasRootKey() && strings.Contains(st.GetNotReadyReason(), "distributor: sealed")
	})
	requireNamesDistributor(t, "GetClusterStatus.NotReadyReason of "+r.ID, st.GetNotReadyReason(), ds)
	t.Logf("%s with the distributors back but sealed: not ready, %q", r.ID, st.GetNotReadyReason())
	for held := time.Now(); time.Since(held) < holdNotReady; time.Sleep(250 * time.Millisecond) {
		requireNotReady(t, w, r, ds, "distributors restarted sealed")
		for _, v := range voters {
			if v != r {
				requireUnwraps(t, v, "distributors restarted sealed")
			}
		}
		if t.Failed() {
			t.FailNow()
		}
	}

	// A quorum ceremony unseals one distributor.
	id := w.OpenCeremony(ds[0], 1)
	release(t, w, ds[0], id, safes, 1)
	requireNotReady(t, w, r, ds, "one share of two released")
	release(t, w, ds[0], id, safes, 2)
	requireUnsealedBy(t, ds[0], waitUnsealed(t, ds[0], m), "ceremony:"+id)
	unsealed := time.Now()

	// The same process recovers by itself.
	r.WaitServing()
	recovered := time.Since(unsealed)
	if got := r.PID(); got != pid || !r.Running() {
		t.Fatalf("%s: pid %d (running %v), want the same process %d: it must recover without a restart", r.ID, got, r.Running(), pid)
	}
	loads := rootKeyLoads(t, r)[before:]
	if len(loads) != 1 || !isDistributorAddr(loads[0].from, ds) {
		t.Fatalf("%s: loaded the root key %d times since its restart, from %v; want once, from a distributor", r.ID, len(loads), loadedFrom(loads))
	}
	requireReplicaReady(t, w, r, r.ID+" after the ceremony")
	t.Logf("%s: not ready from its restart until the ceremony (%s); the same process loaded the root key from %s %s after the ceremony and was ready %s after it",
		r.ID, unsealed.Sub(restarted).Round(time.Millisecond), loads[0].from, loads[0].at.Sub(unsealed).Round(time.Millisecond), recovered.Round(time.Millisecond))
	writeOK(t, c, nil, 0, framework.OpRotate, fleetRegion)
	want[fleetRegion]++
	keys := requireReplicaState(t, voters, want)

	for _, v := range voters {
		v.Stop()
	}
	for _, d := range ds {
		d.Stop()
	}
	requireNoSecrets(t, w, m, safes, rmk, regionKeySecrets(t, keys))
}

// isDistributorAddr reports whether addr is one of ds's.
func isDistributorAddr(addr string, ds []*framework.Distributor) bool {
	return slices.ContainsFunc(ds, func(d *framework.Distributor) bool { return d.Addr == addr })
}

// requireNamesDistributor checks that msg says the root key is awaited from
// the distributors and names one of them.
func requireNamesDistributor(t *testing.T, what, msg string, ds []*framework.Distributor) {
	t.Helper()
	named := slices.ContainsFunc(ds, func(d *framework.Distributor) bool { return strings.Contains(msg, d.Addr) })
	if !strings.Contains(msg, "from the distributors") || !named {
		t.Errorf("%s = %q, want it to say it waits for the root key from the distributors and name one", what, msg)
	}
}

// requireNotReady checks that r is not ready for want of the root key:
// NOT_SERVING with a reason naming the distributors, no root key in its
// status, and UnwrapRegionKey refused UNAVAILABLE with that reason. It
// returns the refusal.
func requireNotReady(t *testing.T, w *framework.World, r *framework.Replica, ds []*framework.Distributor, when string) error {
	t.Helper()
	hs, reason, err := replicaHealth(t, w, r)
	if err != nil || hs != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("%s: health of %s = %v, %v; want NOT_SERVING", when, r.ID, hs, err)
	}
	requireNamesDistributor(t, when+": not-ready reason of "+r.ID, reason, ds)
	if st, err := r.Status(); err != nil || st.GetHasRootKey() {
		t.Errorf("%s: GetClusterStatus(%s) = root key %v, %v; want no root key", when, r.ID, st.GetHasRootKey(), err)
	}
	m, _, err := r.UnwrapRegionKey(kmsOf(fleetRegion), fleetRegion)
	for _, v := range m.GetVersions() {
		clear(v.GetKey())
	}
	if status.Code(err) != codes.Unavailable {
		t.Errorf("%s: UnwrapRegionKey from %s = %v, want UNAVAILABLE", when, r.ID, err)
	} else {
		requireNamesDistributor(t, when+": UnwrapRegionKey refusal of "+r.ID, status.Convert(err).Message(), ds)
	}
	return err
}

// TestDistributorMemoryAfterRekeyAndSeal (RELIABILITY row 14): two real
// distributor processes, one of which hands the key to the other, to the
// test (as the root KMS) and runs a rekey ceremony (two released shares of
// epoch 0 in, three new shares of epoch 1 out), are emergency-sealed. Read
// as root through /proc/<pid>/maps and /proc/<pid>/mem (stopped with
// SIGSTOP), neither holds the RMK (a rekey keeps the RMK, so the old key is
// the current one) or any share of either epoch, in any encoding the file
// scan knows; both show "Max core file size" 0 0 in /proc/<pid>/limits.
// The scan can fail: before the seal it finds the RMK in the rekeying
// distributor's locked page.
func TestDistributorMemoryAfterRekeyAndSeal(t *testing.T) {
	framework.RequireCapability(t, "read a distributor's memory (RELIABILITY row 14; run as root with CAP_SYS_PTRACE)", framework.ProcMemAccess())
	w := framework.NewWorld(t, bin)
	all := w.FileSafes(6)
	olds, news := all[:3], all[3:]
	ds := w.Distributors(2, true)
	for _, d := range ds {
		d.Start()
	}
	for _, d := range ds {
		d.WaitState(sealed)
	}
	m := w.Genesis(2, olds, ds...)
	var addrs []string
	for _, d := range ds {
		waitUnsealed(t, d, m)
		addrs = append(addrs, d.Addr)
	}
	rmk := fetchRMK(t, ds[0], m)
	defer clear(rmk)
	// ds[1] restarts and takes the key from ds[0]: the peer hand-out.
	ds[1].Kill()
	ds[1].Restart()
	requireUnsealedBy(t, ds[1], waitUnsealed(t, ds[1], m), "peer:"+ds[0].Addr)
	secrets := []framework.Secret{{Name: "RMK", Value: rmk}}
	defer func() {
		for _, s := range secrets[1:] {
			clear(s.Value)
		}
	}()
	secrets = append(secrets, unsealShares(t, m, olds)...)

	// Control: the scan sees the unsealed key (in its mlocked page).
	found, stats := scanDistributorMemory(t, ds[0], secrets[:1])
	if !slices.ContainsFunc(found, func(f framework.MemFinding) bool { return f.Secret == "RMK" && f.Encoding == "raw" }) {
		t.Fatalf("control: the memory of the unsealed %s does not hold the RMK (found %v in %d bytes): the scan cannot see what it must", ds[0].Name, found, stats.Bytes)
	}
	t.Logf("control: the unsealed %s holds the RMK %d time(s), e.g. %s", ds[0].Name, stats.Hits, found[0])

	// Rekey on ds[0], as TestRekeyCeremonyAcrossProcesses does it.
	out := filepath.Join(w.Dir, "manifest-epoch-1.json")
	args := append([]string{"rekey", "--distributor", strings.Join(addrs, ","), "--threshold", "2", "--manifest", w.ManifestPath(), "--out", out,
		"--old-safe", olds[0].Path, "--wait", "1m", "--officers", strings.Join([]string{framework.SPIFFEID(framework.Officer(1)), framework.SPIFFEID(framework.Officer(2)), framework.SPIFFEID(framework.Officer(3))}, ",")},
		w.IDFlags(framework.Officer(1))...)
	for _, s := range news {
		args = append(args, "--safe", s.Path)
	}
	done := make(chan framework.Result, 1)
	go func() { done <- w.Safe(args...) }()
	st, _ := ds[0].WaitStatus("a rekey ceremony with share 1", func(st *distributorv1.GetStatusResponse) bool {
		c := st.GetCeremony()
		return c.GetKind() == distributorv1.CeremonyKind_CEREMONY_KIND_REKEY && len(c.GetAcceptedIndices()) == 1
	})
	if r := w.Release(ds[0], st.GetCeremony().GetId(), framework.Officer(2), olds[1]); r.ExitCode != 0 {
		<-done
		t.Fatalf("officer 2 release into the rekey ceremony failed:\n%s", r)
	}
	if r := <-done; r.ExitCode != 0 {
		t.Fatalf("safe rekey failed:\n%s", r)
	}
	m1, err := safe.ReadManifest(out)
	if err != nil || m1.GetEpoch() != 1 {
		t.Fatalf("rekeyed manifest = %v, %v; want epoch 1", m1, err)
	}
	secrets = append(secrets, unsealShares(t, m1, news)...)
	requireSameRMK(t, m, rmk, ds...)

	// The emergency seal.
	r := w.SafeOK(append([]string{"seal", "--fleet", "--distributor", strings.Join(addrs, ","), "--reason", "drill: memory hygiene"}, w.IDFlags(framework.Officer(1))...)...)
	if !strings.Contains(r.Stdout, "fleet sealed") {
		t.Fatalf("safe seal --fleet printed %q, want the fleet sealed", r.Stdout)
	}
	for _, d := range ds {
		if st, err := d.Status(); err != nil || st.GetState() != sealed || !st.GetEmergencySealed() {
			t.Fatalf("GetStatus(%s) after the emergency seal = %v, %v; want SEALED, emergency", d.Name, st, err)
		}
	}
	var names []string
	for _, s := range secrets {
		names = append(names, s.Name)
	}
	for _, d := range ds {
		soft, hard, err := framework.ProcessLimit(d.PID(), "Max core file size")
		if err != nil || soft != "0" || hard != "0" {
			t.Errorf("%s: /proc/%d/limits Max core file size = %q %q, %v; want 0 0", d.Name, d.PID(), soft, hard, err)
		}
		found, stats := scanDistributorMemory(t, d, secrets)
		for _, f := range found {
			t.Errorf("%s (pid %d), sealed after a rekey: %s", d.Name, d.PID(), f)
		}
		if stats.Hits > len(found) {
			t.Errorf("%s: %d more findings not listed", d.Name, stats.Hits-len(found))
		}
		t.Logf("%s sealed: %d of %d mappings read (%d skipped), %d bytes, for %d secrets (%s) in %d encodings each: %d found",
			d.Name, stats.Read, stats.Regions, stats.Skipped, stats.Bytes, len(secrets), strings.Join(names, ", "), len(framework.Encodings(rmk)), stats.Hits)
	}

	for _, d := range ds {
		d.Stop()
	}
	requireNoKeyMaterial(t, w, m1, news, rmk)
}

// unsealShares opens each safe in this process and unseals its share of
// manifest m, for the scans.
func unsealShares(t *testing.T, m *safev1.GenesisManifest, safes []framework.SafeConfig) []framework.Secret {
	t.Helper()
	ctx := context.Background()
	var out []framework.Secret
	for _, sc := range safes {
		s, err := safeconfig.OpenFile(ctx, sc.Path)
		if err != nil {
			t.Fatalf("safeconfig.OpenFile(%s) = %v", sc.Path, err)
		}
		index, err := safe.SlotOf(m, s)
		if err != nil {
			s.Close()
			t.Fatal(err)
		}
		share, err := s.Unseal(ctx, safe.ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: index})
		if cerr := s.Close(); cerr != nil {
			t.Errorf("closing safe %s: %v", sc.Label, cerr)
		}
		if err != nil {
			t.Fatalf("Unseal(%s, epoch %d share %d) = %v", sc.Label, m.GetEpoch(), index, err)
		}
		out = append(out, framework.Secret{Name: fmt.Sprintf("share %d of epoch %d (%s)", index, m.GetEpoch(), sc.Label), Value: share.Data()})
		share.Wipe()
	}
	return out
}

// scanDistributorMemory stops d (SIGSTOP), scans its memory for secrets
// and lets it run again.
func scanDistributorMemory(t *testing.T, d *framework.Distributor, secrets []framework.Secret) ([]framework.MemFinding, framework.MemStats) {
	t.Helper()
	pid := d.PID()
	d.Pause()
	defer d.Resume()
	if err := framework.WaitStopped(pid); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	found, stats, err := framework.ScanProcessMemory(pid, secrets)
	if err != nil {
		t.Fatalf("scanning the memory of %s (pid %d): %v", d.Name, pid, err)
	}
	t.Logf("memory scan of %s (pid %d): %d bytes in %s", d.Name, pid, stats.Bytes, time.Since(start).Round(time.Millisecond))
	return found, stats
}
