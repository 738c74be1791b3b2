// Package rootkmstest is a test harness for the root KMS: command builders,
// snapshot helpers, a state invariant checker and an in-memory hashicorp/raft
// cluster of fsm.FSMs (Cluster). It is for tests only.
package rootkmstest

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
)

// GenesisID is the genesis ID of the harness's RMK lineage.
const GenesisID = "rootkmstest-genesis"

// KCV returns the RMK key check value of the harness's lineage (a fresh copy).
func KCV() []byte { return []byte{0xca, 0x12, 0x17, 0x4b, 0x0c, 0x5e} }

// NewFSM returns an empty FSM of the harness's lineage (GenesisID, KCV).
func NewFSM() *fsm.FSM { return fsm.New(GenesisID, KCV()) }

// Wrapped returns stand-in wrapped material for a region key version: distinct
// per region and version, never a real ciphertext (the FSM does not decrypt).
func Wrapped(region string, version uint32) []byte {
	return fmt.Appendf(nil, "wrapped:%s:%d", region, version)
}

func command(at time.Time) *statev1.Command {
	return &statev1.Command{FormatVersion: fsm.FormatVersion, Time: timestamppb.New(at)}
}

// CreateRegion returns a create_region command whose version 1 is wrapped
// under the RMK of kcv.
func CreateRegion(name string, wrapped, kcv []byte, at time.Time) *statev1.Command {
	c := command(at)
	c.Op = &statev1.Command_CreateRegion{CreateRegion: &statev1.CreateRegionCommand{
		Region:       name,
		FirstVersion: &statev1.WrappedRegionKeyVersion{Version: 1, WrappedKey: wrapped, RmkKcv: kcv},
	}}
	return c
}

// AddVersion returns an add_region_key_version command.
func AddVersion(region string, version uint32, wrapped, kcv []byte, makePrimary bool, at time.Time) *statev1.Command {
	c := command(at)
	c.Op = &statev1.Command_AddRegionKeyVersion{AddRegionKeyVersion: &statev1.AddRegionKeyVersionCommand{
		Region:      region,
		Version:     &statev1.WrappedRegionKeyVersion{Version: version, WrappedKey: wrapped, RmkKcv: kcv},
		MakePrimary: makePrimary,
	}}
	return c
}

// SetStatus returns a set_region_key_version_status command.
func SetStatus(region string, version uint32, status cryptov1.KeyStatus, at time.Time) *statev1.Command {
	c := command(at)
	c.Op = &statev1.Command_SetRegionKeyVersionStatus{SetRegionKeyVersionStatus: &statev1.SetRegionKeyVersionStatusCommand{
		Region: region, Version: version, Status: status,
	}}
	return c
}

// RegisterMember returns a register_member command.
func RegisterMember(id, apiAddress string, at time.Time) *statev1.Command {
	c := command(at)
	c.Op = &statev1.Command_RegisterMember{RegisterMember: &statev1.RegisterMemberCommand{
		Member: &statev1.MemberRecord{Id: id, ApiAddress: apiAddress},
	}}
	return c
}

// DeregisterMember returns a deregister_member command.
func DeregisterMember(id string, at time.Time) *statev1.Command {
	c := command(at)
	c.Op = &statev1.Command_DeregisterMember{DeregisterMember: &statev1.DeregisterMemberCommand{Id: id}}
	return c
}

// Sink is an in-memory raft.SnapshotSink.
type Sink struct {
	bytes.Buffer
	// Closed and Canceled record which of Close and Cancel was called.
	Closed, Canceled bool
}

// ID returns "rootkmstest".
func (s *Sink) ID() string { return "rootkmstest" }

// Close records the call.
func (s *Sink) Close() error { s.Closed = true; return nil }

// Cancel records the call.
func (s *Sink) Cancel() error { s.Canceled = true; return nil }

// SnapshotBytes returns the bytes f's current State persists to: equal for
// replicas in the same state. It fails t on any error.
func SnapshotBytes(t testing.TB, f *fsm.FSM) []byte {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatalf("Snapshot() = %v", err)
	}
	defer snap.Release()
	var sink Sink
	if err := snap.Persist(&sink); err != nil {
		t.Fatalf("Persist() = %v", err)
	}
	if !sink.Closed || sink.Canceled {
		t.Fatalf("Persist() left the sink closed=%v canceled=%v, want closed", sink.Closed, sink.Canceled)
	}
	return sink.Bytes()
}

// CheckInvariants checks what must hold for every State an FSM of RMK kcv
// publishes, independently of the fsm package's own checks: regions sorted by
// valid unique names, each with versions 1..n, exactly one PRIMARY, material
// under kcv for every version but the DESTROYED ones (which have none), the
// timestamps their status implies; members sorted, unique and complete. It
// returns every violation joined.
func CheckInvariants(s *fsm.State, kcv []byte) error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	regions := s.Regions()
	if !slices.IsSortedFunc(regions, func(a, b *fsm.Region) int { return strings.Compare(a.Name, b.Name) }) {
		bad("regions not sorted")
	}
	for i, r := range regions {
		if i > 0 && regions[i-1].Name == r.Name {
			bad("region %q twice", r.Name)
		}
		if err := fsm.ValidRegionName(r.Name); err != nil {
			bad("region name: %v", err)
		}
		if got, ok := s.Region(r.Name); !ok || got != r {
			bad("Region(%q) = %p, %v, want %p, true", r.Name, got, ok, r)
		}
		if r.CreatedAt.IsZero() {
			bad("region %q: no CreatedAt", r.Name)
		}
		if len(r.Versions) == 0 {
			bad("region %q: no versions", r.Name)
		}
		primaries := 0
		for j, v := range r.Versions {
			where := fmt.Sprintf("region %q version %d", r.Name, j+1)
			if v.Version != uint32(j+1) {
				bad("%s: numbered %d", where, v.Version)
			}
			if v.CreatedAt.IsZero() {
				bad("%s: no CreatedAt", where)
			}
			switch v.Status {
			case cryptov1.KeyStatus_KEY_STATUS_PRIMARY:
				primaries++
				if v.PrimarySince.IsZero() {
					bad("%s: PRIMARY without PrimarySince", where)
				}
			case cryptov1.KeyStatus_KEY_STATUS_ENABLED, cryptov1.KeyStatus_KEY_STATUS_DISABLED:
			case cryptov1.KeyStatus_KEY_STATUS_DESTROYED:
				if v.Key != nil {
					bad("%s: DESTROYED with material", where)
				}
				if v.RetiredAt.IsZero() {
					bad("%s: DESTROYED without RetiredAt", where)
				}
				continue
			default:
				bad("%s: status %v", where, v.Status)
			}
			if v.Key.GetVersion() != v.Version || len(v.Key.GetWrappedKey()) == 0 || !bytes.Equal(v.Key.GetRmkKcv(), kcv) {
				bad("%s: key %v", where, v.Key)
			}
		}
		if primaries != 1 {
			bad("region %q: %d primaries", r.Name, primaries)
		}
		if len(r.Info()) != len(r.Versions) {
			bad("region %q: %d infos for %d versions", r.Name, len(r.Info()), len(r.Versions))
		}
	}
	members := s.Members()
	for i, m := range members {
		if i > 0 && strings.Compare(members[i-1].ID, m.ID) >= 0 {
			bad("members not sorted or duplicate at %q", m.ID)
		}
		if m.ID == "" || m.APIAddress == "" {
			bad("member %+v incomplete", m)
		}
	}
	return errors.Join(errs...)
}
