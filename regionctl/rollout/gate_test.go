package rollout_test

import (
	"math"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/cairnkms/cairn/regionctl/rollout"
)

func TestEvaluateGate(t *testing.T) {
	ms := time.Millisecond
	th := rollout.Thresholds{MaxErrorRateIncrease: 0.01, MaxP99Ratio: 2, P99Floor: 5 * ms}
	base := rollout.Metrics{ErrorRate: 0.01, P99: 10 * ms}
	tests := []struct {
		name        string
		before      rollout.Metrics
		after       rollout.Metrics
		probes      []rollout.ProbeFailure
		th          rollout.Thresholds
		wantPass    bool
		wantReasons []string
	}{
		{name: "unchanged", before: base, after: base, th: th, wantPass: true},
		{name: "better", before: base, after: rollout.Metrics{P99: ms}, th: th, wantPass: true},
		{name: "error rate at the limit", before: base, after: rollout.Metrics{ErrorRate: 0.02, P99: 10 * ms}, th: th, wantPass: true},
		{name: "error rate over the limit", before: base, after: rollout.Metrics{ErrorRate: 0.0201, P99: 10 * ms}, th: th,
			wantReasons: []string{"error rate rose from 0.0100 to 0.0201 (more than +0.01)"}},
		{name: "p99 at the ratio", before: base, after: rollout.Metrics{ErrorRate: 0.01, P99: 20 * ms}, th: th, wantPass: true},
		{name: "p99 over the ratio", before: base, after: rollout.Metrics{ErrorRate: 0.01, P99: 21 * ms}, th: th,
			wantReasons: []string{"p99 rose from 10ms to 21ms (more than 2x 10ms)"}},
		{name: "p99 ratio taken against the floor", before: rollout.Metrics{P99: ms}, after: rollout.Metrics{P99: 9 * ms}, th: th, wantPass: true},
		{name: "p99 over the floor's ratio", before: rollout.Metrics{P99: ms}, after: rollout.Metrics{P99: 11 * ms}, th: th,
			wantReasons: []string{"p99 rose from 1ms to 11ms (more than 2x 5ms)"}},
		{name: "no traffic before", before: rollout.Metrics{}, after: rollout.Metrics{P99: 10 * ms}, th: th, wantPass: true},
		{name: "not ready", before: base, after: rollout.Metrics{NotReady: []string{"kms-1", "kms-2"}, ErrorRate: 0.01, P99: 10 * ms}, th: th,
			wantReasons: []string{"not ready: kms-1, kms-2"}},
		{name: "probe failure alone fails", before: base, after: base, th: th,
			probes:      []rollout.ProbeFailure{{Server: "kms-1", Keyset: "demo/notes", KeyID: 3, Reason: "no such key"}},
			wantReasons: []string{"golden probe failed on kms-1: keyset demo/notes version 3: no such key"}},
		{name: "NaN error rate fails closed", before: base, after: rollout.Metrics{ErrorRate: math.NaN(), P99: 10 * ms}, th: th,
			wantReasons: []string{"error rate not measurable (before 0.01, after NaN)"}},
		{name: "error rate above 1 fails closed", before: base, after: rollout.Metrics{ErrorRate: 1.5, P99: 10 * ms}, th: th,
			wantReasons: []string{"error rate not measurable (before 0.01, after 1.5)"}},
		{name: "negative p99 fails closed", before: base, after: rollout.Metrics{ErrorRate: 0.01, P99: -ms}, th: th,
			wantReasons: []string{"p99 not measurable (before 10ms, after -1ms)"}},
		{name: "every reason, in order", before: base, th: th,
			after:  rollout.Metrics{NotReady: []string{"kms-2"}, ErrorRate: 0.5, P99: time.Second},
			probes: []rollout.ProbeFailure{{Server: "kms-2", Keyset: "k", KeyID: 1, Reason: "r"}},
			wantReasons: []string{
				"not ready: kms-2",
				"error rate rose from 0.0100 to 0.5000 (more than +0.01)",
				"p99 rose from 10ms to 1s (more than 2x 10ms)",
				"golden probe failed on kms-2: keyset k version 1: r",
			}},
		{name: "zero thresholds take the defaults", before: rollout.Metrics{ErrorRate: 0, P99: 10 * ms},
			after:       rollout.Metrics{ErrorRate: 0.002, P99: 16 * ms},
			wantReasons: []string{"error rate rose from 0.0000 to 0.0020 (more than +0.001)", "p99 rose from 10ms to 16ms (more than 1.5x 10ms)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pass, reasons := rollout.EvaluateGate(tt.before, tt.after, tt.probes, tt.th)
			if pass != tt.wantPass || pass != (len(reasons) == 0) {
				t.Errorf("EvaluateGate() pass = %v with %d reason(s), want %v", pass, len(reasons), tt.wantPass)
			}
			if diff := cmp.Diff(tt.wantReasons, reasons); diff != "" {
				t.Errorf("EvaluateGate() reasons (-want +got):\n%s", diff)
			}
		})
	}
}
