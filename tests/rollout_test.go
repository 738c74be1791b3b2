package tests

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/bundle"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/regionctl/rollout"
	"github.com/cairnkms/cairn/tests/framework"
)

// The rollout scenarios are issue 11's done-when ("Staged rollout … and the
// 2014 guard") with real processes: the chain of the rotation scenarios
// (startRotationChain: file safes, a distributor, one root KMS replica with
// a short safety window, KMS servers us-east/kms-1, us-east/kms-2 and
// eu-west/kms-1) and regionctl run as a process with a config file, the
// controller (`regionctl rollout start|resume`) included, so that it can be
// killed with kill -9. Bakes are short (--bake); the plan is always canary
// (us-east/kms-1) → region us-east (kms-2) → wave 1 (eu-west). Each ends
// with the rotation scenarios' secret scan (rotChain.requireNoSecrets),
// over every bundle built, crafted or rolled out, and the demo client's
// plaintext.

// rollBake is the bake of every stage unless a test needs a longer one.
const rollBake = time.Second

// rollPlaintext is what the demo clients encrypt: a sentinel the secret
// scan at the end of each scenario looks for.
const rollPlaintext = "rollout e2e plaintext, never logged"

// teamKeyset is one keyset of a team file the rollout tests write.
type teamKeyset struct {
	name    string
	regions []string
	acl     []string // encrypt and decrypt
}

// teamJSON is the payments team file holding kss (ciphertext TTL a year,
// as rotTeam).
func teamJSON(kss []teamKeyset) string {
	var out []any
	for _, k := range kss {
		out = append(out, map[string]any{"name": k.name, "regions": k.regions, "purpose": "envelope", "rotation_period": "2160h",
			"ciphertext_ttl": longTTL.String(), "acl": map[string]any{"encrypt": k.acl, "decrypt": k.acl}})
	}
	b, err := json.MarshalIndent(map[string]any{"team": "payments", "keysets": out}, "", "  ")
	if err != nil {
		panic(err)
	}
	return string(b)
}

// paymentsKeysets is payments/ledger, payments/audit and payments/k03..kN
// (n in all), in every region of c, usable by every client of those regions.
func (c *rotChain) paymentsKeysets(n int) []teamKeyset {
	var acl []string
	for _, r := range c.regs {
		acl = append(acl, "client/"+r+"/*")
	}
	out := []teamKeyset{{rotLedger, c.regs, acl}, {rotAudit, c.regs, acl}}
	for i := 3; i <= n; i++ {
		out = append(out, teamKeyset{fmt.Sprintf("payments/k%02d", i), c.regs, acl})
	}
	return out
}

// startRolloutChain is startRotationChain with us-east/kms-1, us-east/kms-2
// and eu-west/kms-1, serving bundle serial 1.
func startRolloutChain(t *testing.T) (c *rotChain, canary, rest, west *framework.KMSServer) {
	t.Helper()
	c = startRotationChain(t, 2*time.Second, map[string][]string{"us-east": {"kms-1", "kms-2"}, "eu-west": {"kms-1"}})
	return c, c.kms["us-east"][0], c.kms["us-east"][1], c.kms["eu-west"][0]
}

// all is every KMS server of c.
func (c *rotChain) all() []*framework.KMSServer {
	var out []*framework.KMSServer
	for _, r := range c.regs {
		out = append(out, c.kms[r]...)
	}
	return out
}

var builtRE = regexp.MustCompile(`bundle (\S+) serial (\d+) sha256 ([0-9a-f]{64})`)

// buildChange builds region's next bundle into the change dir with
// regionctl (extra flags added) and returns its path and sha256 (hex).
func (c *rotChain) buildChange(name, region string, extra ...string) (path, sum string) {
	c.t.Helper()
	path = filepath.Join(c.dir, "change-"+name, region+".bundle")
	r := c.rcOK(append([]string{"bundle", "build", "--region", region, "--out", path}, extra...)...)
	m := builtRE.FindStringSubmatch(r.Stdout)
	if m == nil {
		c.t.Fatalf("bundle build printed %q, want the bundle's sha256", r.Stdout)
	}
	return path, m[3]
}

// controller describes `regionctl rollout <args> --config …` as a
// long-running process (not started), so that it can be killed.
func (c *rotChain) controller(name string, args ...string) *framework.Process {
	c.t.Helper()
	return framework.NewProcess(c.t, name, c.w.Logs, bin.RegionctlBinary(), append(append([]string{"rollout"}, args...), "--config", c.config))
}

// waitOutput polls p's stdout until it contains want (at most 30 s), and
// fails the test if p exits first.
func waitOutput(t *testing.T, p *framework.Process, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		exited, why := p.Exited()
		if strings.Contains(p.Stdout(), want) {
			return
		}
		if exited || time.Now().After(deadline) {
			t.Fatalf("%s: no %q in its stdout (exited %v: %v)\nstdout:\n%s\nstderr:\n%s", p.Name(), want, exited, why, p.Stdout(), p.Stderr())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// rolloutRecord reads rollout id with `regionctl rollout status ID --json`.
func (c *rotChain) rolloutRecord(id string) rollout.Record {
	c.t.Helper()
	r := c.rcOK("rollout", "status", id, "--json")
	var rec rollout.Record
	if err := json.Unmarshal([]byte(r.Stdout), &rec); err != nil {
		c.t.Fatalf("rollout status %s --json: %v\n%s", id, err, r.Stdout)
	}
	if err := rollout.Check(rec); err != nil {
		c.t.Errorf("rollout %s: the stored record breaks an invariant: %v\n%s", id, err, rollout.Status(rec))
	}
	return rec
}

// serialOf is the bundle serial k serves.
func serialOf(t *testing.T, k *framework.KMSServer) uint64 {
	t.Helper()
	st, err := k.Status()
	if err != nil {
		t.Fatalf("GetStatus(%s) = %v", k.Identity, err)
	}
	return st.GetBundle().GetSerial()
}

// bundleCalls counts the ApplyBundle calls (dry runs and applies, as the
// audit log does not tell them apart) k's audit log records for the bundle
// with sha256 sum.
func bundleCalls(t *testing.T, k *framework.KMSServer, sum string) int {
	t.Helper()
	recs, err := audit.ReadFile(filepath.Join(k.StateDir, "audit.log"))
	if err != nil {
		t.Fatalf("audit.ReadFile(%s) = %v", k.Identity, err)
	}
	n := 0
	for _, r := range recs {
		if strings.HasSuffix(r.Operation, "/ApplyBundle") && strings.Contains(r.Target.Resource, sum) && r.Outcome != audit.OutcomeAttempt {
			n++
		}
	}
	return n
}

// appliedLines counts the applies of serial k logged ("kms: bundle
// applied"), over every run of it.
func appliedLines(t *testing.T, k *framework.KMSServer, serial uint64) int {
	t.Helper()
	logs, err := filepath.Glob(filepath.Join(filepath.Dir(k.StderrPath()), k.Name()+".*.stderr"))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, path := range logs {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for line := range strings.Lines(string(b)) {
			if strings.Contains(line, `msg="kms: bundle applied"`) && strings.Contains(line, fmt.Sprintf(" serial=%d ", serial)) {
				n++
			}
		}
	}
	return n
}

// signCrafted signs b with regionctl's key and writes it to the change dir
// as name.bundle, standing for a buggy or hand-edited build that never went
// through bundle build.
func (c *rotChain) signCrafted(name string, b *bundlev1.Bundle) (*bundlev1.SignedBundle, string) {
	c.t.Helper()
	key, err := bundle.ReadPrivateKey(filepath.Join(c.keys, "bundle-signing.key"))
	if err != nil {
		c.t.Fatal(err)
	}
	defer clear(key)
	sb, err := bundle.Sign(b, key)
	if err != nil {
		c.t.Fatalf("signing the crafted bundle %s: %v", name, err)
	}
	data, err := proto.Marshal(sb)
	if err != nil {
		c.t.Fatal(err)
	}
	path := filepath.Join(c.dir, "crafted", name+".bundle")
	c.writeFile(path, string(data))
	return sb, path
}

// TestRollout2014Guard is the 2014 failure mode: the merged team config
// comes out truncated (its bytes cut to a third; its keysets cut to a
// third), empty (no bytes; no keysets), or with a mistyped region.
// regionctl bundle build refuses each before any canary, also when told to
// leave out what it cannot build (--allow-partial: then the shrink guard
// refuses). Bundles built by hand from such a config and signed with the
// real key are refused by `regionctl rollout start` (the plan, or the
// canary's dry run: the rollout fails with nothing applied) and, sent
// straight to every server, by each KMS's own shrink guard. No server ever
// serves anything new.
func TestRollout2014Guard(t *testing.T) {
	start := time.Now()
	c, canary, _, _ := startRolloutChain(t)
	// Nine keysets, served everywhere at serial 2.
	full := c.paymentsKeysets(9)
	team := filepath.Join(c.teams, "payments.json")
	c.writeFile(team, teamJSON(full))
	if r := c.rcOK("keyset", "create"); !strings.Contains(r.Stdout, "7 created") {
		t.Fatalf("keyset create printed %q, want 7 created", r.Stdout)
	}
	for _, region := range c.regs {
		c.buildPush(region)
	}
	before := c.served()
	t.Logf("9 keysets served at serial 2 everywhere (%s)", time.Since(start).Round(time.Millisecond))

	typo := slices.Clone(full)
	for i := range typo {
		typo[i].regions = []string{"eu-west", "us-eats"}
	}
	fullText := teamJSON(full)
	for _, tc := range []struct {
		name string
		team string
		// partialToo: --allow-partial --reason is refused too (by the
		// shrink guard), not only the plain build.
		partialToo bool
		want       []string
	}{
		{"bytes cut to a third", fullText[:len(fullText)/3], true, []string{"team file"}},
		{"keysets cut to a third", teamJSON(full[:3]), true, []string{"no valid team file lists it"}},
		{"no bytes", "", true, []string{"team file"}},
		{"no keysets", teamJSON(nil), true, nil},
		{"mistyped region us-eats", teamJSON(typo), true, nil},
	} {
		c.writeFile(team, tc.team)
		out := filepath.Join(c.dir, "bad.bundle")
		builds := [][]string{nil}
		if tc.partialToo {
			builds = append(builds, []string{"--allow-partial", "--reason", "e2e: " + tc.name})
		}
		for _, extra := range builds {
			r := c.rc(append([]string{"bundle", "build", "--region", "us-east", "--out", out}, extra...)...)
			what := fmt.Sprintf("bundle build %v with the team file's %s", extra, tc.name)
			if r.ExitCode != 1 || !strings.Contains(r.Stderr, "REFUSED") {
				t.Errorf("%s: exit %d, want 1 and REFUSED:\n%s", what, r.ExitCode, r)
				continue
			}
			if extra == nil {
				for _, w := range tc.want {
					if !strings.Contains(r.Stderr, w) {
						t.Errorf("%s: stderr %q, want %q", what, r.Stderr, w)
					}
				}
			} else if !strings.Contains(r.Stderr, "shrinks past the shrink guard") && !strings.Contains(r.Stderr, "cannot be built, even partially") {
				t.Errorf("%s: stderr %q, want the shrink guard's refusal (or cannot be built)", what, r.Stderr)
			}
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Errorf("%s: refused but %s exists (%v)", what, out, err)
			}
			t.Logf("%s: %s", what, firstLines(r.Stderr, 3))
		}
	}
	// A mistyped --region has nothing to build.
	c.writeFile(team, fullText)
	if r := c.rc("bundle", "build", "--region", "us-eats", "--out", filepath.Join(c.dir, "typo.bundle")); r.ExitCode == 0 {
		t.Errorf("bundle build --region us-eats succeeded:\n%s", r)
	}
	c.requireServedUnchanged(before, "bundle build of the bad team files")

	// Hand-made bundles from the bad configs, signed with the real key.
	sb2, _ := c.craft("us-east", 3, func(*bundlev1.Bundle, map[string]*statev1.KeysetRecord) {})
	var good bundlev1.Bundle
	if err := proto.Unmarshal(sb2.GetBundle(), &good); err != nil {
		t.Fatal(err)
	}
	if n := len(good.GetKeysets()); n != 9 {
		t.Fatalf("the compiled us-east bundle has %d keysets, want 9", n)
	}
	third := proto.Clone(&good).(*bundlev1.Bundle)
	third.Keysets = third.Keysets[:3]
	empty := proto.Clone(&good).(*bundlev1.Bundle)
	empty.Keysets, empty.RegionKeyVersions = nil, nil
	// Keysets are encrypted for their region: a bundle for a mistyped
	// region can only be signed empty.
	typoB := proto.Clone(empty).(*bundlev1.Bundle)
	typoB.Region = "us-eats"
	for i, tc := range []struct {
		name string
		b    *bundlev1.Bundle
		// planRefused: rollout start refuses it before storing anything.
		planRefused bool
	}{
		{"a third of the keysets", third, false},
		{"no keysets", empty, false},
		{"mistyped region us-eats", typoB, true},
	} {
		sb, path := c.signCrafted(fmt.Sprintf("crafted-%d", i), tc.b)
		id := fmt.Sprintf("bad-%d", i)
		r := c.rc("rollout", "start", "--bundles", path, "--bake", rollBake.String(), "--reason", "e2e: a crafted bundle with "+tc.name, "--id", id)
		what := "rollout start of a crafted bundle with " + tc.name
		if r.ExitCode != 1 {
			t.Errorf("%s: exit %d, want 1:\n%s", what, r.ExitCode, r)
			continue
		}
		if strings.Contains(r.Stdout, "applying to") || strings.Contains(r.Stdout, "applied on all") {
			t.Errorf("%s: the controller applied it:\n%s", what, r.Stdout)
		}
		if tc.planRefused {
			if !strings.Contains(r.Stderr, "us-eats") {
				t.Errorf("%s: stderr %q, want the plan's refusal naming us-eats", what, r.Stderr)
			}
			if s := c.rc("rollout", "status", id, "--json"); s.ExitCode == 0 {
				t.Errorf("%s: refused, yet a record %s was stored:\n%s", what, id, s.Stdout)
			}
			t.Logf("%s: %s", what, firstLines(r.Stderr, 2))
			// Sent straight to a KMS: not its region.
			if _, err := applyDirect(canary, sb, true); err == nil {
				t.Errorf("dry run of the %s bundle on %s accepted, want refused (another region)", tc.b.GetRegion(), canary.Identity)
			}
			continue
		}
		if !strings.Contains(r.Stdout, "HALTED: stage 1/2 canary: dry run refused on") || !strings.Contains(r.Stdout, "nothing of the stage was applied") {
			t.Errorf("%s: stdout %q, want the canary's dry run refused and nothing applied", what, r.Stdout)
		}
		rec := c.rolloutRecord(id)
		if rec.Phase != rollout.PhaseFailed || rec.Stage != 0 {
			t.Errorf("%s: record at stage %d %s, want stage 1 failed", what, rec.Stage+1, rec.Phase)
		}
		for addr, sr := range rec.Servers {
			if sr.Applied != 0 {
				t.Errorf("%s: the record says %s applied %d", what, addr, sr.Applied)
			}
		}
		t.Logf("%s: %s", what, rec.Halt)
		// Each KMS's own shrink guard, without regionctl.
		for _, k := range c.kms["us-east"] {
			for _, dry := range []bool{true, false} {
				_, err := applyDirect(k, sb, dry)
				msg := status.Convert(err).Message()
				if status.Code(err) != codes.FailedPrecondition || !strings.Contains(msg, "shrink") {
					t.Errorf("ApplyBundle(%s, dry run %t) on %s = %v, want FailedPrecondition from the shrink guard", tc.name, dry, k.Identity, err)
				}
			}
		}
	}
	c.requireServedUnchanged(before, "the crafted bundles")
	if got := encryptOn(t, canary, rotLedger); got == 0 {
		t.Errorf("the canary encrypts with key 0")
	}
	c.requireNoSecrets(sentinel("the plaintext encrypted", []byte(rotPlaintext)))
	t.Logf("scenario took %s", time.Since(start).Round(time.Millisecond))
}

// firstLines is s's first n lines, joined by " | ".
func firstLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[:min(n, len(lines))], " | ")
}

// traffic is the demo client of a region encrypting and decrypting
// payments/ledger through one server until stop, recording when calls
// failed and succeeded.
type traffic struct {
	k    *framework.KMSServer
	stop chan struct{}
	done sync.WaitGroup

	ok, denied, other atomic.Int64
	mu                sync.Mutex
	firstDenied       time.Time // first refusal
	servedAgain       time.Time // first success after a refusal
	lastErr           error
}

func startTraffic(t *testing.T, k *framework.KMSServer) *traffic {
	t.Helper()
	tr := &traffic{k: k, stop: make(chan struct{})}
	client := k.Client("client/" + k.Region + "/demo")
	tr.done.Add(1)
	go func() {
		defer tr.done.Done()
		for {
			select {
			case <-tr.stop:
				return
			case <-time.After(15 * time.Millisecond):
			}
			ctx, cancel := context.WithTimeout(context.Background(), kmsCallTTL)
			enc, err := client.Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: rotLedger, Plaintext: []byte(rollPlaintext)})
			if err == nil {
				_, err = client.Decrypt(ctx, &kmsv1.DecryptRequest{Keyset: rotLedger, Ciphertext: enc.GetCiphertext()})
			}
			cancel()
			now := time.Now()
			tr.mu.Lock()
			switch {
			case err == nil:
				tr.ok.Add(1)
				if !tr.firstDenied.IsZero() && tr.servedAgain.IsZero() {
					tr.servedAgain = now
				}
			case status.Code(err) == codes.PermissionDenied:
				tr.denied.Add(1)
				if tr.firstDenied.IsZero() {
					tr.firstDenied = now
				}
			default:
				tr.other.Add(1)
				tr.lastErr = err
			}
			tr.mu.Unlock()
		}
	}()
	t.Cleanup(tr.Stop)
	return tr
}

// Stop stops the traffic and waits for it.
func (tr *traffic) Stop() {
	select {
	case <-tr.stop:
	default:
		close(tr.stop)
	}
	tr.done.Wait()
}

// TestRolloutCanaryLockout: a change that passes every check (the shrink
// guard allows revoking one pattern, the Safety Condition has nothing
// against it) but locks us-east's real client out of payments/ledger. The
// demo client encrypts and decrypts through the canary throughout; the
// canary's error-rate gate fails after its one bake, the canary alone is
// rolled back automatically, and the rest of us-east and eu-west never see
// the change (served serials, records, and their audit logs: not even a dry
// run). Then a good change rolls out through all three stages, timed.
func TestRolloutCanaryLockout(t *testing.T) {
	start := time.Now()
	c, canary, rest, west := startRolloutChain(t)
	before := c.served()
	tr := startTraffic(t, canary)
	time.Sleep(300 * time.Millisecond) // a baseline of good calls
	if tr.ok.Load() == 0 {
		tr.mu.Lock()
		defer tr.mu.Unlock()
		t.Fatalf("no good call before the change (last error %v)", tr.lastErr)
	}

	// Lock client/us-east/* out of payments/ledger, in favour of a batch
	// identity: two ACL entries of eight change, within the shrink guard.
	kss := c.paymentsKeysets(2)
	kss[0].acl = []string{"client/us-east/batch", "client/eu-west/*"}
	c.writeFile(filepath.Join(c.teams, "payments.json"), teamJSON(kss))
	us, usSum := c.buildChange("lockout", "us-east")
	eu, euSum := c.buildChange("lockout", "eu-west")

	bake := 2 * time.Second
	r := c.rc("rollout", "start", "--bundles", us+","+eu, "--regions", "us-east,eu-west", "--bake", bake.String(),
		"--reason", "e2e: tighten the ledger ACL", "--id", "lockout")
	// rollout start returns once the rollout ended (here: rolled back); the
	// traffic goroutine then sees the client served again within 5 s.
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		tr.mu.Lock()
		again := !tr.servedAgain.IsZero()
		tr.mu.Unlock()
		if again {
			break
		}
	}
	tr.Stop()
	if r.ExitCode != 1 {
		t.Fatalf("rollout start = %d, want 1 (halted)\n%s", r.ExitCode, r)
	}
	for _, want := range []string{"HALTED: stage 1/3 canary failed its gates: error rate rose from", "rolling back 1 server(s) of the stage",
		"rolled back: every server that applied serves its last good content again"} {
		if !strings.Contains(r.Stdout, want) {
			t.Errorf("rollout start stdout lacks %q:\n%s", want, r.Stdout)
		}
	}
	rec := c.rolloutRecord("lockout")
	if rec.Phase != rollout.PhaseRolledBack || rec.Stage != 0 {
		t.Fatalf("record at stage %d %s, want stage 1 rolled-back\n%s", rec.Stage+1, rec.Phase, rollout.Status(rec))
	}
	sr := rec.Servers[canary.Addr]
	if sr.Applied != 2 || sr.LastGood.Serial != 1 || sr.RolledBack != 3 {
		t.Errorf("the canary's result %+v, want applied 2, last good 1, rolled back at 3", sr)
	}
	if got := serialOf(t, canary); got != 3 {
		t.Errorf("the canary serves serial %d, want the rollback's 3", got)
	}
	for _, k := range []*framework.KMSServer{rest, west} {
		if sr := rec.Servers[k.Addr]; sr.DryRun != rollout.DryRunNone || sr.Applied != 0 {
			t.Errorf("%s was touched by the rollout: %+v", k.Identity, sr)
		}
		sum := usSum
		if k.Region == "eu-west" {
			sum = euSum
		}
		if n := bundleCalls(t, k, sum); n != 0 {
			t.Errorf("%s's audit log holds %d ApplyBundle call(s) of the change, want none (not even a dry run)", k.Identity, n)
		}
	}
	if n := bundleCalls(t, canary, usSum); n != 2 {
		t.Errorf("the canary's audit log holds %d ApplyBundle call(s) of the change, want 2 (its dry run and its apply)", n)
	}
	now := c.served()
	for _, k := range []*framework.KMSServer{rest, west} {
		if now[k.Identity] != before[k.Identity] {
			t.Errorf("%s serves %s, want unchanged: %s", k.Identity, now[k.Identity], before[k.Identity])
		}
	}
	if err := roundTripAs(canary); err != nil {
		t.Errorf("the demo client on the canary after the rollback: %v", err)
	}
	tr.mu.Lock()
	denied, good, other := tr.denied.Load(), tr.ok.Load(), tr.other.Load()
	firstDenied, servedAgain := tr.firstDenied, tr.servedAgain
	tr.mu.Unlock()
	if denied == 0 || other != 0 {
		t.Errorf("traffic: %d ok, %d denied, %d other errors (last %v); want denials and no other error", good, denied, other, tr.lastErr)
	}
	if firstDenied.IsZero() || servedAgain.IsZero() || servedAgain.Before(firstDenied) {
		t.Errorf("traffic on the canary: first refused at %v, served again at %v; want a refusal, then service again after the rollback", firstDenied, servedAgain)
	}
	gate := rec.Stages[0].Gate
	t.Logf("traffic on the canary: %d ok, %d PermissionDenied; the gate: %s", good, denied, strings.Join(gate.Reasons, "; "))
	t.Logf("bad canary: applied %s → gate failed %s (%s) → rolled back by %s (%s after the apply; bake %v); the client was refused from %s to %s (%s)",
		sr.AppliedAt.Format("15:04:05.000"), gate.At.Format("15:04:05.000"), gate.At.Sub(sr.AppliedAt).Round(time.Millisecond),
		rec.Updated.Format("15:04:05.000"), rec.Updated.Sub(sr.AppliedAt).Round(time.Millisecond), bake,
		firstDenied.Format("15:04:05.000"), servedAgain.Format("15:04:05.000"), servedAgain.Sub(firstDenied).Round(time.Millisecond))
	if d := rec.Updated.Sub(sr.AppliedAt); d > bake+5*time.Second {
		t.Errorf("the rollback came %s after the bad apply, want within one bake (%v) plus a few seconds", d, bake)
	}

	// A good change now rolls out everywhere: the regions are free again.
	kss[0].acl = kss[1].acl
	c.writeFile(filepath.Join(c.teams, "payments.json"), teamJSON(kss))
	c.rcOK("keyset", "rotate", rotAudit)
	us, _ = c.buildChange("good", "us-east")
	eu, _ = c.buildChange("good", "eu-west")
	began := time.Now()
	r = c.rc("rollout", "start", "--bundles", us+","+eu, "--regions", "us-east,eu-west", "--bake", rollBake.String(),
		"--reason", "e2e: a new payments/audit version", "--id", "good")
	took := time.Since(began)
	if r.ExitCode != 0 || !strings.Contains(r.Stdout, "rollout good completed") {
		t.Fatalf("the good rollout = %d, want 0 and completed\n%s", r.ExitCode, r)
	}
	rec = c.rolloutRecord("good")
	for _, k := range c.all() {
		if want := rec.Servers[k.Addr].Applied; want == 0 || serialOf(t, k) != want {
			t.Errorf("%s serves serial %d, the record says it applied %d", k.Identity, serialOf(t, k), want)
		}
	}
	t.Logf("a 3-stage, 2-region rollout with --bake %v took %s (the bakes %v)", rollBake, took.Round(time.Millisecond), 3*rollBake)
	c.requireNoSecrets(sentinel("the demo client's plaintext", []byte(rollPlaintext)))
	t.Logf("scenario took %s", time.Since(start).Round(time.Millisecond))
}

// roundTripAs encrypts and decrypts payments/ledger through k as its
// region's demo client.
func roundTripAs(k *framework.KMSServer) error {
	ctx, cancel := context.WithTimeout(context.Background(), kmsCallTTL)
	defer cancel()
	client := k.Client("client/" + k.Region + "/demo")
	enc, err := client.Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: rotLedger, Plaintext: []byte(rollPlaintext)})
	if err != nil {
		return err
	}
	_, err = client.Decrypt(ctx, &kmsv1.DecryptRequest{Keyset: rotLedger, Ciphertext: enc.GetCiphertext()})
	return err
}

// TestRolloutControllerKilled: two `rollout start` of one change race; the
// root KMS lets one through and the other is refused. The one running is
// killed with kill -9 while the canary bakes; `rollout resume` takes over
// (epoch 2) and is killed while the second stage bakes; a second resume
// (epoch 3) finishes. No stage is skipped or repeated: every server applied
// exactly once, in stage order, each after the previous stage passed its
// gates, and each KMS logged exactly one apply of the change.
func TestRolloutControllerKilled(t *testing.T) {
	start := time.Now()
	c, canary, rest, west := startRolloutChain(t)
	c.rcOK("keyset", "rotate", rotLedger)
	us, _ := c.buildChange("rotate", "us-east")
	eu, _ := c.buildChange("rotate", "eu-west")
	bake := 3 * time.Second
	common := []string{"--bundles", us + "," + eu, "--regions", "us-east,eu-west", "--bake", bake.String(), "--reason", "e2e: a new payments/ledger version"}

	// Two controllers for the same regions at once.
	a := c.controller("rollout-start-a", append([]string{"start", "--id", "ra"}, common...)...)
	b := c.controller("rollout-start-b", append([]string{"start", "--id", "rb"}, common...)...)
	a.Start()
	b.Start()
	var run, refused *framework.Process
	var id string
	deadline := time.Now().Add(30 * time.Second)
	for run == nil {
		if ex, _ := a.Exited(); ex {
			run, refused, id = b, a, "rb"
		} else if ex, _ := b.Exited(); ex {
			run, refused, id = a, b, "ra"
		} else if time.Now().After(deadline) {
			t.Fatalf("neither of two concurrent rollout starts ended within 30 s\n%s\n%s", a.Stdout(), b.Stdout())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, code := refused.WaitExit(time.Second); code != 1 || !strings.Contains(refused.Stderr(), "in flight") {
		t.Fatalf("the second concurrent rollout start: exit %d, stderr %q; want 1 and refused as in flight", code, refused.Stderr())
	}
	t.Logf("concurrent rollout start: %s refused: %s", refused.Name(), firstLines(refused.Stderr(), 2))
	other := map[string]string{"ra": "rb", "rb": "ra"}[id]
	if s := c.rc("rollout", "status", other, "--json"); s.ExitCode == 0 && strings.Contains(s.Stdout, `"phase": "baking"`) {
		t.Errorf("the refused rollout %s runs:\n%s", other, s.Stdout)
	}

	// kill -9 while the canary bakes.
	waitOutput(t, run, "stage 1/3 canary: applied on all 1 server(s); baking until")
	run.Kill()
	rec := c.rolloutRecord(id)
	if rec.Stage != 0 || rec.Phase != rollout.PhaseBaking || rec.Epoch != 1 {
		t.Fatalf("after kill -9 in the canary's bake: stage %d %s epoch %d, want stage 1 baking at epoch 1\n%s", rec.Stage+1, rec.Phase, rec.Epoch, rollout.Status(rec))
	}
	if s1, s2, s3 := serialOf(t, canary), serialOf(t, rest), serialOf(t, west); s1 != 2 || s2 != 1 || s3 != 1 {
		t.Fatalf("after kill -9 in the canary's bake, serials %d %d %d; want 2 1 1", s1, s2, s3)
	}
	// The killed rollout still holds its regions.
	if r := c.rc(append([]string{"rollout", "start", "--id", "rc"}, common...)...); r.ExitCode != 1 || !strings.Contains(r.Stderr, "in flight") {
		t.Errorf("rollout start while %s is in flight (its controller dead) = %d, want refused:\n%s", id, r.ExitCode, r)
	}

	// Resume; kill -9 while the second stage bakes.
	res := c.controller("rollout-resume-1", "resume", id, "--bundles", us+","+eu)
	res.Start()
	waitOutput(t, res, "stage 2/3 region us-east: applied on all 1 server(s); baking until")
	res.Kill()
	rec = c.rolloutRecord(id)
	if rec.Stage != 1 || rec.Phase != rollout.PhaseBaking || rec.Epoch != 2 {
		t.Fatalf("after kill -9 in stage 2's bake: stage %d %s epoch %d, want stage 2 baking at epoch 2\n%s", rec.Stage+1, rec.Phase, rec.Epoch, rollout.Status(rec))
	}
	if !strings.Contains(res.Stdout(), "taken over by") || strings.Contains(res.Stdout(), "stage 1/3 canary: dry run passed") {
		t.Errorf("the first resume did not take over, or re-ran the canary:\n%s", res.Stdout())
	}
	if s1, s2, s3 := serialOf(t, canary), serialOf(t, rest), serialOf(t, west); s1 != 2 || s2 != 2 || s3 != 1 {
		t.Fatalf("after kill -9 in stage 2's bake, serials %d %d %d; want 2 2 1", s1, s2, s3)
	}

	r := c.rc("rollout", "resume", id, "--bundles", us+","+eu)
	if r.ExitCode != 0 || !strings.Contains(r.Stdout, "rollout "+id+" completed") {
		t.Fatalf("the second resume = %d, want 0 and completed\n%s", r.ExitCode, r)
	}
	if strings.Contains(r.Stdout, "stage 1/3") || strings.Contains(r.Stdout, "stage 2/3 region us-east: dry run") || strings.Contains(r.Stdout, "stage 2/3 region us-east: applying") {
		t.Errorf("the second resume repeated an earlier stage's work:\n%s", r.Stdout)
	}
	rec = c.rolloutRecord(id)
	if rec.Phase != rollout.PhaseCompleted || rec.Epoch != 3 {
		t.Fatalf("after the second resume: %s at epoch %d, want completed at epoch 3\n%s", rec.Phase, rec.Epoch, rollout.Status(rec))
	}
	var prev time.Time
	for i, k := range []*framework.KMSServer{canary, rest, west} {
		sr := rec.Servers[k.Addr]
		if sr.Stage != i || sr.Applied != 2 || serialOf(t, k) != 2 {
			t.Errorf("%s: stage %d applied %d serving %d; want stage %d, applied and serving 2", k.Identity, sr.Stage+1, sr.Applied, serialOf(t, k), i+1)
		}
		st := rec.Stages[i]
		if st.Gate == nil || !st.Gate.Pass || st.Baseline == nil {
			t.Errorf("stage %d: baseline %v gate %+v, want a baseline and a passed gate", i+1, st.Baseline, st.Gate)
		}
		if i > 0 && !(sr.AppliedAt.After(rec.Stages[i-1].Done) && sr.AppliedAt.Sub(prev) >= bake) {
			t.Errorf("stage %d applied at %v, stage %d passed at %v (applied %v); want after it, at least a bake later", i+1, sr.AppliedAt, i, rec.Stages[i-1].Done, prev)
		}
		prev = sr.AppliedAt
		if n := appliedLines(t, k, 2); n != 1 {
			t.Errorf("%s logged %d applies of serial 2, want exactly 1", k.Identity, n)
		}
	}
	t.Logf("rollout %s: applied at +%s, +%s, +%s; completed at +%s through 2 kills and resumes (bake %v); scenario took %s", id,
		rec.Servers[canary.Addr].AppliedAt.Sub(rec.Created).Round(time.Millisecond), rec.Servers[rest.Addr].AppliedAt.Sub(rec.Created).Round(time.Millisecond),
		rec.Servers[west.Addr].AppliedAt.Sub(rec.Created).Round(time.Millisecond), rec.Updated.Sub(rec.Created).Round(time.Millisecond), bake,
		time.Since(start).Round(time.Millisecond))
	c.requireNoSecrets()
}
