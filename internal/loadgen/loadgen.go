// Package loadgen drives benchmark load: a fixed number of calls shared by a
// fixed number of closed-loop callers (each makes its next call when its last
// returned, as a storage node's request threads do), bounded by the count and
// by the context, recording each call's latency.
package loadgen

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Call is one caller's call. Each caller has its own, so callers share no
// request message.
type Call func(ctx context.Context) error

// Result is what a run measured.
type Result struct {
	// Calls is how many calls were made.
	Calls int
	// Elapsed is the wall time from the first call's start to the last
	// call's end.
	Elapsed time.Duration
	// perCaller are the latencies each caller recorded (nil if not
	// recorded); Latencies merges and sorts them when first asked, so that
	// a benchmark can stop its timer first.
	perCaller [][]time.Duration
	sorted    []time.Duration
}

// Latencies returns the calls' latencies, sorted (nil if not recorded).
func (r *Result) Latencies() []time.Duration {
	if r.sorted == nil && r.perCaller != nil {
		r.sorted = slices.Concat(r.perCaller...)
		slices.Sort(r.sorted)
	}
	return r.sorted
}

// CallTimeout bounds each call Run makes, as a production client bounds
// each of its calls (kmsclient: 10 s). It keeps every call within the
// servers' per-call cap (grpcserver.DefaultMaxCallDuration, 30 s): a call
// with no deadline, or a later one, would make the server bound it with a
// context of its own, a cost real clients do not make it pay.
const CallTimeout = 10 * time.Second

// Run makes n calls in all, shared by one goroutine per element of calls,
// caller i making calls[i] whenever it gets a turn, until all n are made or
// one fails (the first error is returned; a ctx that ends fails the calls
// that see it). Each call gets a context of its own bounded by CallTimeout.
// With record, every call's latency is kept.
func Run(ctx context.Context, n int, calls []Call, record bool) (Result, error) {
	if len(calls) == 0 {
		return Result{}, fmt.Errorf("loadgen: no callers")
	}
	var (
		next     atomic.Int64
		failed   atomic.Bool
		firstErr error
		errOnce  sync.Once
		wg       sync.WaitGroup
	)
	lats := make([][]time.Duration, len(calls))
	start := time.Now()
	for i, call := range calls {
		if record {
			// Room for twice a fair share: appending grows the slice only
			// if one caller gets more than twice its share of turns.
			lats[i] = make([]time.Duration, 0, 2*(n/len(calls)+1))
		}
		wg.Go(func() {
			for !failed.Load() && next.Add(1) <= int64(n) {
				t := time.Now()
				cctx, cancel := context.WithTimeout(ctx, CallTimeout)
				err := call(cctx)
				cancel()
				if err != nil {
					failed.Store(true)
					errOnce.Do(func() { firstErr = fmt.Errorf("caller %d: %w", i, err) })
					return
				}
				if record {
					lats[i] = append(lats[i], time.Since(t))
				}
			}
		})
	}
	wg.Wait()
	r := Result{Calls: n, Elapsed: time.Since(start)}
	if record {
		r.perCaller = lats
	}
	return r, firstErr
}

// Rate is calls per second.
func (r *Result) Rate() float64 { return float64(r.Calls) / r.Elapsed.Seconds() }

// Quantile returns the q-quantile (nearest rank) of the latencies in µs, 0
// if none were recorded.
func (r *Result) Quantile(q float64) float64 {
	lat := r.Latencies()
	if len(lat) == 0 {
		return 0
	}
	i := int(q*float64(len(lat))+0.999999) - 1
	i = min(max(i, 0), len(lat)-1)
	return float64(lat[i]) / float64(time.Microsecond)
}

// Reporter is what a benchmark reports figures to (*testing.B).
type Reporter interface {
	ReportMetric(n float64, unit string)
}

// Report reports the rate as unit ("ops/s") and the p50 and p99 latency in
// µs. Call it after stopping the benchmark's timer: it sorts the latencies.
func (r *Result) Report(b Reporter, unit string) {
	b.ReportMetric(r.Rate(), unit)
	b.ReportMetric(r.Quantile(0.50), "p50-µs")
	b.ReportMetric(r.Quantile(0.99), "p99-µs")
}
