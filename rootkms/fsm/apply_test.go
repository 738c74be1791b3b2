package fsm_test

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/timestamppb"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkmstest"
)

// key returns the wrapped key record the tests put in region's version v.
func key(region string, v uint32) *statev1.WrappedRegionKeyVersion {
	return &statev1.WrappedRegionKeyVersion{Version: v, WrappedKey: rootkmstest.Wrapped(region, v), RmkKcv: kcv}
}

// euVersions returns region "eu"'s versions after euSetup.
func euVersions() []fsm.Version {
	return []fsm.Version{
		{Version: 1, Key: key("eu", 1), Status: enabled, CreatedAt: at(0), PrimarySince: at(0), SupersededAt: at(10)},
		{Version: 2, Key: key("eu", 2), Status: primary, CreatedAt: at(10), PrimarySince: at(10)},
		{Version: 3, Key: key("eu", 3), Status: disabled, CreatedAt: at(20)},
		{Version: 4, Status: destroyed, CreatedAt: at(40), RetiredAt: at(42)},
		{Version: 5, Key: key("eu", 5), Status: enabled, CreatedAt: at(50)},
	}
}

// edit returns a copy of vs changed by f.
func edit(vs []fsm.Version, f func([]fsm.Version) []fsm.Version) []fsm.Version {
	return f(slices.Clone(vs))
}

func TestApplyRegionCommands(t *testing.T) {
	now := at(100)
	tests := []struct {
		name string
		cmd  *statev1.Command
		want *fsm.Region
	}{
		{
			name: "create_region",
			cmd:  rootkmstest.CreateRegion("ap-south-1", rootkmstest.Wrapped("ap-south-1", 1), kcv, now),
			want: &fsm.Region{Name: "ap-south-1", CreatedAt: now, Versions: []fsm.Version{
				{Version: 1, Key: key("ap-south-1", 1), Status: primary, CreatedAt: now, PrimarySince: now},
			}},
		},
		{
			name: "add_region_key_version enabled",
			cmd:  rootkmstest.AddVersion("eu", 6, rootkmstest.Wrapped("eu", 6), kcv, false, now),
			want: &fsm.Region{Name: "eu", CreatedAt: at(0), Versions: append(euVersions(),
				fsm.Version{Version: 6, Key: key("eu", 6), Status: enabled, CreatedAt: now})},
		},
		{
			name: "add_region_key_version make_primary",
			cmd:  rootkmstest.AddVersion("eu", 6, rootkmstest.Wrapped("eu", 6), kcv, true, now),
			want: &fsm.Region{Name: "eu", CreatedAt: at(0), Versions: edit(euVersions(), func(vs []fsm.Version) []fsm.Version {
				vs[1].Status, vs[1].SupersededAt = enabled, now
				return append(vs, fsm.Version{Version: 6, Key: key("eu", 6), Status: primary, CreatedAt: now, PrimarySince: now})
			})},
		},
		{
			name: "ENABLED to PRIMARY",
			cmd:  rootkmstest.SetStatus("eu", 5, primary, now),
			want: &fsm.Region{Name: "eu", CreatedAt: at(0), Versions: edit(euVersions(), func(vs []fsm.Version) []fsm.Version {
				vs[1].Status, vs[1].SupersededAt = enabled, now
				vs[4].Status, vs[4].PrimarySince = primary, now
				return vs
			})},
		},
		{
			name: "superseded ENABLED to PRIMARY again clears SupersededAt",
			cmd:  rootkmstest.SetStatus("eu", 1, primary, now),
			want: &fsm.Region{Name: "eu", CreatedAt: at(0), Versions: edit(euVersions(), func(vs []fsm.Version) []fsm.Version {
				vs[1].Status, vs[1].SupersededAt = enabled, now
				vs[0].Status, vs[0].PrimarySince, vs[0].SupersededAt = primary, now, time.Time{}
				return vs
			})},
		},
		{
			name: "DISABLED to ENABLED",
			cmd:  rootkmstest.SetStatus("eu", 3, enabled, now),
			want: &fsm.Region{Name: "eu", CreatedAt: at(0), Versions: edit(euVersions(), func(vs []fsm.Version) []fsm.Version {
				vs[2].Status = enabled
				return vs
			})},
		},
		{
			name: "ENABLED to DISABLED",
			cmd:  rootkmstest.SetStatus("eu", 5, disabled, now),
			want: &fsm.Region{Name: "eu", CreatedAt: at(0), Versions: edit(euVersions(), func(vs []fsm.Version) []fsm.Version {
				vs[4].Status = disabled
				return vs
			})},
		},
		{
			name: "DISABLED to DESTROYED drops the material",
			cmd:  rootkmstest.SetStatus("eu", 3, destroyed, now),
			want: &fsm.Region{Name: "eu", CreatedAt: at(0), Versions: edit(euVersions(), func(vs []fsm.Version) []fsm.Version {
				vs[2].Status, vs[2].Key, vs[2].RetiredAt = destroyed, nil, now
				return vs
			})},
		},
		{
			name: "add_region_key_version to another region",
			cmd:  rootkmstest.AddVersion("us", 2, rootkmstest.Wrapped("us", 2), kcv, true, now),
			want: &fsm.Region{Name: "us", CreatedAt: at(60), Versions: []fsm.Version{
				{Version: 1, Key: key("us", 1), Status: enabled, CreatedAt: at(60), PrimarySince: at(60), SupersededAt: now},
				{Version: 2, Key: key("us", 2), Status: primary, CreatedAt: now, PrimarySince: now},
			}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := setupFSM(t)
			before := f.State()
			res := apply(t, f, tt.cmd)
			if res.Err != nil {
				t.Fatalf("Apply(%s).Err = %v, want nil", tt.name, res.Err)
			}
			after := f.State()
			got, ok := after.Region(tt.want.Name)
			if !ok {
				t.Fatalf("Region(%q) after Apply(%s) = _, false, want true", tt.want.Name, tt.name)
			}
			if diff := cmp.Diff(tt.want, got, protocmp.Transform()); diff != "" {
				t.Errorf("Region(%q) after Apply(%s) differs (-want +got):\n%s", tt.want.Name, tt.name, diff)
			}
			if res.Region != got {
				t.Errorf("Apply(%s).Region = %p, want the published region %p", tt.name, res.Region, got)
			}
			if after.Index() != f.AppliedIndex() {
				t.Errorf("Index() after Apply(%s) = %d, want %d", tt.name, after.Index(), f.AppliedIndex())
			}
			// Unchanged regions are shared, not copied.
			for _, r := range before.Regions() {
				if r.Name == tt.want.Name {
					continue
				}
				if now, _ := after.Region(r.Name); now != r {
					t.Errorf("Region(%q) after Apply(%s) = %p, want the unchanged %p", r.Name, tt.name, now, r)
				}
			}
			if err := rootkmstest.CheckInvariants(after, kcv); err != nil {
				t.Errorf("CheckInvariants after Apply(%s) = %v", tt.name, err)
			}
		})
	}
}

func TestApplyMemberCommands(t *testing.T) {
	tests := []struct {
		name string
		cmd  *statev1.Command
		want []fsm.Member
	}{
		{"register new", rootkmstest.RegisterMember("node-2", "10.0.0.2:8443", at(100)),
			[]fsm.Member{{"node-1", "10.0.0.1:8443"}, {"node-2", "10.0.0.2:8443"}}},
		{"register sorts", rootkmstest.RegisterMember("a", "10.0.0.9:8443", at(100)),
			[]fsm.Member{{"a", "10.0.0.9:8443"}, {"node-1", "10.0.0.1:8443"}}},
		{"register replaces", rootkmstest.RegisterMember("node-1", "10.9.9.9:1", at(100)),
			[]fsm.Member{{"node-1", "10.9.9.9:1"}}},
		{"deregister", rootkmstest.DeregisterMember("node-1", at(100)), []fsm.Member{}},
		{"deregister absent", rootkmstest.DeregisterMember("node-9", at(100)),
			[]fsm.Member{{"node-1", "10.0.0.1:8443"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := setupFSM(t)
			before := f.State()
			res := apply(t, f, tt.cmd)
			if res.Err != nil || res.Region != nil {
				t.Fatalf("Apply(%s) = %+v, want no error and no region", tt.name, res)
			}
			after := f.State()
			if diff := cmp.Diff(tt.want, after.Members()); diff != "" {
				t.Errorf("Members() after Apply(%s) differs (-want +got):\n%s", tt.name, diff)
			}
			for _, m := range tt.want {
				if got, ok := after.Member(m.ID); !ok || got != m {
					t.Errorf("Member(%q) after Apply(%s) = %+v, %v, want %+v, true", m.ID, tt.name, got, ok, m)
				}
			}
			if after == before || after.Index() != f.AppliedIndex() {
				t.Errorf("Apply(%s) published %p with Index %d, want a new State with Index %d", tt.name, after, after.Index(), f.AppliedIndex())
			}
			if !slices.Equal(after.Regions(), before.Regions()) {
				t.Errorf("Regions() after Apply(%s) = %v, want the unchanged %v", tt.name, after.Regions(), before.Regions())
			}
		})
	}
}

// modify returns a copy of cmd changed by f.
func modify(cmd *statev1.Command, f func(*statev1.Command)) *statev1.Command {
	c := proto.Clone(cmd).(*statev1.Command)
	f(c)
	return c
}

func TestApplyRefuses(t *testing.T) {
	now := at(100)
	create := rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), kcv, now)
	other := []byte{0xde, 0xad}
	type test struct {
		name string
		cmd  *statev1.Command // encoded as is, or
		raw  []byte           // these bytes if non-nil
		want error
	}
	tests := []test{
		{name: "undecodable", raw: []byte{0xff, 0xff, 0xff, 0xff}, want: fsm.ErrInvalidCommand},
		{name: "truncated", raw: encode(t, create)[:20], want: fsm.ErrInvalidCommand},
		{name: "format 0", cmd: modify(create, func(c *statev1.Command) { c.FormatVersion = 0 }), want: fsm.ErrInvalidCommand},
		{name: "empty bytes", raw: []byte{}, want: fsm.ErrInvalidCommand},
		{name: "no operation", cmd: modify(create, func(c *statev1.Command) { c.Op = nil }), want: fsm.ErrInvalidCommand},
		{name: "no time", cmd: modify(create, func(c *statev1.Command) { c.Time = nil }), want: fsm.ErrInvalidCommand},
		{name: "time at epoch", cmd: modify(create, func(c *statev1.Command) { c.Time = &timestamppb.Timestamp{} }), want: fsm.ErrInvalidCommand},
		{name: "time before epoch", cmd: modify(create, func(c *statev1.Command) { c.Time = &timestamppb.Timestamp{Seconds: -1} }), want: fsm.ErrInvalidCommand},
		{name: "time invalid nanos", cmd: modify(create, func(c *statev1.Command) { c.Time.Nanos = 1e9 }), want: fsm.ErrInvalidCommand},

		{name: "create existing", cmd: rootkmstest.CreateRegion("eu", rootkmstest.Wrapped("eu", 1), kcv, now), want: fsm.ErrRegionExists},
		{name: "create version 2", cmd: modify(create, func(c *statev1.Command) { c.GetCreateRegion().FirstVersion.Version = 2 }), want: fsm.ErrBadVersion},
		{name: "create version 0", cmd: modify(create, func(c *statev1.Command) { c.GetCreateRegion().FirstVersion.Version = 0 }), want: fsm.ErrBadVersion},
		{name: "create without version", cmd: modify(create, func(c *statev1.Command) { c.GetCreateRegion().FirstVersion = nil }), want: fsm.ErrBadVersion},
		{name: "create empty wrapped key", cmd: rootkmstest.CreateRegion("ap", nil, kcv, now), want: fsm.ErrBadVersion},
		{name: "create other RMK", cmd: rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), other, now), want: fsm.ErrWrongRMK},
		{name: "create no RMK", cmd: rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), nil, now), want: fsm.ErrWrongRMK},

		{name: "add to missing region", cmd: rootkmstest.AddVersion("ap", 1, rootkmstest.Wrapped("ap", 1), kcv, false, now), want: fsm.ErrNoRegion},
		{name: "add existing version", cmd: rootkmstest.AddVersion("eu", 5, rootkmstest.Wrapped("eu", 5), kcv, false, now), want: fsm.ErrBadVersion},
		{name: "add with gap", cmd: rootkmstest.AddVersion("eu", 7, rootkmstest.Wrapped("eu", 7), kcv, true, now), want: fsm.ErrBadVersion},
		{name: "add version 0", cmd: rootkmstest.AddVersion("eu", 0, rootkmstest.Wrapped("eu", 0), kcv, false, now), want: fsm.ErrBadVersion},
		{name: "add without version", cmd: modify(rootkmstest.AddVersion("eu", 6, rootkmstest.Wrapped("eu", 6), kcv, false, now),
			func(c *statev1.Command) { c.GetAddRegionKeyVersion().Version = nil }), want: fsm.ErrBadVersion},
		{name: "add empty wrapped key", cmd: rootkmstest.AddVersion("eu", 6, nil, kcv, true, now), want: fsm.ErrBadVersion},
		{name: "add other RMK", cmd: rootkmstest.AddVersion("eu", 6, rootkmstest.Wrapped("eu", 6), other, true, now), want: fsm.ErrWrongRMK},

		{name: "status of missing region", cmd: rootkmstest.SetStatus("ap", 1, disabled, now), want: fsm.ErrNoRegion},
		{name: "status of version 0", cmd: rootkmstest.SetStatus("eu", 0, disabled, now), want: fsm.ErrNoVersion},
		{name: "status of missing version", cmd: rootkmstest.SetStatus("eu", 6, disabled, now), want: fsm.ErrNoVersion},

		{name: "register without id", cmd: rootkmstest.RegisterMember("", "10.0.0.2:8443", now), want: fsm.ErrInvalidCommand},
		{name: "register without address", cmd: rootkmstest.RegisterMember("node-2", "", now), want: fsm.ErrInvalidCommand},
		{name: "register without member", cmd: modify(rootkmstest.RegisterMember("node-2", "a:1", now),
			func(c *statev1.Command) { c.GetRegisterMember().Member = nil }), want: fsm.ErrInvalidCommand},
		{name: "deregister without id", cmd: rootkmstest.DeregisterMember("", now), want: fsm.ErrInvalidCommand},
	}
	for _, name := range []string{"", "EU", "1eu", "-eu", "eu_west", "eu west", "eu.west", "é", strings.Repeat("a", 64)} {
		tests = append(tests, test{name: fmt.Sprintf("create named %q", name),
			cmd: rootkmstest.CreateRegion(name, rootkmstest.Wrapped(name, 1), kcv, now), want: fsm.ErrInvalidName})
	}
	// Every transition outside ENABLED→PRIMARY, DISABLED→ENABLED,
	// ENABLED→DISABLED, DISABLED→DESTROYED. In euSetup, version 2 is PRIMARY,
	// 5 ENABLED, 3 DISABLED, 4 DESTROYED.
	from := map[cryptov1.KeyStatus]uint32{primary: 2, enabled: 5, disabled: 3, destroyed: 4}
	allowed := map[[2]cryptov1.KeyStatus]bool{
		{enabled, primary}: true, {disabled, enabled}: true, {enabled, disabled}: true, {disabled, destroyed}: true,
	}
	for _, f := range []cryptov1.KeyStatus{primary, enabled, disabled, destroyed} {
		for _, to := range []cryptov1.KeyStatus{unspecified, enabled, primary, disabled, destroyed, 99} {
			if allowed[[2]cryptov1.KeyStatus{f, to}] {
				continue
			}
			tests = append(tests, test{name: fmt.Sprintf("%v to %v", f, to),
				cmd: rootkmstest.SetStatus("eu", from[f], to, now), want: fsm.ErrBadTransition})
		}
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := setupFSM(t)
			before, index := f.State(), f.AppliedIndex()
			data := tt.raw
			if data == nil {
				data = encode(t, tt.cmd)
			}
			out := applyBytes(f, data)
			res, ok := out.(*fsm.Result)
			if !ok {
				t.Fatalf("Apply(%s) = %T, want *fsm.Result", tt.name, out)
			}
			if !errors.Is(res.Err, tt.want) {
				t.Errorf("Apply(%s).Err = %v, want %v", tt.name, res.Err, tt.want)
			}
			if res.Region != nil {
				t.Errorf("Apply(%s).Region = %v, want nil", tt.name, res.Region)
			}
			if f.State() != before {
				t.Errorf("State() after refused Apply(%s) = %p, want the same %p", tt.name, f.State(), before)
			}
			if got := f.AppliedIndex(); got != index+1 {
				t.Errorf("AppliedIndex() after refused Apply(%s) = %d, want %d", tt.name, got, index+1)
			}
		})
	}
}

// withUnknownField returns cmd's encoding with field 99 appended: what an
// operation added by a newer binary looks like to this one.
func withUnknownField(t testing.TB, cmd *statev1.Command) []byte {
	b := encode(t, cmd)
	b = protowire.AppendTag(b, 99, protowire.BytesType)
	return protowire.AppendBytes(b, []byte("a newer operation"))
}

func TestApplyPanicsOnNewerCommand(t *testing.T) {
	noOp := &statev1.Command{FormatVersion: 1, Time: timestamppb.New(at(100))}
	create := rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), kcv, at(100))
	tests := []struct {
		name string
		data []byte
	}{
		{"format 2", encode(t, modify(create, func(c *statev1.Command) { c.FormatVersion = 2 }))},
		{"format 2 without operation", encode(t, modify(noOp, func(c *statev1.Command) { c.FormatVersion = 2 }))},
		{"format max", encode(t, modify(create, func(c *statev1.Command) { c.FormatVersion = ^uint32(0) }))},
		{"unknown operation", withUnknownField(t, noOp)},
		{"unknown operation without time", withUnknownField(t, modify(noOp, func(c *statev1.Command) { c.Time = nil }))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := setupFSM(t)
			before, index := f.State(), f.AppliedIndex()
			got := catchPanic(func() { applyBytes(f, tt.data) })
			err, ok := got.(error)
			if !ok || !errors.Is(err, fsm.ErrUnsupportedCommand) {
				t.Fatalf("Apply(%s) panicked with %v, want an error wrapping %v", tt.name, got, fsm.ErrUnsupportedCommand)
			}
			for _, want := range []string{fmt.Sprintf("log entry %d ", index+1), "upgrade it before it applies this log"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("Apply(%s) panic = %q, want it to say %q", tt.name, err, want)
				}
			}
			if f.State() != before || f.AppliedIndex() != index {
				t.Errorf("after Apply(%s) panicked: State() = %p, AppliedIndex() = %d, want %p, %d", tt.name, f.State(), f.AppliedIndex(), before, index)
			}
		})
	}
}

// catchPanic returns what f panics with, or nil.
func catchPanic(f func()) (v any) {
	defer func() { v = recover() }()
	f()
	return nil
}

func TestApplyIgnoresOtherLogTypes(t *testing.T) {
	data := encode(t, rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), kcv, at(100)))
	for _, typ := range []raft.LogType{raft.LogNoop, raft.LogConfiguration, raft.LogBarrier, raft.LogAddPeerDeprecated} {
		t.Run(typ.String(), func(t *testing.T) {
			f := setupFSM(t)
			before, index := f.State(), f.AppliedIndex()
			if got := f.Apply(&raft.Log{Type: typ, Index: index + 1, Data: data}); got != nil {
				t.Errorf("Apply(%v entry) = %v, want nil", typ, got)
			}
			if f.State() != before || f.AppliedIndex() != index {
				t.Errorf("after Apply(%v entry): State() = %p, AppliedIndex() = %d, want %p, %d", typ, f.State(), f.AppliedIndex(), before, index)
			}
		})
	}
}

func TestIndexes(t *testing.T) {
	f := rootkmstest.NewFSM()
	steps := []struct {
		index         uint64
		cmd           *statev1.Command
		wantStateIdx  uint64
		wantAppliedIx uint64
	}{
		{5, rootkmstest.CreateRegion("eu", rootkmstest.Wrapped("eu", 1), kcv, at(0)), 5, 5},
		{9, rootkmstest.CreateRegion("eu", rootkmstest.Wrapped("eu", 1), kcv, at(1)), 5, 9}, // refused
		{12, rootkmstest.RegisterMember("n", "a:1", at(2)), 12, 12},
	}
	if got := f.State().Index(); got != 0 {
		t.Fatalf("New().State().Index() = %d, want 0", got)
	}
	for _, s := range steps {
		f.Apply(&raft.Log{Type: raft.LogCommand, Index: s.index, Data: encode(t, s.cmd)})
		if got := f.State().Index(); got != s.wantStateIdx {
			t.Errorf("State().Index() after entry %d = %d, want %d", s.index, got, s.wantStateIdx)
		}
		if got := f.AppliedIndex(); got != s.wantAppliedIx {
			t.Errorf("AppliedIndex() after entry %d = %d, want %d", s.index, got, s.wantAppliedIx)
		}
	}
	// Restore keeps AppliedIndex and gives the restored State that index.
	b := rootkmstest.SnapshotBytes(t, setupFSM(t))
	if err := restoreBytes(f, b); err != nil {
		t.Fatalf("Restore() = %v", err)
	}
	if got, want := [2]uint64{f.State().Index(), f.AppliedIndex()}, [2]uint64{12, 12}; got != want {
		t.Errorf("[State().Index(), AppliedIndex()] after Restore = %v, want %v", got, want)
	}
}

func TestCopyOnWrite(t *testing.T) {
	f := setupFSM(t)
	s0 := f.State()
	eu0, _ := s0.Region("eu")
	us0, _ := s0.Region("us")
	snap0, err := f.Snapshot()
	if err != nil {
		t.Fatalf("Snapshot() = %v", err)
	}
	defer snap0.Release()
	bytes0 := rootkmstest.SnapshotBytes(t, f)
	wantEU := &fsm.Region{Name: "eu", CreatedAt: at(0), Versions: euVersions()}

	mustApply(t, f,
		rootkmstest.AddVersion("eu", 6, rootkmstest.Wrapped("eu", 6), kcv, true, at(100)),
		rootkmstest.SetStatus("eu", 3, destroyed, at(101)),
		rootkmstest.SetStatus("eu", 5, disabled, at(102)),
		rootkmstest.SetStatus("eu", 1, primary, at(103)),
		rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), kcv, at(104)),
		rootkmstest.RegisterMember("node-1", "10.9.9.9:1", at(105)),
		rootkmstest.RegisterMember("node-2", "10.0.0.2:1", at(106)),
	)

	if diff := cmp.Diff(wantEU, eu0, protocmp.Transform()); diff != "" {
		t.Errorf("region eu of an earlier State changed (-want +got):\n%s", diff)
	}
	if got, _ := s0.Region("eu"); got != eu0 {
		t.Errorf("earlier State's Region(eu) = %p, want %p", got, eu0)
	}
	if _, ok := s0.Region("ap"); ok {
		t.Errorf("earlier State's Region(ap) = _, true, want false")
	}
	if diff := cmp.Diff([]fsm.Member{{"node-1", "10.0.0.1:8443"}}, s0.Members()); diff != "" {
		t.Errorf("earlier State's Members() changed (-want +got):\n%s", diff)
	}
	var sink rootkmstest.Sink
	if err := snap0.Persist(&sink); err != nil {
		t.Fatalf("Persist() = %v", err)
	}
	if !slices.Equal(sink.Bytes(), bytes0) {
		t.Errorf("Persist() of a snapshot taken before later Applies = %x, want %x", sink.Bytes(), bytes0)
	}
	if got, _ := f.State().Region("us"); got != us0 {
		t.Errorf("Region(us), unchanged by later Applies, = %p, want the shared %p", got, us0)
	}
}

func TestEncodeCommand(t *testing.T) {
	create := rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), kcv, at(100))
	b1, err := fsm.EncodeCommand(create)
	if err != nil {
		t.Fatalf("EncodeCommand(create) = %v", err)
	}
	b2, _ := fsm.EncodeCommand(proto.Clone(create).(*statev1.Command))
	if !slices.Equal(b1, b2) {
		t.Errorf("EncodeCommand(create) = %x then %x, want equal bytes", b1, b2)
	}
	var back statev1.Command
	if err := proto.Unmarshal(b1, &back); err != nil || !proto.Equal(&back, create) {
		t.Errorf("Unmarshal(EncodeCommand(create)) = %v, %v, want %v", &back, err, create)
	}

	refused := []struct {
		name string
		cmd  *statev1.Command
	}{
		{"format 0", modify(create, func(c *statev1.Command) { c.FormatVersion = 0 })},
		{"format 2", modify(create, func(c *statev1.Command) { c.FormatVersion = 2 })},
		{"no operation", modify(create, func(c *statev1.Command) { c.Op = nil })},
		{"no time", modify(create, func(c *statev1.Command) { c.Time = nil })},
		{"time at epoch", modify(create, func(c *statev1.Command) { c.Time = &timestamppb.Timestamp{} })},
		{"nil", nil},
	}
	for _, tt := range refused {
		if b, err := fsm.EncodeCommand(tt.cmd); !errors.Is(err, fsm.ErrInvalidCommand) {
			t.Errorf("EncodeCommand(%s) = %x, %v, want %v", tt.name, b, err, fsm.ErrInvalidCommand)
		}
	}
}

func TestValidRegionName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"eu", true},
		{"a", true},
		{"eu-west-1", true},
		{"a0-", true},
		{strings.Repeat("a", 63), true},
		{"", false},
		{strings.Repeat("a", 64), false},
		{"Eu", false},
		{"0eu", false},
		{"-eu", false},
		{"eu_west", false},
		{"eu.west", false},
		{"eu/west", false},
		{"eu\x00", false},
		{"eü", false},
	}
	for _, tt := range tests {
		err := fsm.ValidRegionName(tt.name)
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, fsm.ErrInvalidName)) {
			t.Errorf("ValidRegionName(%q) = %v, want ok=%v (else %v)", tt.name, err, tt.ok, fsm.ErrInvalidName)
		}
	}
}

func TestRegionAccessors(t *testing.T) {
	f := setupFSM(t)
	eu, _ := f.State().Region("eu")
	want := euVersions()
	if got, ok := eu.Primary(); !ok || !cmp.Equal(got, want[1], protocmp.Transform()) {
		t.Errorf("Primary() = %+v, %v, want %+v, true", got, ok, want[1])
	}
	for _, v := range []uint32{1, 3, 4, 5} {
		if got, ok := eu.Version(v); !ok || !cmp.Equal(got, want[v-1], protocmp.Transform()) {
			t.Errorf("Version(%d) = %+v, %v, want %+v, true", v, got, ok, want[v-1])
		}
	}
	for _, v := range []uint32{0, 6, ^uint32(0)} {
		if got, ok := eu.Version(v); ok {
			t.Errorf("Version(%d) = %+v, true, want false", v, got)
		}
	}
	if got, ok := (&fsm.Region{}).Primary(); ok {
		t.Errorf("Region{}.Primary() = %+v, true, want false", got)
	}
	ts := timestamppb.New
	info := func(v uint32, s cryptov1.KeyStatus, created, primarySince, superseded, retired *timestamppb.Timestamp) *cryptov1.KeyVersionInfo {
		return &cryptov1.KeyVersionInfo{KeyId: v, Status: s, TypeUrl: "type.googleapis.com/google.crypto.tink.AesGcmKey",
			CreatedAt: created, PrimarySince: primarySince, SupersededAt: superseded, RetiredAt: retired}
	}
	wantInfo := []*cryptov1.KeyVersionInfo{
		info(1, enabled, ts(at(0)), ts(at(0)), ts(at(10)), nil),
		info(2, primary, ts(at(10)), ts(at(10)), nil, nil),
		info(3, disabled, ts(at(20)), nil, nil, nil),
		info(4, destroyed, ts(at(40)), nil, nil, ts(at(42))),
		info(5, enabled, ts(at(50)), nil, nil, nil),
	}
	if diff := cmp.Diff(wantInfo, eu.Info(), protocmp.Transform()); diff != "" {
		t.Errorf("Info() differs (-want +got):\n%s", diff)
	}
}

func TestStateAccessors(t *testing.T) {
	empty := rootkmstest.NewFSM().State()
	if len(empty.Regions()) != 0 || len(empty.Members()) != 0 || empty.Index() != 0 {
		t.Errorf("New().State() = %v regions, %v members, index %d, want empty", empty.Regions(), empty.Members(), empty.Index())
	}
	f := setupFSM(t)
	mustApply(t, f, rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), kcv, at(100)),
		rootkmstest.RegisterMember("a", "10.0.0.0:1", at(100)))
	s := f.State()
	var names []string
	for _, r := range s.Regions() {
		names = append(names, r.Name)
	}
	if want := []string{"ap", "eu", "us"}; !slices.Equal(names, want) {
		t.Errorf("Regions() names = %v, want %v", names, want)
	}
	if diff := cmp.Diff([]fsm.Member{{"a", "10.0.0.0:1"}, {"node-1", "10.0.0.1:8443"}}, s.Members()); diff != "" {
		t.Errorf("Members() differs (-want +got):\n%s", diff)
	}
	rs, ms := s.Regions(), s.Members()
	rs[0], ms[0] = nil, fsm.Member{}
	if s.Regions()[0] == nil || s.Members()[0].ID != "a" {
		t.Errorf("changing the slices of Regions() and Members() changed the State")
	}
	if r, ok := s.Region("nowhere"); ok {
		t.Errorf("Region(nowhere) = %v, true, want false", r)
	}
	if m, ok := s.Member("nobody"); ok {
		t.Errorf("Member(nobody) = %v, true, want false", m)
	}
}

func TestNewPanicsWithoutLineage(t *testing.T) {
	for _, tt := range []struct {
		genesis string
		kcv     []byte
	}{{"", kcv}, {"g", nil}, {"g", []byte{}}} {
		if got := catchPanic(func() { fsm.New(tt.genesis, tt.kcv) }); got == nil {
			t.Errorf("New(%q, %x) did not panic, want a panic", tt.genesis, tt.kcv)
		}
	}
}

func TestNewCopiesKCV(t *testing.T) {
	k := rootkmstest.KCV()
	f := fsm.New(rootkmstest.GenesisID, k)
	k[0] ^= 0xff
	if res := apply(t, f, rootkmstest.CreateRegion("eu", rootkmstest.Wrapped("eu", 1), kcv, at(0))); res.Err != nil {
		t.Errorf("Apply(create under the original KCV) after the caller changed its slice = %v, want nil", res.Err)
	}
}

// TestTimeNeverGoesBackwards: a proposer whose clock is behind (a new leader
// with a slow clock) cannot record a supersession earlier than what the state
// already holds, which would shorten the ciphertext TTL window.
func TestTimeNeverGoesBackwards(t *testing.T) {
	f := rootkmstest.NewFSM()
	apply(t, f, rootkmstest.CreateRegion("eu", rootkmstest.Wrapped("eu", 1), kcv, at(100)))
	res := apply(t, f, rootkmstest.AddVersion("eu", 2, rootkmstest.Wrapped("eu", 2), kcv, true, at(5)))
	if res.Err != nil {
		t.Fatalf("rotate with a slow clock = %v", res.Err)
	}
	v1, _ := res.Region.Version(1)
	v2, _ := res.Region.Version(2)
	if v1.SupersededAt.Before(at(100)) || v2.PrimarySince.Before(v1.PrimarySince) || v2.CreatedAt.Before(at(100)) {
		t.Errorf("times after a backwards clock: v1 superseded %v, v2 primary since %v; want none before %v", v1.SupersededAt, v2.PrimarySince, at(100))
	}
	if got := f.State().Latest(); !got.Equal(at(100)) {
		t.Errorf("Latest() = %v, want %v", got, at(100))
	}
}
