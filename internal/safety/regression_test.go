package safety_test

import (
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/cairnkms/cairn/internal/safety"
)

// Named regressions: each known way around the Safety Condition, refused.

// TestRegressionTTLCutThenDrop: TTL 90 days cut to 1s, 2s later the keyset is
// dropped. Ciphertexts made just before the cut live 90 days more.
func TestRegressionTTLCutThenDrop(t *testing.T) {
	k, f := fixture()
	k.TTL = safety.WithTTL(safety.WithTTL(nil, 90*day, t0.Add(-100*day)), time.Second, t0)
	k.Versions[0].SupersededAt = t0.Add(-10 * day) // v1 superseded in the 90-day era
	now := t0.Add(2 * time.Second)
	cur := content(map[uint32]safety.Serving{1: dec, 2: pri, 3: dec})
	for _, scope := range []safety.Scope{safety.ScopeFleet, safety.ScopeLocal} {
		fl := f
		if scope == safety.ScopeLocal {
			fl.Servers = fl.Servers[:1]
		}
		err := safety.CheckBundle("us-east", cur, safety.Content{}, map[string]safety.Keyset{k.Name: k}, fl, scope, p, now)
		var rs safety.Refusals
		if !errors.As(err, &rs) {
			t.Fatalf("CheckBundle(%v, drop keyset 2s after a TTL cut) = %v, want refusals", scope, err)
		}
		var ids []uint32
		for _, r := range rs {
			ids = append(ids, r.KeyID)
		}
		// v1: superseded 10 days ago under a 90-day TTL; v2: primary and
		// used a minute ago. v3 was never used.
		if want := []uint32{1, 2}; !slices.Equal(ids, want) {
			t.Errorf("CheckBundle(%v, drop keyset 2s after a TTL cut) refuses versions %v, want %v (%v)", scope, ids, want, err)
		}
		if got, want := rs[0].Earliest, t0.Add(-10*day+90*day+10*time.Minute); !got.Equal(want) {
			t.Errorf("CheckBundle(%v, ...) version 1 earliest = %v, want %v", scope, got, want)
		}
	}
	// The same through the record: disabling v1 is refused.
	if err := safety.CheckRetire(k, 1, f, safety.ScopeFleet, p, now); !errors.Is(err, safety.ErrUnsafe) {
		t.Errorf("CheckRetire(v1, 2s after a TTL cut) = %v, want a refusal", err)
	}
	// Once the old TTL has passed since the cut, the 1s TTL rules.
	if got := safety.EffectiveTTL(k.TTL, t0.Add(90*day)); got != time.Second {
		t.Errorf("EffectiveTTL(90 days after the cut) = %v, want 1s", got)
	}
}

// TestRegressionPerServerHistory: one server (fresh state) never served the
// version; its neighbour still encrypted with it after the record superseded
// it. The fleet-wide check refuses dropping it from the fresh server; that
// server's own local check cannot see the neighbour, which is why regionctl
// and the root KMS check fleet-wide.
func TestRegressionPerServerHistory(t *testing.T) {
	k, f := fixture()
	setUsage(&f, 0, 1, func(sv *safety.ServedVersion) {
		sv.Primary, sv.LastEncrypt, sv.LastUse = false, t0.Add(-time.Minute), t0.Add(-time.Minute)
	})
	f.Servers[1].Keysets = nil // us-east kms-2: fresh state, serves nothing, no history
	f.Servers[1].HistoryFrom = t0.Add(-10 * day)
	next := content(map[uint32]safety.Serving{2: pri, 3: dec})
	record := map[string]safety.Keyset{k.Name: k}

	err := safety.CheckBundle("us-east", content(map[uint32]safety.Serving{1: dec, 2: pri, 3: dec}), next, record, f, safety.ScopeFleet, p, t0)
	var r *safety.Refusal
	if !errors.As(err, &r) || r.KeyID != 1 {
		t.Fatalf("CheckBundle(fleet, drop v1 used by a neighbour) = %v, want a refusal of version 1", err)
	}
	if got, want := r.Servers(), []string{"us-east/kms-1"}; !cmp.Equal(got, want) {
		t.Errorf("CheckBundle(...).Servers() = %v, want %v", got, want)
	}
	if got, want := r.Earliest, t0.Add(-time.Minute+time.Hour+10*time.Minute); !got.Equal(want) {
		t.Errorf("CheckBundle(...).Earliest = %v, want %v", got, want)
	}
	local := safety.Fleet{Servers: f.Servers[1:2]}
	if err := safety.CheckRetire(k, 1, local, safety.ScopeLocal, p, t0); err != nil {
		t.Errorf("CheckRetire(local, the fresh server alone) = %v, want nil (it cannot see its neighbour)", err)
	}
}

// TestRegressionPromoteBeforePropagate: a bundle that adds a version and
// makes it primary at once is refused, and so is a promotion while one region
// has not served the version, naming that region.
func TestRegressionPromoteBeforePropagate(t *testing.T) {
	k, f := fixture()
	record := map[string]safety.Keyset{k.Name: k}
	cur := content(map[uint32]safety.Serving{1: dec, 2: pri})
	next := content(map[uint32]safety.Serving{1: dec, 2: dec, 3: pri})
	err := safety.CheckBundle("us-east", cur, next, record, f, safety.ScopeLocal, p, t0.Add(day))
	var r *safety.Refusal
	if !errors.As(err, &r) || r.KeyID != 3 || r.Step != safety.StepPromote {
		t.Fatalf("CheckBundle(adds v3 and makes it primary) = %v, want a refusal to promote version 3", err)
	}

	delete(k.Versions[2].Propagated, "eu-west")
	err = safety.CheckPromote(k, 3, f, safety.ScopeFleet, p, t0.Add(day))
	if !errors.As(err, &r) {
		t.Fatalf("CheckPromote(eu-west not propagated) = %v, want a refusal", err)
	}
	if got, want := r.Regions(), []string{"eu-west"}; !cmp.Equal(got, want) || !r.Earliest.IsZero() {
		t.Errorf("CheckPromote(eu-west not propagated) regions, earliest = %v, %v, want %v, zero", got, r.Earliest, want)
	}
}

// TestRegressionUnknownCountsAsInUse: an unreachable server, or one that lost
// its history and has not reported since, blocks retirement and promotion
// with no computable earliest time.
func TestRegressionUnknownCountsAsInUse(t *testing.T) {
	k, f := fixture()
	f.Servers[2].Known = false
	f.Servers[2].Keysets = nil // nothing is known of it
	for _, c := range []struct {
		name string
		err  error
	}{
		{"CheckRetire(v1)", safety.CheckRetire(k, 1, f, safety.ScopeFleet, p, t0.Add(30*day))},
		{"CheckPromote(v3)", safety.CheckPromote(k, 3, f, safety.ScopeFleet, p, t0.Add(30*day))},
	} {
		var r *safety.Refusal
		if !errors.As(c.err, &r) {
			t.Errorf("%s with eu-west kms-1 unknown = %v, want a refusal", c.name, c.err)
			continue
		}
		if got, want := r.Servers(), []string{"eu-west/kms-1"}; !cmp.Equal(got, want) || !r.Earliest.IsZero() {
			t.Errorf("%s servers, earliest = %v, %v, want %v, zero", c.name, got, r.Earliest, want)
		}
	}
}
