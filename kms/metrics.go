package kms

// Every use of Prometheus is in this file.

import (
	"fmt"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// promRegistry is the type of Config.Registry.
type promRegistry = prometheus.Registry

// numCodes is the number of gRPC codes (OK .. Unauthenticated).
const numCodes = int(codes.Unauthenticated) + 1

// metrics are a server's Prometheus metrics, in a registry of its own. No
// metric has a keyset label: there can be 100k keysets (per-keyset usage is
// in GetStatus).
type metrics struct {
	reg      *prometheus.Registry
	requests *prometheus.CounterVec
	// counters caches requests' children by op and code, so the request path
	// does no label lookup (and no allocation) after a series' first use.
	counters [numOps][numCodes]atomic.Pointer[counter]
	duration [numOps]prometheus.Observer
	// durationVec is the histogram behind duration, read by requestStats.
	durationVec *prometheus.HistogramVec
	keysets     prometheus.Gauge
	serial      prometheus.Gauge
	readyG      prometheus.Gauge
	// historyLost is 1 when the server started without its usage history
	// (and so assumed every version of its bundle was just used).
	historyLost prometheus.Gauge
}

type counter struct{ prometheus.Counter }

// newMetrics registers the server's metrics in reg (nil: a new registry).
func newMetrics(reg *prometheus.Registry) (*metrics, error) {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	const ns, sub = "cairn", "kms"
	m := &metrics{
		reg: reg,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "requests_total",
			Help: "Calls handled, by operation and gRPC code."}, []string{"op", "code"}),
		keysets: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "keysets",
			Help: "Keysets in the bundle served."}),
		serial: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "bundle_serial",
			Help: "Serial of the bundle served (0: none)."}),
		readyG: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "ready",
			Help: "1 while the server serves a bundle."}),
		historyLost: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "usage_history_lost",
			Help: "1 if the server started without its usage history: the Safety check then keeps every version of its last bundle for a TTL."}),
	}
	duration := prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "request_duration_seconds",
		Help: "Handler latency by operation (after authentication, before the audit record).",
		// 25µs .. ~0.8s: a DEK unwrap takes microseconds; bundles take longer.
		Buckets: prometheus.ExponentialBuckets(25e-6, 2, 16)}, []string{"op"})
	for _, c := range []prometheus.Collector{m.requests, duration, m.keysets, m.serial, m.readyG, m.historyLost} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("kms: registering metrics: %w", err)
		}
	}
	for o := range numOps {
		m.duration[o] = duration.WithLabelValues(opNames[o])
	}
	m.durationVec = duration
	return m, nil
}

// dataOps are the data-plane operations RequestStats counts.
var dataOps = []op{opEncrypt, opDecrypt, opEncryptBatch, opDecryptBatch, opGenerateDataKey, opRewrap}

// requestStats reads the data-plane calls from the server's own metrics
// (requests_total and request_duration_seconds) for GetStatus: calls and
// errors (every code but OK) summed over dataOps, and their latency
// histograms summed bucket by bucket (cumulative counts, +Inf last). The
// counters and the histogram are read one after the other, not atomically:
// a call in flight may show in one and not yet in the other.
func (m *metrics) requestStats() *kmsv1.RequestStats {
	out := &kmsv1.RequestStats{}
	var pb dto.Metric
	for _, o := range dataOps {
		for code := range numCodes {
			c := m.counters[o][code].Load()
			if c == nil {
				continue // never used: no series
			}
			pb.Reset()
			if c.Write(&pb) != nil {
				continue
			}
			n := uint64(pb.GetCounter().GetValue())
			out.Requests += n
			if codes.Code(code) != codes.OK {
				out.Errors += n
			}
		}
	}
	var bounds []float64
	var counts []uint64
	var total uint64
	for _, o := range dataOps {
		h, ok := m.durationVec.WithLabelValues(opNames[o]).(prometheus.Metric)
		if !ok {
			continue
		}
		pb.Reset()
		if h.Write(&pb) != nil {
			continue
		}
		hist := pb.GetHistogram()
		if bounds == nil {
			for _, b := range hist.GetBucket() {
				bounds = append(bounds, b.GetUpperBound())
			}
			counts = make([]uint64, len(bounds))
		}
		for i, b := range hist.GetBucket() {
			if i < len(counts) {
				counts[i] += b.GetCumulativeCount()
			}
		}
		total += hist.GetSampleCount()
	}
	for i, le := range bounds {
		out.Latency = append(out.Latency, &kmsv1.LatencyBucket{LeSeconds: le, Count: counts[i]})
	}
	out.Latency = append(out.Latency, &kmsv1.LatencyBucket{Infinite: true, Count: total})
	return out
}

// observe counts a call of o that started at start and ended with *err.
// Handlers defer it.
func (s *Server) observe(o op, start time.Time, err *error) {
	m := s.metrics
	m.duration[o].Observe(time.Since(start).Seconds())
	code := codeOf(*err)
	if int(code) >= numCodes {
		code = codes.Unknown
	}
	slot := &m.counters[o][code]
	c := slot.Load()
	if c == nil {
		c = &counter{m.requests.WithLabelValues(opNames[o], code.String())}
		slot.Store(c) // a racing first use stores the same child
	}
	c.Inc()
}

// served records the bundle now served.
func (m *metrics) served(keysets int, serial uint64) {
	m.keysets.Set(float64(keysets))
	m.serial.Set(float64(serial))
	m.readyG.Set(1)
}

// ready records readiness.
func (m *metrics) ready(ok bool) {
	if ok {
		m.readyG.Set(1)
	} else {
		m.readyG.Set(0)
	}
}

// Handler serves the server's metrics in the Prometheus exposition format,
// for a metrics listener apart from the gRPC one.
func (s *Server) Handler() http.Handler {
	return promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{})
}
