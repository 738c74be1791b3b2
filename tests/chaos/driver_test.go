package chaos

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/tests/framework"
)

// The compressed clock of the SRE driver: every keyset rotates every
// rotationPeriod, its ciphertexts live ciphertextTTL, and the Safety
// Condition's propagation window (the root KMS's --safety-window and
// regionctl's propagation_window) is safetyWindow. A version is then added
// every 15 s, promoted about a window after its bundles are served, and
// retired TTL + window after its supersession: a 70 s run sees each several
// times.
const (
	rotationPeriod = 15 * time.Second
	ciphertextTTL  = 8 * time.Second
	safetyWindow   = 2 * time.Second
	destroyDelay   = 3 * time.Second
)

// driverInterval is the rest between two rounds of the driver;
// regionKeyEvery is how many rounds pass between two region key rotations.
const (
	driverInterval = 500 * time.Millisecond
	regionKeyEvery = 6
)

// rootWriteTimeout bounds one recorded root KMS call (every attempt, with
// one request ID): long enough to outlast a root-tier-down step, so that few
// writes end of unknown outcome.
const rootWriteTimeout = 15 * time.Second

// regionctlTimeout bounds one regionctl run.
const regionctlTimeout = 2 * time.Minute

// driver is the SRE: `regionctl rotate --due` (observe, add, promote,
// retire, destroy; no push), then `bundle build` and `bundle push` of every
// region whose keysets changed, until each push succeeds; and region key
// rotations and reads through the cluster client, recorded for porcupine.
// regionctl runs are retried in the next round when they fail: `rotate
// --due` is idempotent, and regionctl retries a write within one run with
// one request ID (rootkmsclient.Do); it has no flag to pin a request ID
// across runs.
type driver struct {
	c    *chain
	hist *framework.History
	root *rootkmsclient.Client

	// Written by the driver's goroutine only; read after it ended.
	stats   DriverStats
	pending map[string]bool // regions whose bundle must be built and pushed
	open    []openWrite     // recorded writes of unknown outcome, sent again each round
	runs    int
	// rotated counts the region key rotations the driver asked for.
	rotated int
}

var codeRE = regexp.MustCompile(`code = (\w+)|(REFUSED[^:]*)|(unreachable)`)

// failed counts a failed regionctl run by reason, keeping its first stderr.
func (d *driver) failed(cmd string, r rcResult) {
	why := reason(cmd, r)
	d.stats.Failures[why]++
	if _, ok := d.stats.Samples[why]; !ok {
		// A refusal's details (what a bundle drops, which server is
		// unsafe) may be on stdout, which its stderr points to.
		sample := strings.TrimSpace(r.stderr)
		if out := strings.TrimSpace(r.stdout); out != "" {
			sample += " | stdout: " + out[max(0, len(out)-1500):]
		}
		d.stats.Samples[why] = sample
	}
}

// reason sums up why a regionctl run failed, for the report.
func reason(cmd string, r rcResult) string {
	if r.code < 0 {
		return cmd + ": did not run to its end"
	}
	if m := codeRE.FindStringSubmatch(r.stderr); m != nil {
		return cmd + ": " + strings.Join(m[1:], "")
	}
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	last := lines[len(lines)-1]
	return cmd + ": " + last[:min(len(last), 60)]
}

var (
	doneRE = regexp.MustCompile(`(?m)^done: keyset (\S+): (added version|promoted version|disabled version|scheduled version|destroyed version) `)
	stepOf = map[string]string{"added version": "add", "promoted version": "promote", "disabled version": "disable",
		"scheduled version": "schedule-destroy", "destroyed version": "destroy"}
)

// newDriver returns the driver of c, with its history and cluster client
// (as regionctl), before the chain's regions exist: startChain creates them
// through it, recorded.
func newDriver(c *chain) *driver {
	return &driver{c: c, hist: framework.NewHistory(), stats: DriverStats{Steps: map[string]int{}, Failures: map[string]int{}, Samples: map[string]string{}}, pending: map[string]bool{}}
}

// connect makes the driver's cluster client once the voters run.
func (d *driver) connect() {
	d.root = rootkmsclient.New(d.c.w.Source(framework.Regionctl), framework.Addrs(d.c.voters...))
}

// recorded does one region operation through the cluster client, recorded
// in the history as one operation: every attempt carries the call's request
// ID, so the root KMS applies a retried write at most once. A write whose
// outcome it cannot tell (no answer, or not a definite one) stays open: the
// driver sends it again, with the same request ID, at the start of its next
// rounds (resolveOpen) until the cluster says what became of it, and the
// operation ends then. An open write is one long operation to porcupine, not
// one of unknown outcome that may take effect anywhere up to the end of the
// history: a few dozen of those make the check exponential.
func (d *driver) recorded(in framework.RegionInput) (*rootkmsv1.Region, error) {
	call := d.hist.Begin(0, in)
	reply, err := d.send(call, in)
	if in.Op != framework.OpGet && framework.Classify(in.Op, reply, err).Outcome == framework.OutcomeUnknown {
		d.open = append(d.open, openWrite{call: call, in: in})
		return reply, err
	}
	call.End(reply, err)
	return reply, err
}

// resent is recorded for a write whose reply the client "lost": once the
// cluster answered it, it is sent again with the same request ID, as a
// client that timed out after the commit would, and the operation ends with
// the second answer. The root KMS must answer it as a duplicate and not
// apply it twice; a second rotation would show as a version the history
// cannot explain (porcupine) at the next read.
func (d *driver) resent(in framework.RegionInput) {
	call := d.hist.Begin(0, in)
	reply, err := d.send(call, in)
	if framework.Classify(in.Op, reply, err).Outcome == framework.OutcomeOK {
		d.stats.Resent++
		reply, err = d.send(call, in)
	}
	if framework.Classify(in.Op, reply, err).Outcome == framework.OutcomeUnknown {
		d.open = append(d.open, openWrite{call: call, in: in})
		return
	}
	call.End(reply, err)
}

// openWrite is a recorded write whose outcome is not known yet.
type openWrite struct {
	call *framework.Call
	in   framework.RegionInput
}

// send makes one rootkmsclient.Do of in with call's request ID.
func (d *driver) send(call *framework.Call, in framework.RegionInput) (*rootkmsv1.Region, error) {
	ctx, cancel := context.WithTimeout(context.Background(), rootWriteTimeout)
	defer cancel()
	ctx = rootkmsclient.WithRequestID(ctx, call.RequestID())
	var reply *rootkmsv1.Region
	err := d.root.Do(ctx, func(ctx context.Context, rc rootkmsv1.RootKMSClient) error {
		call.Attempt()
		var err error
		switch in.Op {
		case framework.OpCreate:
			reply, err = rc.CreateRegion(ctx, &rootkmsv1.CreateRegionRequest{Region: in.Region})
		case framework.OpRotate:
			reply, err = rc.RotateRegionKey(ctx, &rootkmsv1.RotateRegionKeyRequest{Region: in.Region})
		case framework.OpGet:
			reply, err = rc.GetRegion(ctx, &rootkmsv1.GetRegionRequest{Region: in.Region})
		}
		return err
	})
	if err != nil {
		reply = nil
	}
	return reply, err
}

// resolveOpen sends every open write again with its own request ID and
// ends those the cluster now answers: a write it had committed is answered
// as a duplicate (not applied twice), one it never committed is applied
// now. The root KMS remembers the last fsm.MaxRequests request IDs, and an
// open write is sent again within a round or two, well inside that.
func (d *driver) resolveOpen() {
	kept := d.open[:0]
	for _, w := range d.open {
		reply, err := d.send(w.call, w.in)
		if framework.Classify(w.in.Op, reply, err).Outcome == framework.OutcomeUnknown {
			kept = append(kept, w)
			continue
		}
		w.call.End(reply, err)
		d.stats.Resolved++
	}
	d.open = kept
}

// closeOpen resolves the open writes once the chain is healed, trying a
// few times, and ends any left with its last error (of unknown outcome).
func (d *driver) closeOpen() {
	for range 5 {
		if len(d.open) == 0 {
			return
		}
		d.resolveOpen()
	}
	for _, w := range d.open {
		w.call.End(nil, status.Error(codes.Unavailable, "chaos: still unresolved at the end of the run"))
	}
	d.open = nil
}

// run is the driver's loop, until ctx ends.
func (d *driver) run(ctx context.Context) {
	for round := 1; ctx.Err() == nil; round++ {
		d.stats.Rounds++
		d.round(ctx, round)
		select {
		case <-ctx.Done():
		case <-time.After(driverInterval):
		}
	}
}

// round is one round: rotate --due, the pushes it calls for (and those
// still pending), a region key rotation every regionKeyEvery rounds, and a
// read of a region.
func (d *driver) round(ctx context.Context, round int) {
	d.resolveOpen()
	res := d.regionctl(ctx, "rotate", "--due", "--no-push", strings.Join(regions, ","), "--destroy-delay", destroyDelay.String())
	if ctx.Err() != nil {
		return
	}
	d.stats.RotateRuns++
	if res.code != 0 {
		d.stats.RotateFailed++
		d.failed("rotate", res)
	}
	for _, m := range doneRE.FindAllStringSubmatch(res.stdout, -1) {
		kind := stepOf[m[2]]
		d.stats.Steps[kind]++
		if kind == "schedule-destroy" {
			continue // the bundles do not change
		}
		for _, ks := range keysets {
			if ks.name == m[1] {
				for _, r := range ks.regions {
					d.pending[r] = true
				}
			}
		}
	}
	for _, r := range regions {
		if !d.pending[r] || ctx.Err() != nil {
			continue
		}
		d.stats.Pushes++
		if d.push(ctx, r) {
			delete(d.pending, r)
		} else {
			d.stats.PushFailed++
		}
	}
	if round%regionKeyEvery == 0 {
		d.rotated++
		in := framework.RegionInput{Op: framework.OpRotate, Region: regions[(round/regionKeyEvery)%len(regions)]}
		if d.rotated%2 == 0 {
			d.resent(in)
		} else {
			_, _ = d.recorded(in)
		}
	}
	_, _ = d.recorded(framework.RegionInput{Op: framework.OpGet, Region: regions[round%len(regions)]})
}

// push builds region's next bundle and pushes it to every server of the
// region (all or nothing before the apply); it reports whether regionctl
// said both went through.
func (d *driver) push(ctx context.Context, region string) bool {
	d.runs++
	out := filepath.Join(d.c.dir, fmt.Sprintf("driver-%s-%d.bundle", region, d.runs))
	b := d.regionctl(ctx, "bundle", "build", "--region", region, "--out", out)
	m := serialRE.FindStringSubmatch(b.stdout)
	if b.code != 0 || m == nil {
		d.failed("bundle build", b)
		return false
	}
	serial, err := strconv.ParseUint(m[1], 10, 64)
	if err != nil {
		return false
	}
	if p := d.regionctl(ctx, "bundle", "push", "--bundle", out); p.code != 0 {
		d.failed("bundle push", p)
		return false
	}
	d.c.served(region, serial)
	return true
}

// rcResult is one regionctl run.
type rcResult struct {
	code           int
	stdout, stderr string
}

// regionctl runs regionctl with the chain's config file, its output kept
// under the logs. It does not fail the test (it runs on the driver's
// goroutine): a run that cannot start or times out is exit code -1.
func (d *driver) regionctl(ctx context.Context, args ...string) rcResult {
	d.runs++
	name := filepath.Join(d.c.w.Logs, fmt.Sprintf("driver-%04d-%s", d.runs, strings.Join(args[:min(2, len(args))], "-")))
	ctx, cancel := context.WithTimeout(ctx, regionctlTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin.RegionctlBinary(), append(args, "--config", d.c.config)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	code := -1
	var exit *exec.ExitError
	if err == nil || errors.As(err, &exit) {
		code = cmd.ProcessState.ExitCode()
	}
	if err != nil && code == 0 {
		code = -1
	}
	_ = os.WriteFile(name+".stdout", stdout.Bytes(), 0o600)
	_ = os.WriteFile(name+".stderr", stderr.Bytes(), 0o600)
	return rcResult{code: code, stdout: stdout.String(), stderr: stderr.String()}
}

// lifecycle reads every keyset's record (as regionctl, through the leader)
// and counts its lifecycle.
func (d *driver) lifecycle(t *testing.T) Lifecycle {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), rootWriteTimeout)
	defer cancel()
	var resp *rootkmsv1.ListKeysetsResponse
	err := d.root.Do(ctx, func(ctx context.Context, rc rootkmsv1.RootKMSClient) error {
		var err error
		resp, err = rc.ListKeysets(ctx, &rootkmsv1.ListKeysetsRequest{})
		return err
	})
	if err != nil {
		t.Fatalf("ListKeysets = %v", err)
	}
	out := Lifecycle{Retired: map[string]map[uint32]time.Time{}}
	for _, k := range resp.GetKeysets() {
		rec := k.GetRecord()
		out.Retired[rec.GetName()] = map[uint32]time.Time{}
		for i, v := range rec.GetVersions() {
			if i > 0 {
				out.Rotations++
				if v.GetPrimarySince() != nil {
					out.Promotions++
				}
			}
			if v.GetDisabledAt() != nil {
				out.Retirements++
				out.Retired[rec.GetName()][v.GetKeyId()] = v.GetDisabledAt().AsTime()
			}
			if v.GetState() == statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROYED {
				out.Destructions++
			}
		}
	}
	return out
}

// finalRegions reads every region through the cluster client (recorded)
// and returns the primary version of each.
func (d *driver) finalRegions(t *testing.T) map[string]uint32 {
	t.Helper()
	out := map[string]uint32{}
	for _, r := range regions {
		reply, err := d.recorded(framework.RegionInput{Op: framework.OpGet, Region: r})
		if err != nil {
			t.Fatalf("final GetRegion(%s) = %v", r, err)
		}
		out[r] = reply.GetPrimaryVersion()
	}
	return out
}

// replicaStateTimeout bounds how long a replica may take to apply what the
// leader committed before its state is judged.
const replicaStateTimeout = 10 * time.Second

// replicaViolations checks that every voter serves, from its own state,
// exactly the region key versions want implies (1..want[r], the last one
// primary, the others enabled) with the same key bytes as every other
// voter: no acknowledged write missing, none invented.
func (c *chain) replicaViolations(want map[string]uint32) []string {
	c.t.Helper()
	var out []string
	for _, r := range regions {
		var first map[uint32][]byte
		for _, v := range c.voters {
			var keys map[uint32][]byte
			problem := ""
			deadline := time.Now().Add(replicaStateTimeout)
			for {
				keys, problem = regionState(v, r, want[r])
				if problem == "" || time.Now().After(deadline) {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if problem != "" {
				out = append(out, fmt.Sprintf("root KMS %s: region %s: %s", v.ID, r, problem))
				continue
			}
			if first == nil {
				first = keys
				continue
			}
			for ver, k := range keys {
				if !bytes.Equal(k, first[ver]) {
					out = append(out, fmt.Sprintf("root KMS %s: region %s key version %d differs from another voter's", v.ID, r, ver))
				}
				clear(k)
			}
		}
		// The first voter's keys are kept (and cleared) for the secret
		// scan at the end of the run.
		for ver, k := range first {
			c.regionKeys = append(c.regionKeys, framework.Secret{Name: fmt.Sprintf("region key %s v%d", r, ver), Value: k})
		}
	}
	return out
}

// regionState reads region's key material from one replica, as the
// region's kms-1, and says what is wrong with it ("" if nothing).
func regionState(v *framework.Replica, region string, want uint32) (map[uint32][]byte, string) {
	m, meta, err := v.UnwrapRegionKey("kms/"+region+"/kms-1", region)
	if err != nil {
		return nil, fmt.Sprintf("UnwrapRegionKey = %v, want versions 1..%d", err, want)
	}
	keys := map[uint32][]byte{}
	var versions []uint32
	problem := ""
	for _, kv := range m.GetVersions() {
		versions = append(versions, kv.GetVersion())
		keys[kv.GetVersion()] = kv.GetKey()
		wantStatus := cryptov1.KeyStatus_KEY_STATUS_ENABLED
		if kv.GetVersion() == want {
			wantStatus = cryptov1.KeyStatus_KEY_STATUS_PRIMARY
		}
		if kv.GetStatus() != wantStatus || len(kv.GetKey()) == 0 {
			problem = fmt.Sprintf("version %d: status %v with %d key bytes, want %v with a key", kv.GetVersion(), kv.GetStatus(), len(kv.GetKey()), wantStatus)
		}
	}
	var wantVersions []uint32
	for ver := uint32(1); ver <= want; ver++ {
		wantVersions = append(wantVersions, ver)
	}
	if problem == "" && (!slices.Equal(versions, wantVersions) || meta.GetPrimaryVersion() != want) {
		problem = fmt.Sprintf("serves versions %v (primary %d), want 1..%d (primary %d)", versions, meta.GetPrimaryVersion(), want, want)
	}
	if problem != "" {
		for _, k := range keys {
			clear(k)
		}
		return nil, problem
	}
	return keys, ""
}

// checkRootWrites reads every region a last time, checks every voter's
// state against it and the history for linearizability (porcupine, in a
// subtest whose result is the verdict), and returns the verdict and the
// violations.
func (d *driver) checkRootWrites(t *testing.T) (RootWrites, []string) {
	t.Helper()
	d.closeOpen()
	rw := RootWrites{Versions: d.finalRegions(t)}
	violations := d.c.replicaViolations(rw.Versions)
	for r, v := range d.hist.LastAcked() {
		if v > rw.Versions[r] {
			violations = append(violations, fmt.Sprintf("root KMS: region %s: a write was acknowledged with version %d, the cluster serves %d", r, v, rw.Versions[r]))
		}
	}
	rw.Linearizable = t.Run("porcupine", func(t *testing.T) {
		rw.Stats = framework.CheckLinearizable(t, d.hist)
	})
	if !rw.Linearizable {
		violations = append(violations, "root KMS: the driver's history is not linearizable (see the porcupine subtest)")
	}
	return rw, violations
}

// createRegions creates the chain's regions through the recorded client,
// failing the test unless each is created.
func (d *driver) createRegions(t *testing.T) {
	t.Helper()
	for _, r := range regions {
		if _, err := d.recorded(framework.RegionInput{Op: framework.OpCreate, Region: r}); err != nil {
			t.Fatalf("CreateRegion(%s) = %v", r, err)
		}
	}
}

// startDriver runs d on its own goroutine until the returned stop is
// called; stop waits for it.
func startDriver(d *driver) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		d.run(ctx)
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			cancel()
			wg.Wait()
		})
	}
}

// isVersionGone reports whether a decrypt's code is the KMS's answer for a
// ciphertext whose key version the keyset no longer decrypts with.
func isVersionGone(code string) bool { return code == codes.NotFound.String() }
