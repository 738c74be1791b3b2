package chaos

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/tests/framework"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fault is one injected action and how to undo it.
type fault struct {
	a    Action
	heal func()
	// check, if set, runs at the end of the hold, before any heal, and
	// returns a violation or "".
	check func() string
	// deposed is the leader the fault killed or paused (nil: none).
	deposed *framework.Replica
	// settle, if set, runs once the chain is healthy again after the heal.
	settle func()
}

// inject applies a and returns its fault. Voter faults aimed at the leader
// take the voter that leads now.
func (c *chain) inject(a Action) fault {
	c.t.Helper()
	switch a.Kind {
	case KillKMS:
		k := c.kmsServer(a.Target)
		k.Kill()
		f := fault{a: a, heal: k.Restart}
		if a.Early {
			// Restarted while the root tier is down or cut off, it
			// cannot unwrap its region key: it must not serve until the
			// root is back.
			f.check = func() string {
				st, err := k.Status()
				if err == nil && st.GetState() == kmsv1.ServingState_SERVING_STATE_SERVING {
					return fmt.Sprintf("%s, restarted while the root tier was down or unreachable, says SERVING", k.Identity)
				}
				return ""
			}
		}
		return f
	case RegionDown:
		for _, k := range c.kms[a.Target] {
			k.Kill()
		}
		return fault{a: a, heal: func() {
			for _, k := range c.kms[a.Target] {
				k.Restart()
			}
		}}
	case KillVoter, PauseVoter:
		v := c.targetVoter(a.Target)
		var deposed *framework.Replica
		if st, err := v.Status(); err == nil && st.GetState() == rootkmsv1.ReplicaState_REPLICA_STATE_LEADER {
			deposed = v
		}
		if a.Kind == PauseVoter {
			v.Pause()
			c.paused[v.ID] = true
			return fault{a: a, heal: v.Resume, deposed: deposed}
		}
		v.Kill()
		return fault{a: a, heal: v.Restart, deposed: deposed}
	case KillDistributor:
		d := c.distributor(a.Target)
		d.Kill()
		return fault{a: a, heal: d.Restart}
	case AuditSinkFail:
		k := c.kmsServer(a.Target)
		fi, err := os.Stat(filepath.Join(k.StateDir, "audit.log"))
		if err != nil {
			c.t.Fatalf("%s: %v", a, err)
		}
		old, err := k.FileSizeLimit(uint64(fi.Size()))
		if err != nil {
			c.t.Fatalf("%s: %v", a, err)
		}
		// The fault must bite: a call straight to the server, at the end
		// of the hold, is refused for want of its audit record.
		region, _, _ := strings.Cut(a.Target, "/")
		check := func() string {
			ks := keysets[slices.IndexFunc(keysets, func(k keysetSpec) bool { return slices.Contains(k.regions, region) })]
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err := k.Client(clientOf(region)).Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: ks.name, Plaintext: make([]byte, 32)})
			if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "audit log unavailable") {
				return fmt.Sprintf("%s: an Encrypt straight to %s while its audit writes fail = %v, want Unavailable (audit log unavailable): the server served a call it could not audit, or the fault did not take", a, k.Identity, err)
			}
			return ""
		}
		return fault{a: a, check: check, heal: func() {
			if _, err := k.FileSizeLimit(old); err != nil {
				c.t.Fatalf("healing %s: %v", a, err)
			}
		}}
	case VoterDeaf, VoterSlow:
		v := c.targetVoter(a.Target)
		p := c.raftProxy[v.ID]
		if a.Kind == VoterDeaf {
			p.Set(framework.NetFault{Blackhole: true})
		} else {
			p.Set(framework.NetFault{Latency: 100 * time.Millisecond, Jitter: 100 * time.Millisecond})
		}
		return fault{a: a, heal: p.Heal}
	case RootUnreachable:
		for _, p := range c.rootProxies {
			p.Set(framework.NetFault{Blackhole: true})
		}
		return fault{a: a, heal: func() {
			for _, p := range c.rootProxies {
				p.Heal()
			}
		}}
	case IsolateLeader:
		l := c.targetVoter(LeaderTarget)
		var paused []*framework.Replica
		for _, v := range c.voters {
			if v != l {
				v.Pause()
				c.paused[v.ID] = true
				paused = append(paused, v)
			}
		}
		w := c.writeToIsolated(l)
		return fault{a: a, check: w.verdict, settle: w.settle, heal: func() {
			for _, v := range paused {
				v.Resume()
			}
		}}
	case RootTierDown:
		for _, d := range c.ds {
			d.Pause()
		}
		for _, v := range c.voters {
			v.Kill()
		}
		return fault{a: a, heal: func() {
			for _, d := range c.ds {
				d.Resume()
			}
			for _, v := range c.voters {
				v.Restart()
			}
		}}
	}
	c.t.Fatalf("unknown fault %v", a)
	return fault{}
}

// targetVoter resolves a voter target: LeaderTarget is the current leader.
func (c *chain) targetVoter(target string) *framework.Replica {
	c.t.Helper()
	if target == LeaderTarget {
		l, _, _ := framework.WaitLeader(c.voters...)
		return l
	}
	return c.voter(target)
}

// runStep injects st's actions, holds them (healing Early ones halfway),
// heals the rest, and waits until every component serves again. It returns
// the step's window and result; broken invariants go to c.violations.
func (c *chain) runStep(st Step) (Window, StepResult) {
	c.t.Helper()
	win := Window{Step: st, Start: time.Now()}
	var faults []fault
	for _, a := range st.Actions {
		faults = append(faults, c.inject(a))
	}
	// A deposed leader: how long until another voter leads (the time it
	// takes counts in the hold).
	var failover time.Duration
	for _, f := range faults {
		if f.deposed != nil {
			others := slices.DeleteFunc(slices.Clone(c.voters), func(r *framework.Replica) bool { return r == f.deposed })
			_, _, failover = framework.WaitLeader(others...)
		}
	}
	time.Sleep(st.Hold/2 - time.Since(win.Start))
	for _, f := range faults {
		if f.a.Early {
			f.heal()
		}
	}
	time.Sleep(st.Hold - st.Hold/2)
	for _, f := range faults {
		if f.check != nil {
			if v := f.check(); v != "" {
				c.violations = append(c.violations, fmt.Sprintf("step %d: %s", st.N, v))
				if c.firstViolation.IsZero() {
					c.firstViolation = win.Start
				}
			}
		}
	}
	healed := time.Now()
	for i := len(faults) - 1; i >= 0; i-- {
		if !faults[i].a.Early {
			faults[i].heal()
		}
	}
	c.waitHealthy()
	for _, f := range faults {
		if f.settle != nil {
			f.settle()
		}
	}
	win.End = time.Now()
	return win, StepResult{Step: st, Recovery: win.End.Sub(healed), Failover: failover}
}

// waitHealthy waits until every distributor is unsealed, a voter leads and
// every voter serves, and every KMS server serves its region's last fully
// pushed bundle or a later one (the driver may be pushing one: a push cut
// short by a fault leaves servers of a region on different serials until
// the driver's next push). Each wait fails the test after
// framework.WaitTimeout.
func (c *chain) waitHealthy() {
	c.t.Helper()
	for _, d := range c.ds {
		c.waitUnsealed(d)
	}
	framework.WaitLeader(c.voters...)
	for _, v := range c.voters {
		v.WaitServing()
	}
	for _, r := range regions {
		serial := c.servedSerial(r)
		for _, k := range c.kms[r] {
			k.WaitStatus(fmt.Sprintf("SERVING bundle serial %d or later", serial), func(st *kmsv1.GetStatusResponse) bool {
				return st.GetState() == kmsv1.ServingState_SERVING_STATE_SERVING && st.GetBundle().GetSerial() >= serial
			})
		}
	}
}

// isolatedWriteTimeout bounds the write sent straight to an isolated leader.
const isolatedWriteTimeout = 2 * time.Second

// isolatedWrite is a region key rotation sent straight to a leader whose
// followers were all just paused, recorded in the driver's history.
type isolatedWrite struct {
	c      *chain
	leader *framework.Replica
	call   *framework.Call
	in     framework.RegionInput
	reply  *rootkmsv1.Region
	err    error
}

// writeToIsolated sends a region key rotation straight to leader, with its
// own request ID, at once after its followers were paused: it may still
// believe it leads, but nothing can commit without a quorum, so the answer
// must not be a success (the root KMS confirms leadership with a Raft
// barrier before it proposes, and answers only what committed).
func (c *chain) writeToIsolated(leader *framework.Replica) *isolatedWrite {
	c.t.Helper()
	w := &isolatedWrite{c: c, leader: leader, in: framework.RegionInput{Op: framework.OpRotate, Region: regions[0]}}
	w.call = c.drv.hist.Begin(1, w.in)
	ctx, cancel := context.WithTimeout(context.Background(), isolatedWriteTimeout)
	defer cancel()
	w.call.Attempt()
	w.reply, w.err = leader.Client(framework.Regionctl).RotateRegionKey(rootkmsclient.WithRequestID(ctx, w.call.RequestID()),
		&rootkmsv1.RotateRegionKeyRequest{Region: w.in.Region})
	return w
}

// verdict is the write's violation, if it was acknowledged.
func (w *isolatedWrite) verdict() string {
	if w.err != nil {
		return ""
	}
	return fmt.Sprintf("the leader %s acknowledged a region key rotation of %s (primary version %d) while every other voter was paused: no quorum could have committed it",
		w.leader.ID, w.in.Region, w.reply.GetPrimaryVersion())
}

// settle ends the recorded operation: an answer that says what happened
// ends it as it is; otherwise the rotation is sent again through the
// cluster client with the same request ID (the root KMS applies it at most
// once) until the cluster says what became of it.
func (w *isolatedWrite) settle() {
	for try := 0; try < 5 && framework.Classify(w.in.Op, w.reply, w.err).Outcome == framework.OutcomeUnknown; try++ {
		w.reply, w.err = w.c.drv.send(w.call, w.in)
	}
	if w.err != nil {
		w.reply = nil
	}
	w.call.End(w.reply, w.err)
}
