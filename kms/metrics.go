package kms

// Every use of Prometheus is in this file.

import (
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"

	"github.com/cairnkms/cairn/kms/keystore"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// promRegistry is the type of Config.Registry.
type promRegistry = prometheus.Registry

// numCodes is the number of gRPC codes (OK .. Unauthenticated).
const numCodes = int(codes.Unauthenticated) + 1

// metrics are a server's Prometheus metrics, in a registry of its own. Only
// keyset_requests_total has a keyset label, for at most
// Config.MetricsKeysetLimit keysets of the served bundle: there can be 100k
// keysets (per-keyset usage is in GetStatus).
type metrics struct {
	reg      *prometheus.Registry
	requests *prometheus.CounterVec
	// counters caches requests' children by op and code, so the request path
	// does no label lookup (and no allocation) after a series' first use.
	counters [numOps][numCodes]atomic.Pointer[counter]
	duration [numOps]prometheus.Observer
	keysets  prometheus.Gauge
	serial   prometheus.Gauge
	readyG   prometheus.Gauge
	// historyLost is 1 when the server started without its usage history
	// (and so assumed every version of its bundle was just used).
	historyLost prometheus.Gauge
	// appliedAt and createdAt are the served bundle's times (unix seconds).
	appliedAt, createdAt prometheus.Gauge

	// keysetRequests counts data-plane calls by keyset, op and outcome. The
	// request path finds a keyset's cached children in the served
	// snapshot's keysetTable (built at swap time); other names use other.
	keysetRequests *prometheus.CounterVec
	keysetLimit    int
	other          keysetCounters
	// keysetMu serialises creating keyset_requests_total children and
	// retiring a table's keysets, so that no series is made for a keyset
	// after it was retired. The request path takes it only on a series'
	// first use.
	keysetMu sync.Mutex

	// shed are cairn_kms_shed_total's children, by shedKind.
	shed [numShed]counter
}

type counter struct{ prometheus.Counter }

// outcome is a data-plane call's outcome, for keyset_requests_total.
type outcome int

const (
	outcomeOK outcome = iota
	outcomeDenied
	outcomeError
	numOutcomes
)

var outcomeNames = [numOutcomes]string{"ok", "denied", "error"}

// outcomeOf classifies a call's gRPC code: OK, PermissionDenied (the
// keyset's ACL refused the caller), or anything else.
func outcomeOf(code codes.Code) outcome {
	switch code {
	case codes.OK:
		return outcomeOK
	case codes.PermissionDenied:
		return outcomeDenied
	}
	return outcomeError
}

// otherKeyset is the keyset label of calls on keysets without a series of
// their own (over the limit, not in the served bundle, or nothing served).
// A keyset really named "_other" counts there too.
const otherKeyset = "_other"

// numDataOps is the number of data-plane ops: opEncrypt .. opRewrap.
const numDataOps = int(opRewrap) + 1

// keysetCounters caches one keyset's keyset_requests_total children by op
// and outcome, created on first use.
type keysetCounters struct {
	name     string
	counters [numDataOps][numOutcomes]atomic.Pointer[counter]
	// retired is set (under keysetMu) when the keyset left the served
	// bundle and its series were deleted.
	retired bool
}

// keysetTable maps the served bundle's labelled keysets (at most
// MetricsKeysetLimit) to their counters. Immutable once published.
type keysetTable struct {
	byName map[string]*keysetCounters
}

// newMetrics registers the server's metrics in reg (nil: a new registry).
// keysetLimit bounds the keysets with a keyset_requests_total series of
// their own.
func newMetrics(reg *prometheus.Registry, keysetLimit int) (*metrics, error) {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	const ns, sub = "cairn", "kms"
	m := &metrics{
		reg: reg, keysetLimit: keysetLimit, other: keysetCounters{name: otherKeyset},
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
		appliedAt: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "bundle_applied_timestamp_seconds",
			Help: "When the bundle served was applied (or loaded at boot), unix seconds; 0: none served. Its age is time() - this."}),
		createdAt: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "bundle_created_timestamp_seconds",
			Help: "When the bundle served was compiled (its created_at), unix seconds; 0: none served. Its age is time() - this."}),
		keysetRequests: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "keyset_requests_total",
			Help: "Data-plane calls by keyset, operation and outcome (ok, denied, error). Only keysets of the served bundle get a label, at most MetricsKeysetLimit of them; other calls count under keyset=\"_other\"."},
			[]string{"keyset", "op", "outcome"}),
	}
	duration := prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "request_duration_seconds",
		Help: "Handler latency by operation (after authentication, before the audit record).",
		// 25µs .. ~0.8s: a DEK unwrap takes microseconds; bundles take longer.
		Buckets: prometheus.ExponentialBuckets(25e-6, 2, 16)}, []string{"op"})
	shed := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "shed_total",
		Help: "Data-plane calls refused before any handler ran, by reason: quota_rate and quota_concurrency (the caller's quota), overload (the server's MaxInFlight), message_size (MaxDataMsgSize), batch_items (MaxBatch)."},
		[]string{"reason"})
	for k := range numShed {
		m.shed[k] = counter{shed.WithLabelValues(shedNames[k])}
	}
	for _, c := range []prometheus.Collector{m.requests, duration, m.keysets, m.serial, m.readyG, m.historyLost,
		m.appliedAt, m.createdAt, m.keysetRequests, shed} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("kms: registering metrics: %w", err)
		}
	}
	for o := range numOps {
		m.duration[o] = duration.WithLabelValues(opNames[o])
	}
	return m, nil
}

// inFlight registers cairn_kms_data_in_flight, read from f.
func (m *metrics) inFlight(f func() float64) error {
	return m.reg.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "cairn", Subsystem: "kms", Name: "data_in_flight",
		Help: "Data-plane calls in progress (admitted, not yet answered); MaxInFlight bounds it."}, f))
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
		h, ok := m.duration[o].(prometheus.Metric)
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
func (s *Server) observe(o op, start time.Time, err *error) { s.count(o, start, *err) }

// count is observe's work; it returns the call's code.
func (s *Server) count(o op, start time.Time, err error) codes.Code {
	m := s.metrics
	m.duration[o].Observe(time.Since(start).Seconds())
	code := codeOf(err)
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
	return code
}

// observeData is observe for a data-plane call on keyset name (as the
// client sent it): it also counts the call in keyset_requests_total, under
// name only if the served bundle's keyset table holds it. After a series'
// first use it allocates nothing.
func (s *Server) observeData(o op, name string, start time.Time, err *error) {
	code := s.count(o, start, *err)
	var t *keysetTable
	if cur := s.cur.Load(); cur != nil {
		t = cur.keysetMetrics
	}
	s.metrics.countKeyset(t, name, o, outcomeOf(code))
}

// countKeyset counts one call of o on keyset name with outcome out.
func (m *metrics) countKeyset(t *keysetTable, name string, o op, out outcome) {
	if int(o) >= numDataOps {
		return
	}
	kc := &m.other
	if t != nil {
		if c, ok := t.byName[name]; ok {
			kc = c
		}
	}
	c := kc.counters[o][out].Load()
	if c == nil {
		c = m.keysetCounter(kc, o, out)
	}
	c.Inc()
}

// keysetCounter makes kc's child for o and out on its first use (or, if kc
// was retired meanwhile, returns _other's).
func (m *metrics) keysetCounter(kc *keysetCounters, o op, out outcome) *counter {
	m.keysetMu.Lock()
	defer m.keysetMu.Unlock()
	if kc.retired {
		kc = &m.other
	}
	slot := &kc.counters[o][out]
	if c := slot.Load(); c != nil {
		return c
	}
	c := &counter{m.keysetRequests.WithLabelValues(kc.name, opNames[o], outcomeNames[out])}
	slot.Store(c)
	return c
}

// keysetNames is what keysetTableFor reads of a store (*keystore.Store):
// its names in name order, and whether it holds a name.
type keysetNames interface {
	Names() []string
	Keyset(name string) (*keystore.Keyset, bool)
}

// keysetTableFor returns the keyset table for a store about to be served,
// given prev, the table of the snapshot served now (nil: none): the
// keysets prev labels that the store still holds keep their counters, then
// its other keysets get one, in name order, up to the limit. The keysets
// prev labels that it lacks are retired: their series are deleted. The work
// is in the limit, not in the store's size. Callers hold the server's
// applyMu.
func (m *metrics) keysetTableFor(prev *keysetTable, store keysetNames) *keysetTable {
	names := store.Names()
	next := &keysetTable{byName: make(map[string]*keysetCounters, min(len(names), m.keysetLimit))}
	if prev != nil {
		for n, kc := range prev.byName {
			if _, ok := store.Keyset(n); ok {
				next.byName[n] = kc
			}
		}
	}
	for _, n := range names {
		if len(next.byName) >= m.keysetLimit {
			break
		}
		if _, ok := next.byName[n]; !ok && n != otherKeyset {
			next.byName[n] = &keysetCounters{name: n}
		}
	}
	if prev != nil {
		m.keysetMu.Lock()
		for n, kc := range prev.byName {
			if _, kept := next.byName[n]; kept {
				continue
			}
			kc.retired = true
			for o := range numDataOps {
				for out := range numOutcomes {
					if kc.counters[o][out].Load() != nil {
						m.keysetRequests.DeleteLabelValues(n, opNames[o], outcomeNames[out])
					}
				}
			}
		}
		m.keysetMu.Unlock()
	}
	return next
}

// served records the bundle now served.
func (m *metrics) served(snap *snapshot) {
	m.keysets.Set(float64(snap.store.Len()))
	m.serial.Set(float64(snap.ref.GetSerial()))
	m.appliedAt.Set(unixSeconds(snap.appliedAt))
	m.createdAt.Set(unixSeconds(snap.createdAt))
	m.readyG.Set(1)
}

// unixSeconds is t in unix seconds (0 for the zero time).
func unixSeconds(t time.Time) float64 {
	if t.IsZero() {
		return 0
	}
	return float64(t.UnixNano()) / 1e9
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
