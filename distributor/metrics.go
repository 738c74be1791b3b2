package distributor

// Every use of Prometheus in this package is in this file (and the type of
// Config.Registry).

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cairnkms/cairn/internal/identity"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
)

// Refusal reasons of FetchRootKey (the refusals_total label).
const (
	refusedSealed  = "sealed"  // no key to hand out
	refusedDenied  = "denied"  // the caller is neither a root key reader nor a peer
	refusedInvalid = "invalid" // wrong genesis ID, or a bad recipient key
	refusedOther   = "other"   // an internal failure
)

// Hand-out destinations (the handouts_total label "to").
const (
	toRootKMS = "rootkms" // any caller that is not a distributor
	toPeer    = "peer"    // a peer distributor
)

// metrics are a distributor's Prometheus metrics, in a registry of its own.
// The seal and ceremony gauges are read from the server at scrape time; the
// hand-out counters are counted by FetchRootKey and its authorizer.
type metrics struct {
	// reg is the server's registry, which its gRPC server's own metrics
	// (grpcserver.Options.Registerer) join.
	reg      *prometheus.Registry
	handouts *prometheus.CounterVec
	refusals *prometheus.CounterVec
}

// newMetrics registers s's metrics in reg (nil: a new registry).
func newMetrics(s *Server, reg *prometheus.Registry) (*metrics, error) {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	const ns, sub = "cairn", "distributor"
	m := &metrics{
		reg: reg,
		handouts: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "root_key_handouts_total",
			Help: `Root keys handed out (successful FetchRootKey), to root KMS replicas ("rootkms") or peer distributors ("peer").`}, []string{"to"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "root_key_refusals_total",
			Help: `FetchRootKey calls refused: "sealed" (no key), "denied" (caller not allowed), "invalid" (wrong genesis or recipient key), "other".`}, []string{"reason"}),
	}
	// Every series exists from the start, so rate() and alerts see zeros.
	for _, to := range []string{toRootKMS, toPeer} {
		m.handouts.WithLabelValues(to)
	}
	for _, r := range []string{refusedSealed, refusedDenied, refusedInvalid, refusedOther} {
		m.refusals.WithLabelValues(r)
	}
	for _, c := range []prometheus.Collector{m.handouts, m.refusals, &stateCollector{s: s}} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("distributor: registering metrics: %w", err)
		}
	}
	return m, nil
}

// handedOut counts a root key handed out to caller.
func (m *metrics) handedOut(caller identity.ID) {
	to := toRootKMS
	if caller.Tier() == identity.TierDistributor {
		to = toPeer
	}
	m.handouts.WithLabelValues(to).Inc()
}

// refused counts a refused FetchRootKey.
func (m *metrics) refused(reason string) { m.refusals.WithLabelValues(reason).Inc() }

// countDenied wraps FetchRootKey's authorizer so that its refusals count as
// "denied". (A caller refused at the TLS handshake, outside the trust
// domain, never reaches it.)
func (m *metrics) countDenied(a identity.Authorizer) identity.Authorizer {
	return func(id identity.ID) error {
		err := a(id)
		if err != nil {
			m.refused(refusedDenied)
		}
		return err
	}
}

var (
	descSealed = prometheus.NewDesc("cairn_distributor_sealed",
		"1 while the distributor is sealed (holds no root key), 0 when unsealed.", nil, nil)
	descReady = prometheus.NewDesc("cairn_distributor_ready",
		"1 when the distributor is ready (unsealed), as Readiness reports.", nil, nil)
	descSharesReceived = prometheus.NewDesc("cairn_distributor_ceremony_shares_received",
		"Shares accepted by the open unseal ceremony (0: none open).", nil, nil)
	descSharesRequired = prometheus.NewDesc("cairn_distributor_ceremony_shares_required",
		"Shares the open unseal ceremony needs (the manifest's threshold; 0: none open).", nil, nil)
	descCeremoniesOpen = prometheus.NewDesc("cairn_distributor_ceremonies_open",
		"Ceremonies (unseal or provisioning) open now: 0 or 1.", nil, nil)
)

// stateCollector reads the seal and ceremony state at scrape time, under
// one lock: nothing to keep in step.
type stateCollector struct{ s *Server }

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSealed, descReady, descSharesReceived, descSharesRequired, descCeremoniesOpen} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.s.state()
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	open := st.ceremony != nil
	var received, required float64
	if open && st.ceremony.kind == distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL {
		received, required = float64(st.ceremony.received), float64(st.ceremony.required)
	}
	ch <- prometheus.MustNewConstMetric(descSealed, prometheus.GaugeValue, b(st.sealed))
	ch <- prometheus.MustNewConstMetric(descReady, prometheus.GaugeValue, b(st.ready))
	ch <- prometheus.MustNewConstMetric(descSharesReceived, prometheus.GaugeValue, received)
	ch <- prometheus.MustNewConstMetric(descSharesRequired, prometheus.GaugeValue, required)
	ch <- prometheus.MustNewConstMetric(descCeremoniesOpen, prometheus.GaugeValue, b(open))
}
