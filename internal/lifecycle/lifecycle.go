// Package lifecycle reads the root KMS's keyset record
// (cairn.rootkms.state.v1.KeysetRecord) as the Safety Condition
// (internal/safety) judges it. The root KMS, before a lifecycle write, and
// regionctl, before a build or push, convert the same record the same way.
package lifecycle

import (
	"slices"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/safety"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
)

// Keyset is rec as the Safety Condition reads it: regions, TTL history and
// every version's state and times (unset times are zero).
func Keyset(rec *statev1.KeysetRecord) safety.Keyset {
	k := safety.Keyset{Name: rec.GetName(), Regions: slices.Clone(rec.GetRegions())}
	for _, p := range rec.GetTtlHistory() {
		k.TTL = append(k.TTL, safety.TTLPeriod{TTL: p.GetTtl().AsDuration(), From: Time(p.GetFrom()), Until: Time(p.GetUntil())})
	}
	for _, v := range rec.GetVersions() {
		sv := safety.Version{
			KeyID: v.GetKeyId(), State: State(v.GetState()),
			Created: Time(v.GetCreatedAt()), PrimarySince: Time(v.GetPrimarySince()), SupersededAt: Time(v.GetSupersededAt()),
			DisabledAt: Time(v.GetDisabledAt()), DestroyAfter: Time(v.GetDestroyAfter()),
			Propagated: make(map[string]time.Time, len(v.GetPropagated())),
		}
		for _, p := range v.GetPropagated() {
			sv.Propagated[p.GetRegion()] = Time(p.GetAt())
		}
		k.Versions = append(k.Versions, sv)
	}
	return k
}

// State is a record state as the Safety Condition names it.
func State(s statev1.KeysetVersionState) safety.State {
	switch s {
	case statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED:
		return safety.Enabled
	case statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY:
		return safety.Primary
	case statev1.KeysetVersionState_KEYSET_VERSION_STATE_DISABLED:
		return safety.Disabled
	case statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROY_SCHEDULED:
		return safety.DestroyScheduled
	case statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROYED:
		return safety.Destroyed
	}
	return safety.StateUnspecified
}

// Time is t as a time.Time, zero for unset.
func Time(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime()
}
