package lifecycle_test

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/lifecycle"
	"github.com/cairnkms/cairn/internal/safety"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
)

func TestKeyset(t *testing.T) {
	t0 := time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)
	ts := func(d time.Duration) *timestamppb.Timestamp { return timestamppb.New(t0.Add(d)) }
	rec := &statev1.KeysetRecord{
		Name: "demo/notes", Regions: []string{"eu-west", "us-east"},
		TtlHistory: []*statev1.TtlPeriod{
			{Ttl: durationpb.New(90 * 24 * time.Hour), From: ts(0), Until: ts(time.Hour)},
			{Ttl: durationpb.New(time.Second), From: ts(time.Hour)},
		},
		Versions: []*statev1.KeysetVersionRecord{
			{KeyId: 1, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED, CreatedAt: ts(0), PrimarySince: ts(0), SupersededAt: ts(2 * time.Hour),
				Propagated: []*statev1.RegionTime{{Region: "us-east", At: ts(time.Minute)}}},
			{KeyId: 2, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY, CreatedAt: ts(time.Hour), PrimarySince: ts(2 * time.Hour)},
			{KeyId: 3, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROY_SCHEDULED, CreatedAt: ts(0), DisabledAt: ts(3 * time.Hour), DestroyAfter: ts(27 * time.Hour)},
			{KeyId: 4, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_DISABLED},
			{KeyId: 5, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROYED},
			{KeyId: 6},
		},
	}
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	want := safety.Keyset{
		Name: "demo/notes", Regions: []string{"eu-west", "us-east"},
		TTL: []safety.TTLPeriod{{TTL: 90 * 24 * time.Hour, From: at(0), Until: at(time.Hour)}, {TTL: time.Second, From: at(time.Hour)}},
		Versions: []safety.Version{
			{KeyID: 1, State: safety.Enabled, Created: at(0), PrimarySince: at(0), SupersededAt: at(2 * time.Hour), Propagated: map[string]time.Time{"us-east": at(time.Minute)}},
			{KeyID: 2, State: safety.Primary, Created: at(time.Hour), PrimarySince: at(2 * time.Hour), Propagated: map[string]time.Time{}},
			{KeyID: 3, State: safety.DestroyScheduled, Created: at(0), DisabledAt: at(3 * time.Hour), DestroyAfter: at(27 * time.Hour), Propagated: map[string]time.Time{}},
			{KeyID: 4, State: safety.Disabled, Propagated: map[string]time.Time{}},
			{KeyID: 5, State: safety.Destroyed, Propagated: map[string]time.Time{}},
			{KeyID: 6, State: safety.StateUnspecified, Propagated: map[string]time.Time{}},
		},
	}
	if diff := cmp.Diff(want, lifecycle.Keyset(rec)); diff != "" {
		t.Errorf("Keyset(record) differs (-want +got):\n%s", diff)
	}
	// The record's TTL cut counts as the safety package says: the old TTL
	// still rules an hour after the cut.
	if got := safety.EffectiveTTL(lifecycle.Keyset(rec).TTL, at(2*time.Hour)); got != 90*24*time.Hour {
		t.Errorf("EffectiveTTL after the cut = %v, want %v", got, 90*24*time.Hour)
	}
	if got := lifecycle.Time(nil); !got.IsZero() {
		t.Errorf("Time(nil) = %v, want zero", got)
	}
}
