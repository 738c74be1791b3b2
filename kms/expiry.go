package kms

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// registerExpiryMetrics registers the gauges of the served bundle's
// not_after, computed at scrape time (expiry is a matter of the clock, not
// of an event):
//
//	cairn_kms_bundle_expired                     1 while the bundle served is past its not_after
//	cairn_kms_bundle_not_after_timestamp_seconds its not_after, unix seconds (0: none served, or a format 1 bundle)
//
// An expired bundle is still served (see ApplyBundle): these say that a fresh
// bundle is due, so an alert can fire before (not_after - time() < 7d) and
// after.
func (s *Server) registerExpiryMetrics() error {
	const ns, sub = "cairn", "kms"
	expired := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "bundle_expired",
		Help: "1 while the bundle served is past its not_after: still served, but no KMS server applies it any more; push a fresh bundle."},
		func() float64 {
			if cur := s.cur.Load(); cur != nil && !cur.notAfter.IsZero() && s.cfg.Now().After(cur.notAfter) {
				return 1
			}
			return 0
		})
	notAfter := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "bundle_not_after_timestamp_seconds",
		Help: "The not_after of the bundle served, unix seconds; 0: none served, or a bundle without one (format 1)."},
		func() float64 {
			if cur := s.cur.Load(); cur != nil && !cur.notAfter.IsZero() {
				return float64(cur.notAfter.UnixNano()) / 1e9
			}
			return 0
		})
	for _, c := range []prometheus.Collector{expired, notAfter} {
		if err := s.metrics.reg.Register(c); err != nil {
			return fmt.Errorf("kms: registering metrics: %w", err)
		}
	}
	return nil
}
