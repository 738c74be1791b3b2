package chaos

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cairnkms/cairn/tests/framework"
)

// maxSteps bounds the schedule whatever the duration.
const maxSteps = 100000

// TestChaosSoak is issue 16's soak, first version: the whole chain (3
// distributors, 3 voters, us-east and eu-west with 2 KMS servers each, 3
// keysets) under a continuous envelope workload (a client per region and
// keyset, decrypts falling back to the other region where the keyset is in
// both), and an SRE driver (driver_test.go: rotate --due, bundle build and
// push, region key rotations recorded for porcupine) on a compressed clock,
// while the faults of a seeded schedule (schedule.go) run one step after
// another for -chaos.duration. It fails on any broken invariant:
//   - during the run, an acknowledged ciphertext that does not decrypt or
//     decrypts to another plaintext; a client error that no fault excuses (a
//     region with a KMS server up answers every call, through root-tier
//     outages too; a decrypt with a fallback is answered while its region
//     is down); a KMS server restarted while the root tier is down that says
//     it serves;
//   - a decrypt refused because its version no longer decrypts, unless the
//     record retired the version after the ciphertext's TTL, and before;
//   - at the end, a ledger entry that does not decrypt in every region of its
//     keyset (within its TTL, or past it with its version not retired); a
//     success with no ok audit record (by request ID) on a server of its
//     regions; the driver's root KMS history not linearizable, or a voter
//     whose region keys are not exactly what the last read says; a server
//     that does not stop cleanly or still runs.
//
// Goroutine leaks are TestMain's goleak. The report (faults, operations,
// errors by code and window, longest unavailability per region) is logged.
func TestChaosSoak(t *testing.T) {
	seed := *seedFlag
	if seed == 0 {
		var b [8]byte
		rand.Read(b[:])
		seed = binary.LittleEndian.Uint64(b[:]) >> 1
	}
	t.Logf("chaos seed %d: replay this schedule with -chaos.seed=%d", seed, seed)
	began := time.Now()
	c := startChain(t)
	topo := c.topology()
	sched, err := NewSchedule(seed, topo)
	if err != nil {
		t.Fatal(err)
	}
	duration := *durationFlag
	rate := *rateFlag
	maxOps := rate*int(duration/time.Second+60) + 1000
	wl := startWorkload(t, c, rate, maxOps)
	wl.waitLedger(t, 5, framework.WaitTimeout)
	stopDriver := startDriver(c.drv)
	t.Cleanup(stopDriver)

	rep := &Report{Seed: seed, Planned: duration, Began: time.Now()}
	var windows []Window
	end := time.Now().Add(duration)
	for len(rep.Steps) < maxSteps && time.Now().Before(end) {
		st := sched.Next()
		if err := st.Validate(topo); err != nil {
			t.Fatal(err)
		}
		win, res := c.runStep(st)
		t.Logf("%s: recovered %s after the heal; ledger %d", st, res.Recovery.Round(time.Millisecond), wl.ledger.size())
		windows = append(windows, win)
		rep.Steps = append(rep.Steps, res)
		time.Sleep(st.Gap)
	}
	stopDriver()
	wl.stop()

	var ops []Op
	var successes []success
	violations := c.violations
	for _, w := range wl.workers {
		ops = append(ops, w.ops...)
		successes = append(successes, w.successes...)
		violations = append(violations, w.violations...)
	}
	rep.Ledger = wl.ledger.size()
	replayOps, replayViolations := c.replay(t, wl.ledger)
	rep.Replayed = len(replayOps)
	violations = append(violations, replayViolations...)
	rep.Driver, rep.RegionKeyRotations = c.drv.stats, c.drv.rotated
	rep.Lifecycle = c.drv.lifecycle(t)
	exp := Expiry{TTL: map[string]time.Duration{}, Retired: rep.Lifecycle.Retired}
	for _, ks := range keysets {
		exp.TTL[ks.name] = ciphertextTTL
	}
	rep.Analysis = Analyze(append(ops, replayOps...), windows, exp)
	var rootViolations []string
	rep.Root, rootViolations = c.drv.checkRootWrites(t)
	violations = append(violations, rootViolations...)
	c.drv.root.Close()

	// Stop every server: the KMS servers first, whose audit logs then end
	// with a signed checkpoint, and are read.
	for _, k := range c.allKMS() {
		if err := k.Terminate(); err != nil {
			violations = append(violations, err.Error())
		}
	}
	var auditViolations []string
	var auditFirst time.Time
	rep.AuditChecked, rep.AuditDuplicates, auditFirst, auditViolations = c.auditCheck(t, successes)
	violations = append(violations, auditViolations...)
	for _, v := range c.voters {
		if err := v.Terminate(); err != nil {
			if c.paused[v.ID] {
				rep.KnownDefects = append(rep.KnownDefects, fmt.Sprintf("%s (paused during the run) did not stop cleanly: %v", v.ID, err))
				continue
			}
			violations = append(violations, err.Error())
		}
	}
	for _, d := range c.ds {
		if err := d.Terminate(); err != nil {
			violations = append(violations, err.Error())
		}
	}
	var procs []*framework.Process
	for _, k := range c.allKMS() {
		procs = append(procs, k.Process)
	}
	for _, v := range c.voters {
		procs = append(procs, v.Process)
	}
	for _, d := range c.ds {
		procs = append(procs, d.Process)
	}
	for _, p := range procs {
		if p.Running() {
			violations = append(violations, fmt.Sprintf("%s still runs (pid %d) after it was stopped", p.Name(), p.PID()))
		}
	}

	// No secret in any file: every process's logs, state and audit log,
	// regionctl's files, and every error a client or regionctl saw (written
	// out for the scan: error strings go back to callers too).
	var errs strings.Builder
	for _, o := range ops {
		if o.Err != "" {
			fmt.Fprintln(&errs, o.Err)
		}
	}
	for _, o := range replayOps {
		if o.Err != "" {
			fmt.Fprintln(&errs, o.Err)
		}
	}
	for _, e := range c.drv.stats.Samples {
		fmt.Fprintln(&errs, e)
	}
	if err := os.WriteFile(filepath.Join(c.w.Dir, "client-errors.txt"), []byte(errs.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	c.w.RequireNoSecrets(c.m, c.safes, nil, c.regionKeys)

	rep.Took = time.Since(began)
	rep.Violations = append(rep.Analysis.Violations, violations...)
	for _, at := range []time.Time{rep.Analysis.FirstViolation, auditFirst, c.firstViolation} {
		if !at.IsZero() && (rep.FirstViolation.IsZero() || at.Before(rep.FirstViolation)) {
			rep.FirstViolation = at
		}
	}
	t.Logf("\n%s", rep)
	if n := len(rep.Violations); n > 0 {
		t.Errorf("%d invariant violation(s) (seed %d; replay with -chaos.seed=%d): see the report above", n, seed, seed)
	}
	if rep.Ledger == 0 || rep.AuditChecked == 0 {
		t.Errorf("the workload acknowledged %d ciphertexts and %d audited successes, want some of each", rep.Ledger, rep.AuditChecked)
	}
}
