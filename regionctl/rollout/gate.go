package rollout

import (
	"fmt"
	"math"
	"strings"
	"time"
)

// Metrics are a stage's servers measured together, from their metrics
// endpoints: once before the stage applies (the baseline) and once after it
// baked.
type Metrics struct {
	// NotReady lists the servers whose /readyz failed.
	NotReady []string `json:"not_ready,omitempty"`
	// ErrorRate is the fraction of requests that failed, 0..1.
	ErrorRate float64 `json:"error_rate"`
	// P99 is the 99th percentile request latency.
	P99 time.Duration `json:"p99"`
}

// ProbeFailure is one golden ciphertext probe a server failed to decrypt.
type ProbeFailure struct {
	Server string `json:"server"`
	Keyset string `json:"keyset"`
	KeyID  uint32 `json:"key_id"`
	Reason string `json:"reason"`
}

// EvaluateGate decides a stage's gates: it passes when every server is ready
// after the bake, the error rate rose by at most t.MaxErrorRateIncrease, the
// p99 latency is at most t.MaxP99Ratio times max(before.P99, t.P99Floor),
// and no golden probe failed. Otherwise it returns every reason, in that
// order. Invalid measurements (an error rate outside 0..1 or NaN, a negative
// latency) fail the gate: it fails closed. Zero thresholds take their
// defaults.
func EvaluateGate(before, after Metrics, probes []ProbeFailure, t Thresholds) (pass bool, reasons []string) {
	t = t.withDefaults()
	if len(after.NotReady) > 0 {
		reasons = append(reasons, "not ready: "+strings.Join(after.NotReady, ", "))
	}
	validRate := func(r float64) bool { return r >= 0 && r <= 1 } // false for NaN
	switch {
	case !validRate(before.ErrorRate) || !validRate(after.ErrorRate):
		reasons = append(reasons, fmt.Sprintf("error rate not measurable (before %v, after %v)", before.ErrorRate, after.ErrorRate))
	case after.ErrorRate-before.ErrorRate > t.MaxErrorRateIncrease:
		reasons = append(reasons, fmt.Sprintf("error rate rose from %.4f to %.4f (more than +%v)", before.ErrorRate, after.ErrorRate, t.MaxErrorRateIncrease))
	}
	switch {
	case before.P99 < 0 || after.P99 < 0:
		reasons = append(reasons, fmt.Sprintf("p99 not measurable (before %v, after %v)", before.P99, after.P99))
	default:
		base := max(before.P99, t.P99Floor)
		if limit := time.Duration(math.Min(float64(base)*t.MaxP99Ratio, math.MaxInt64)); after.P99 > limit {
			reasons = append(reasons, fmt.Sprintf("p99 rose from %v to %v (more than %vx %v)", before.P99, after.P99, t.MaxP99Ratio, base))
		}
	}
	for _, p := range probes {
		reasons = append(reasons, fmt.Sprintf("golden probe failed on %s: keyset %s version %d: %s", p.Server, p.Keyset, p.KeyID, p.Reason))
	}
	return len(reasons) == 0, reasons
}
