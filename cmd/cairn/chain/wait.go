package chain

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/cairnkms/cairn/internal/identity"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// Bounds of the waits for a component's state.
const (
	// waitTimeout bounds every wait for a component to reach a state.
	waitTimeout = 60 * time.Second
	// pollInterval is how often a wait asks.
	pollInterval = 50 * time.Millisecond
	// pollRPCTimeout bounds one status call.
	pollRPCTimeout = 2 * time.Second
)

// dial connects to a component as the observer (regionctl's identity, which
// every status API admits), accepting only a server matching serverPattern.
// The caller closes the connection.
func (c *Chain) dial(addr, serverPattern string) (*grpc.ClientConn, error) {
	only, err := identity.ParseAllowlist(c.observer.TrustDomain(), serverPattern)
	if err != nil {
		return nil, fmt.Errorf("chain: %w", err)
	}
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(identity.ClientCredentials(c.observer, only.Authorize)),
		// The servers are starting: reconnect quickly.
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.5, MaxDelay: 250 * time.Millisecond}, MinConnectTimeout: time.Second}))
	if err != nil {
		return nil, fmt.Errorf("chain: connecting to %s: %w", addr, err)
	}
	return conn, nil
}

// poll asks check every pollInterval until it reports ok. It fails when p
// exits, after waitTimeout, or when ctx ends. what says what is waited for,
// in failure messages ("unsealed").
func (c *Chain) poll(ctx context.Context, p *proc, what string, check func(context.Context) (ok bool, state string, err error)) error {
	deadline := time.Now().Add(waitTimeout)
	last := "no answer yet"
	for polls := 1; ; polls++ {
		cctx, cancel := context.WithTimeout(ctx, pollRPCTimeout)
		ok, state, err := check(cctx)
		cancel()
		if err == nil && ok {
			return nil
		}
		if err != nil {
			last = err.Error()
		} else {
			last = state
		}
		if exited, why := p.exited(); exited {
			return p.errorf("exited (%s) while the launcher waited until it was %s", exitString(why), what)
		}
		if ctx.Err() != nil {
			return errInterrupted
		}
		if time.Now().After(deadline) {
			return p.errorf("not %s after %s (%d polls); last: %s", what, waitTimeout, polls, last)
		}
		t := time.NewTimer(pollInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return errInterrupted
		case <-t.C:
		}
	}
}

// waitDistributor waits until the distributor reports state.
func (c *Chain) waitDistributor(ctx context.Context, p *proc, state distributorv1.SealState) (*distributorv1.GetStatusResponse, error) {
	conn, err := c.dial(p.Address, "distributor/*/*")
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	client := distributorv1.NewDistributorClient(conn)
	var st *distributorv1.GetStatusResponse
	what := strings.ToLower(strings.TrimPrefix(state.String(), "SEAL_STATE_"))
	err = c.poll(ctx, p, what, func(ctx context.Context) (bool, string, error) {
		var err error
		st, err = client.GetStatus(ctx, &distributorv1.GetStatusRequest{})
		if err != nil {
			return false, "", err
		}
		return st.GetState() == state, st.GetState().String(), nil
	})
	return st, err
}

// waitRootKMS waits until the voter holds the root key, is a member of the
// cluster, and knows a leader that registered its API address; with
// members > 0, until the cluster also has that many voters.
func (c *Chain) waitRootKMS(ctx context.Context, p *proc, id string, members int) (*rootkmsv1.ClusterStatus, error) {
	conn, err := c.dial(p.Address, "rootkms/*/*")
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	client := rootkmsv1.NewRootKMSClient(conn)
	var st *rootkmsv1.ClusterStatus
	what := "serving (root key, a member, leader known)"
	if members > 0 {
		what = fmt.Sprintf("serving in a cluster of %d voters", members)
	}
	err = c.poll(ctx, p, what, func(ctx context.Context) (bool, string, error) {
		var err error
		st, err = client.GetClusterStatus(ctx, &rootkmsv1.GetClusterStatusRequest{})
		if err != nil {
			return false, "", err
		}
		state := fmt.Sprintf("%s, root key %v, leader %q, %d members", st.GetState(), st.GetHasRootKey(), st.GetLeaderId(), len(st.GetMembers()))
		if r := st.GetNotReadyReason(); r != "" {
			state += ", not ready: " + r
		}
		if !st.GetHasRootKey() || st.GetLeaderApiAddress() == "" {
			return false, state, nil
		}
		voters := 0
		self := false
		for _, m := range st.GetMembers() {
			if m.GetId() == id {
				self = true
			}
			if m.GetSuffrage() == rootkmsv1.Suffrage_SUFFRAGE_VOTER {
				voters++
			}
		}
		return self && voters >= members, state, nil
	})
	return st, err
}

// waitKMS waits until the KMS server answers status with a state accepted
// by ok.
func (c *Chain) waitKMS(ctx context.Context, p *proc, what string, ok func(*kmsv1.GetStatusResponse) bool) (*kmsv1.GetStatusResponse, error) {
	conn, err := c.dial(p.Address, "kms/"+p.Region+"/*")
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	client := kmsv1.NewKMSAdminClient(conn)
	var st *kmsv1.GetStatusResponse
	err = c.poll(ctx, p, what, func(ctx context.Context) (bool, string, error) {
		var err error
		st, err = client.GetStatus(ctx, &kmsv1.GetStatusRequest{IncludeKeysets: true})
		if err != nil {
			return false, "", err
		}
		state := st.GetState().String()
		if r := st.GetNotReadyReason(); r != "" {
			state += ": " + r
		}
		return ok(st), state, nil
	})
	return st, err
}

// serving accepts a KMS server that serves a bundle.
func serving(st *kmsv1.GetStatusResponse) bool {
	return st.GetState() == kmsv1.ServingState_SERVING_STATE_SERVING && st.GetBundle() != nil
}

// answering accepts a KMS server in any state: it is up.
func answering(st *kmsv1.GetStatusResponse) bool {
	return st.GetState() != kmsv1.ServingState_SERVING_STATE_UNSPECIFIED
}

// leaderOf returns the leader's ID from a status, for progress lines.
func leaderOf(st *rootkmsv1.ClusterStatus) string {
	if st == nil || st.GetLeaderId() == "" {
		return "unknown"
	}
	return st.GetLeaderId()
}

// sortedKeysetNames returns the keyset names a KMS status lists.
func sortedKeysetNames(st *kmsv1.GetStatusResponse) []string {
	var names []string
	for _, k := range st.GetKeysets() {
		names = append(names, k.GetKeyset())
	}
	slices.Sort(names)
	return names
}
