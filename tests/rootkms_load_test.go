package tests

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/tests/framework"
)

// opTimeout bounds one client operation, redirects and retries included:
// enough for two attempts on a replica that does not answer and one that
// does (see attemptTimeout).
const opTimeout = 5 * time.Second

// load is a steady mix of region writes and linearizable reads from several
// clients, each bounded in time and in count. Every client operation
// (attempts and redirects together, one request ID) is recorded in the
// history as one operation, and in done.
type load struct {
	h      *framework.History
	start  time.Time
	wg     sync.WaitGroup
	cancel context.CancelFunc

	mu   sync.Mutex
	done []loadOp
}

// loadOp is one finished client operation.
type loadOp struct {
	client     int
	start, end time.Time
	write      bool
	// ok: it succeeded; answered: it got an answer that says what happened
	// (success, AlreadyExists, NotFound), not a failure.
	ok, answered bool
	err          error
}

// loadRate is each load client's pace, in operations per second: a steady
// load well above the 50 ops/s the tests require in all, that leaves the
// two cores enough room that Raft's 300ms timeouts measure the faults the
// tests inject, not CPU starvation.
const loadRate = 50

// startLoad starts one goroutine per client. Each runs at loadRate until d
// has passed or it has done maxOps operations, on regions picked at random
// from regions: 20% CreateRegion, 40% RotateRegionKey, 40% GetRegion.
// Client i is client i in the history. If the test ends first (it failed),
// the load is cut short and waited for.
func startLoad(t *testing.T, h *framework.History, clients []*rootkmsclient.Client, regions []string, d time.Duration, maxOps int) *load {
	ctx, cancel := context.WithCancel(context.Background())
	l := &load{h: h, start: time.Now(), cancel: cancel}
	t.Cleanup(func() { l.cancel(); l.wait() })
	for i, c := range clients {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(i)))
			for n := 0; n < maxOps && time.Since(l.start) < d && ctx.Err() == nil; n++ {
				// The n-th operation is due at n/loadRate; one that is late
				// (a fault held the client) starts at once.
				sleepUntil(l.start.Add(time.Duration(n) * time.Second / loadRate))
				in := framework.RegionInput{Region: regions[rng.IntN(len(regions))]}
				switch p := rng.IntN(10); {
				case p < 2:
					in.Op = framework.OpCreate
				case p < 6:
					in.Op = framework.OpRotate
				default:
					in.Op = framework.OpGet
				}
				began := time.Now()
				opCtx, cancel := context.WithTimeout(ctx, opTimeout)
				reply, err := recordedDo(opCtx, c, h, i, in)
				cancel()
				l.mu.Lock()
				answered := framework.Classify(in.Op, reply, err).Outcome != framework.OutcomeUnknown
				l.done = append(l.done, loadOp{client: i, start: began, end: time.Now(), write: in.Op != framework.OpGet, ok: err == nil, answered: answered, err: err})
				l.mu.Unlock()
			}
		}()
	}
	return l
}

// wait waits for every client to finish (each stops by itself within the
// load's duration plus one opTimeout).
func (l *load) wait() { l.wg.Wait() }

// rate returns how many operations per second finished in [from, to), and
// how many of those were answered (not failed).
func (l *load) rate(from, to time.Time) (total, answered float64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	secs := to.Sub(from).Seconds()
	for _, op := range l.done {
		if !op.end.Before(from) && op.end.Before(to) {
			total++
			if op.answered {
				answered++
			}
		}
	}
	return total / secs, answered / secs
}

// count returns how many operations finished, and how many were answered.
func (l *load) count() (total, answered int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, op := range l.done {
		total++
		if op.answered {
			answered++
		}
	}
	return total, answered
}

// firstOKWrite returns, for each client that had one, when its first
// successful write called after t finished.
func (l *load) firstOKWrite(after time.Time) map[int]time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[int]time.Time{}
	for _, op := range l.done {
		if op.write && op.ok && op.start.After(after) {
			if first, ok := out[op.client]; !ok || op.end.Before(first) {
				out[op.client] = op.end
			}
		}
	}
	return out
}

// summary describes what each client did after t: how many operations it
// finished, how many writes succeeded, and its last error.
func (l *load) summary(after time.Time) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	type sum struct {
		ops, okWrites int
		lastErr       error
		lastEnd       time.Time
	}
	per := map[int]*sum{}
	maxClient := -1
	for _, op := range l.done {
		if !op.start.After(after) {
			continue
		}
		s := per[op.client]
		if s == nil {
			s = &sum{}
			per[op.client] = s
		}
		maxClient = max(maxClient, op.client)
		s.ops++
		if op.write && op.ok {
			s.okWrites++
		}
		if op.err != nil {
			s.lastErr = op.err
		}
		s.lastEnd = op.end
	}
	var b strings.Builder
	for c := 0; c <= maxClient; c++ {
		if s := per[c]; s != nil {
			fmt.Fprintf(&b, "\nclient %d: %d operations, %d writes succeeded, last finished %s after; last error: %v",
				c, s.ops, s.okWrites, s.lastEnd.Sub(after).Round(time.Millisecond), s.lastErr)
		}
	}
	return b.String()
}

// waitOKWrites waits until n clients have each had a write called after t
// succeed, or until timeout; it returns the earliest such write's end, and
// whether n clients got there.
func (l *load) waitOKWrites(after time.Time, n int, timeout time.Duration) (time.Time, bool) {
	deadline := time.Now().Add(timeout)
	for {
		firsts := l.firstOKWrite(after)
		if len(firsts) >= n {
			var first time.Time
			for _, t := range firsts {
				if first.IsZero() || t.Before(first) {
					first = t
				}
			}
			return first, true
		}
		if time.Now().After(deadline) {
			return time.Time{}, false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sleepUntil waits until t: it schedules a fault at a point of the load,
// it is not a wait for a condition.
func sleepUntil(t time.Time) {
	if d := time.Until(t); d > 0 {
		time.Sleep(d)
	}
}
