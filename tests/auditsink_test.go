package tests

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/kmsclient"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	"github.com/cairnkms/cairn/safe/officer"
	"github.com/cairnkms/cairn/safe/safeconfig"
	"github.com/cairnkms/cairn/tests/framework"
)

// RELIABILITY row 42: the audit sink of a real server fails, then hangs,
// during data-plane load and during a ceremony.

const (
	// sinkCallTTL is each load call's deadline. Under a hanging sink every
	// call runs into it, so it is short; a healthy call takes milliseconds.
	sinkCallTTL = 1500 * time.Millisecond
	// sinkWorkers run the load, one call at a time each.
	sinkWorkers = 4
	// sinkMaxCalls bounds the calls of one worker (the load also stops when
	// the test says so).
	sinkMaxCalls = 4000
	// sinkGap paces each worker, to keep the load modest.
	sinkGap = 5 * time.Millisecond
	// sinkPhaseCalls is how many calls each phase waits for.
	sinkPhaseCalls = 40
	// sinkPhaseWait bounds the wait for a phase's calls (a failure, not a
	// speed measurement).
	sinkPhaseWait = 60 * time.Second
)

const (
	sinkEncryptOp = "/cairn.kms.v1.KMS/Encrypt"
	sinkDecryptOp = "/cairn.kms.v1.KMS/Decrypt"
	sinkSubmitOp  = "/cairn.distributor.v1.Distributor/SubmitShare"
)

// sinkPhase is what the sink is doing when a call starts. A call that
// starts in a phase started after the test had set the sink so: its audit
// record can only go to the sink in that state.
type sinkPhase int32

const (
	sinkHealthy sinkPhase = iota
	sinkFault             // failing or hanging, set before the phase began
	sinkLifting           // the fault is being lifted: either outcome
	sinkBack              // the fault lifted before the phase began
	sinkNumPhases
)

func (p sinkPhase) String() string {
	return [...]string{"healthy", "fault", "lifting", "back"}[p]
}

// sinkStamp formats the times in failure messages.
const sinkStamp = "15:04:05.000000"

// sinkCall is one load call as the client saw it.
type sinkCall struct {
	rid    string
	op     string
	phase  sinkPhase
	err    error
	result bool   // a non-nil ciphertext or plaintext came back
	wrong  bool   // a decrypt returned another plaintext than was encrypted
	dek    []byte // what an encrypt sent, for the secret scan
	// start and end are for the failure messages.
	start, end time.Time
}

// sinkLoad is a bounded kmsclient load on one KMS server: each worker
// encrypts a fresh DEK, then decrypts the last ciphertext it got, each call
// with its own x-request-id and deadline.
type sinkLoad struct {
	t      *testing.T
	aead   *kmsclient.AEAD
	prefix string
	done   [sinkNumPhases]atomic.Int64 // calls ended, by the phase they started in
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	phase    sinkPhase
	inFlight [sinkNumPhases]int // calls started and not ended, by phase
	calls    []sinkCall
}

// newSinkClient is a kmsclient AEAD for payments/ledger on k, as kmsClient,
// with one attempt per call: every call the test counts is one RPC, so its
// request ID names exactly one audited call.
func newSinkClient(t *testing.T, w *framework.World, k *framework.KMSServer) *kmsclient.AEAD {
	t.Helper()
	c, err := kmsclient.New(kmsclient.WithSource(w.Source(kmsClient)), kmsclient.WithEndpoints(kmsRegion, k.Addr),
		kmsclient.WithRetry(kmsclient.RetryPolicy{MaxAttempts: 1}))
	if err != nil {
		t.Fatalf("kmsclient.New = %v", err)
	}
	t.Cleanup(func() { c.Close() })
	a, err := c.AEAD(kmsRegion, kmsKeyset)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func startSinkLoad(t *testing.T, aead *kmsclient.AEAD, prefix string) *sinkLoad {
	l := &sinkLoad{t: t, aead: aead, prefix: prefix}
	ctx, cancel := context.WithCancel(context.Background())
	l.cancel = cancel
	for i := range sinkWorkers {
		l.wg.Go(func() { l.worker(ctx, i) })
	}
	t.Cleanup(l.stop)
	return l
}

func (l *sinkLoad) worker(ctx context.Context, id int) {
	var last []byte // the last ciphertext, and its plaintext
	var lastPT []byte
	for n := 0; n < sinkMaxCalls && ctx.Err() == nil; n++ {
		rid := fmt.Sprintf("%s-%d-%d", l.prefix, id, n)
		l.mu.Lock()
		c := sinkCall{rid: rid, phase: l.phase, start: time.Now()}
		l.inFlight[c.phase]++
		l.mu.Unlock()
		cctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, audit.RequestIDHeader, rid), sinkCallTTL)
		ad := []byte("auditsink " + l.prefix)
		if n%2 == 1 && last != nil {
			c.op = sinkDecryptOp
			pt, err := l.aead.DecryptWithContext(cctx, last, ad)
			c.err, c.result = err, pt != nil
			c.wrong = err == nil && !bytes.Equal(pt, lastPT)
		} else {
			c.op = sinkEncryptOp
			dek := make([]byte, 32)
			rand.Read(dek)
			ct, err := l.aead.EncryptWithContext(cctx, dek, ad)
			c.err, c.result, c.dek = err, ct != nil, dek
			if err == nil {
				last, lastPT = ct, dek
			}
		}
		cancel()
		c.end = time.Now()
		l.mu.Lock()
		l.inFlight[c.phase]--
		stopped := ctx.Err() != nil && c.err != nil // stopped in the middle of the call
		if !stopped {
			l.calls = append(l.calls, c)
		}
		l.mu.Unlock()
		if stopped {
			return
		}
		l.done[c.phase].Add(1)
		select {
		case <-ctx.Done():
		case <-time.After(sinkGap):
		}
	}
}

// setPhase marks the calls that start from now on.
func (l *sinkLoad) setPhase(p sinkPhase) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.phase = p
}

// endFault moves the load to sinkLifting and waits until every call that
// started in sinkFault has ended: the fault may then be lifted without a
// fault-phase call seeing the sink come back.
func (l *sinkLoad) endFault() {
	l.t.Helper()
	l.setPhase(sinkLifting)
	deadline := time.Now().Add(sinkPhaseWait)
	for {
		l.mu.Lock()
		n := l.inFlight[sinkFault]
		l.mu.Unlock()
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			l.t.Fatalf("%d load calls started while the sink was faulty still run after %s", n, sinkPhaseWait)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitCalls waits until n calls that started in phase p have ended.
func (l *sinkLoad) waitCalls(p sinkPhase, n int64) {
	l.t.Helper()
	deadline := time.Now().Add(sinkPhaseWait)
	for l.done[p].Load() < n {
		if time.Now().After(deadline) {
			l.t.Fatalf("only %d of %d load calls started in phase %s ended within %s", l.done[p].Load(), n, p, sinkPhaseWait)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (l *sinkLoad) stop() {
	l.cancel()
	l.wg.Wait()
}

// secrets returns (after stop), for the secret scan, every DEK the load
// sent to be encrypted, and writes every error string its calls saw to
// load-<prefix>-errors.txt in the world's directory.
func (l *sinkLoad) secrets(w *framework.World) []framework.Secret {
	l.t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []framework.Secret
	seen := map[string]bool{}
	var errs []string
	for _, c := range l.calls {
		if c.dek != nil {
			out = append(out, sentinel("DEK of "+c.rid, c.dek))
		}
		if c.err != nil && !seen[c.err.Error()] {
			seen[c.err.Error()] = true
			errs = append(errs, c.err.Error())
		}
	}
	writeErrorStrings(l.t, w, "load-"+l.prefix+"-errors.txt", errs)
	return out
}

// byPhase returns the calls (after stop) that started in phase p.
func (l *sinkLoad) byPhase(p sinkPhase) []sinkCall {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []sinkCall
	for _, c := range l.calls {
		if c.phase == p {
			out = append(out, c)
		}
	}
	return out
}

// requireAllOK checks that every call of phase p succeeded and decrypted
// right.
func (l *sinkLoad) requireAllOK(p sinkPhase) {
	l.t.Helper()
	for _, c := range l.byPhase(p) {
		if c.err != nil || !c.result || c.wrong {
			l.t.Errorf("%s %s (phase %s, %s to %s) = %v (result %t, wrong plaintext %t), want success", c.op, c.rid, p, c.start.Format(sinkStamp), c.end.Format(sinkStamp), c.err, c.result, c.wrong)
		}
	}
}

// requireAllRefused checks that every call of phase p failed with code and
// a message containing msg, and returned no ciphertext and no plaintext.
func (l *sinkLoad) requireAllRefused(p sinkPhase, code codes.Code, msg string) {
	l.t.Helper()
	for _, c := range l.byPhase(p) {
		if status.Code(c.err) != code || !strings.Contains(fmt.Sprint(c.err), msg) || c.result {
			l.t.Errorf("%s %s (sink %s, %s to %s) = %v, result %t; want %v (%q) and no ciphertext or plaintext", c.op, c.rid, p, c.start.Format(sinkStamp), c.end.Format(sinkStamp), c.err, c.result, code, msg)
		}
	}
}

// sinkAuditByRID reads an audit log and groups its records by request ID.
func sinkAuditByRID(t *testing.T, path string) map[string][]audit.Record {
	t.Helper()
	recs, err := audit.ReadFile(path)
	if err != nil {
		t.Fatalf("audit.ReadFile(%s) = %v", path, err)
	}
	out := map[string][]audit.Record{}
	for _, r := range recs {
		if r.RequestID != "" {
			out[r.RequestID] = append(out[r.RequestID], r)
		}
	}
	return out
}

// requireAuditMatches checks the KMS audit log against what the client saw:
// every success has exactly one record, an ok one of its operation on the
// keyset; every call refused with refusedCode has none when noRecord (the
// record could not be written, and nothing else was), or else exactly one.
func (l *sinkLoad) requireAuditMatches(path string, refusedCode codes.Code, noRecord bool) (ok, refused int) {
	l.t.Helper()
	byRID := sinkAuditByRID(l.t, path)
	l.mu.Lock()
	calls := slices.Clone(l.calls)
	l.mu.Unlock()
	for _, c := range calls {
		recs := byRID[c.rid]
		switch {
		case c.err == nil:
			ok++
			if len(recs) != 1 || recs[0].Outcome != audit.OutcomeOK || recs[0].Operation != c.op || recs[0].Target.Keyset != kmsKeyset {
				l.t.Errorf("audit log %s: the %s %s the client saw succeed has records %+v, want exactly one ok record of it on %s", path, c.op, c.rid, recs, kmsKeyset)
			}
		case status.Code(c.err) == refusedCode:
			refused++
			if noRecord && len(recs) != 0 {
				l.t.Errorf("audit log %s: the %s %s the client saw refused (%v) has records %+v, want none", path, c.op, c.rid, c.err, recs)
			}
			if !noRecord && len(recs) != 1 {
				l.t.Errorf("audit log %s: the %s %s the client saw refused (%v) has records %+v, want exactly one", path, c.op, c.rid, c.err, recs)
			}
		default:
			l.t.Errorf("%s %s (phase %s) = %v, want success or %v", c.op, c.rid, c.phase, c.err, refusedCode)
		}
	}
	return ok, refused
}

// requireRecordsWritten checks, while the server still runs, that the
// audit log at path already holds a record of every call of phase p: the
// records queued while the sink hung were written once it came back, not
// only when the log was closed. Only complete lines are read (a batch may
// be being written).
func (l *sinkLoad) requireRecordsWritten(path string, p sinkPhase) {
	l.t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		l.t.Fatal(err)
	}
	b = b[:bytes.LastIndexByte(b, '\n')+1]
	for _, c := range l.byPhase(p) {
		if !bytes.Contains(b, []byte(`,"request_id":"`+c.rid+`",`)) {
			l.t.Errorf("audit log %s, with the server running after the sink came back: no record of the %s %s (phase %s, %v)", path, c.op, c.rid, p, c.err)
		}
	}
}

// requireSinkAuditIntact runs `cairn audit verify --ca` on the log, which must
// be one intact chain with signed checkpoints ending in a final one (the
// server was stopped cleanly).
func requireSinkAuditIntact(t *testing.T, w *framework.World, name, path string) {
	t.Helper()
	requireSinkAuditVerifies(t, w, name, path, true)
}

// requireSinkAuditVerifies runs `cairn audit verify --ca` on the log, which must
// be one intact chain, ending in a final checkpoint exactly when final (a
// broken log cannot write one when it is closed).
func requireSinkAuditVerifies(t *testing.T, w *framework.World, name, path string, final bool) {
	t.Helper()
	r := w.Run(name, bin.Cairn, "audit", "verify", "--ca", filepath.Join(w.Certs, "ca.pem"), path)
	if r.ExitCode != 0 || !strings.HasPrefix(r.Stdout, "intact: 1 files, ") || strings.Contains(r.Stdout, "ends with a final checkpoint") != final {
		t.Fatalf("cairn audit verify of %s: want exit 0 and an intact summary, ending with a final checkpoint: %t\n%s", path, final, r)
	}
}

// requireServingDespiteSink checks what the KMS says about itself while its
// audit sink fails or hangs but the log is not broken: GetStatus (not
// audited) and grpc.health.v1 answer SERVING, since the log recovers by
// itself once the sink works (a broken log, which does not, makes
// readiness NOT_SERVING: TestKMSAuditLogBrokenNeedsRestart).
func requireServingDespiteSink(t *testing.T, k *framework.KMSServer, what string) {
	t.Helper()
	st, err := k.Status()
	if err != nil || st.GetState() != kmsv1.ServingState_SERVING_STATE_SERVING {
		t.Errorf("GetStatus of %s while its audit sink %s = %v, %v; want SERVING (answered: the server is not wedged)", k.Identity, what, st.GetState(), err)
	}
	requireHealth(t, "KMS server (audit sink "+what+")", k.Health, healthpb.HealthCheckResponse_SERVING)
}

// sinkRestartAndServe starts a stopped KMS server again on the same audit log,
// checks that it serves (an encrypt and a decrypt, each audited ok), stops
// it and checks the log again.
// sinkRestartDEK is what sinkRestartAndServe encrypts.
const sinkRestartDEK = "a 32-byte data encryption key!!!"

func sinkRestartAndServe(t *testing.T, w *framework.World, k *framework.KMSServer, path, name string) {
	t.Helper()
	k.Start()
	k.WaitServing(1)
	aead := newSinkClient(t, w, k)
	ctx, cancel := context.WithTimeout(context.Background(), kmsCallTTL)
	defer cancel()
	dek := []byte(sinkRestartDEK)
	ct, err := aead.EncryptWithContext(metadata.AppendToOutgoingContext(ctx, audit.RequestIDHeader, name+"-enc"), dek, []byte(name))
	if err != nil {
		t.Fatalf("Encrypt after the restart with a working audit sink = %v, want success", err)
	}
	pt, err := aead.DecryptWithContext(metadata.AppendToOutgoingContext(ctx, audit.RequestIDHeader, name+"-dec"), ct, []byte(name))
	if err != nil || !bytes.Equal(pt, dek) {
		t.Fatalf("Decrypt after the restart with a working audit sink = %v (plaintext matches %t), want the DEK back", err, bytes.Equal(pt, dek))
	}
	k.Stop()
	requireSinkAuditIntact(t, w, name+"-verify", path)
	byRID := sinkAuditByRID(t, path)
	for rid, op := range map[string]string{name + "-enc": sinkEncryptOp, name + "-dec": sinkDecryptOp} {
		if recs := byRID[rid]; len(recs) != 1 || recs[0].Outcome != audit.OutcomeOK || recs[0].Operation != op {
			t.Errorf("audit log %s after the restart: records of %s = %+v, want one ok %s", path, rid, recs, op)
		}
	}
}

// TestKMSAuditSinkFailsUnderLoad (row 42, failing sink): a real KMS server
// serves a bounded kmsclient load (encrypt and decrypt, one attempt each,
// each with its own deadline and x-request-id). Mid-run every write to its
// audit log starts failing: its RLIMIT_FSIZE is set (prlimit) to the log's
// size, so each write(2) of a record fails with EFBIG, as on a full disk,
// for the real process. Then:
//   - every call that started after the fault was set (and ended before it
//     was lifted: the load waits for those first) fails Unavailable with the
//     audit interceptor's refusal (not DeadlineExceeded: it is refused before
//     its deadline), and no encrypt returns a ciphertext and no decrypt a
//     plaintext;
//   - GetStatus and grpc.health.v1 still answer SERVING (neither reflects
//     the audit sink);
//   - when the limit is lifted every later call succeeds in the same process:
//     a failed write of a file sink is repaired (the log truncates the torn
//     batch) and does not break the log (only a failed fsync or truncate
//     does; see internal/audit.Log.Write);
//   - after a clean stop the log verifies (`cairn audit verify`): one chain,
//     signed checkpoints, a final one. Every call the client saw succeed has
//     exactly one ok record with its request ID, operation and keyset, and
//     no refused call has any record;
//   - restarted on the same log, the server serves and the log verifies;
//   - no file, and no error string the client saw, holds a DEK it sent, a
//     key of the chain, a share or a passphrase.
func TestKMSAuditSinkFailsUnderLoad(t *testing.T) {
	c := startOneRegionChain(t, oneRegion{team: ledgerTeam})
	w, k := c.w, c.k
	path := filepath.Join(k.StateDir, "audit.log")
	load := startSinkLoad(t, newSinkClient(t, w, k), "fail")
	load.waitCalls(sinkHealthy, sinkPhaseCalls)

	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	old, err := k.FileSizeLimit(uint64(fi.Size()))
	if err != nil {
		t.Fatal(err)
	}
	load.setPhase(sinkFault)
	t.Logf("audit sink failing: RLIMIT_FSIZE of %s (pid %d) = %d bytes, the log's size", k.Identity, k.PID(), fi.Size())
	load.waitCalls(sinkFault, sinkPhaseCalls)
	requireServingDespiteSink(t, k, "failing")

	load.endFault()
	if _, err := k.FileSizeLimit(old); err != nil {
		t.Fatal(err)
	}
	load.setPhase(sinkBack)
	load.waitCalls(sinkBack, sinkPhaseCalls)
	load.stop()

	load.requireAllOK(sinkBack)
	// The interceptor's refusal, not another failure.
	load.requireAllRefused(sinkFault, codes.Unavailable, "audit log unavailable: operation refused")
	k.Stop()
	requireSinkAuditIntact(t, w, "audit-verify-fail", path)
	ok, refused := load.requireAuditMatches(path, codes.Unavailable, true)
	if refused < sinkPhaseCalls {
		t.Errorf("%d calls refused, want at least the %d started while the sink failed", refused, sinkPhaseCalls)
	}
	t.Logf("%d calls succeeded and are audited ok; %d were refused Unavailable and left no record", ok, refused)

	sinkRestartAndServe(t, w, k, path, "fail-restart")
	c.requireNoSecrets(t, append(load.secrets(w), sentinel("the DEK after the restart", []byte(sinkRestartDEK))))
}

// requireSinkMountNamespace fails the test under CI=true, and skips it loudly
// elsewhere, if this process cannot make a mount namespace with an ext4
// loop mount (it needs root).
func requireSinkMountNamespace(t *testing.T, what string) {
	t.Helper()
	framework.RequireCapability(t, what+" (RELIABILITY row 42; run as root)", framework.MountNamespaceSupport())
}

// startKMSOnAuditFS brings up the one-region chain with the KMS server's
// audit log on an ext4 loop mount (mnt) of a private mount namespace, so
// that the test can fault that filesystem; path is the log as the server
// sees it (ns.Path(path) as the test does).
func startKMSOnAuditFS(t *testing.T) (c *oneRegionChain, ns *framework.MountNamespace, mnt, path string) {
	t.Helper()
	c = startOneRegionChain(t, oneRegion{team: ledgerTeam})
	w, k := c.w, c.k
	ns = framework.NewMountNamespace(t, w.Dir)
	mnt = filepath.Join(w.Dir, "auditfs")
	ns.MountExt4(mnt, 32<<20)
	path = filepath.Join(mnt, "audit.log")
	k.Stop()
	k.AddArgs("--audit-log", path)
	k.InMountNamespace(ns)
	k.Start()
	k.WaitServing(1)
	return c, ns, mnt, path
}

// TestKMSAuditSinkHangsUnderLoad (row 42, hanging sink): as
// TestKMSAuditSinkFailsUnderLoad, but the KMS server's audit log is on an
// ext4 loop mount of a private mount namespace, and mid-run that
// filesystem is frozen (fsfreeze): the server's next write(2) to it hangs,
// uninterruptibly, until it is thawed. Then:
//   - every call that started while it was frozen (each ends before the
//     thaw: the load waits for them) fails DeadlineExceeded at its deadline
//     with no ciphertext or plaintext: none is answered while its record is
//     not written;
//   - the rest of the server is not wedged: GetStatus and grpc.health.v1
//     answer SERVING throughout;
//   - once thawed, every later call succeeds in the same process (the log
//     is not broken: the write that hung completes), and by then, with the
//     server still running, the log already holds a record of every call
//     refused while the sink hung;
//   - after a clean stop the log verifies; every success the client saw has
//     exactly one ok record, and every call refused at its deadline while
//     the sink hung has exactly one record too: its record was queued and
//     written when the sink came back, as internal/audit documents (a caller
//     refused at its deadline must treat its call as not done, but the log
//     says what the server did);
//   - restarted on the same log, the server serves and the log verifies;
//   - no file (the log in the namespace included), and no error string the
//     client saw, holds a DEK it sent or a secret of the chain.
//
// It needs root (a mount namespace, a loop device, fsfreeze); under CI=true
// it fails without, elsewhere it is skipped, loudly.
func TestKMSAuditSinkHangsUnderLoad(t *testing.T) {
	requireSinkMountNamespace(t, "hang a KMS server's audit sink")
	c, ns, mnt, path := startKMSOnAuditFS(t)
	w, k := c.w, c.k
	// From here on the cleanups run thaw before they kill the server: a
	// process blocked on a frozen filesystem cannot be killed.
	load := startSinkLoad(t, newSinkClient(t, w, k), "hang")
	load.waitCalls(sinkHealthy, sinkPhaseCalls)

	thaw := ns.Freeze(mnt, 3*sinkPhaseWait)
	load.setPhase(sinkFault)
	t.Logf("audit sink hanging at %s: %s frozen under %s (pid %d)", time.Now().Format(sinkStamp), mnt, k.Identity, k.PID())
	// Each worker's calls now take their whole deadline.
	load.waitCalls(sinkFault, 3*sinkWorkers)
	requireServingDespiteSink(t, k, "hanging")
	load.waitCalls(sinkFault, 4*sinkWorkers)
	requireServingDespiteSink(t, k, "hanging")

	load.endFault()
	thaw()
	load.setPhase(sinkBack)
	load.waitCalls(sinkBack, sinkPhaseCalls)
	load.stop()

	view := ns.Path(path)
	load.requireAllOK(sinkBack)
	load.requireAllRefused(sinkFault, codes.DeadlineExceeded, "")
	load.requireRecordsWritten(view, sinkFault)
	k.Stop()
	requireSinkAuditIntact(t, w, "audit-verify-hang", view)
	ok, refused := load.requireAuditMatches(view, codes.DeadlineExceeded, false)
	if refused < 4*sinkWorkers {
		t.Errorf("%d calls refused at their deadlines, want at least the %d started while the sink hung", refused, 4*sinkWorkers)
	}
	t.Logf("%d calls succeeded and are audited ok; %d were refused at their deadlines and their records were written once the sink was back", ok, refused)

	sinkRestartAndServe(t, w, k, view, "hang-restart")
	// The audit log is seen through the namespace: scan it there too.
	c.requireNoSecrets(t, append(load.secrets(w), sentinel("the DEK after the restart", []byte(sinkRestartDEK))), ns.Path(mnt))
}

// TestKMSAuditLogBrokenNeedsRestart (row 42, design (b)): the one failure a
// file audit log cannot repair. The KMS server's log is on an ext4 loop
// mount of a private mount namespace; mid-load the log file is made
// append-only (chattr +a) and the server's RLIMIT_FSIZE is set to its size:
// a record's write fails (EFBIG) and so does the truncate that would repair
// it (EPERM), so the log breaks (audit.ErrBroken). Then:
//   - every call that started after the fault fails Unavailable with the
//     interceptor's refusal and returns no ciphertext or plaintext;
//   - with both faults lifted, every call still fails so: a broken log
//     stays broken in its process (Reopen refuses it too); GetStatus still
//     answers SERVING (its bundle) but grpc.health.v1 answers NOT_SERVING
//     (readiness names the broken log);
//   - the server stops cleanly (exit 0); the log verifies, without a final
//     checkpoint (a broken log cannot write one); every success the client
//     saw has exactly one ok record and no refused call has any;
//   - restarted with the sink working, the server serves again and the log
//     verifies: recovery from a broken log is a process restart;
//   - no file (the log in the namespace included), and no error string the
//     client saw, holds a DEK it sent or a secret of the chain.
//
// It needs root (a mount namespace, a loop device, chattr).
func TestKMSAuditLogBrokenNeedsRestart(t *testing.T) {
	requireSinkMountNamespace(t, "break a KMS server's audit log")
	c, ns, mnt, path := startKMSOnAuditFS(t)
	w, k := c.w, c.k
	load := startSinkLoad(t, newSinkClient(t, w, k), "broken")
	load.waitCalls(sinkHealthy, sinkPhaseCalls)

	view := ns.Path(path)
	if out, err := ns.Run("chattr", "+a", path); err != nil {
		t.Fatalf("chattr +a %s: %v: %s", path, err, out)
	}
	t.Cleanup(func() { _, _ = ns.Run("chattr", "-a", path) })
	fi, err := os.Stat(view)
	if err != nil {
		t.Fatal(err)
	}
	old, err := k.FileSizeLimit(uint64(fi.Size()))
	if err != nil {
		t.Fatal(err)
	}
	load.setPhase(sinkFault)
	load.waitCalls(sinkFault, sinkPhaseCalls)

	load.endFault()
	if _, err := k.FileSizeLimit(old); err != nil {
		t.Fatal(err)
	}
	if out, err := ns.Run("chattr", "-a", path); err != nil {
		t.Fatalf("chattr -a %s: %v: %s", path, err, out)
	}
	load.setPhase(sinkBack)
	load.waitCalls(sinkBack, sinkPhaseCalls)
	// GetStatus still says SERVING (its bundle), but readiness says the log
	// is broken: a load balancer stops sending calls that would all be
	// refused.
	if st, err := k.Status(); err != nil || st.GetState() != kmsv1.ServingState_SERVING_STATE_SERVING {
		t.Errorf("GetStatus of %s with its audit log broken = %v, %v; want SERVING (answered: the server is not wedged)", k.Identity, st.GetState(), err)
	}
	requireHealth(t, "KMS server (audit log broken)", k.Health, healthpb.HealthCheckResponse_NOT_SERVING)
	load.stop()

	const refusal = "audit log unavailable: operation refused"
	load.requireAllRefused(sinkFault, codes.Unavailable, refusal)
	load.requireAllRefused(sinkBack, codes.Unavailable, refusal)
	k.Stop()
	// The broken log wrote no final checkpoint; its last records are signed
	// by the next run's first checkpoint (sinkRestartAndServe checks that run's
	// clean end).
	requireSinkAuditVerifies(t, w, "audit-verify-broken", view, false)
	ok, refused := load.requireAuditMatches(view, codes.Unavailable, true)
	t.Logf("%d calls succeeded and are audited ok; %d were refused Unavailable (the log broken) and left no record", ok, refused)

	sinkRestartAndServe(t, w, k, view, "broken-restart")
	c.requireNoSecrets(t, append(load.secrets(w), sentinel("the DEK after the restart", []byte(sinkRestartDEK))), ns.Path(mnt))
}

// TestCeremonyAuditSinkFails (row 42, ceremony): a real distributor, sealed
// after a restart, runs an unseal ceremony (threshold 2) with one share in.
// Then its audit log's writes fail (RLIMIT_FSIZE at the log's size, EFBIG):
// `safe release` of shares 2 and 3 is refused Unavailable; the ceremony
// still has only share 1 and the distributor stays sealed; its state
// directory holds nothing but the manifest and the log. With the limit
// lifted, share 2 is admitted in the same process and unseals it. After a
// clean stop the log verifies and holds no SubmitShare record of officer 3
// (refused only), and exactly one attempt and one ok record of officer 2
// (its refused try left none). Restarted, the distributor comes up sealed
// and the log still verifies. No file holds the RMK, a share or a
// passphrase.
func TestCeremonyAuditSinkFails(t *testing.T) {
	w := framework.NewWorld(t, bin)
	safes := w.FileSafes(3)
	d := w.Distributors(1, false)[0]
	d.Start()
	d.WaitState(sealed)
	m := w.Genesis(2, safes, d)
	waitUnsealed(t, d, m)
	d.Kill()
	d.Restart()
	d.WaitState(sealed)

	id := w.OpenCeremony(d, 1)
	release(t, w, d, id, safes, 1)
	path := filepath.Join(d.StateDir, "audit.log")
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	old, err := d.FileSizeLimit(uint64(fi.Size()))
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{2, 3} {
		r := w.Release(d, id, framework.Officer(i), safes[i-1])
		if r.ExitCode == 0 || !strings.Contains(r.Stderr, "code = Unavailable") {
			t.Errorf("officer %d release while the audit sink fails = exit %d, %q; want a failure with code Unavailable", i, r.ExitCode, r.Stderr)
		}
		if got, want := acceptedIndices(t, d, id), []uint32{1}; !slices.Equal(got, want) {
			t.Fatalf("after officer %d's refused release: AcceptedIndices = %v, want %v (the share must not be admitted)", i, got, want)
		}
	}
	if st, err := d.Status(); err != nil || st.GetState() != sealed {
		t.Errorf("GetStatus while the audit sink fails = %v, %v; want SEALED", st.GetState(), err)
	}
	requireOnlyPublicState(t, d)

	if _, err := d.FileSizeLimit(old); err != nil {
		t.Fatal(err)
	}
	release(t, w, d, id, safes, 2)
	st := waitUnsealed(t, d, m)
	requireUnsealedBy(t, d, st, "ceremony:"+id)
	d.Stop()
	requireSinkAuditIntact(t, w, "audit-verify-ceremony", path)
	count := func(name string, outcome audit.Outcome) int {
		n := 0
		for _, r := range d.Audit() {
			if r.Identity == framework.SPIFFEID(name) && r.Operation == sinkSubmitOp && r.Outcome == outcome {
				n++
			}
		}
		return n
	}
	if n := count(framework.Officer(3), audit.OutcomeAttempt) + count(framework.Officer(3), audit.OutcomeOK) + count(framework.Officer(3), audit.OutcomeError); n != 0 {
		t.Errorf("audit log %s: %d SubmitShare records of %s, whose only release was refused; want none", path, n, framework.Officer(3))
	}
	if a, o := count(framework.Officer(2), audit.OutcomeAttempt), count(framework.Officer(2), audit.OutcomeOK); a != 1 || o != 1 {
		t.Errorf("audit log %s: %d attempt and %d ok SubmitShare records of %s; want 1 and 1 (its refused release left none)", path, a, o, framework.Officer(2))
	}

	d.Start()
	d.WaitState(sealed)
	d.Stop()
	requireSinkAuditIntact(t, w, "audit-verify-ceremony-restart", path)
	requireNoKeyMaterial(t, w, m, safes, nil)
}

// TestCeremonyAuditSinkHangs (row 42, ceremony, hanging sink): a real
// distributor whose audit log is on an ext4 loop mount of a private mount
// namespace runs an unseal ceremony (threshold 3) with share 1 in. The
// filesystem is frozen; officer 2 releases share 2 with a deadline
// (officer.Release, the library `safe release` runs, in this process). The
// call fails DeadlineExceeded; while frozen GetStatus (SEALED) and
// GetCeremony (share 1 only) still answer. After the thaw the ceremony
// still has share 1 only: a submission whose caller was refused at its
// deadline is not admitted later, when the attempt record it waited for is
// written (before the fix in audit.UnaryServerInterceptor it was: the
// writer inside the hung write(2) waits for the sink whatever its context
// says, and the handler then ran with the caller long gone). Shares 2 and
// 3 released then unseal it; after a clean stop the log verifies, and
// officer 2's records are an attempt and a DeadlineExceeded (or Canceled)
// error for the refused try, then an attempt and an ok. No file (the log in
// the namespace included) holds the RMK, a share or a passphrase.
//
// It needs root, like TestKMSAuditSinkHangsUnderLoad.
func TestCeremonyAuditSinkHangs(t *testing.T) {
	requireSinkMountNamespace(t, "hang a distributor's audit sink")
	w := framework.NewWorld(t, bin)
	safes := w.FileSafes(4)
	d := w.Distributors(1, false)[0]
	d.Start()
	d.WaitState(sealed)
	m := w.Genesis(3, safes, d)
	waitUnsealed(t, d, m)
	d.Stop()

	ns := framework.NewMountNamespace(t, w.Dir)
	mnt := filepath.Join(w.Dir, "auditfs")
	ns.MountExt4(mnt, 32<<20)
	path := filepath.Join(mnt, "audit.log")
	d.AppendArgs("--audit-log", path)
	d.InMountNamespace(ns)
	d.Start()
	d.WaitState(sealed)

	id := w.OpenCeremony(d, 1)
	release(t, w, d, id, safes, 1)

	s2, err := safeconfig.OpenFile(t.Context(), safes[1].Path)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	client, conn := d.Dial(framework.Officer(2))
	defer conn.Close()

	thaw := ns.Freeze(mnt, 3*sinkPhaseWait)
	ctx, cancel := context.WithTimeout(t.Context(), sinkCallTTL)
	_, err = officer.Release(ctx, client, id, m, s2)
	cancel()
	if status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("officer 2 release while the audit sink hangs = %v, want DeadlineExceeded", err)
	}
	if got, want := acceptedIndices(t, d, id), []uint32{1}; !slices.Equal(got, want) {
		t.Errorf("GetCeremony while the audit sink hangs: AcceptedIndices = %v, want %v", got, want)
	}
	if st, err := d.Status(); err != nil || st.GetState() != sealed {
		t.Errorf("GetStatus while the audit sink hangs = %v, %v; want SEALED (answered: the server is not wedged)", st.GetState(), err)
	}
	thaw()

	if got, want := acceptedIndices(t, d, id), []uint32{1}; !slices.Equal(got, want) {
		t.Errorf("after the thaw: AcceptedIndices = %v, want %v (officer 2 was told its release failed; the share must not be admitted behind its back)", got, want)
	}
	for _, i := range []int{2, 3} {
		r := w.Release(d, id, framework.Officer(i), safes[i-1])
		if r.ExitCode != 0 {
			t.Fatalf("officer %d release after the thaw failed:\n%s", i, r)
		}
	}
	st := waitUnsealed(t, d, m)
	requireUnsealedBy(t, d, st, "ceremony:"+id)
	d.Stop()
	view := ns.Path(path)
	requireSinkAuditIntact(t, w, "audit-verify-ceremony-hang", view)
	// Officer 2's refused try is on record as what it was: an attempt and
	// an error outcome (DeadlineExceeded, or Canceled if the client's reset
	// of the stream reached the server before the server's own timer
	// fired); its later release an attempt and an ok.
	recs, err := audit.ReadFile(view)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range recs {
		if r.Identity == framework.SPIFFEID(framework.Officer(2)) && r.Operation == sinkSubmitOp {
			code := r.Code
			if code == codes.Canceled.String() {
				code = codes.DeadlineExceeded.String()
			}
			got = append(got, string(r.Outcome)+" "+code)
		}
	}
	if want := []string{"attempt ", "error DeadlineExceeded", "attempt ", "ok "}; !slices.Equal(got, want) {
		t.Errorf("audit log %s: SubmitShare records of %s = %q, want %q", view, framework.Officer(2), got, want)
	}
	// The audit log is seen through the namespace: scan it there too.
	requireNoKeyMaterial(t, w, m, safes, nil, ns.Path(mnt))
}
