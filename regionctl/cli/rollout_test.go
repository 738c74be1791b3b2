package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cairnkms/cairn/internal/identity/identitytest"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	"github.com/cairnkms/cairn/regionctl/cli"
	"github.com/cairnkms/cairn/regionctl/rollout"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The rollout tests drive regionctl rollout against the fleet env (a real
// root KMS and real KMS servers on one fake clock). The rollout records are
// kept in cli.MemRollouts: the root KMS's PutRollout/GetRollout/
// ListRollouts are not implemented yet. Bakes pass by the controller's
// sleep advancing the fake clock (after driving client traffic, if asked).

const rolloutBake = time.Minute

// newRolloutEnv is us-east (2 servers) and eu-west (1), each serving its
// first bundle (serial 1).
func newRolloutEnv(t *testing.T) *fleetEnv {
	e := newFleetEnv(t, map[string]int{"us-east": 2, "eu-west": 1})
	e.push("us-east")
	e.push("eu-west")
	return e
}

// buildBundle builds region's next bundle into the env's change dir.
func (e *fleetEnv) buildBundle(region string, extra ...string) string {
	e.t.Helper()
	out := filepath.Join(e.dir, "change", region+".bundle")
	e.mustRC(append([]string{"bundle", "build", "--region", region, "--out", out}, extra...)...)
	return out
}

// rollout runs regionctl rollout with store (nil: the root KMS's) and
// sleep (nil: only advance the clock).
func (e *fleetEnv) rollout(store *cli.MemRollouts, sleep func(time.Duration), args ...string) result {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if store != nil {
		ctx = cli.WithRollouts(ctx, store)
	}
	var out, errb bytes.Buffer
	code := cli.RunWith(ctx, append(append([]string{"rollout"}, args...), "--config", e.config), &out, &errb, cli.RunOptions{Now: e.clk.Now,
		Sleep: func(_ context.Context, d time.Duration) error {
			if sleep != nil {
				sleep(d)
			}
			e.clk.Advance(d)
			return nil
		}})
	return result{code: code, stdout: out.String(), stderr: errb.String()}
}

func (e *fleetEnv) serial(k *fleetKMS) uint64 { return e.status(k).GetBundle().GetSerial() }

// tryEncrypt encrypts through k as the region's demo client.
func (e *fleetEnv) tryEncrypt(k *fleetKMS) error {
	cc := e.dial(fmt.Sprintf("spiffe://%s/client/%s/app", identitytest.TrustDomain, k.region), k.addr)
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := kmsv1.NewKMSClient(cc).Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: fleetKeyset, Plaintext: []byte("dek")})
	return err
}

func storedRecord(t *testing.T, store *cli.MemRollouts, id string) rollout.Record {
	t.Helper()
	rec, _, err := store.Record(id)
	if err != nil {
		t.Fatalf("the store's record of %s: %v", id, err)
	}
	if err := rollout.Check(rec); err != nil {
		t.Errorf("the stored record breaks an invariant: %v", err)
	}
	return rec
}

// wantCanaryRolledBack checks a rollout whose canary (c1, named canary in
// rec) applied serial 2, failed its gates and was rolled back: the record
// says rolled back to last good serial 1 at serial 3, the canary serves 3
// and lets the demo client in again as under serial 1 (the change's
// content does not), and c2, the rest of us-east, never left serial 1.
func wantCanaryRolledBack(t *testing.T, e *fleetEnv, rec rollout.Record, canary string, c1, c2 *fleetKMS) {
	t.Helper()
	if sr := rec.Servers[canary]; rec.Phase != rollout.PhaseRolledBack || sr.Applied != 2 || sr.LastGood.Serial != 1 || sr.RolledBack != 3 {
		t.Errorf("record %s, canary %+v; want rolled-back, applied 2, last good 1, rolled back at 3", rec.Phase, sr)
	}
	if got := e.serial(c1); got != 3 {
		t.Errorf("the canary serves serial %d, want the rollback's 3", got)
	}
	if err := e.tryEncrypt(c1); err != nil {
		t.Errorf("Encrypt on the canary after the rollback = %v, want it served again as under serial 1", err)
	}
	if got := e.serial(c2); got != 1 {
		t.Errorf("the rest of us-east serves serial %d, want 1 (never received the change)", got)
	}
}

// inOrder reports whether the substrings appear in s in order.
func inOrder(s string, subs ...string) bool {
	for _, sub := range subs {
		i := strings.Index(s, sub)
		if i < 0 {
			return false
		}
		s = s[i+len(sub):]
	}
	return true
}

// TestRolloutHappyPath: a new version goes to us-east's canary, the rest of
// us-east, then eu-west, each stage dry-run, applied, baked and gated; every
// server ends on the new serial, in stage order, and the record says so.
func TestRolloutHappyPath(t *testing.T) {
	e := newRolloutEnv(t)
	e.mustRC("keyset", "rotate", fleetKeyset)
	us, eu := e.buildBundle("us-east"), e.buildBundle("eu-west")
	store := cli.NewMemRollouts(e.clk.Now)
	args := []string{"start", "--bundles", us + "," + eu, "--regions", "us-east,eu-west", "--bake", rolloutBake.String(),
		"--reason", "add a payments/ledger version", "--id", "r1"}
	c1, c2, w := e.kms["us-east"][0], e.kms["us-east"][1], e.kms["eu-west"][0]

	// --dry-run prints the plan and stores and changes nothing.
	r := e.rollout(store, nil, append(args, "--dry-run")...)
	if r.code != 0 {
		t.Fatalf("rollout start --dry-run = %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	contains(t, "rollout start --dry-run stdout", r.stdout, "rollout by "+regionctlID+": add a payments/ledger version",
		"stage 1/3 canary: us-east ["+c1.addr+"]; bake 1m0s", "stage 2/3 region us-east: us-east ["+c2.addr+"]",
		"stage 3/3 wave 1: eu-west ["+w.addr+"]", "dry run: nothing stored")
	if all, _ := store.List(context.Background(), false); len(all) != 0 {
		t.Errorf("rollout start --dry-run stored %d record(s)", len(all))
	}

	start := e.clk.Now()
	r = e.rollout(store, nil, args...)
	if r.code != 0 {
		t.Fatalf("rollout start = %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	if !inOrder(r.stdout, "stage 1/3 canary: dry run passed", "stage 1/3 canary: applied on all 1", "stage 1/3 canary passed its gates",
		"stage 2/3 region us-east: dry run passed", "stage 2/3 region us-east passed its gates",
		"stage 3/3 wave 1: dry run passed", "stage 3/3 wave 1 passed its gates", "rollout r1 completed") {
		t.Errorf("rollout start stdout is not the stages in order:\n%s", r.stdout)
	}
	for _, k := range []*fleetKMS{c1, c2, w} {
		if got := e.serial(k); got != 2 {
			t.Errorf("%s/%s serves serial %d after the rollout, want 2", k.region, k.name, got)
		}
	}
	rec := storedRecord(t, store, "r1")
	if rec.Phase != rollout.PhaseCompleted || rec.Epoch != 1 {
		t.Fatalf("record phase %s epoch %d, want completed at epoch 1\n%s", rec.Phase, rec.Epoch, rollout.Status(rec))
	}
	a1, a2, a3 := rec.Servers[c1.addr].AppliedAt, rec.Servers[c2.addr].AppliedAt, rec.Servers[w.addr].AppliedAt
	if !(a1.Equal(start) && a2.Equal(start.Add(rolloutBake)) && a3.Equal(start.Add(2*rolloutBake))) {
		t.Errorf("applied at %v, %v, %v; want one bake apart from %v, in stage order", a1, a2, a3, start)
	}
	for i, st := range rec.Stages {
		if st.Gate == nil || !st.Gate.Pass || st.Baseline == nil {
			t.Errorf("stage %d: baseline %v gate %+v, want a baseline and a passed gate", i+1, st.Baseline, st.Gate)
		}
	}

	// status reads the stored record; a second rollout for the regions is
	// no longer refused once this one completed.
	r = e.rollout(store, nil, "status", "r1")
	contains(t, "rollout status r1", r.stdout, "rollout r1 by", "completed", "stage 3 wave 1: passed")
	r = e.rollout(store, nil, "status", "--json")
	var list []rollout.Record
	if err := json.Unmarshal([]byte(r.stdout), &list); err != nil || len(list) != 1 || list[0].ID != "r1" {
		t.Errorf("rollout status --json = %v, %q; want [r1]", err, r.stdout)
	}
}

// lockoutChange checks that c1 serves the demo client before the change,
// then builds the change that locks it out (lockoutTeam) for us-east and
// eu-west, and returns the two bundles' paths.
func (e *fleetEnv) lockoutChange(t *testing.T, c1 *fleetKMS) (us, eu string) {
	t.Helper()
	for range 5 { // traffic before: all OK
		if err := e.tryEncrypt(c1); err != nil {
			t.Fatalf("Encrypt before the change = %v", err)
		}
	}
	writeFile(t, filepath.Join(e.teams, "payments.json"), lockoutTeam())
	us = e.buildBundle("us-east", "--force-shrink", "--reason", "test: lock the demo client out")
	eu = e.buildBundle("eu-west", "--force-shrink", "--reason", "test: lock the demo client out")
	return us, eu
}

// lockoutTeam is ledgerTeam with us-east's demo client (client/us-east/app)
// out of the ACL: only client/us-east/batch and eu-west's clients.
func lockoutTeam() string {
	acl := []string{"client/us-east/batch", "client/eu-west/*"}
	b, _ := json.Marshal(map[string]any{"team": "payments", "keysets": []any{map[string]any{
		"name": fleetKeyset, "regions": []string{"eu-west", "us-east"}, "purpose": "envelope", "rotation_period": time.Hour.String(),
		"ciphertext_ttl": (2 * time.Hour).String(), "acl": map[string]any{"encrypt": acl, "decrypt": acl}}}})
	return string(b)
}

// TestRolloutCanaryLockout: the change's ACL locks the demo client out. The
// canary's error rate rises while it bakes (the client keeps calling), its
// gate fails after one bake, the canary alone is rolled back to its last
// good content at a new serial, and neither the rest of us-east nor eu-west
// ever receives the change.
func TestRolloutCanaryLockout(t *testing.T) {
	e := newRolloutEnv(t)
	c1, c2, w := e.kms["us-east"][0], e.kms["us-east"][1], e.kms["eu-west"][0]
	us, eu := e.lockoutChange(t, c1)
	store := cli.NewMemRollouts(e.clk.Now)

	var bakes []time.Duration
	refused := 0
	traffic := func(d time.Duration) {
		bakes = append(bakes, d)
		for range 10 {
			if e.tryEncrypt(c1) != nil {
				refused++
			}
		}
	}
	start := e.clk.Now()
	r := e.rollout(store, traffic, "start", "--bundles", us+","+eu, "--regions", "us-east,eu-west", "--bake", rolloutBake.String(),
		"--reason", "tighten the ledger ACL", "--id", "r2")
	if r.code != 1 {
		t.Fatalf("rollout start = %d, want 1 (halted)\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	if refused != 10 {
		t.Errorf("the demo client was refused %d of 10 times on the canary during the bake, want 10", refused)
	}
	if len(bakes) != 1 || bakes[0] != rolloutBake || !e.clk.Now().Equal(start.Add(rolloutBake)) {
		t.Errorf("waited %v (clock at +%v), want one bake of %v", bakes, e.clk.Now().Sub(start), rolloutBake)
	}
	contains(t, "rollout start stdout", r.stdout, "HALTED: stage 1/3 canary failed its gates: error rate rose from 0.0000 to 1.0000",
		"rolling back 1 server(s) of the stage", "rolled back: every server that applied serves its last good content again")
	contains(t, "rollout start stderr", r.stderr, "rollout r2 ended rolled-back")
	rec := storedRecord(t, store, "r2")
	if rec.Phase != rollout.PhaseRolledBack || rec.Stage != 0 {
		t.Fatalf("record at stage %d %s, want stage 1 rolled-back\n%s", rec.Stage+1, rec.Phase, rollout.Status(rec))
	}
	if sr := rec.Servers[c1.addr]; sr.Applied != 2 || sr.RolledBack != 3 || sr.LastGood.Serial != 1 {
		t.Errorf("canary result %+v, want applied 2, last good 1, rolled back at 3", sr)
	}
	for _, k := range []*fleetKMS{c2, w} {
		if sr := rec.Servers[k.addr]; sr.DryRun != rollout.DryRunNone || sr.Applied != 0 {
			t.Errorf("%s/%s was touched: %+v", k.region, k.name, sr)
		}
		if got := e.serial(k); got != 1 {
			t.Errorf("%s/%s serves serial %d, want 1 (never received the change)", k.region, k.name, got)
		}
	}
	if got := e.serial(c1); got != 3 {
		t.Errorf("the canary serves serial %d, want the rollback's 3", got)
	}
	if err := e.tryEncrypt(c1); err != nil {
		t.Errorf("Encrypt on the canary after the rollback = %v, want the demo client served again", err)
	}

	// Stopped for good: resume has nothing to do, and the regions are free.
	r = e.rollout(store, nil, "resume", "r2")
	if r.code != 1 || !strings.Contains(r.stdout, "taken over") || e.serial(c2) != 1 {
		t.Errorf("rollout resume r2 = %d\n%s%s\nwant 1 (it stays rolled back), nothing applied", r.code, r.stdout, r.stderr)
	}
}

// TestRolloutDryRunRefused: a server refuses the canary's dry run (a bundle
// reusing the serial it serves with other content): the rollout fails
// before anything is applied anywhere.
func TestRolloutDryRunRefused(t *testing.T) {
	e := newRolloutEnv(t)
	e.mustRC("keyset", "rotate", fleetKeyset)
	us := e.buildBundle("us-east", "--serial", "1")
	eu := e.buildBundle("eu-west")
	store := cli.NewMemRollouts(e.clk.Now)
	r := e.rollout(store, nil, "start", "--bundles", us+","+eu, "--regions", "us-east,eu-west", "--bake", rolloutBake.String(),
		"--reason", "a bad bundle", "--id", "r3")
	if r.code != 1 {
		t.Fatalf("rollout start = %d, want 1\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	contains(t, "rollout start stdout", r.stdout, "HALTED: stage 1/3 canary: dry run refused on", "serial 1 is already applied with different content",
		"nothing of the stage was applied")
	rec := storedRecord(t, store, "r3")
	if rec.Phase != rollout.PhaseFailed {
		t.Errorf("record phase %s, want failed", rec.Phase)
	}
	for _, region := range []string{"us-east", "eu-west"} {
		for _, k := range e.kms[region] {
			if got := e.serial(k); got != 1 {
				t.Errorf("%s/%s serves serial %d, want 1 (nothing applied)", region, k.name, got)
			}
			if rec.Servers[k.addr].Applied != 0 {
				t.Errorf("%s/%s recorded as applied", region, k.name)
			}
		}
	}
}

// TestRolloutPauseResume: an operator pauses the rollout while its canary
// bakes; the running controller sees it at its next write and stops;
// resume takes the rollout over at epoch 2 and completes it.
func TestRolloutPauseResume(t *testing.T) {
	e := newRolloutEnv(t)
	e.mustRC("keyset", "rotate", fleetKeyset)
	us, eu := e.buildBundle("us-east"), e.buildBundle("eu-west")
	store := cli.NewMemRollouts(e.clk.Now)
	paused := false
	pause := func(time.Duration) {
		if !paused {
			paused = true
			if r := e.rollout(store, nil, "pause", "r4", "--reason", "looking at a graph"); r.code != 0 {
				t.Errorf("rollout pause = %d\n%s%s", r.code, r.stdout, r.stderr)
			}
		}
	}
	r := e.rollout(store, pause, "start", "--bundles", us+","+eu, "--regions", "us-east,eu-west", "--bake", rolloutBake.String(),
		"--reason", "add a version", "--id", "r4")
	if r.code != 0 || !strings.Contains(r.stdout, "paused: regionctl rollout resume r4") {
		t.Fatalf("rollout start with a pause during the bake = %d, want 0 and paused\n%s%s", r.code, r.stdout, r.stderr)
	}
	if rec := storedRecord(t, store, "r4"); !rec.Paused || rec.Phase != rollout.PhaseBaking || rec.Stage != 0 {
		t.Fatalf("after the pause: stage %d %s paused %v, want the canary baking, paused", rec.Stage+1, rec.Phase, rec.Paused)
	}
	if got := e.serial(e.kms["us-east"][1]); got != 1 {
		t.Errorf("the rest of us-east serves %d while paused, want 1", got)
	}
	r = e.rollout(store, nil, "resume", "r4", "--bundles", us+","+eu)
	if r.code != 0 {
		t.Fatalf("rollout resume = %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	contains(t, "rollout resume stdout", r.stdout, "taken over by "+regionctlID, "at epoch 2", "resumed by", "rollout r4 completed")
	if rec := storedRecord(t, store, "r4"); rec.Phase != rollout.PhaseCompleted || rec.Epoch != 2 {
		t.Errorf("after resume: %s at epoch %d, want completed at epoch 2", rec.Phase, rec.Epoch)
	}
	for _, region := range []string{"us-east", "eu-west"} {
		for _, k := range e.kms[region] {
			if got := e.serial(k); got != 2 {
				t.Errorf("%s/%s serves serial %d, want 2", region, k.name, got)
			}
		}
	}
}

// TestRolloutRootStore: without a store override the rollout's record is
// kept in the root KMS (PutRollout, GetRollout, ListRollouts), fenced by
// revision and epoch, and a second rollout for a busy region is refused.
func TestRolloutRootStore(t *testing.T) {
	e := newRolloutEnv(t)
	e.mustRC("keyset", "rotate", fleetKeyset)
	us, eu := e.buildBundle("us-east"), e.buildBundle("eu-west")
	paused := false
	pause := func(time.Duration) {
		if paused {
			return
		}
		paused = true
		if r := e.rollout(nil, nil, "pause", "r5", "--reason", "a second look"); r.code != 0 {
			t.Errorf("rollout pause = %d\n%s%s", r.code, r.stdout, r.stderr)
		}
		// A second rollout for the regions is refused while r5 is in flight.
		r := e.rollout(nil, nil, "start", "--bundles", us+","+eu, "--regions", "us-east,eu-west", "--reason", "again", "--id", "r6")
		if r.code != 1 || !strings.Contains(r.stderr, "in flight") {
			t.Errorf("a second rollout while r5 is in flight = %d, %q; want refused", r.code, r.stderr)
		}
	}
	r := e.rollout(nil, pause, "start", "--bundles", us+","+eu, "--regions", "us-east,eu-west", "--bake", rolloutBake.String(),
		"--reason", "add a version", "--id", "r5")
	if r.code != 0 || !strings.Contains(r.stdout, "paused: regionctl rollout resume r5") {
		t.Fatalf("rollout start = %d, want 0 and paused\n%s%s", r.code, r.stdout, r.stderr)
	}
	r = e.rollout(nil, nil, "resume", "r5", "--bundles", us+","+eu)
	if r.code != 0 {
		t.Fatalf("rollout resume = %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	contains(t, "rollout resume stdout", r.stdout, "at epoch 2", "rollout r5 completed")
	for _, region := range []string{"us-east", "eu-west"} {
		for _, k := range e.kms[region] {
			if got := e.serial(k); got != 2 {
				t.Errorf("%s/%s serves serial %d, want 2", region, k.name, got)
			}
		}
	}
	if r := e.rollout(nil, nil, "status"); r.code != 0 {
		t.Errorf("rollout status = %d\n%s%s", r.code, r.stdout, r.stderr)
	} else if strings.Contains(r.stdout, "r5") {
		contains(t, "rollout status stdout", r.stdout, "completed")
	}
	// A rollback of the completed rollout, by another controller once every
	// server moved on: each server still keeps the bundle it served before,
	// so the last good content is found; the rollback's success exits 0.
	r = e.rollout(nil, nil, "rollback", "r5", "--reason", "undo the rotation")
	if r.code != 0 {
		t.Fatalf("rollout rollback of the completed rollout = %d, want 0\n%s%s", r.code, r.stdout, r.stderr)
	}
	for _, region := range []string{"us-east", "eu-west"} {
		for _, k := range e.kms[region] {
			if got := e.serial(k); got <= 2 {
				t.Errorf("%s/%s serves serial %d after the rollback, want a new serial above 2", region, k.name, got)
			}
		}
	}
}

// TestRolloutToServersThatServedNothing: servers that served nothing (and
// refused their clients meanwhile) get their bundle from rotate --due's
// rollout, and each stage's gate judges them on what they answer once they
// serve it, not on the refusals before.
func TestRolloutToServersThatServedNothing(t *testing.T) {
	e := newFleetEnv(t, map[string]int{"us-east": 2})
	for _, k := range e.kms["us-east"] {
		if err := e.tryEncrypt(k); status.Code(err) != codes.Unavailable {
			t.Fatalf("Encrypt on %s, which serves nothing = %v, want Unavailable", k.addr, err)
		}
	}
	r := e.mustRC("rotate", "--due", "--bake", "1m")
	contains(t, "rotate --due stdout", r.stdout, "serves nothing: region us-east", "stage 1/2 canary passed its gates", "completed: every stage passed")
	for _, k := range e.kms["us-east"] {
		if err := e.tryEncrypt(k); err != nil {
			t.Errorf("Encrypt on %s after the rollout = %v", k.addr, err)
		}
	}
}

// TestRolloutRollbackAfterResumedApply: the canary applies the change but
// the record of it cannot be stored (the root KMS briefly unavailable), so
// the controller stops. rollout resume applies again; the KMS answers that
// it already serves the change (previous: the change itself). The rollback
// that the failing gate then asks for must restore what the canary served
// before the rollout (serial 1's content), not re-serve the change.
func TestRolloutRollbackAfterResumedApply(t *testing.T) {
	e := newRolloutEnv(t)
	c1, c2 := e.kms["us-east"][0], e.kms["us-east"][1]
	us, eu := e.lockoutChange(t, c1)
	store := cli.NewMemRollouts(e.clk.Now)
	failed := false
	store.FailPut(func(rec rollout.Record) bool {
		if !failed && rec.Servers[c1.addr].Applied != 0 {
			failed = true
			return true
		}
		return false
	})
	args := []string{"--bundles", us + "," + eu, "--regions", "us-east,eu-west", "--bake", rolloutBake.String()}
	r := e.rollout(store, nil, append([]string{"start", "--reason", "tighten the ledger ACL", "--id", "r8"}, args...)...)
	if r.code != 1 || !failed || !strings.Contains(r.stderr, "regionctl rollout resume r8") {
		t.Fatalf("rollout start with the Applied write failing = %d (write failed: %v), want 1 and told to resume\n%s%s", r.code, failed, r.stdout, r.stderr)
	}
	if got, rec := e.serial(c1), storedRecord(t, store, "r8"); got != 2 || rec.Servers[c1.addr].Applied != 0 {
		t.Fatalf("after the lost write the canary serves serial %d and the record says applied %d; want 2 served, 0 recorded", got, rec.Servers[c1.addr].Applied)
	}

	refused := 0
	traffic := func(time.Duration) {
		for range 10 {
			if e.tryEncrypt(c1) != nil {
				refused++
			}
		}
	}
	r = e.rollout(store, traffic, "resume", "r8", "--bundles", us+","+eu)
	if r.code != 1 || refused != 10 {
		t.Fatalf("rollout resume = %d with %d of 10 calls refused during the bake, want 1 (halted) and 10\n%s%s", r.code, refused, r.stdout, r.stderr)
	}
	contains(t, "rollout resume stdout", r.stdout, "taken over by", "stage 1/3 canary failed its gates",
		"rolled back: every server that applied serves its last good content again")
	wantCanaryRolledBack(t, e, storedRecord(t, store, "r8"), c1.addr, c1, c2)
}

// TestBundlePushRefusedDuringRollout: a push changes every server of its
// region at once, so while a rollout is in flight for the region (here held
// in its canary bake) bundle push is refused before it asks anything of a
// server, naming the rollout and how to end it. Other regions may still be
// pushed to, and once the rollout is done the push goes through.
func TestBundlePushRefusedDuringRollout(t *testing.T) {
	e := newRolloutEnv(t)
	c1, c2 := e.kms["us-east"][0], e.kms["us-east"][1]
	e.mustRC("keyset", "rotate", fleetKeyset)
	us := e.buildBundle("us-east")
	e.onBake = func(time.Duration) error { return context.Canceled }
	r := e.rc("rollout", "start", "--bundles", us, "--bake", rolloutBake.String(), "--reason", "held in its bake")
	m := regexp.MustCompile(`rollout (\S+) stored`).FindStringSubmatch(r.stdout)
	if r.code == 0 || m == nil {
		t.Fatalf("rollout start stopped in its bake = %d, want an error and a stored rollout\n%s%s", r.code, r.stdout, r.stderr)
	}
	id := m[1]
	e.onBake = nil
	if a, b := e.serial(c1), e.serial(c2); a != 2 || b != 1 {
		t.Fatalf("in the canary bake us-east serves serials %d, %d; want 2 (canary), 1", a, b)
	}

	next := filepath.Join(e.dir, "push-us.bundle")
	e.mustRC("bundle", "build", "--region", "us-east", "--out", next)
	r = e.rc("bundle", "push", "--bundle", next)
	if r.code != 1 {
		t.Fatalf("bundle push with rollout %s in flight = %d, want 1\n%s%s", id, r.code, r.stdout, r.stderr)
	}
	contains(t, "bundle push stderr (rollout in flight)", r.stderr, "region us-east has rollout "+id+" in flight",
		"regionctl rollout resume "+id, "rollout abort "+id)
	if a, b := e.serial(c1), e.serial(c2); a != 2 || b != 1 {
		t.Errorf("after the refused push us-east serves serials %d, %d; want 2, 1 (nothing changed)", a, b)
	}

	e.push("eu-west") // not in the rollout: pushed as ever
	e.mustRC("rollout", "resume", id)
	e.mustRC("bundle", "push", "--bundle", next)
	for _, k := range []*fleetKMS{c1, c2} {
		if got := e.serial(k); got != 3 {
			t.Errorf("%s/%s serves serial %d after the rollout and the push, want 3", k.region, k.name, got)
		}
	}
}

// lossyAdmin is a KMSAdmin in front of a real KMS server: it forwards every
// call, but answers the first real (not dry-run) ApplyBundle that the
// server applied with DeadlineExceeded: the answer is lost, not the apply.
type lossyAdmin struct {
	kmsv1.UnimplementedKMSAdminServer
	to   kmsv1.KMSAdminClient
	mu   sync.Mutex
	lost bool
}

func (l *lossyAdmin) ApplyBundle(ctx context.Context, req *kmsv1.ApplyBundleRequest) (*kmsv1.ApplyBundleResponse, error) {
	resp, err := l.to.ApplyBundle(ctx, req)
	l.mu.Lock()
	defer l.mu.Unlock()
	if err == nil && !req.GetDryRun() && !l.lost {
		l.lost = true
		return nil, status.Error(codes.DeadlineExceeded, "context deadline exceeded")
	}
	return resp, err
}

func (l *lossyAdmin) GetStatus(ctx context.Context, req *kmsv1.GetStatusRequest) (*kmsv1.GetStatusResponse, error) {
	return l.to.GetStatus(ctx, req)
}

func (l *lossyAdmin) Probe(ctx context.Context, req *kmsv1.ProbeRequest) (*kmsv1.ProbeResponse, error) {
	return l.to.Probe(ctx, req)
}

func (l *lossyAdmin) answerLost() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lost
}

// TestRolloutApplyAnswerLost: the canary applies the change but its answer
// is lost (DeadlineExceeded). The controller asks what it serves, counts it
// as applied, and so the failing gate rolls it back to serial 1's content;
// counted as not applied, the rollout would end failed with the change
// still served and nothing to roll back.
func TestRolloutApplyAnswerLost(t *testing.T) {
	e := newRolloutEnv(t)
	c1, c2 := e.kms["us-east"][0], e.kms["us-east"][1]
	cc := e.dial(regionctlID, c1.addr)
	t.Cleanup(func() { cc.Close() })
	lossy := &lossyAdmin{to: kmsv1.NewKMSAdminClient(cc)}
	srv := newServer(e.pki, fmt.Sprintf("spiffe://%s/kms/us-east/%s", identitytest.TrustDomain, c1.name))
	kmsv1.RegisterKMSAdminServer(srv, lossy)
	canary := serve(t, srv)
	e.files["regions"].(map[string][]string)["us-east"][0] = canary // regionctl reaches c1 through lossy
	e.writeConfig()

	us, eu := e.lockoutChange(t, c1)
	store := cli.NewMemRollouts(e.clk.Now)
	traffic := func(time.Duration) {
		for range 10 {
			_ = e.tryEncrypt(c1)
		}
	}
	r := e.rollout(store, traffic, "start", "--bundles", us+","+eu, "--regions", "us-east,eu-west", "--bake", rolloutBake.String(),
		"--reason", "tighten the ledger ACL", "--id", "r9")
	if r.code != 1 || !lossy.answerLost() {
		t.Fatalf("rollout start = %d (answer lost: %v), want 1 (halted) after a lost answer\n%s%s", r.code, lossy.answerLost(), r.stdout, r.stderr)
	}
	contains(t, "rollout start stderr", r.stderr, "DeadlineExceeded", "although its apply failed: counted as applied")
	contains(t, "rollout start stdout", r.stdout, "stage 1/3 canary failed its gates", "rolled back: every server that applied serves its last good content again")
	wantCanaryRolledBack(t, e, storedRecord(t, store, "r9"), canary, c1, c2)
}
