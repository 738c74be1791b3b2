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
	recs, err := audit.ReadFile(r1.auditLog)
	if err != nil {
		t.Fatal(err)
	}
	loads := 0
	for _, r := range recs {
		if r.Operation == "rootkms/root-key-loaded" {
			loads++
		}
	}
	if loads != 2 {
		t.Errorf("root-key-loaded audit records = %d, want 2 (boot and after the drop)", loads)
	}
}
