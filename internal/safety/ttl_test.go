package safety_test

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/cairnkms/cairn/internal/safety"
)

var t0 = time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)

const day = 24 * time.Hour

func TestEffectiveTTL(t *testing.T) {
	cut := safety.WithTTL(safety.WithTTL(nil, 90*day, t0.Add(-100*day)), time.Second, t0) // 90 days cut to 1s at t0
	raised := safety.WithTTL(safety.WithTTL(nil, time.Hour, t0.Add(-day)), 2*time.Hour, t0)
	tests := []struct {
		name    string
		history []safety.TTLPeriod
		now     time.Time
		want    time.Duration
	}{
		{"empty", nil, t0, 0},
		{"one open period", safety.WithTTL(nil, time.Hour, t0), t0.Add(1000 * day), time.Hour},
		{"cut: just after", cut, t0.Add(2 * time.Second), 90 * day},
		{"cut: old TTL not yet passed", cut, t0.Add(90*day - time.Nanosecond), 90 * day},
		{"cut: old TTL passed", cut, t0.Add(90 * day), time.Second},
		{"raised", raised, t0.Add(time.Minute), 2 * time.Hour},
		{"raised long ago", raised, t0.Add(10 * day), 2 * time.Hour},
		{"closed period only", []safety.TTLPeriod{{TTL: time.Hour, From: t0, Until: t0.Add(time.Hour)}}, t0.Add(2 * time.Hour), 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := safety.EffectiveTTL(tt.history, tt.now); got != tt.want {
				t.Errorf("EffectiveTTL(%v, %v) = %v, want %v", tt.history, tt.now, got, tt.want)
			}
		})
	}
}

func TestWithTTL(t *testing.T) {
	h1 := safety.WithTTL(nil, time.Hour, t0)
	if want := []safety.TTLPeriod{{TTL: time.Hour, From: t0}}; !cmp.Equal(h1, want) {
		t.Errorf("WithTTL(nil, 1h, t0) = %v, want %v", h1, want)
	}
	h2 := safety.WithTTL(h1, time.Minute, t0.Add(day))
	want := []safety.TTLPeriod{{TTL: time.Hour, From: t0, Until: t0.Add(day)}, {TTL: time.Minute, From: t0.Add(day)}}
	if !cmp.Equal(h2, want) {
		t.Errorf("WithTTL(h1, 1m, t0+1d) = %v, want %v", h2, want)
	}
	if !h1[0].Until.IsZero() {
		t.Errorf("WithTTL modified its input: h1 = %v", h1)
	}
	if got := safety.WithTTL(h2, time.Minute, t0.Add(2*day)); !cmp.Equal(got, h2) {
		t.Errorf("WithTTL(h2, same TTL) = %v, want %v", got, h2)
	}
	// Never rewrites history: a change dated before the open period closes it
	// empty at its start.
	back := safety.WithTTL(h2, time.Second, t0)
	if got, want := back[1].Until, t0.Add(day); !got.Equal(want) {
		t.Errorf("WithTTL(h2, 1s, before open period)[1].Until = %v, want %v", got, want)
	}
}

func TestTTLAt(t *testing.T) {
	h := safety.WithTTL(safety.WithTTL(nil, time.Hour, t0), time.Minute, t0.Add(day))
	tests := []struct {
		at     time.Time
		want   time.Duration
		wantOK bool
	}{
		{t0.Add(-time.Nanosecond), 0, false},
		{t0, time.Hour, true},
		{t0.Add(day - time.Nanosecond), time.Hour, true},
		{t0.Add(day), time.Minute, true},
		{t0.Add(100 * day), time.Minute, true},
	}
	for _, tt := range tests {
		got, ok := safety.TTLAt(h, tt.at)
		if got != tt.want || ok != tt.wantOK {
			t.Errorf("TTLAt(h, %v) = %v, %v, want %v, %v", tt.at, got, ok, tt.want, tt.wantOK)
		}
	}
}

func TestParamsValidate(t *testing.T) {
	for _, tt := range []struct {
		p      safety.Params
		wantOK bool
	}{{safety.DefaultParams(), true}, {safety.Params{}, false}, {safety.Params{Window: -time.Second}, false}} {
		if err := tt.p.Validate(); (err == nil) != tt.wantOK {
			t.Errorf("%+v.Validate() = %v, want ok %v", tt.p, err, tt.wantOK)
		}
	}
	err := safety.CheckRetire(safety.Keyset{}, 1, safety.Fleet{}, safety.ScopeFleet, safety.Params{}, t0)
	if err == nil {
		t.Errorf("CheckRetire(zero Params) = nil, want an error")
	}
	if err := safety.CheckPromote(safety.Keyset{}, 1, safety.Fleet{}, 0, safety.DefaultParams(), t0); err == nil {
		t.Errorf("CheckPromote(scope 0) = nil, want an error")
	}
}
