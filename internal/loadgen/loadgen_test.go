package loadgen

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

func TestRunMakesExactlyNCalls(t *testing.T) {
	var made [3]atomic.Int64
	calls := make([]Call, len(made))
	for i := range calls {
		calls[i] = func(context.Context) error { made[i].Add(1); return nil }
	}
	r, err := Run(t.Context(), 1000, calls, true)
	if err != nil {
		t.Fatal(err)
	}
	total := made[0].Load() + made[1].Load() + made[2].Load()
	lat := r.Latencies()
	if total != 1000 || r.Calls != 1000 || len(lat) != 1000 {
		t.Errorf("Run(1000 calls) made %d, Calls %d, %d latencies; want 1000 each", total, r.Calls, len(lat))
	}
	for i := 1; i < len(lat); i++ {
		if lat[i] < lat[i-1] {
			t.Fatalf("latencies not sorted at %d", i)
		}
	}
	if r.Rate() <= 0 {
		t.Errorf("Rate() = %v, want > 0", r.Rate())
	}
}

func TestRunStopsAtTheFirstError(t *testing.T) {
	boom := errors.New("boom")
	var made atomic.Int64
	calls := []Call{func(context.Context) error {
		if made.Add(1) == 5 {
			return boom
		}
		return nil
	}}
	_, err := Run(t.Context(), 100, calls, false)
	if !errors.Is(err, boom) || made.Load() != 5 {
		t.Errorf("Run with the 5th call failing = %v after %d calls, want boom after 5", err, made.Load())
	}
}

func TestRunRefusesNoCallers(t *testing.T) {
	if _, err := Run(t.Context(), 10, nil, false); err == nil {
		t.Error("Run with no callers = nil error")
	}
}

func TestQuantile(t *testing.T) {
	r := Result{perCaller: [][]time.Duration{{3 * time.Microsecond, 1 * time.Microsecond}, {4 * time.Microsecond, 2 * time.Microsecond}}}
	for _, tt := range []struct {
		q    float64
		want float64
	}{{0.5, 2}, {0.99, 4}, {0.25, 1}, {1, 4}, {0, 1}} {
		if got := r.Quantile(tt.q); got != tt.want {
			t.Errorf("Quantile(%v) = %v, want %v", tt.q, got, tt.want)
		}
	}
	if got := (&Result{}).Quantile(0.5); got != 0 {
		t.Errorf("Quantile of nothing = %v, want 0", got)
	}
}
