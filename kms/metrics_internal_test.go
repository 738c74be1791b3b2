package kms

import (
	"slices"
	"testing"

	"github.com/cairnkms/cairn/kms/keystore"
	"github.com/google/go-cmp/cmp"
)

// keysetSeries returns keyset_requests_total as "keyset op outcome" -> value.
func keysetSeries(t *testing.T, m *metrics) map[string]float64 {
	t.Helper()
	mfs, err := m.reg.Gather()
	if err != nil {
		t.Fatalf("Gather() = %v", err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "cairn_kms_keyset_requests_total" {
			continue
		}
		for _, s := range mf.GetMetric() {
			l := map[string]string{}
			for _, p := range s.GetLabel() {
				l[p.GetName()] = p.GetValue()
			}
			out[l["keyset"]+" "+l["op"]+" "+l["outcome"]] = s.GetCounter().GetValue()
		}
	}
	return out
}

// TestKeysetTable: the first limit keysets by name get series; a keyset
// keeps its series while it stays in the bundle; one that leaves loses them
// and frees its place; a retired keyset never gets a series again.
func TestKeysetTable(t *testing.T) {
	m, err := newMetrics(nil, 2)
	if err != nil {
		t.Fatal(err)
	}
	t1 := m.keysetTableFor(nil, nameList{"a", "b", "c"})
	for _, n := range []string{"a", "b", "c", "zz"} {
		m.countKeyset(t1, n, opDecrypt, outcomeOK)
	}
	m.countKeyset(t1, "a", opEncrypt, outcomeDenied)
	m.countKeyset(nil, "a", opEncrypt, outcomeError) // nothing served
	m.countKeyset(t1, "a", opApplyBundle, outcomeOK) // not a data-plane op: not counted
	want := map[string]float64{
		"a decrypt ok":         1,
		"a encrypt denied":     1,
		"b decrypt ok":         1,
		"_other decrypt ok":    2, // c over the limit, zz unknown
		"_other encrypt error": 1,
	}
	if diff := cmp.Diff(want, keysetSeries(t, m)); diff != "" {
		t.Errorf("after the first bundle (-want +got):\n%s", diff)
	}

	// a leaves: its series go, and c takes its place; d is over the limit.
	t2 := m.keysetTableFor(t1, nameList{"b", "c", "d"})
	m.countKeyset(t2, "c", opDecrypt, outcomeOK)
	m.countKeyset(t2, "d", opDecrypt, outcomeOK)
	m.countKeyset(t2, "b", opDecrypt, outcomeOK)
	// Calls that read the old table before the swap: a's old series is
	// gone and is not made again.
	m.countKeyset(t1, "a", opDecrypt, outcomeOK)
	m.countKeyset(t1, "a", opRewrap, outcomeOK) // a's first rewrap: counted as _other
	want = map[string]float64{
		"b decrypt ok":         2,
		"c decrypt ok":         1,
		"_other decrypt ok":    3,
		"_other encrypt error": 1,
		"_other rewrap ok":     1,
	}
	if diff := cmp.Diff(want, keysetSeries(t, m)); diff != "" {
		t.Errorf("after the second bundle (-want +got):\n%s", diff)
	}
	if got := len(t2.byName); got != 2 {
		t.Errorf("labelled keysets = %d, want the limit 2", got)
	}

	// A keyset named like the overflow label shares it.
	t3 := m.keysetTableFor(t2, nameList{"_other", "b", "c"})
	if _, ok := t3.byName["_other"]; ok {
		t.Errorf("keysetTableFor: %q got counters of its own", otherKeyset)
	}
}

// TestKeysetCountAllocations: counting a call allocates nothing after the
// series' first use, for a labelled keyset and for _other.
func TestKeysetCountAllocations(t *testing.T) {
	m, err := newMetrics(nil, 1)
	if err != nil {
		t.Fatal(err)
	}
	tab := m.keysetTableFor(nil, nameList{"payments/ledger", "zz"})
	for _, name := range []string{"payments/ledger", "zz", "not/served"} {
		m.countKeyset(tab, name, opDecrypt, outcomeOK)
		if n := testing.AllocsPerRun(100, func() { m.countKeyset(tab, name, opDecrypt, outcomeOK) }); n != 0 {
			t.Errorf("countKeyset(%q) allocs = %v, want 0", name, n)
		}
	}
}

func TestMetricsKeysetLimitDefault(t *testing.T) {
	s, _, _, _ := newUnstarted(t)
	if got := s.cfg.MetricsKeysetLimit; got != 100 {
		t.Errorf("MetricsKeysetLimit default = %d, want 100", got)
	}
}

// nameList stands in for a store's names in keysetTableFor (in name order).
type nameList []string

func (l nameList) Names() []string { return l }

func (l nameList) Keyset(name string) (*keystore.Keyset, bool) { return nil, slices.Contains(l, name) }
