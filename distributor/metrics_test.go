package distributor_test

import (
	"fmt"
	"net"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/distributor"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	"github.com/cairnkms/cairn/safe"
)

// series returns every cairn_distributor_ series of reg as
// `name{label=value,...}` -> value.
func series(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather() = %v", err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if !strings.HasPrefix(mf.GetName(), "cairn_distributor_") {
			continue
		}
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetName()+"="+l.GetValue())
			}
			sort.Strings(labels)
			key := mf.GetName()
			if len(labels) > 0 {
				key += "{" + strings.Join(labels, ",") + "}"
			}
			out[key] = m.GetGauge().GetValue() + m.GetCounter().GetValue()
		}
	}
	return out
}

// metricsWant is the full set of a distributor's series, from the gauges
// given and the counters' values (all others 0).
func metricsWant(sealed, shares, required, open float64, counters map[string]float64) map[string]float64 {
	ready := 1 - sealed
	out := map[string]float64{
		"cairn_distributor_sealed":                                  sealed,
		"cairn_distributor_ready":                                   ready,
		"cairn_distributor_ceremony_shares_received":                shares,
		"cairn_distributor_ceremony_shares_required":                required,
		"cairn_distributor_ceremonies_open":                         open,
		"cairn_distributor_root_key_handouts_total{to=rootkms}":     0,
		"cairn_distributor_root_key_handouts_total{to=peer}":        0,
		"cairn_distributor_root_key_refusals_total{reason=sealed}":  0,
		"cairn_distributor_root_key_refusals_total{reason=denied}":  0,
		"cairn_distributor_root_key_refusals_total{reason=invalid}": 0,
		"cairn_distributor_root_key_refusals_total{reason=other}":   0,
	}
	for k, v := range counters {
		out[k] = v
	}
	return out
}

// TestMetricsAndReadiness drives a distributor through an unseal ceremony,
// hand-outs and refusals, and a peer's unseal, checking its readiness and
// every series on the way.
func TestMetricsAndReadiness(t *testing.T) {
	w := newWorld(t, 2, 3)
	regs := map[string]*prometheus.Registry{}
	w.configure = func(name string, c *distributor.Config) {
		regs[name] = prometheus.NewRegistry()
		c.Registry = regs[name]
	}
	d := w.start("distributor-1", true)
	reg := regs["distributor-1"]
	check := func(when string, wantReady bool, wantReason string, want map[string]float64) {
		t.Helper()
		if ok, reason := d.srv.Readiness(); ok != wantReady || !strings.Contains(reason, wantReason) || (ok && reason != "") {
			t.Errorf("%s: Readiness() = %v, %q, want %v, %q", when, ok, reason, wantReady, wantReason)
		}
		if diff := cmp.Diff(want, series(t, reg)); diff != "" {
			t.Errorf("%s: series (-want +got):\n%s", when, diff)
		}
	}
	check("sealed", false, "sealed: no ceremony open; open an unseal ceremony", metricsWant(1, 0, 0, 0, nil))

	if _, err := w.fetch(d.addr, rootKMSID); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("FetchRootKey while sealed = %v, want FailedPrecondition", err)
	}
	refusals := map[string]float64{"cairn_distributor_root_key_refusals_total{reason=sealed}": 1}
	c := w.openUnseal(d.addr)
	check("ceremony open", false, fmt.Sprintf("sealed: unseal ceremony %s open, 0 of 2 shares received", c.GetId()), metricsWant(1, 0, 2, 1, refusals))
	if _, err := w.release(d.addr, c.GetId(), 0); err != nil {
		t.Fatal(err)
	}
	check("one share", false, fmt.Sprintf("sealed: unseal ceremony %s open, 1 of 2 shares received", c.GetId()), metricsWant(1, 1, 2, 1, refusals))
	if _, err := w.release(d.addr, c.GetId(), 2); err != nil {
		t.Fatal(err)
	}
	check("unsealed", true, "", metricsWant(0, 0, 0, 0, refusals))

	// Hand-outs and refusals.
	for range 2 {
		if _, err := w.fetch(d.addr, rootKMSID); err != nil {
			t.Fatalf("FetchRootKey = %v", err)
		}
	}
	if _, err := w.fetch(d.addr, kmsID); status.Code(err) != codes.PermissionDenied {
		t.Errorf("FetchRootKey by a KMS = %v, want PermissionDenied", err)
	}
	r, err := hpkeseal.NewRecipient()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := w.client(d.addr, rootKMSID).FetchRootKey(ctx(t), &distributorv1.FetchRootKeyRequest{Recipient: r.PublicKey(), GenesisId: "other"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("FetchRootKey(other genesis) = %v, want InvalidArgument", err)
	}
	counters := map[string]float64{
		"cairn_distributor_root_key_refusals_total{reason=sealed}":  1,
		"cairn_distributor_root_key_refusals_total{reason=denied}":  1,
		"cairn_distributor_root_key_refusals_total{reason=invalid}": 1,
		"cairn_distributor_root_key_handouts_total{to=rootkms}":     2,
	}
	check("after fetches", true, "", metricsWant(0, 0, 0, 0, counters))

	// A peer unseals from it: a hand-out to a peer.
	l2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := safe.WriteManifest(filepath.Join(w.dir, "distributor-2", "genesis.json"), w.manifest); err != nil {
		t.Fatal(err)
	}
	d2 := w.startIn(filepath.Join(w.dir, "distributor-2"), "distributor-2", l2, d.addr)
	if err := d2.srv.WaitUnsealed(ctx(t)); err != nil {
		t.Fatalf("distributor-2 did not unseal from its peer: %v", err)
	}
	if ok, reason := d2.srv.Readiness(); !ok {
		t.Errorf("distributor-2 Readiness() after a peer unseal = false, %q", reason)
	}
	if got := series(t, regs["distributor-2"])["cairn_distributor_sealed"]; got != 0 {
		t.Errorf("distributor-2 cairn_distributor_sealed = %v, want 0", got)
	}
	counters["cairn_distributor_root_key_handouts_total{to=peer}"] = 1
	check("after a peer unseal", true, "", metricsWant(0, 0, 0, 0, counters))

	// Sealed by an officer: not ready again.
	if _, err := w.client(d.addr, officerID(1)).Seal(ctx(t), &distributorv1.SealRequest{Reason: "drill"}); err != nil {
		t.Fatal(err)
	}
	if ok, reason := d.srv.Readiness(); ok || !strings.HasPrefix(reason, "sealed: ") {
		t.Errorf("Readiness() after Seal = %v, %q, want false, sealed: ...", ok, reason)
	}
	d2.stop()
	d.stop()
	if ok, reason := d.srv.Readiness(); ok || reason != "shut down" {
		t.Errorf("Readiness() after Close = %v, %q, want false, \"shut down\"", ok, reason)
	}
}

// TestReadinessReasons: what a sealed distributor says it waits for.
func TestReadinessReasons(t *testing.T) {
	w := newWorld(t, 2, 3)
	unprovisioned := w.start("distributor-1", false)
	withPeer := w.start("distributor-2", true, "127.0.0.1:1") // a peer that never answers
	for _, tt := range []struct {
		name string
		d    *node
		want string
	}{
		{"unprovisioned", unprovisioned, "sealed: not provisioned (no genesis manifest); run a provisioning ceremony"},
		{"peers", withPeer, "sealed: no ceremony open; fetching the root key from 1 peer distributor(s) until one hands it out, or open an unseal ceremony"},
	} {
		if ok, reason := tt.d.srv.Readiness(); ok || reason != tt.want {
			t.Errorf("%s: Readiness() = %v, %q, want false, %q", tt.name, ok, reason, tt.want)
		}
	}
	mb, err := proto.Marshal(w.manifest)
	if err != nil {
		t.Fatal(err)
	}
	c, err := w.client(unprovisioned.addr, officerID(1)).OpenCeremony(ctx(t), &distributorv1.OpenCeremonyRequest{
		Kind: distributorv1.CeremonyKind_CEREMONY_KIND_PROVISION, Manifest: mb})
	if err != nil {
		t.Fatalf("OpenCeremony(provision) = %v", err)
	}
	want := fmt.Sprintf("sealed: provisioning ceremony %s open, waiting for the root key from genesis", c.GetId())
	if ok, reason := unprovisioned.srv.Readiness(); ok || reason != want {
		t.Errorf("provisioning: Readiness() = %v, %q, want false, %q", ok, reason, want)
	}
}
