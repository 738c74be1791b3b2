package chaos

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/aead"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/kms/keystore"
	"github.com/cairnkms/cairn/kmsclient"
)

// objectSize is the size of each workload object (random bytes).
const objectSize = 64

// Client timeouts: a call gives up after callTimeout (all attempts,
// failovers and fallbacks); one attempt on one server after attemptTimeout.
const (
	callTimeout    = 5 * time.Second
	attemptTimeout = time.Second
)

// entry is one acknowledged ciphertext of the ledger.
type entry struct {
	keyset string
	region string // where it was encrypted
	client int
	at     time.Time
	ad, ct []byte
	sum    [sha256.Size]byte // of the plaintext
	rid    string            // the request ID of the KMS Encrypt
	keyID  uint32            // the keyset version that encrypted its DEK
}

// keyIDOf is the keyset version named by the TINK prefix of an envelope
// ciphertext's encrypted DEK (the KMS ciphertext), 0 if there is none.
func keyIDOf(ct []byte) uint32 {
	if len(ct) < 4 {
		return 0
	}
	n := binary.BigEndian.Uint32(ct)
	if uint64(n) > uint64(len(ct)-4) {
		return 0
	}
	id, _ := keystore.KeyIDOf(ct[4 : 4+n])
	return id
}

// ledger holds every acknowledged ciphertext, by keyset.
type ledger struct {
	mu       sync.Mutex
	byKeyset map[string][]*entry
	n        int
}

func (l *ledger) add(e *entry) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.byKeyset[e.keyset] = append(l.byKeyset[e.keyset], e)
	l.n++
}

// pick returns a random entry of keyset, or nil: three times in four one
// made within the last ciphertextTTL (which must decrypt), else any.
func (l *ledger) pick(keyset string, rng *mrand.Rand) *entry {
	l.mu.Lock()
	defer l.mu.Unlock()
	es := l.byKeyset[keyset]
	if len(es) == 0 {
		return nil
	}
	if rng.IntN(4) > 0 {
		// Entries are appended about in time order.
		from, since := len(es)-1, time.Now().Add(-ciphertextTTL)
		for from > 0 && es[from-1].at.After(since) {
			from--
		}
		es = es[from:]
	}
	return es[rng.IntN(len(es))]
}

func (l *ledger) entries() []*entry {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []*entry
	for _, k := range keysets {
		out = append(out, l.byKeyset[k.name]...)
	}
	return out
}

func (l *ledger) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n
}

// success is a call a client saw succeed, for the audit check: some KMS
// server of one of regions must hold an ok record of it.
type success struct {
	rid, keyset string
	kind        OpKind
	regions     []string
	at          time.Time // when the call started
}

// worker is one client loop: envelope encryptions and decryptions of one
// keyset, calling its region first.
type worker struct {
	id       int
	region   string
	keyset   keysetSpec
	env      *kmsclient.EnvelopeAEAD
	fallback bool

	// Written by the worker's goroutine only; read after it ended.
	ops        []Op
	successes  []success
	violations []string
}

// workload is the soak's clients.
type workload struct {
	ledger  *ledger
	workers []*worker
	clients []*kmsclient.Client
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	stopped sync.Once
}

// newClient is a kmsclient as region's demo client, knowing every region's
// KMS servers; with fallback, a decrypt whose region fails goes on in the
// other regions.
func (c *chain) newClient(region string, fallback bool) *kmsclient.Client {
	c.t.Helper()
	opts := []kmsclient.Option{kmsclient.WithSource(c.w.Source(clientOf(region))),
		kmsclient.WithTimeout(callTimeout), kmsclient.WithAttemptTimeout(attemptTimeout)}
	for _, r := range regions {
		var addrs []string
		for _, k := range c.kms[r] {
			addrs = append(addrs, k.Addr)
		}
		opts = append(opts, kmsclient.WithEndpoints(r, addrs...))
	}
	if fallback {
		var others []string
		for _, r := range regions {
			if r != region {
				others = append(others, r)
			}
		}
		opts = append(opts, kmsclient.WithDecryptFallback(region, others...))
	}
	kc, err := kmsclient.New(opts...)
	if err != nil {
		c.t.Fatalf("kmsclient.New(%s) = %v", region, err)
	}
	return kc
}

// envelope is an envelope AEAD (AES256_GCM DEKs) over keyset in region.
func envelope(t *testing.T, kc *kmsclient.Client, region, keyset string) *kmsclient.EnvelopeAEAD {
	t.Helper()
	kek, err := kc.AEAD(region, keyset)
	if err != nil {
		t.Fatalf("AEAD(%s, %s) = %v", region, keyset, err)
	}
	env, err := kmsclient.NewEnvelopeAEAD(aead.AES256GCMKeyTemplate(), kek)
	if err != nil {
		t.Fatal(err)
	}
	return env
}

// startWorkload starts one worker per (region, keyset of that region), each
// at most rate operations a second and maxOps in all, until stop.
func startWorkload(t *testing.T, c *chain, rate, maxOps int) *workload {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	wl := &workload{ledger: &ledger{byKeyset: map[string][]*entry{}}, cancel: cancel}
	for _, r := range regions {
		kc := c.newClient(r, true)
		wl.clients = append(wl.clients, kc)
		for _, ks := range keysets {
			if !slices.Contains(ks.regions, r) {
				continue
			}
			wl.workers = append(wl.workers, &worker{id: len(wl.workers), region: r, keyset: ks,
				env: envelope(t, kc, r, ks.name), fallback: len(ks.regions) > 1})
		}
	}
	t.Cleanup(wl.stop)
	for _, w := range wl.workers {
		wl.wg.Add(1)
		go func() {
			defer wl.wg.Done()
			w.run(ctx, wl.ledger, rate, maxOps)
		}()
	}
	return wl
}

// stop ends the workers, waits for them and closes the clients.
func (wl *workload) stop() {
	wl.stopped.Do(func() {
		wl.cancel()
		wl.wg.Wait()
		for _, kc := range wl.clients {
			kc.Close()
		}
	})
}

// waitLedger waits until every keyset has at least n entries (at most
// d), so that faults meet a workload that reads as well as writes.
func (wl *workload) waitLedger(t *testing.T, n int, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		short := ""
		wl.ledger.mu.Lock()
		for _, k := range keysets {
			if len(wl.ledger.byKeyset[k.name]) < n {
				short = k.name
			}
		}
		wl.ledger.mu.Unlock()
		if short == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the workload acknowledged fewer than %d ciphertexts of %s within %s", n, short, d)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// run is the worker's loop: every other operation encrypts a new object,
// the others decrypt a random acknowledged ciphertext of the keyset (made
// by any client, in any region).
func (w *worker) run(ctx context.Context, l *ledger, rate, maxOps int) {
	rng := mrand.New(mrand.NewPCG(uint64(w.id), uint64(time.Now().UnixNano())))
	interval := time.Second / time.Duration(rate)
	for n := 0; n < maxOps && ctx.Err() == nil; n++ {
		next := time.Now().Add(interval)
		rid := fmt.Sprintf("chaos-%d-%d", w.id, n)
		if e := l.pick(w.keyset.name, rng); n%2 == 1 && e != nil {
			w.decrypt(ctx, rid, e)
		} else {
			w.encrypt(ctx, rid, l)
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Until(next)):
		}
	}
}

// withRequestID sends rid as the call's x-request-id, which the KMS keeps
// in its audit record (every attempt of the call carries it).
func withRequestID(ctx context.Context, rid string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, audit.RequestIDHeader, rid)
}

// codeOf is the gRPC code name of a call's error ("OK" for nil).
func codeOf(err error) string { return status.Code(err).String() }

// errOf is the message of a call's error ("" for nil).
func errOf(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// stopping reports whether err is only the workload being stopped.
func stopping(ctx context.Context, err error) bool {
	return err != nil && ctx.Err() != nil && errors.Is(err, context.Canceled)
}

func (w *worker) encrypt(ctx context.Context, rid string, l *ledger) {
	obj := make([]byte, objectSize)
	rand.Read(obj)
	ad := []byte("object " + rid)
	start := time.Now()
	ct, err := w.env.EncryptWithContext(withRequestID(ctx, rid), obj, ad)
	if stopping(ctx, err) {
		return
	}
	w.ops = append(w.ops, Op{Client: w.id, Region: w.region, Keyset: w.keyset.name, Kind: Encrypt, Start: start, End: time.Now(), Code: codeOf(err), Err: errOf(err)})
	if err != nil {
		return
	}
	if bytes.Contains(ct, obj) {
		w.violations = append(w.violations, fmt.Sprintf("client %d: the ciphertext of %s holds its plaintext", w.id, rid))
	}
	l.add(&entry{keyset: w.keyset.name, region: w.region, client: w.id, at: start, ad: ad, ct: ct, sum: sha256.Sum256(obj), rid: rid, keyID: keyIDOf(ct)})
	w.successes = append(w.successes, success{rid: rid, keyset: w.keyset.name, kind: Encrypt, regions: []string{w.region}, at: start})
}

func (w *worker) decrypt(ctx context.Context, rid string, e *entry) {
	start := time.Now()
	pt, err := w.env.DecryptWithContext(withRequestID(ctx, rid), e.ct, e.ad)
	if stopping(ctx, err) {
		return
	}
	w.ops = append(w.ops, Op{Client: w.id, Region: w.region, Keyset: w.keyset.name, Kind: Decrypt, Start: start, End: time.Now(), Code: codeOf(err), Err: errOf(err), Fallback: w.fallback,
		Made: e.at, KeyID: e.keyID, Ref: e.rid})
	if err != nil {
		if status.Code(err) == codes.InvalidArgument {
			w.violations = append(w.violations, fmt.Sprintf("client %d: the ciphertext %s acknowledged at %s (%s, %s) does not decrypt in %s: %v",
				w.id, e.rid, e.at.Format("15:04:05.000"), e.keyset, e.region, w.region, err))
		}
		return
	}
	if sha256.Sum256(pt) != e.sum {
		w.violations = append(w.violations, fmt.Sprintf("client %d: the ciphertext %s decrypted to another plaintext", w.id, e.rid))
	}
	regs := []string{w.region}
	if w.fallback {
		regs = w.keyset.regions
	}
	w.successes = append(w.successes, success{rid: rid, keyset: w.keyset.name, kind: Decrypt, regions: regs, at: start})
}

// replayConcurrency is how many replay calls run at once.
const replayConcurrency = 4

// replay decrypts every ledger entry in every region of its keyset, calling
// only that region (no fallback), as the client that wrote it, and returns
// the operations and the violations: any failure, or another plaintext. A
// refusal because the entry's key version no longer decrypts is left to
// Analyze, which allows it only past the entry's TTL, once the record
// retired the version.
func (c *chain) replay(t *testing.T, l *ledger) ([]Op, []string) {
	t.Helper()
	type job struct {
		e      *entry
		region string
	}
	envs := map[string]*kmsclient.EnvelopeAEAD{} // by writer region, region, keyset
	for _, writer := range regions {
		kc := c.newClient(writer, false)
		defer kc.Close()
		for _, ks := range keysets {
			for _, r := range ks.regions {
				envs[writer+" "+r+" "+ks.name] = envelope(t, kc, r, ks.name)
			}
		}
	}
	var jobs []job
	for _, e := range l.entries() {
		for _, ks := range keysets {
			if ks.name == e.keyset {
				for _, r := range ks.regions {
					jobs = append(jobs, job{e, r})
				}
			}
		}
	}
	var (
		mu         sync.Mutex
		ops        []Op
		violations []string
		wg         sync.WaitGroup
	)
	ch := make(chan job)
	for i := range replayConcurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range ch {
				env := envs[j.e.region+" "+j.region+" "+j.e.keyset]
				start := time.Now()
				ctx, cancel := context.WithTimeout(context.Background(), 2*callTimeout)
				pt, err := env.DecryptWithContext(withRequestID(ctx, fmt.Sprintf("replay-%s-%s", j.region, j.e.rid)), j.e.ct, j.e.ad)
				cancel()
				op := Op{Client: -1 - i, Region: j.region, Keyset: j.e.keyset, Kind: Replay, Start: start, End: time.Now(), Code: codeOf(err), Err: errOf(err),
					Made: j.e.at, KeyID: j.e.keyID, Ref: j.e.rid}
				var v string
				switch {
				case isVersionGone(op.Code):
					// Judged by Analyze against the record: allowed
					// only past the TTL, after the version's retirement.
				case err != nil:
					v = fmt.Sprintf("replay: the ciphertext %s acknowledged at %s (%s, encrypted in %s) does not decrypt in %s: %v",
						j.e.rid, j.e.at.Format("15:04:05.000"), j.e.keyset, j.e.region, j.region, err)
				case sha256.Sum256(pt) != j.e.sum:
					v = fmt.Sprintf("replay: the ciphertext %s decrypted to another plaintext in %s", j.e.rid, j.region)
				}
				mu.Lock()
				ops = append(ops, op)
				if v != "" && len(violations) < maxListed {
					violations = append(violations, v)
				}
				mu.Unlock()
			}
		}()
	}
	for _, j := range jobs {
		ch <- j
	}
	close(ch)
	wg.Wait()
	return ops, violations
}

// auditCheck reads every KMS server's audit log (the servers stopped) and
// checks that each success has an ok record with its request ID, operation
// and keyset on a server of one of its regions. It returns how many matched,
// how many were on more than one server, and the violations.
func (c *chain) auditCheck(t *testing.T, ss []success) (matched, dups int, first time.Time, violations []string) {
	t.Helper()
	type rec struct{ region, op, keyset string }
	byRID := map[string][]rec{}
	for _, k := range c.allKMS() {
		recs, err := audit.ReadFile(filepath.Join(k.StateDir, "audit.log"))
		if err != nil {
			t.Fatalf("audit.ReadFile(%s) = %v", k.Identity, err)
		}
		for _, r := range recs {
			if r.Outcome != audit.OutcomeOK || !strings.HasPrefix(r.RequestID, "chaos-") {
				continue
			}
			byRID[r.RequestID] = append(byRID[r.RequestID], rec{k.Region, r.Operation, r.Target.Keyset})
		}
	}
	missing := 0
	for _, s := range ss {
		want := "/cairn.kms.v1.KMS/Encrypt"
		if s.kind == Decrypt {
			want = "/cairn.kms.v1.KMS/Decrypt"
		}
		n := 0
		for _, r := range byRID[s.rid] {
			if r.op == want && r.keyset == s.keyset && slices.Contains(s.regions, r.region) {
				n++
			}
		}
		switch {
		case n == 0:
			missing++
			if first.IsZero() || s.at.Before(first) {
				first = s.at
			}
			if missing <= maxListed {
				violations = append(violations, fmt.Sprintf("audit: the %s %s of %s that a client saw succeed has no ok record on any KMS server of %v (records with its ID: %v)",
					s.kind, s.rid, s.keyset, s.regions, byRID[s.rid]))
			}
		case n > 1:
			dups++
			matched++
		default:
			matched++
		}
	}
	if missing > maxListed {
		violations = append(violations, fmt.Sprintf("audit: ... and %d more successes with no ok record", missing-maxListed))
	}
	return matched, dups, first, violations
}
