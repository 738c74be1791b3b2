package chaos

import (
	"fmt"
	"time"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	"github.com/cairnkms/cairn/tests/framework"
)

// fault is one injected action and how to undo it.
type fault struct {
	a    Action
	heal func()
	// check, if set, runs at the end of the hold, before any heal, and
	// returns a violation or "".
	check func() string
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
			// Restarted while the root tier is down, it cannot unwrap
			// its region key: it must not serve until the root is back.
			f.check = func() string {
				st, err := k.Status()
				if err == nil && st.GetState() == kmsv1.ServingState_SERVING_STATE_SERVING {
					return fmt.Sprintf("%s, restarted while the root tier was down, says SERVING", k.Identity)
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
		if a.Kind == PauseVoter {
			v.Pause()
			c.paused[v.ID] = true
			return fault{a: a, heal: v.Resume}
		}
		v.Kill()
		return fault{a: a, heal: v.Restart}
	case KillDistributor:
		d := c.distributor(a.Target)
		d.Kill()
		return fault{a: a, heal: d.Restart}
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
	time.Sleep(st.Hold / 2)
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
	win.End = time.Now()
	return win, StepResult{Step: st, Recovery: win.End.Sub(healed)}
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
