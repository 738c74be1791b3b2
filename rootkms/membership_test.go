package rootkms_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms"
)

// rawClient is a RootKMS client as id, on one replica (no leader
// redirects: the tests talk to the leader).
func (c *chain) rawClient(t *testing.T, id, addr string) rootkmsv1.RootKMSClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(c.pki.ClientCredentials(id)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return rootkmsv1.NewRootKMSClient(conn)
}

// TestMembershipIsForOperators: replicas are not operators (they may not
// remove members or snapshot), a replica may join only as the server ID its
// SPIFFE ID names, and no join rewrites an existing member unless an
// operator asks.
func TestMembershipIsForOperators(t *testing.T) {
	c := newChain(t)
	r1 := c.startReplica("rootkms-1", true, false)
	if err := r1.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if ready, _ := r1.srv.Readiness(); ready && r1.srv.Raft().State() == raft.Leader {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("rootkms-1 never led")
		}
	}
	const (
		self      = "spiffe://cairn.test/rootkms/global/rootkms-1"
		other     = "spiffe://cairn.test/rootkms/global/rootkms-2"
		namesake  = "spiffe://cairn.test/rootkms/us-east/rootkms-1" // same name, another region
		operator  = "spiffe://cairn.test/operator/global/operator"
		stranger  = "spiffe://cairn.test/kms/us-east/rootkms-1"
		newMember = "rootkms-2"
	)
	ctx := bg(t)
	st, err := c.rawClient(t, self, r1.api).GetClusterStatus(ctx, &rootkmsv1.GetClusterStatusRequest{})
	if err != nil || len(st.GetMembers()) != 1 {
		t.Fatalf("GetClusterStatus = %v, %v; want one member", st, err)
	}
	me := st.GetMembers()[0]

	for _, id := range []string{self, other} {
		if _, err := c.rawClient(t, id, r1.api).Remove(ctx, &rootkmsv1.RemoveRequest{Id: "rootkms-1"}); status.Code(err) != codes.PermissionDenied {
			t.Errorf("Remove as replica %s = %v, want PermissionDenied", id, err)
		}
		if _, err := c.rawClient(t, id, r1.api).Snapshot(ctx, &rootkmsv1.SnapshotRequest{}); status.Code(err) != codes.PermissionDenied {
			t.Errorf("Snapshot as replica %s = %v, want PermissionDenied", id, err)
		}
	}
	// An operator is let through (a fresh replica has nothing to snapshot).
	if _, err := c.rawClient(t, operator, r1.api).Snapshot(ctx, &rootkmsv1.SnapshotRequest{}); status.Code(err) == codes.PermissionDenied {
		t.Errorf("Snapshot as operator = %v, want it allowed", err)
	}

	joins := []struct {
		name   string
		caller string
		req    *rootkmsv1.JoinRequest
		code   codes.Code
	}{
		{"replica joins as another server ID", other,
			&rootkmsv1.JoinRequest{Id: "rootkms-3", Address: "127.0.0.1:1", ApiAddress: "127.0.0.1:2", Suffrage: rootkmsv1.Suffrage_SUFFRAGE_VOTER}, codes.PermissionDenied},
		{"same name in another region rewrites the voter's address", namesake,
			&rootkmsv1.JoinRequest{Id: "rootkms-1", Address: "127.0.0.1:1", ApiAddress: r1.api, Suffrage: rootkmsv1.Suffrage_SUFFRAGE_VOTER}, codes.PermissionDenied},
		{"the voter itself moves its address", self,
			&rootkmsv1.JoinRequest{Id: "rootkms-1", Address: "127.0.0.1:1", ApiAddress: r1.api, Suffrage: rootkmsv1.Suffrage_SUFFRAGE_VOTER}, codes.PermissionDenied},
		{"the voter demotes itself", self,
			&rootkmsv1.JoinRequest{Id: "rootkms-1", Address: me.GetAddress(), ApiAddress: r1.api, Suffrage: rootkmsv1.Suffrage_SUFFRAGE_NONVOTER}, codes.PermissionDenied},
		{"another tier with a replica's name", stranger,
			&rootkmsv1.JoinRequest{Id: "rootkms-1", Address: me.GetAddress(), ApiAddress: r1.api, Suffrage: rootkmsv1.Suffrage_SUFFRAGE_VOTER}, codes.PermissionDenied},
		{"the voter rejoins as it is: idempotent", self,
			&rootkmsv1.JoinRequest{Id: "rootkms-1", Address: me.GetAddress(), ApiAddress: r1.api, Suffrage: rootkmsv1.Suffrage_SUFFRAGE_VOTER}, codes.OK},
	}
	for _, tt := range joins {
		t.Run(tt.name, func(t *testing.T) {
			_, err := c.rawClient(t, tt.caller, r1.api).Join(ctx, tt.req)
			if status.Code(err) != tt.code {
				t.Errorf("Join(%s as %s) = %v, want %v", tt.req.GetId(), tt.caller, err, tt.code)
			}
		})
	}
	// Nothing changed: one member, at its own address.
	st, err = c.rawClient(t, self, r1.api).GetClusterStatus(ctx, &rootkmsv1.GetClusterStatusRequest{})
	if err != nil || len(st.GetMembers()) != 1 || st.GetMembers()[0].GetAddress() != me.GetAddress() || st.GetMembers()[0].GetSuffrage() != rootkmsv1.Suffrage_SUFFRAGE_VOTER {
		t.Errorf("after the refused joins: members %v (%v), want only %v", st.GetMembers(), err, me)
	}
	// A new replica may join as itself.
	r2 := c.startReplica(newMember, false, false, r1.api)
	if err := r2.srv.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	waitMembers(t, r1, 2)

	recs, err := audit.ReadFile(r1.auditLog)
	if err != nil {
		t.Fatal(err)
	}
	refused := map[string]int{}
	for _, r := range recs {
		if r.Operation == "/cairn.rootkms.v1.RootKMS/Join" && r.Outcome == audit.OutcomeDenied {
			refused[r.Identity]++
		}
	}
	for _, want := range []string{other, namesake, self, stranger} {
		if refused[want] == 0 {
			t.Errorf("no denied Join audit record for %s; have %v", want, refused)
		}
	}
}

func waitMembers(t *testing.T, r *replica, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for {
		f := r.srv.Raft().GetConfiguration()
		if f.Error() == nil && len(f.Configuration().Servers) == n {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s never saw %d members", r.id, n)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func TestJoinSelfID(t *testing.T) {
	replicas, _ := identity.ParseAllowlist(td, "rootkms/*/*")
	tests := []struct {
		caller, want string
		ok           bool
	}{
		{"spiffe://cairn.test/rootkms/global/rootkms-1", "rootkms-1", true},
		{"spiffe://cairn.test/rootkms/us-east/replica-east", "replica-east", true},
		{"spiffe://cairn.test/kms/us-east/rootkms-1", "", false},
		{"spiffe://cairn.test/operator/global/rootkms-1", "", false},
	}
	for _, tt := range tests {
		got, err := rootkms.JoinSelfID(replicas, identity.MustParse(tt.caller))
		if got != tt.want || (err == nil) != tt.ok {
			t.Errorf("JoinSelfID(%s) = %q, %v; want %q, ok %v", tt.caller, got, err, tt.want, tt.ok)
		}
	}
}

// TestOperatorsAreNotReplicas: an operator pattern that matches replica
// identities is refused.
func TestOperatorsAreNotReplicas(t *testing.T) {
	c := newChain(t)
	for _, pattern := range []string{"rootkms/*/*", "*/global/*", "rootkms/global/operator"} {
		ops, err := identity.ParseAllowlist(td, pattern)
		if err != nil {
			t.Fatal(err)
		}
		a, _ := audit.Open(filepath.Join(t.TempDir(), "audit.log"), audit.Options{})
		_, err = rootkms.New(rootkms.Config{ID: "r", DataDir: t.TempDir(), Manifest: c.manifest, Distributors: []string{c.distAddr},
			Source: c.pki.Source("spiffe://cairn.test/rootkms/global/rootkms-1"), Audit: a, Operators: ops})
		a.Close()
		if err == nil || !strings.Contains(err.Error(), "replicas are not operators") {
			t.Errorf("New(Operators %s) = %v, want an error: replicas are not operators", pattern, err)
		}
	}
}

// TestDropRootKey: only officers may drop the root key; the replica then
// refuses RMK-dependent calls until it fetches the key again (at once here:
// the distributor is unsealed).
func TestDropRootKey(t *testing.T) {
	c := newChain(t)
	r1 := c.startReplica("rootkms-1", true, false)
	if err := r1.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	ctx := bg(t)
	for _, id := range []string{"spiffe://cairn.test/rootkms/global/rootkms-1", regionctlID, "spiffe://cairn.test/operator/global/operator"} {
		if _, err := c.rawClient(t, id, r1.api).DropRootKey(ctx, &rootkmsv1.DropRootKeyRequest{Reason: "x"}); status.Code(err) != codes.PermissionDenied {
			t.Errorf("DropRootKey as %s = %v, want PermissionDenied", id, err)
		}
	}
	officer := c.rawClient(t, "spiffe://cairn.test/officer/global/officer-1", r1.api)
	if _, err := officer.DropRootKey(ctx, &rootkmsv1.DropRootKeyRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("DropRootKey without a reason = %v, want InvalidArgument", err)
	}
	if !r1.srv.HasRootKey() {
		t.Fatal("a refused DropRootKey dropped the key")
	}
	resp, err := officer.DropRootKey(ctx, &rootkmsv1.DropRootKeyRequest{Reason: "drill"})
	if err != nil || !resp.GetHadRootKey() {
		t.Fatalf("DropRootKey as an officer = %v, %v; want it had the key", resp, err)
	}
	// The distributor is unsealed, so the replica fetches the key again.
	if err := r1.srv.WaitReady(ctx); err != nil {
		t.Fatalf("no root key again after the drop: %v", err)
	}
	if loads := keyLoads(t, r1); loads != 2 {
		t.Errorf("root-key-loaded audit records = %d, want 2 (boot and after the drop)", loads)
	}
}

// halfJoin does the first half of a Join of id at raftAddr on leader, as a
// Join whose member record was never applied (leadership lost, a deadline)
// leaves it: the replica is a non-voter of the Raft configuration, with no
// API address registered.
func halfJoin(t *testing.T, leader *replica, id, raftAddr string) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); leader.srv.Raft().State() != raft.Leader; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s never led", leader.id)
		}
	}
	if err := leader.srv.Raft().AddNonvoter(raft.ServerID(id), raft.ServerAddress(raftAddr), 0, 5*time.Second).Error(); err != nil {
		t.Fatal(err)
	}
}

// memberAPIAddress is the API address the cluster status cl answers gives
// member id ("" if none).
func memberAPIAddress(t *testing.T, cl rootkmsv1.RootKMSClient, id string) string {
	t.Helper()
	st, err := cl.GetClusterStatus(bg(t), &rootkmsv1.GetClusterStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range st.GetMembers() {
		if m.GetId() == id {
			return m.GetApiAddress()
		}
	}
	return ""
}

// TestJoinRetryCompletesHalfJoin: the retry of a Join whose configuration
// change committed but whose member record did not registers the API
// address; it does not answer "already a member" and leave the replica
// without one (callers redirected to it would get no address).
func TestJoinRetryCompletesHalfJoin(t *testing.T) {
	c := newChain(t)
	r1 := c.startReplica("rootkms-1", true, false)
	if err := r1.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	halfJoin(t, r1, "x", "127.0.0.1:1")
	req := &rootkmsv1.JoinRequest{Id: "x", Address: "127.0.0.1:1", ApiAddress: "127.0.0.1:2", Suffrage: rootkmsv1.Suffrage_SUFFRAGE_NONVOTER}
	if _, err := c.rawClient(t, "spiffe://cairn.test/rootkms/us-east/x", r1.api).Join(bg(t), req); err != nil {
		t.Fatalf("Join retry of a half-applied join = %v", err)
	}
	if got := memberAPIAddress(t, c.rawClient(t, "spiffe://cairn.test/operator/global/operator", r1.api), "x"); got != req.GetApiAddress() {
		t.Errorf("member x's API address after the Join retry = %q, want %q", got, req.GetApiAddress())
	}
}

// TestJoiningReplicaCompletesHalfJoin: a replica configured to join that
// starts in the Raft configuration (its log says so) without a member
// record (its Join stopped half-way) joins again until the record exists,
// rather than taking "in the configuration" for joined.
func TestJoiningReplicaCompletesHalfJoin(t *testing.T) {
	c := newChain(t)
	r1 := c.startReplica("rootkms-1", true, false)
	if err := r1.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	// The replica, started without joining, is added half-way and
	// replicates the log that names it.
	r2 := c.startReplica("replica-east", false, true)
	halfJoin(t, r1, "replica-east", r2.raft)
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		ok, why := r2.srv.Readiness()
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica-east, added to the configuration, is not ready after 20s: %s", why)
		}
	}
	op := c.rawClient(t, "spiffe://cairn.test/operator/global/operator", r1.api)
	if got := memberAPIAddress(t, op, "replica-east"); got != "" {
		t.Fatalf("replica-east has API address %q before it joined; the test shows nothing", got)
	}

	// Restarted configured to join: it is in the configuration from the
	// start, and has no record.
	r2.stop()
	r2 = c.startReplicaAt(r2.api, r2.raft, "replica-east", false, true, r1.api)
	for deadline := time.Now().Add(20 * time.Second); memberAPIAddress(t, op, "replica-east") != r2.api; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("replica-east, in the configuration without a member record, registered no API address in 20s (it has %q)", memberAPIAddress(t, op, "replica-east"))
		}
	}
}

// keyLoads counts the root-key-loaded records of r's audit log.
func keyLoads(t *testing.T, r *replica) int {
	t.Helper()
	recs, err := audit.ReadFile(r.auditLog)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, rec := range recs {
		if rec.Operation == "rootkms/root-key-loaded" {
			n++
		}
	}
	return n
}
