package fsm_test

import (
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
)

// keysetFixture is an FSM holding euSetup and keyset "payments/ledger" in eu
// and us, created at 100, with the real Tink keyset behind its copies.
type keysetFixture struct {
	f     *fsm.FSM
	k     *tinkKeyset
	first uint32 // the primary key ID at creation
}

const ledger = "payments/ledger"

func newKeysetFixture(t testing.TB) *keysetFixture {
	t.Helper()
	f := setupFSM(t)
	k, id := newTinkKeyset(t, ledger)
	mustApply(t, f, createKeyset(createKeysetRecord(ledger, euUS, id, k.copies(euUS, usable)), at(100)))
	return &keysetFixture{f: f, k: k, first: id}
}

// rev is the keyset's current revision.
func (x *keysetFixture) rev(t testing.TB) uint64 {
	t.Helper()
	k, ok := x.f.State().Keyset(ledger)
	if !ok {
		t.Fatalf("Keyset(%q) = _, false", ledger)
	}
	return k.GetRevision()
}

// step proposes step on id with copies matching the Tink keyset after it
// (and a golden ciphertext for an added version), and returns the result.
func (x *keysetFixture) step(t testing.TB, step statev1.KeysetStep, id uint32, at time.Time) *fsm.Result {
	t.Helper()
	x.k.step(step, id)
	cmd := updateKeyset(ledger, x.rev(t), step, id, x.k.copies(euUS, usable), at)
	switch step {
	case stepScheduleDestroy:
		cmd.GetUpdateKeyset().DestroyAfter = ts(at.Add(time.Hour))
	case stepAdd:
		cmd.GetUpdateKeyset().Golden = fakeGolden(id)
	}
	return apply(t, x.f, cmd)
}

func TestCreateKeyset(t *testing.T) {
	f := setupFSM(t)
	k, id := newTinkKeyset(t, ledger)
	copies := k.copies(euUS, usable)
	rec := createKeysetRecord(ledger, euUS, id, copies)
	// Proposer times and lifecycle fields are not taken.
	rec.CreatedAt, rec.UpdatedAt = ts(at(1)), ts(at(2))
	rec.TtlHistory[0].From = ts(at(3))
	rec.Versions[0].CreatedAt, rec.Versions[0].PrimarySince = ts(at(4)), ts(at(5))
	rec.Versions[0].Propagated = []*statev1.RegionTime{{Region: "eu", At: ts(at(6))}}
	rec.Versions[0].EncryptCount = 7
	before := f.State()
	res := apply(t, f, withRequest(createKeyset(rec, at(100)), "spiffe://cairn.test/ops", "req-1"))
	if res.Err != nil {
		t.Fatalf("Apply(create_keyset).Err = %v, want nil", res.Err)
	}
	now := ts(at(100))
	want := &statev1.KeysetRecord{
		Name:           ledger,
		Regions:        euUS,
		CreatedAt:      now,
		CreatedBy:      "spiffe://cairn.test/regionctl/ops",
		RotationPeriod: dur(90 * 24 * time.Hour),
		TtlHistory:     []*statev1.TtlPeriod{{Ttl: dur(24 * time.Hour), From: now}},
		Versions:       []*statev1.KeysetVersionRecord{{KeyId: id, State: ksPrimary, Template: "AES256_GCM", CreatedAt: now, PrimarySince: now}},
		Copies:         copies,
		Revision:       1,
		UpdatedAt:      now,
		Purpose:        1,
	}
	got, ok := f.State().Keyset(ledger)
	if !ok {
		t.Fatalf("Keyset(%q) = _, false, want true", ledger)
	}
	if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
		t.Errorf("Keyset(%q) after create differs (-want +got):\n%s", ledger, diff)
	}
	if res.Keyset != got || res.Region != nil || res.Duplicate {
		t.Errorf("Apply(create_keyset) = %+v, want Keyset the published %p only", res, got)
	}
	if _, ok := before.Keyset(ledger); ok {
		t.Errorf("the State before create_keyset has the keyset")
	}
	if got := f.State().Latest(); !got.Equal(at(100)) {
		t.Errorf("Latest() = %v, want %v", got, at(100))
	}
	if r, ok := f.State().Request("spiffe://cairn.test/ops", "req-1"); !ok || r != (fsm.RequestRecord{
		Identity: "spiffe://cairn.test/ops", RequestID: "req-1", Index: f.AppliedIndex(), Subject: "keyset/" + ledger, KeyID: id, Operation: "create_keyset"}) {
		t.Errorf("Request(req-1) = %+v, %v", r, ok)
	}
	// created_by defaults to the command's identity.
	k2, id2 := newTinkKeyset(t, "a/b")
	rec2 := createKeysetRecord("a/b", []string{"us"}, id2, k2.copies([]string{"us"}, usable))
	rec2.CreatedBy = ""
	res = apply(t, f, withRequest(createKeyset(rec2, at(101)), "spiffe://cairn.test/x", ""))
	if res.Err != nil || res.Keyset.GetCreatedBy() != "spiffe://cairn.test/x" {
		t.Errorf("Apply(create_keyset without created_by) = %v, created_by %q, want the identity", res.Err, res.Keyset.GetCreatedBy())
	}
	var names []string
	for _, k := range f.State().Keysets() {
		names = append(names, k.GetName())
	}
	if want := []string{"a/b", ledger}; !slices.Equal(names, want) {
		t.Errorf("Keysets() names = %v, want %v", names, want)
	}
}

func TestCreateKeysetRefuses(t *testing.T) {
	k, id := newTinkKeyset(t, ledger)
	good := func() *statev1.KeysetRecord { return createKeysetRecord(ledger, euUS, id, k.copies(euUS, usable)) }
	two, _ := newTinkKeyset(t, ledger)
	two.add()
	tests := []struct {
		name   string
		mutate func(*statev1.KeysetRecord)
		want   error
	}{
		{"invalid name", func(r *statev1.KeysetRecord) { r.Name = "Payments" }, fsm.ErrInvalidCommand},
		{"empty name", func(r *statev1.KeysetRecord) { r.Name = "" }, fsm.ErrInvalidCommand},
		{"no regions", func(r *statev1.KeysetRecord) { r.Regions, r.Copies = nil, nil }, fsm.ErrInvalidCommand},
		{"regions not sorted", func(r *statev1.KeysetRecord) { r.Regions = []string{"us", "eu"} }, fsm.ErrInvalidCommand},
		{"region twice", func(r *statev1.KeysetRecord) { r.Regions = []string{"eu", "eu"} }, fsm.ErrInvalidCommand},
		{"unknown region", func(r *statev1.KeysetRecord) { r.Regions = []string{"eu", "zz"} }, fsm.ErrNoRegion},
		{"revision 0", func(r *statev1.KeysetRecord) { r.Revision = 0 }, fsm.ErrInvalidCommand},
		{"revision 2", func(r *statev1.KeysetRecord) { r.Revision = 2 }, fsm.ErrInvalidCommand},
		{"no versions", func(r *statev1.KeysetRecord) { r.Versions = nil }, fsm.ErrInvalidCommand},
		{"two versions", func(r *statev1.KeysetRecord) {
			r.Versions = append(r.Versions, &statev1.KeysetVersionRecord{KeyId: id + 1, State: ksEnabled})
		}, fsm.ErrInvalidCommand},
		{"version ENABLED", func(r *statev1.KeysetRecord) { r.Versions[0].State = ksEnabled }, fsm.ErrInvalidCommand},
		{"key ID 0", func(r *statev1.KeysetRecord) { r.Versions[0].KeyId = 0 }, fsm.ErrInvalidCommand},
		{"no ttl", func(r *statev1.KeysetRecord) { r.TtlHistory = nil }, fsm.ErrInvalidCommand},
		{"ttl 0", func(r *statev1.KeysetRecord) { r.TtlHistory[0].Ttl = dur(0) }, fsm.ErrInvalidCommand},
		{"ttl negative", func(r *statev1.KeysetRecord) { r.TtlHistory[0].Ttl = dur(-time.Hour) }, fsm.ErrInvalidCommand},
		{"ttl unset", func(r *statev1.KeysetRecord) { r.TtlHistory[0].Ttl = nil }, fsm.ErrInvalidCommand},
		{"ttl with until", func(r *statev1.KeysetRecord) { r.TtlHistory[0].Until = ts(at(200)) }, fsm.ErrInvalidCommand},
		{"two ttl periods", func(r *statev1.KeysetRecord) { r.TtlHistory = append(r.TtlHistory, r.TtlHistory[0]) }, fsm.ErrInvalidCommand},
		{"negative rotation", func(r *statev1.KeysetRecord) { r.RotationPeriod = dur(-time.Hour) }, fsm.ErrInvalidCommand},
		{"copy missing", func(r *statev1.KeysetRecord) { r.Copies = r.Copies[:1] }, fsm.ErrInvalidCommand},
		{"copies not sorted", func(r *statev1.KeysetRecord) { r.Copies[0], r.Copies[1] = r.Copies[1], r.Copies[0] }, fsm.ErrInvalidCommand},
		{"copy misnamed", func(r *statev1.KeysetRecord) { r.Copies = k.copies(euUS, usable); r.Copies[1].Name = "other" }, fsm.ErrInvalidCommand},
		{"copy without ciphertext", func(r *statev1.KeysetRecord) { r.Copies[0].Ciphertext = nil }, fsm.ErrInvalidCommand},
		{"copy under DISABLED region key", func(r *statev1.KeysetRecord) {
			r.Copies = k.copies(euUS, map[string]uint32{"eu": 3, "us": 1})
		}, fsm.ErrInvalidCommand},
		{"copy under DESTROYED region key", func(r *statev1.KeysetRecord) {
			r.Copies = k.copies(euUS, map[string]uint32{"eu": 4, "us": 1})
		}, fsm.ErrInvalidCommand},
		{"copy under missing region key", func(r *statev1.KeysetRecord) {
			r.Copies = k.copies(euUS, map[string]uint32{"eu": 9, "us": 1})
		}, fsm.ErrInvalidCommand},
		{"copy under ENABLED region key", func(r *statev1.KeysetRecord) {
			r.Copies = k.copies(euUS, map[string]uint32{"eu": 5, "us": 1})
		}, nil},
		{"copy of another primary", func(r *statev1.KeysetRecord) { r.Versions[0].KeyId = id + 1 }, fsm.ErrInvalidCommand},
		{"copy with an extra key", func(r *statev1.KeysetRecord) { r.Copies = two.copies(euUS, usable) }, fsm.ErrInvalidCommand},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := setupFSM(t)
			before := f.State()
			rec := good()
			tt.mutate(rec)
			res := apply(t, f, createKeyset(rec, at(100)))
			if tt.want == nil {
				if res.Err != nil {
					t.Errorf("Apply(create_keyset %s).Err = %v, want nil", tt.name, res.Err)
				}
				return
			}
			if !errors.Is(res.Err, tt.want) || res.Keyset != nil {
				t.Errorf("Apply(create_keyset %s) = %+v, want Err %v", tt.name, res, tt.want)
			}
			if f.State() != before {
				t.Errorf("State() after refused create_keyset %s changed", tt.name)
			}
		})
	}
	t.Run("exists", func(t *testing.T) {
		x := newKeysetFixture(t)
		before := x.f.State()
		if res := apply(t, x.f, createKeyset(good(), at(200))); !errors.Is(res.Err, fsm.ErrKeysetExists) || x.f.State() != before {
			t.Errorf("Apply(create_keyset of an existing name).Err = %v, want %v and no change", res.Err, fsm.ErrKeysetExists)
		}
	})
}

// TestKeysetLifecycle walks one keyset through every step that is allowed,
// with real copies, and checks the whole record after each.
func TestKeysetLifecycle(t *testing.T) {
	x := newKeysetFixture(t)
	k1 := x.first
	var k2 uint32
	versions := func(vs ...*statev1.KeysetVersionRecord) []*statev1.KeysetVersionRecord { return vs }
	v := func(id uint32, st statev1.KeysetVersionState, created int, opts func(*statev1.KeysetVersionRecord)) *statev1.KeysetVersionRecord {
		r := &statev1.KeysetVersionRecord{KeyId: id, State: st, Template: "AES256_GCM", CreatedAt: ts(at(created))}
		if id != k1 && st != ksDestroyed {
			// Added with a golden ciphertext, kept until DESTROYED; k1 was
			// created without one, as before golden ciphertexts.
			r.Golden = fakeGolden(id)
		}
		if opts != nil {
			opts(r)
		}
		return r
	}
	steps := []struct {
		step statev1.KeysetStep
		id   func() uint32
		at   int
		want func() []*statev1.KeysetVersionRecord
	}{
		{stepAdd, func() uint32 { k2 = x.k.add(); return k2 }, 110, func() []*statev1.KeysetVersionRecord {
			return versions(
				v(k1, ksPrimary, 100, func(r *statev1.KeysetVersionRecord) { r.PrimarySince = ts(at(100)) }),
				v(k2, ksEnabled, 110, nil))
		}},
		{stepPromote, func() uint32 { return k2 }, 120, func() []*statev1.KeysetVersionRecord {
			return versions(
				v(k1, ksEnabled, 100, func(r *statev1.KeysetVersionRecord) { r.PrimarySince, r.SupersededAt = ts(at(100)), ts(at(120)) }),
				v(k2, ksPrimary, 110, func(r *statev1.KeysetVersionRecord) { r.PrimarySince = ts(at(120)) }))
		}},
		{stepDisable, func() uint32 { return k1 }, 130, func() []*statev1.KeysetVersionRecord {
			return versions(
				v(k1, ksDisabled, 100, func(r *statev1.KeysetVersionRecord) {
					r.PrimarySince, r.SupersededAt, r.DisabledAt = ts(at(100)), ts(at(120)), ts(at(130))
				}),
				v(k2, ksPrimary, 110, func(r *statev1.KeysetVersionRecord) { r.PrimarySince = ts(at(120)) }))
		}},
		{stepEnable, func() uint32 { return k1 }, 140, func() []*statev1.KeysetVersionRecord {
			return versions(
				v(k1, ksEnabled, 100, func(r *statev1.KeysetVersionRecord) { r.PrimarySince, r.SupersededAt = ts(at(100)), ts(at(120)) }),
				v(k2, ksPrimary, 110, func(r *statev1.KeysetVersionRecord) { r.PrimarySince = ts(at(120)) }))
		}},
		{stepPromote, func() uint32 { return k1 }, 145, func() []*statev1.KeysetVersionRecord {
			return versions(
				v(k1, ksPrimary, 100, func(r *statev1.KeysetVersionRecord) { r.PrimarySince = ts(at(145)) }),
				v(k2, ksEnabled, 110, func(r *statev1.KeysetVersionRecord) { r.PrimarySince, r.SupersededAt = ts(at(120)), ts(at(145)) }))
		}},
		{stepDisable, func() uint32 { return k2 }, 150, nil},
		{stepScheduleDestroy, func() uint32 { return k2 }, 160, func() []*statev1.KeysetVersionRecord {
			return versions(
				v(k1, ksPrimary, 100, func(r *statev1.KeysetVersionRecord) { r.PrimarySince = ts(at(145)) }),
				v(k2, ksDestroyScheduled, 110, func(r *statev1.KeysetVersionRecord) {
					r.PrimarySince, r.SupersededAt, r.DisabledAt, r.DestroyAfter = ts(at(120)), ts(at(145)), ts(at(150)), ts(at(160).Add(time.Hour))
				}))
		}},
		{stepUndestroy, func() uint32 { return k2 }, 170, func() []*statev1.KeysetVersionRecord {
			return versions(
				v(k1, ksPrimary, 100, func(r *statev1.KeysetVersionRecord) { r.PrimarySince = ts(at(145)) }),
				v(k2, ksDisabled, 110, func(r *statev1.KeysetVersionRecord) {
					r.PrimarySince, r.SupersededAt, r.DisabledAt = ts(at(120)), ts(at(145)), ts(at(150))
				}))
		}},
		{stepScheduleDestroy, func() uint32 { return k2 }, 180, nil},
		{stepDestroy, func() uint32 { return k2 }, 180 + 3600, func() []*statev1.KeysetVersionRecord {
			return versions(
				v(k1, ksPrimary, 100, func(r *statev1.KeysetVersionRecord) { r.PrimarySince = ts(at(145)) }),
				v(k2, ksDestroyed, 110, func(r *statev1.KeysetVersionRecord) {
					r.PrimarySince, r.SupersededAt, r.DisabledAt = ts(at(120)), ts(at(145)), ts(at(150))
					r.DestroyAfter, r.DestroyedAt = ts(at(180+3600)), ts(at(180+3600))
				}))
		}},
		{stepRewrap, func() uint32 { return 0 }, 4000, nil},
	}
	for i, s := range steps {
		before := x.f.State()
		old, _ := before.Keyset(ledger)
		id := s.id()
		res := x.step(t, s.step, id, at(s.at))
		if res.Err != nil {
			t.Fatalf("step %d: Apply(%v %d).Err = %v, want nil", i, s.step, id, res.Err)
		}
		got, _ := x.f.State().Keyset(ledger)
		if res.Keyset != got {
			t.Errorf("step %d: Apply(%v).Keyset = %p, want the published %p", i, s.step, res.Keyset, got)
		}
		if got.GetRevision() != old.GetRevision()+1 || !got.GetUpdatedAt().AsTime().Equal(at(s.at)) {
			t.Errorf("step %d: %v: revision %d, updated_at %v, want %d, %v", i, s.step, got.GetRevision(), got.GetUpdatedAt().AsTime(), old.GetRevision()+1, at(s.at))
		}
		if s.want != nil {
			if diff := cmp.Diff(s.want(), got.GetVersions(), protocmp.Transform()); diff != "" {
				t.Errorf("step %d: versions after %v differ (-want +got):\n%s", i, s.step, diff)
			}
		}
		// The earlier record is untouched.
		if again, _ := before.Keyset(ledger); again != old || again.GetRevision() != old.GetRevision() {
			t.Errorf("step %d: the earlier State's record changed", i)
		}
	}
	if got := x.f.State().Latest(); !got.Equal(at(4000)) {
		t.Errorf("Latest() = %v, want %v", got, at(4000))
	}
	// Rewrap under the ENABLED region key version 5 of eu.
	res := apply(t, x.f, updateKeyset(ledger, x.rev(t), stepRewrap, 0, x.k.copies(euUS, map[string]uint32{"eu": 5, "us": 1}), at(4001)))
	if res.Err != nil || res.Keyset.GetCopies()[0].GetRegionKeyVersion() != 5 {
		t.Errorf("Apply(rewrap to eu 5) = %v, copy under %d, want nil, 5", res.Err, res.Keyset.GetCopies()[0].GetRegionKeyVersion())
	}
}

// lifecycleFixture returns a keyset fixture whose keyset holds a version in
// every state: the IDs by state.
func lifecycleFixture(t testing.TB) (*keysetFixture, map[statev1.KeysetVersionState]uint32) {
	x := newKeysetFixture(t)
	ids := map[statev1.KeysetVersionState]uint32{ksPrimary: x.first}
	var added []uint32
	for i := range 4 {
		id := x.k.add()
		added = append(added, id)
		if res := x.step(t, stepAdd, id, at(110+i)); res.Err != nil {
			t.Fatalf("add: %v", res.Err)
		}
	}
	ids[ksEnabled], ids[ksDisabled], ids[ksDestroyScheduled], ids[ksDestroyed] = added[0], added[1], added[2], added[3]
	for i, s := range []struct {
		step statev1.KeysetStep
		id   uint32
	}{
		{stepDisable, added[1]},
		{stepDisable, added[2]},
		{stepDisable, added[3]}, {stepScheduleDestroy, added[3]},
	} {
		if res := x.step(t, s.step, s.id, at(120+i)); res.Err != nil {
			t.Fatalf("%v %d: %v", s.step, s.id, res.Err)
		}
	}
	if res := x.step(t, stepDestroy, added[3], at(124+3600)); res.Err != nil {
		t.Fatalf("destroy: %v", res.Err)
	}
	// Scheduled last, so that its destroy_after (an hour on) is after every
	// time in the state.
	if res := x.step(t, stepScheduleDestroy, added[2], at(125+3600)); res.Err != nil {
		t.Fatalf("schedule destroy: %v", res.Err)
	}
	return x, ids
}

func TestUpdateKeysetRefuses(t *testing.T) {
	allowed := map[statev1.KeysetStep]statev1.KeysetVersionState{
		stepPromote: ksEnabled, stepDisable: ksEnabled, stepEnable: ksDisabled,
		stepScheduleDestroy: ksDisabled, stepUndestroy: ksDestroyScheduled, stepDestroy: ksDestroyScheduled,
	}
	now := at(10000)
	type test struct {
		name string
		cmd  func(x *keysetFixture, ids map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command
		want error
	}
	var tests []test
	for _, step := range []statev1.KeysetStep{stepPromote, stepDisable, stepEnable, stepScheduleDestroy, stepUndestroy, stepDestroy} {
		for _, from := range []statev1.KeysetVersionState{ksEnabled, ksPrimary, ksDisabled, ksDestroyScheduled, ksDestroyed} {
			if allowed[step] == from {
				continue
			}
			tests = append(tests, test{fmt.Sprintf("%v from %v", step, from), func(x *keysetFixture, ids map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
				c := updateKeyset(ledger, rev, step, ids[from], x.k.copies(euUS, usable), now)
				c.GetUpdateKeyset().DestroyAfter = ts(now)
				return c
			}, fsm.ErrBadTransition})
		}
	}
	cur := func(x *keysetFixture) []*cryptov1.EncryptedKeyset { return x.k.copies(euUS, usable) }
	tests = append(tests,
		test{"stale revision", func(x *keysetFixture, _ map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset(ledger, rev-1, stepRewrap, 0, cur(x), now)
		}, fsm.ErrStaleRevision},
		test{"future revision", func(x *keysetFixture, _ map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset(ledger, rev+1, stepRewrap, 0, cur(x), now)
		}, fsm.ErrStaleRevision},
		test{"no keyset", func(x *keysetFixture, _ map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset("nope", rev, stepRewrap, 0, cur(x), now)
		}, fsm.ErrNoKeyset},
		test{"no version", func(x *keysetFixture, _ map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset(ledger, rev, stepDisable, 12345, cur(x), now)
		}, fsm.ErrNoKeysetVersion},
		test{"add existing key ID", func(x *keysetFixture, ids map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset(ledger, rev, stepAdd, ids[ksDestroyed], cur(x), now)
		}, fsm.ErrInvalidCommand},
		test{"add key ID 0", func(x *keysetFixture, _ map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset(ledger, rev, stepAdd, 0, cur(x), now)
		}, fsm.ErrInvalidCommand},
		test{"add without the key in the copies", func(x *keysetFixture, _ map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset(ledger, rev, stepAdd, 777, cur(x), now)
		}, fsm.ErrInvalidCommand},
		test{"unspecified step", func(x *keysetFixture, _ map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset(ledger, rev, statev1.KeysetStep_KEYSET_STEP_UNSPECIFIED, 0, cur(x), now)
		}, fsm.ErrInvalidCommand},
		test{"unknown step", func(x *keysetFixture, _ map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset(ledger, rev, 99, 0, cur(x), now)
		}, fsm.ErrInvalidCommand},
		test{"schedule destroy in the past", func(x *keysetFixture, ids map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			c := updateKeyset(ledger, rev, stepScheduleDestroy, ids[ksDisabled], cur(x), now)
			c.GetUpdateKeyset().DestroyAfter = ts(now.Add(-time.Second))
			return c
		}, fsm.ErrInvalidCommand},
		test{"schedule destroy without destroy_after", func(x *keysetFixture, ids map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset(ledger, rev, stepScheduleDestroy, ids[ksDisabled], cur(x), now)
		}, fsm.ErrInvalidCommand},
		test{"destroy before destroy_after", func(x *keysetFixture, ids map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			x.k.step(stepDestroy, ids[ksDestroyScheduled])
			return updateKeyset(ledger, rev, stepDestroy, ids[ksDestroyScheduled], cur(x), at(200))
		}, fsm.ErrBadTransition},
		test{"copies not matching the new states", func(x *keysetFixture, ids map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset(ledger, rev, stepDisable, ids[ksEnabled], cur(x), now) // the Tink key is still ENABLED
		}, fsm.ErrInvalidCommand},
		test{"copies holding a DESTROYED version", func(x *keysetFixture, ids map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			c := updateKeyset(ledger, rev, stepRewrap, 0, cur(x), now)
			for _, cp := range c.GetUpdateKeyset().GetCopies() {
				cp.Versions = append(cp.Versions, &cryptov1.KeyVersionInfo{KeyId: ids[ksDestroyed], Status: cryptov1.KeyStatus_KEY_STATUS_DESTROYED})
			}
			return c
		}, fsm.ErrInvalidCommand},
		test{"copies with the old primary", func(x *keysetFixture, ids map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset(ledger, rev, stepPromote, ids[ksEnabled], cur(x), now) // the Tink primary did not move
		}, fsm.ErrInvalidCommand},
		test{"copy missing", func(x *keysetFixture, _ map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset(ledger, rev, stepRewrap, 0, cur(x)[:1], now)
		}, fsm.ErrInvalidCommand},
		test{"copy for another region", func(x *keysetFixture, _ map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset(ledger, rev, stepRewrap, 0, x.k.copies([]string{"eu", "eu"}, usable), now)
		}, fsm.ErrInvalidCommand},
		test{"copy under a DISABLED region key", func(x *keysetFixture, _ map[statev1.KeysetVersionState]uint32, rev uint64) *statev1.Command {
			return updateKeyset(ledger, rev, stepRewrap, 0, x.k.copies(euUS, map[string]uint32{"eu": 3, "us": 1}), now)
		}, fsm.ErrInvalidCommand},
	)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			x, ids := lifecycleFixture(t)
			before := x.f.State()
			res := apply(t, x.f, tt.cmd(x, ids, x.rev(t)))
			if !errors.Is(res.Err, tt.want) || res.Keyset != nil {
				t.Errorf("Apply(update_keyset %s) = %+v, want Err %v", tt.name, res, tt.want)
			}
			if x.f.State() != before {
				t.Errorf("State() after refused update_keyset %s changed", tt.name)
			}
		})
	}
}

func TestSetKeysetPolicy(t *testing.T) {
	day := 24 * time.Hour
	tests := []struct {
		name          string
		rotation, ttl time.Duration // -1: unset
		wantRotation  time.Duration
		wantTTL       []*statev1.TtlPeriod
	}{
		{"nothing", -1, -1, 90 * day, []*statev1.TtlPeriod{{Ttl: dur(day), From: ts(at(100))}}},
		{"rotation", 30 * day, -1, 30 * day, []*statev1.TtlPeriod{{Ttl: dur(day), From: ts(at(100))}}},
		{"rotation off", 0, -1, 0, []*statev1.TtlPeriod{{Ttl: dur(day), From: ts(at(100))}}},
		{"same ttl", -1, day, 90 * day, []*statev1.TtlPeriod{{Ttl: dur(day), From: ts(at(100))}}},
		{"new ttl", -1, 7 * day, 90 * day, []*statev1.TtlPeriod{
			{Ttl: dur(day), From: ts(at(100)), Until: ts(at(200))},
			{Ttl: dur(7 * day), From: ts(at(200))},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			x := newKeysetFixture(t)
			rot, ttl := dur(tt.rotation), dur(tt.ttl)
			if tt.rotation < 0 {
				rot = nil
			}
			if tt.ttl < 0 {
				ttl = nil
			}
			res := apply(t, x.f, setPolicy(ledger, 1, rot, ttl, at(200)))
			if res.Err != nil {
				t.Fatalf("Apply(set_keyset_policy %s).Err = %v", tt.name, res.Err)
			}
			got := res.Keyset
			if got.GetRotationPeriod().AsDuration() != tt.wantRotation {
				t.Errorf("rotation_period after %s = %v, want %v", tt.name, got.GetRotationPeriod().AsDuration(), tt.wantRotation)
			}
			if diff := cmp.Diff(tt.wantTTL, got.GetTtlHistory(), protocmp.Transform()); diff != "" {
				t.Errorf("ttl_history after %s differs (-want +got):\n%s", tt.name, diff)
			}
			if got.GetRevision() != 2 || !got.GetUpdatedAt().AsTime().Equal(at(200)) {
				t.Errorf("revision, updated_at after %s = %d, %v, want 2, %v", tt.name, got.GetRevision(), got.GetUpdatedAt().AsTime(), at(200))
			}
		})
	}
	t.Run("history grows", func(t *testing.T) {
		x := newKeysetFixture(t)
		mustApply(t, x.f, setPolicy(ledger, 1, nil, dur(2*day), at(200)), setPolicy(ledger, 2, nil, dur(day/2), at(300)))
		got, _ := x.f.State().Keyset(ledger)
		want := []*statev1.TtlPeriod{
			{Ttl: dur(day), From: ts(at(100)), Until: ts(at(200))},
			{Ttl: dur(2 * day), From: ts(at(200)), Until: ts(at(300))},
			{Ttl: dur(day / 2), From: ts(at(300))},
		}
		if diff := cmp.Diff(want, got.GetTtlHistory(), protocmp.Transform()); diff != "" {
			t.Errorf("ttl_history after two changes differs (-want +got):\n%s", diff)
		}
	})
	refusals := []struct {
		name string
		cmd  *statev1.Command
		want error
	}{
		{"stale", setPolicy(ledger, 2, nil, dur(day), at(200)), fsm.ErrStaleRevision},
		{"no keyset", setPolicy("nope", 1, nil, dur(day), at(200)), fsm.ErrNoKeyset},
		{"negative rotation", setPolicy(ledger, 1, dur(-day), nil, at(200)), fsm.ErrInvalidCommand},
		{"zero ttl", setPolicy(ledger, 1, nil, dur(0), at(200)), fsm.ErrInvalidCommand},
		{"negative ttl", setPolicy(ledger, 1, nil, dur(-day), at(200)), fsm.ErrInvalidCommand},
	}
	for _, tt := range refusals {
		t.Run(tt.name, func(t *testing.T) {
			x := newKeysetFixture(t)
			before := x.f.State()
			if res := apply(t, x.f, tt.cmd); !errors.Is(res.Err, tt.want) || x.f.State() != before {
				t.Errorf("Apply(set_keyset_policy %s).Err = %v, want %v and no change", tt.name, res.Err, tt.want)
			}
		})
	}
}

func TestRecordPropagation(t *testing.T) {
	x := newKeysetFixture(t)
	k1 := x.first
	k2 := x.k.add()
	if res := x.step(t, stepAdd, k2, at(110)); res.Err != nil {
		t.Fatal(res.Err)
	}
	// "us/only" is served in us only; "bystander" is not observed at all.
	only, oid := newTinkKeyset(t, "us/only")
	by, bid := newTinkKeyset(t, "bystander")
	mustApply(t, x.f,
		createKeyset(createKeysetRecord("us/only", []string{"us"}, oid, only.copies([]string{"us"}, usable)), at(111)),
		createKeyset(createKeysetRecord("bystander", euUS, bid, by.copies(euUS, usable)), at(112)))
	s0 := x.f.State()
	only0, _ := s0.Keyset("us/only")
	by0, _ := s0.Keyset("bystander")
	ledger0, _ := s0.Keyset(ledger)

	obs := func(id uint32, all bool, enc, dec uint64, lastUse int) *statev1.VersionObservation {
		return &statev1.VersionObservation{KeyId: id, ServedByAll: all, EncryptCount: enc, DecryptCount: dec, LastUse: ts(at(lastUse)), LastEncrypt: ts(at(lastUse))}
	}
	res := apply(t, x.f, recordPropagation("eu", []uint32{5, 2, 2}, []*statev1.KeysetObservation{
		{Keyset: ledger, Versions: []*statev1.VersionObservation{obs(k1, true, 10, 20, 190), obs(k2, false, 0, 1, 195), obs(424242, true, 1, 1, 1)}},
		{Keyset: "us/only", Versions: []*statev1.VersionObservation{obs(oid, true, 5, 5, 190)}},
		{Keyset: "made/later", Versions: []*statev1.VersionObservation{obs(1, true, 5, 5, 190)}},
	}, at(200)))
	if res.Err != nil {
		t.Fatalf("Apply(record_propagation eu).Err = %v", res.Err)
	}
	eu, _ := x.f.State().Region("eu")
	if res.Region != eu || !slices.Equal(eu.ServedKeyVersions, []uint32{2, 5}) || !eu.ServedObservedAt.Equal(at(200)) {
		t.Errorf("region eu after record_propagation: Result.Region %p (published %p), served %v at %v, want [2 5] at %v",
			res.Region, eu, eu.ServedKeyVersions, eu.ServedObservedAt, at(200))
	}
	s1 := x.f.State()
	if got, _ := s1.Keyset("us/only"); got != only0 {
		t.Errorf("keyset us/only, not served in eu, was replaced")
	}
	if got, _ := s1.Keyset("bystander"); got != by0 {
		t.Errorf("keyset bystander, not observed, was replaced")
	}
	if got, _ := s0.Keyset(ledger); got != ledger0 || len(ledger0.GetVersions()[0].GetUsage()) != 0 {
		t.Errorf("the earlier State's record of %s changed", ledger)
	}
	// A second eu observation keeps the first propagation time and replaces
	// the usage; us adds its own.
	mustApply(t, x.f,
		recordPropagation("eu", []uint32{2}, []*statev1.KeysetObservation{
			{Keyset: ledger, Versions: []*statev1.VersionObservation{obs(k1, true, 15, 30, 290), obs(k2, true, 2, 2, 295)}},
		}, at(300)),
		recordPropagation("us", []uint32{1}, []*statev1.KeysetObservation{
			{Keyset: ledger, Versions: []*statev1.VersionObservation{obs(k1, false, 7, 7, 350)}},
		}, at(400)),
	)
	got, _ := x.f.State().Keyset(ledger)
	usage := func(region string, observed, lastUse int, enc, dec uint64) *statev1.RegionUsage {
		return &statev1.RegionUsage{Region: region, ObservedAt: ts(at(observed)), LastUse: ts(at(lastUse)), LastEncrypt: ts(at(lastUse)), EncryptCount: enc, DecryptCount: dec}
	}
	want := []*statev1.KeysetVersionRecord{
		{KeyId: k1, State: ksPrimary, Template: "AES256_GCM", CreatedAt: ts(at(100)), PrimarySince: ts(at(100)),
			Propagated:   []*statev1.RegionTime{{Region: "eu", At: ts(at(200))}},
			Usage:        []*statev1.RegionUsage{usage("eu", 300, 290, 15, 30), usage("us", 400, 350, 7, 7)},
			EncryptCount: 22},
		{KeyId: k2, State: ksEnabled, Template: "AES256_GCM", CreatedAt: ts(at(110)),
			Propagated:   []*statev1.RegionTime{{Region: "eu", At: ts(at(300))}},
			Usage:        []*statev1.RegionUsage{usage("eu", 300, 295, 2, 2)},
			EncryptCount: 2, Golden: fakeGolden(k2)},
	}
	if diff := cmp.Diff(want, got.GetVersions(), protocmp.Transform()); diff != "" {
		t.Errorf("versions after three observations differ (-want +got):\n%s", diff)
	}
	if got.GetRevision() != ledger0.GetRevision() || !proto.Equal(got.GetUpdatedAt(), ledger0.GetUpdatedAt()) {
		t.Errorf("record_propagation changed revision/updated_at to %d/%v, want %d/%v (observations are not changes)",
			got.GetRevision(), got.GetUpdatedAt().AsTime(), ledger0.GetRevision(), ledger0.GetUpdatedAt().AsTime())
	}
	if l := x.f.State().Latest(); !l.Equal(at(400)) {
		t.Errorf("Latest() = %v, want %v", l, at(400))
	}

	// eu's servers stop serving k2 (a rollback) while they serve k1: its eu
	// propagation is dropped, and a promotion waits for eu again. A fresh
	// server reports less use than its predecessor: the last use and last
	// encrypt never move back.
	mustApply(t, x.f, recordPropagation("eu", []uint32{2}, []*statev1.KeysetObservation{
		{Keyset: ledger, Versions: []*statev1.VersionObservation{obs(k1, true, 1, 1, 250)}},
	}, at(410)))
	got, _ = x.f.State().Keyset(ledger)
	if p := got.GetVersions()[1].GetPropagated(); len(p) != 0 {
		t.Errorf("k2 propagated after eu stopped serving it = %v, want none", p)
	}
	if p := got.GetVersions()[0].GetPropagated(); len(p) != 1 || !p[0].GetAt().AsTime().Equal(at(200)) {
		t.Errorf("k1 propagated = %v, want eu at %v kept", p, at(200))
	}
	u := got.GetVersions()[0].GetUsage()[0]
	if !u.GetLastUse().AsTime().Equal(at(290)) || !u.GetLastEncrypt().AsTime().Equal(at(290)) || !u.GetObservedAt().AsTime().Equal(at(410)) {
		t.Errorf("k1 eu usage after an observation of older use = %v, want last use and encrypt kept at %v, observed %v", u, at(290), at(410))
	}
	if l := x.f.State().Latest(); !l.Equal(at(410)) {
		t.Errorf("Latest() = %v, want %v", l, at(410))
	}
	if n := u.GetEncryptCount(); n != 15 {
		t.Errorf("k1 eu encrypt count after an observation of 1 = %d, want 15 kept (the message budget never grows back)", n)
	}
	// A server clock running ahead: a use after the command's time counts
	// at the command's time, so it cannot block retirement for longer.
	mustApply(t, x.f, recordPropagation("eu", []uint32{2}, []*statev1.KeysetObservation{
		{Keyset: ledger, Versions: []*statev1.VersionObservation{obs(k1, true, 15, 30, 9000), obs(k2, true, 0, 0, 0)}},
	}, at(420)))
	got, _ = x.f.State().Keyset(ledger)
	if u := got.GetVersions()[0].GetUsage()[0]; !u.GetLastUse().AsTime().Equal(at(420)) || !u.GetLastEncrypt().AsTime().Equal(at(420)) {
		t.Errorf("k1 eu usage after a use reported in the future = %v, want it at the command time %v", u, at(420))
	}
	// Disabling k2 ends its propagation: re-enabled, it must propagate again.
	if p := got.GetVersions()[1].GetPropagated(); len(p) != 1 {
		t.Fatalf("k2 propagated = %v, want eu", p)
	}
	if res := x.step(t, stepDisable, k2, at(430)); res.Err != nil {
		t.Fatal(res.Err)
	}
	got, _ = x.f.State().Keyset(ledger)
	if p := got.GetVersions()[1].GetPropagated(); len(p) != 0 {
		t.Errorf("k2 propagated after DISABLE = %v, want none", p)
	}

	refusals := []struct {
		name string
		cmd  *statev1.Command
		want error
	}{
		{"no region", recordPropagation("zz", nil, nil, at(500)), fsm.ErrNoRegion},
		{"unknown region key version", recordPropagation("eu", []uint32{2, 9}, nil, at(500)), fsm.ErrNoVersion},
		{"region key version 0", recordPropagation("eu", []uint32{0}, nil, at(500)), fsm.ErrNoVersion},
		{"invalid last_use", recordPropagation("eu", nil, []*statev1.KeysetObservation{{Keyset: ledger, Versions: []*statev1.VersionObservation{
			{KeyId: k1, LastUse: ts(time.Unix(0, 0))}}}}, at(500)), fsm.ErrInvalidCommand},
	}
	for _, tt := range refusals {
		before := x.f.State()
		if res := apply(t, x.f, tt.cmd); !errors.Is(res.Err, tt.want) || x.f.State() != before {
			t.Errorf("Apply(record_propagation %s).Err = %v, want %v and no change", tt.name, res.Err, tt.want)
		}
	}
}

// TestKeysetTimeNeverGoesBackwards: keyset times are clamped to the latest
// time in the state, which counts keyset times.
func TestKeysetTimeNeverGoesBackwards(t *testing.T) {
	x := newKeysetFixture(t) // keyset at 100, regions up to 70
	k2 := x.k.add()
	res := x.step(t, stepAdd, k2, at(5))
	if res.Err != nil {
		t.Fatalf("add with a slow clock = %v", res.Err)
	}
	if got := res.Keyset.GetVersions()[1].GetCreatedAt().AsTime(); !got.Equal(at(100)) {
		t.Errorf("created_at with a slow clock = %v, want %v", got, at(100))
	}
	mustApply(t, x.f, setPolicy(ledger, 2, nil, dur(time.Hour), at(300)))
	res = x.step(t, stepPromote, k2, at(200))
	if got := res.Keyset.GetVersions()[0].GetSupersededAt().AsTime(); res.Err != nil || !got.Equal(at(300)) {
		t.Errorf("superseded_at with a slow clock = %v (%v), want %v", got, res.Err, at(300))
	}
	// destroy_after is not the FSM's clock: a far schedule does not move
	// Latest.
	if res := x.step(t, stepDisable, x.first, at(400)); res.Err != nil {
		t.Fatal(res.Err)
	}
	if res := x.step(t, stepScheduleDestroy, x.first, at(500)); res.Err != nil {
		t.Fatal(res.Err)
	}
	if got := x.f.State().Latest(); !got.Equal(at(500)) {
		t.Errorf("Latest() after schedule_destroy = %v, want %v", got, at(500))
	}
}
