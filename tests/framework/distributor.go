package framework

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/secret"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
)

// Observer is the identity the framework watches distributors as
// (GetStatus, GetCeremony are open to any member of the trust domain).
const Observer = "regionctl/global/regionctl"

// RootKMS is the identity that fetches the root key, as a root KMS replica
// would.
const RootKMS = "rootkms/global/rootkms-1"

// WaitTimeout bounds every wait for a distributor's state.
const WaitTimeout = 15 * time.Second

// pollInterval is how often a wait asks for the state.
const pollInterval = 25 * time.Millisecond

// rpcTimeout bounds one RPC from the test.
const rpcTimeout = 5 * time.Second

// infoRootKey is the HPKE info label of FetchRootKey replies
// (distributor.proto).
const infoRootKey = "cairn/distributor/v1/root-key"

// Distributor is one cmd/distributor process of a World.
type Distributor struct {
	*Process
	w *World
	// Name is its identity, "distributor/global/distributor-<i>".
	Name string
	// Addr is its 127.0.0.1:port, fixed across restarts.
	Addr string
	// StateDir holds genesis.json and audit.log.
	StateDir string
}

// Distributors describes n distributors on ports chosen now, each with all
// the others as --peers when peers is true. None is started.
func (w *World) Distributors(n int, peers bool) []*Distributor {
	w.T.Helper()
	ports := FreePorts(w.T, n)
	addrs := make([]string, n)
	for i, p := range ports {
		addrs[i] = fmt.Sprintf("127.0.0.1:%d", p)
	}
	var out []*Distributor
	for i := range n {
		d := &Distributor{w: w, Name: fmt.Sprintf("distributor/global/distributor-%d", i+1), Addr: addrs[i],
			StateDir: filepath.Join(w.Dir, "state", fmt.Sprintf("distributor-%d", i+1))}
		args := append(w.IDFlags(d.Name), "--listen", d.Addr, "--state-dir", d.StateDir,
			"--officers", "officer/global/*", "--root-key-readers", "rootkms/*/*", "--peer-ids", "distributor/*/*", "-v")
		if peers {
			var others []string
			for j, a := range addrs {
				if j != i {
					others = append(others, a)
				}
			}
			args = append(args, "--peers", strings.Join(others, ","))
		}
		d.Process = NewProcess(w.T, fmt.Sprintf("distributor-%d", i+1), w.Logs, w.Bin.Distributor, args)
		out = append(out, d)
	}
	return out
}

// Dial connects to the distributor as name over mTLS, accepting only a
// distributor's certificate on the other end. Close the connection.
func (d *Distributor) Dial(name string) (distributorv1.DistributorClient, *grpc.ClientConn) {
	d.w.T.Helper()
	src := d.w.Source(name)
	only, err := identity.ParseAllowlist(src.TrustDomain(), "distributor/*/*")
	if err != nil {
		d.w.T.Fatal(err)
	}
	conn, err := grpc.NewClient(d.Addr, append(d.w.dialOptions(),
		grpc.WithTransportCredentials(identity.ClientCredentials(src, only.Authorize)),
		// Reconnect quickly: the server is killed and restarted on purpose.
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.5, MaxDelay: 200 * time.Millisecond}, MinConnectTimeout: time.Second}))...)
	if err != nil {
		d.w.T.Fatalf("grpc.NewClient(%s) = %v", d.Addr, err)
	}
	return distributorv1.NewDistributorClient(conn), conn
}

// Status asks for the distributor's status (as Observer).
func (d *Distributor) Status() (*distributorv1.GetStatusResponse, error) {
	c, conn := d.Dial(Observer)
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	return c.GetStatus(ctx, &distributorv1.GetStatusRequest{})
}

// Ceremony asks for a ceremony by id (as Observer).
func (d *Distributor) Ceremony(id string) (*distributorv1.Ceremony, error) {
	c, conn := d.Dial(Observer)
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	return c.GetCeremony(ctx, &distributorv1.GetCeremonyRequest{CeremonyId: id})
}

// WaitStatus polls GetStatus until ok accepts the reply, and returns the
// reply and how long it took. It fails the test after WaitTimeout, or at once
// if the process exits.
func (d *Distributor) WaitStatus(what string, ok func(*distributorv1.GetStatusResponse) bool) (*distributorv1.GetStatusResponse, time.Duration) {
	d.w.T.Helper()
	c, conn := d.Dial(Observer)
	defer conn.Close()
	get := func() (*distributorv1.GetStatusResponse, error) {
		ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
		defer cancel()
		return c.GetStatus(ctx, &distributorv1.GetStatusRequest{})
	}
	return waitStatus(d.w.T, d.Process, d.Name, what, get, ok)
}

// WaitState waits until the distributor reports state (see WaitStatus).
func (d *Distributor) WaitState(state distributorv1.SealState) (*distributorv1.GetStatusResponse, time.Duration) {
	d.w.T.Helper()
	return d.WaitStatus(state.String(), func(st *distributorv1.GetStatusResponse) bool { return st.GetState() == state })
}

// FetchRootKey fetches the RMK of genesis genesisID as name, the way a root
// KMS replica does: with an ephemeral HPKE key, opening the reply with the
// info bound to the genesis and the caller's SPIFFE ID. The caller wipes the
// key.
func (d *Distributor) FetchRootKey(name, genesisID string) (secret.Bytes, *distributorv1.FetchRootKeyResponse, error) {
	d.w.T.Helper()
	c, conn := d.Dial(name)
	defer conn.Close()
	r, err := hpkeseal.NewRecipient()
	if err != nil {
		d.w.T.Fatal(err)
	}
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	resp, err := c.FetchRootKey(ctx, &distributorv1.FetchRootKeyRequest{Recipient: r.PublicKey(), GenesisId: genesisID})
	if err != nil {
		return secret.Bytes{}, nil, err
	}
	info, err := hpkeseal.Info(infoRootKey, genesisID, SPIFFEID(name))
	if err != nil {
		d.w.T.Fatal(err)
	}
	rmk, err := r.Open(resp.GetSealedRootKey(), info)
	if err != nil {
		return secret.Bytes{}, resp, fmt.Errorf("opening the sealed root key: %w", err)
	}
	return rmk, resp, nil
}

// Audit reads the distributor's audit log.
func (d *Distributor) Audit() []audit.Record {
	d.w.T.Helper()
	recs, err := audit.ReadFile(filepath.Join(d.StateDir, "audit.log"))
	if err != nil {
		d.w.T.Fatalf("audit.ReadFile(%s) = %v", d.Name, err)
	}
	return recs
}
