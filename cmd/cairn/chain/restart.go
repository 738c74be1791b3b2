package chain

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"

	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
)

// ErrStopping is returned by Restart once Stop has begun.
var ErrStopping = errors.New("chain: the chain is stopping")

// control is the launcher's side of `cairn up restart`: the control socket
// (control.go) and the serialization of restarts against each other and
// against Stop.
type control struct {
	// mu is held by a restart for its whole run, and by Stop before it
	// stops anything: a restart never overlaps another or the stop.
	mu       sync.Mutex
	stopping bool // on mu: Stop has begun; no restart starts

	// stopCtx ends when Stop begins, which cuts a restart's waits short.
	once     sync.Once
	stopCtx  context.Context
	stopFunc context.CancelFunc

	// The socket; set by startControl, on mu.
	lis     net.Listener
	path    string // the socket
	tempDir string // the directory made for it outside the state dir ("" if none)
	conns   sync.WaitGroup
	serving sync.WaitGroup
}

// stopContext returns a context that ends when Stop begins.
func (c *Chain) stopContext() context.Context {
	c.ctl.once.Do(func() { c.ctl.stopCtx, c.ctl.stopFunc = context.WithCancel(context.Background()) })
	return c.ctl.stopCtx
}

// Restart restarts the component named name ("us-east/kms-1", "rootkms-2",
// "distributor-1"): it stops the process (SIGTERM by its PID, SIGKILL after
// the grace period, as Stop does; one that had died already is just started
// again), starts it again with the same command line and state dir (a root
// KMS voter without --bootstrap or --join: it restarts from its Raft data),
// and waits until it is ready as Up does: a distributor unsealed (from its
// peers), a root KMS voter serving in the cluster, a KMS server serving its
// persisted bundle. It then records the new PID in chain.json. progress
// gets a line per step. Restarts run one at a time; once Stop has begun,
// Restart returns ErrStopping, and Stop cuts a running restart's wait short.
func (c *Chain) Restart(ctx context.Context, name string, progress func(line string)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(c.stopContext(), cancel)()

	c.ctl.mu.Lock()
	defer c.ctl.mu.Unlock()
	if c.ctl.stopping {
		return ErrStopping
	}
	var old *proc
	var names []string
	for _, p := range c.started() {
		names = append(names, p.Name)
		if p.Name == name {
			old = p
		}
	}
	if old == nil {
		return fmt.Errorf("chain: no component %q; the chain has %s", name, strings.Join(names, ", "))
	}

	line, err := old.stop(ctx, c.termTimeout)
	if line != "" {
		progress(line)
	}
	if errors.Is(err, ErrNotStopped) {
		return err
	}
	// A non-zero exit after SIGTERM, or a kill, is in the line; the old
	// process is gone either way.
	p := &proc{Component: old.Component, path: old.path, args: restartArgs(old), env: old.env}
	if err := c.start(p); err != nil {
		return err
	}
	c.replace(old, p)
	progress(fmt.Sprintf("started %s (pid %d), log %s", p.Name, p.PID, c.display(p.Log)))

	detail, err := c.waitReady(ctx, p)
	if err != nil {
		if ctx.Err() != nil && c.stopContext().Err() != nil {
			return fmt.Errorf("%w: %w", ErrStopping, err)
		}
		return err
	}
	progress(fmt.Sprintf("%s ready: %s", p.Name, detail))

	c.mu.Lock()
	written := c.info.Version != 0
	for i := range c.info.Components {
		if c.info.Components[i].Name == name {
			c.info.Components[i].PID = p.PID
		}
	}
	info := c.info
	info.Components = slices.Clone(c.info.Components)
	c.mu.Unlock()
	if written {
		if err := info.write(); err != nil {
			return err
		}
		progress(fmt.Sprintf("chain.json: %s is pid %d", name, p.PID))
	}
	return nil
}

// restartArgs is p's command line for a restart: a root KMS voter's
// without --bootstrap and --join, which only a first run gives (on a lost
// data dir, --bootstrap would make a second cluster).
func restartArgs(p *proc) []string {
	if p.Kind != "rootkms" {
		return slices.Clone(p.args)
	}
	var out []string
	for i := 0; i < len(p.args); i++ {
		switch a := p.args[i]; {
		case a == "--bootstrap" || a == "-bootstrap":
		case a == "--join" || a == "-join":
			i++ // and its value
		case strings.HasPrefix(a, "--join=") || strings.HasPrefix(a, "-join=") || strings.HasPrefix(a, "--bootstrap=") || strings.HasPrefix(a, "-bootstrap="):
		default:
			out = append(out, a)
		}
	}
	return out
}

// replace puts p where old was: in the started processes (so Stop keeps
// the reverse start order) and in the chain's description.
func (c *Chain) replace(old, p *proc) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if i := slices.Index(c.procs, old); i >= 0 {
		if j := slices.Index(c.procs, p); j >= 0 {
			c.procs = slices.Delete(c.procs, j, j+1)
		}
		c.procs[i] = p
	}
	swap := func(ps []*proc) {
		if i := slices.Index(ps, old); i >= 0 {
			ps[i] = p
		}
	}
	swap(c.dists)
	swap(c.roots)
	for _, ps := range c.kms {
		swap(ps)
	}
}

// waitReady waits until a restarted p is ready, by its kind, and says how
// it is. A process of another kind is ready once started.
func (c *Chain) waitReady(ctx context.Context, p *proc) (string, error) {
	switch p.Kind {
	case "distributor":
		st, err := c.waitDistributor(ctx, p, distributorv1.SealState_SEAL_STATE_UNSEALED)
		if err != nil {
			return "", fmt.Errorf("%w\nchain: a distributor unseals from an unsealed peer; with none, officers open an unseal ceremony: safe ceremony open --distributor %s", err, p.Address)
		}
		return fmt.Sprintf("unsealed by %s", st.GetUnsealedBy()), nil
	case "rootkms":
		st, err := c.waitRootKMS(ctx, p, p.Name, numRootKMS)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("serving in a cluster of %d voters, leader %s", numRootKMS, leaderOf(st)), nil
	case "kms":
		st, err := c.waitKMS(ctx, p, "SERVING its persisted bundle", serving)
		if err != nil {
			return "", err
		}
		return strings.TrimPrefix(kmsState(p, st), p.Name+" "), nil
	}
	return "started (no readiness check for its kind)", nil
}
