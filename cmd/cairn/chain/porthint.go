package chain

import (
	"errors"
	"fmt"
	"syscall"
	"time"
)

// hintTries bounds the base ports portsHint checks.
const hintTries = 20

// explainTakenPorts gives a *PortsTakenError from checkPorts its hint (see
// portsHint); other errors pass through.
func (c *Chain) explainTakenPorts(err error) error {
	var pt *PortsTakenError
	if errors.As(err, &pt) {
		pt.Hint = portsHint(c.s.StateDir, c.display(c.s.StateDir), pt.Base, c.ports.all, c.s.Rerun)
	}
	return err
}

// portsHint says what to do when ports of plan (base port base) are taken.
// If chain.json of stateDir (shown as shown) describes a chain that runs
// (not stopped, its launcher and a component alive), that chain is in the
// way: use it or stop it. Otherwise it names the first base port above base
// whose whole plan it found free just now (freeBaseAfter), with
// --state-dir when the state dir's chain keeps its ports (a re-run), or
// says that it found none.
func portsHint(stateDir, shown string, base int, plan []Port, rerun bool) string {
	if info, err := Load(stateDir); err == nil && info.Running() {
		return fmt.Sprintf("the chain in %s is already running (cairn up, pid %d, ready since %s): use it, or stop it with Ctrl-C in its terminal (or kill %d) and run this again",
			shown, info.LauncherPID, info.StartedAt.Local().Format(time.TimeOnly), info.LauncherPID)
	}
	start := "is another `make up` or `cairn up` running? Stop it (Ctrl-C in its terminal), or "
	free, ok := freeBaseAfter(base, plan, hintTries)
	if !ok {
		return start + fmt.Sprintf("pick a --base-port whose ports are free (none of the %d base ports above %d that were checked has all its ports free)", hintTries, base)
	}
	span := planSpan(base, plan)
	if rerun {
		return start + fmt.Sprintf("free them: the chain in %s keeps base port %d (its Raft members keep their addresses); or start a new chain on ports found free just now: --base-port %d --state-dir <another dir> (ports %d-%d)",
			shown, base, free, free+1, free+span)
	}
	return start + fmt.Sprintf("start this chain on ports found free just now: --base-port %d (ports %d-%d)", free, free+1, free+span)
}

// Running reports whether the chain runs (as far as this machine's process
// table tells): not stopped, its launcher alive, and at least one of its
// components.
func (info *Info) Running() bool {
	if !info.StoppedAt.IsZero() || !alive(info.LauncherPID) {
		return false
	}
	for _, c := range info.Components {
		if alive(c.PID) {
			return true
		}
	}
	return false
}

// alive reports whether a process with this pid exists (it may be another
// user's).
func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// planSpan is the highest offset from base that plan uses.
func planSpan(base int, plan []Port) int {
	span := 0
	for _, p := range plan {
		span = max(span, p.Port-base)
	}
	return span
}

// freeBaseAfter returns the first base port above base, in steps of 100 (or
// of the next multiple of 100 above the plan's span), at most tries of them
// and within 1024..65535, for which checkPorts finds every port of plan,
// shifted there, free.
func freeBaseAfter(base int, plan []Port, tries int) (int, bool) {
	span := planSpan(base, plan)
	step := 100 * (span/100 + 1)
	for i := 1; i <= tries; i++ {
		cand := base + i*step
		if cand < 1024 {
			continue
		}
		if cand+span > 65535 {
			break
		}
		shifted := make([]Port, len(plan))
		for j, p := range plan {
			p.Port += cand - base
			shifted[j] = p
		}
		if checkPorts(shifted) == nil {
			return cand, true
		}
	}
	return 0, false
}
