package kms_test

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/kmstest"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// gather returns the registry's families by name.
func gather(t *testing.T, reg *prometheus.Registry) map[string]*dto.MetricFamily {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather() = %v", err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

// gauge returns the value of the unlabelled gauge name.
func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mf, ok := gather(t, reg)[name]
	if !ok || len(mf.GetMetric()) != 1 {
		t.Fatalf("gauge %s: family %v, want one series", name, mf)
	}
	return mf.GetMetric()[0].GetGauge().GetValue()
}

// keysetCounts returns keyset_requests_total as "keyset op outcome" -> value.
func keysetCounts(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for _, m := range gather(t, reg)["cairn_kms_keyset_requests_total"].GetMetric() {
		l := map[string]string{}
		for _, p := range m.GetLabel() {
			l[p.GetName()] = p.GetValue()
		}
		out[l["keyset"]+" "+l["op"]+" "+l["outcome"]] = m.GetCounter().GetValue()
	}
	return out
}

// TestKeysetMetrics: the bundle gauges and readiness follow ApplyBundle; keyset
// counters name only keysets of the bundle, at most MetricsKeysetLimit of
// them, and count everything else under _other.
func TestKeysetMetrics(t *testing.T) {
	e := newEnv(t)
	reg := prometheus.NewRegistry()
	s := e.start(kms1ID, "", func(c *kms.Config) { c.Registry = reg; c.MetricsKeysetLimit = 2 })
	app, intruder := e.client(appID, s), e.client(otherID, s)

	if ok, reason := s.Readiness(); ok || !strings.Contains(reason, "no bundle applied yet") {
		t.Errorf("Readiness() before a bundle = %v, %q, want false, a reason naming the missing bundle", ok, reason)
	}
	for _, name := range []string{"cairn_kms_ready", "cairn_kms_bundle_applied_timestamp_seconds", "cairn_kms_bundle_created_timestamp_seconds", "cairn_kms_bundle_serial"} {
		if got := gauge(t, reg, name); got != 0 {
			t.Errorf("%s before a bundle = %v, want 0", name, got)
		}
	}
	// Nothing served: a call counts under _other.
	if _, err := app.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: ledger, Plaintext: []byte("x")}); err == nil {
		t.Fatal("Encrypt before a bundle succeeded")
	}

	acl := kmstest.ACL("client/us-east/app")
	one, two, three := kmstest.NewKeyset(t, "a/one", acl), kmstest.NewKeyset(t, "b/two", acl), kmstest.NewKeyset(t, "c/three", acl)
	s.clock.Advance(time.Minute)
	appliedAt := s.clock.Now()
	e.apply(s, e.bundle(one, two, three))
	if ok, reason := s.Readiness(); !ok || reason != "" {
		t.Errorf("Readiness() serving = %v, %q, want true, \"\"", ok, reason)
	}
	for _, g := range []struct {
		name string
		want float64
	}{
		{"cairn_kms_ready", 1},
		{"cairn_kms_bundle_serial", 1},
		{"cairn_kms_keysets", 3},
		{"cairn_kms_bundle_applied_timestamp_seconds", float64(appliedAt.Unix())},
		{"cairn_kms_bundle_created_timestamp_seconds", 1_800_000_000}, // kmstest.Bundle's created_at
	} {
		if got := gauge(t, reg, g.name); got != g.want {
			t.Errorf("%s = %v, want %v", g.name, got, g.want)
		}
	}

	encrypt(t, app, "a/one", []byte("x"), nil)
	encrypt(t, app, "a/one", []byte("x"), nil)
	ct := encrypt(t, app, "b/two", []byte("x"), nil).GetCiphertext()
	decrypt(t, app, "b/two", ct, nil)
	if _, err := app.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: "b/two", Ciphertext: []byte("garbage")}); err == nil {
		t.Error("Decrypt(garbage) succeeded")
	}
	encrypt(t, app, "c/three", []byte("x"), nil) // over the limit of 2
	if _, err := intruder.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: "a/one", Plaintext: []byte("x")}); err == nil {
		t.Error("Encrypt by an intruder succeeded")
	}
	for _, name := range []string{"zz/unknown", "_other", strings.Repeat("x", 300)} {
		if _, err := app.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: name, Plaintext: []byte("x")}); err == nil {
			t.Errorf("Encrypt(%.20q) succeeded", name)
		}
	}
	// Only series used exist; no client-supplied name is a label.
	want := map[string]float64{
		"a/one encrypt ok":      2,
		"a/one encrypt denied":  1,
		"b/two encrypt ok":      1,
		"b/two decrypt ok":      1,
		"b/two decrypt error":   1,
		"_other encrypt ok":     1, // c/three, over the limit
		"_other encrypt error":  1, // before the bundle
		"_other encrypt denied": 3, // the three unknown names: refused as to a caller on no ACL
	}
	if diff := cmp.Diff(want, keysetCounts(t, reg)); diff != "" {
		t.Errorf("cairn_kms_keyset_requests_total (-want +got):\n%s", diff)
	}

	// The older per-op counters still count every call.
	var encrypts float64
	for _, m := range gather(t, reg)["cairn_kms_requests_total"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "op" && l.GetValue() == "encrypt" {
				encrypts += m.GetCounter().GetValue()
			}
		}
	}
	if encrypts != 9 {
		t.Errorf("cairn_kms_requests_total{op=encrypt} summed = %v, want 9", encrypts)
	}

	s.Close()
	if ok, reason := s.Readiness(); ok || reason != "shut down" {
		t.Errorf("Readiness() after Close = %v, %q, want false, \"shut down\"", ok, reason)
	}
	if got := gauge(t, reg, "cairn_kms_ready"); got != 0 {
		t.Errorf("cairn_kms_ready after Close = %v, want 0", got)
	}
}

// TestMetricsKeysetLimitConfig: a negative limit is refused.
func TestMetricsKeysetLimitConfig(t *testing.T) {
	err := kms.Config{MetricsKeysetLimit: -1}.Validate()
	if err == nil || !strings.Contains(err.Error(), "kms: negative MetricsKeysetLimit") {
		t.Errorf("Config{MetricsKeysetLimit: -1}.Validate() = %v, want an error naming it", err)
	}
}
