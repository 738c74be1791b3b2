package fsm_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkmstest"
)

// keysetGenerator proposes random keyset commands against euSetup, mostly
// valid for the state it is shown (with copies whose public metadata follows
// the states, as a leader's would), with a share of mistakes (stale
// revisions, refused transitions, copies that do not match, unknown names),
// region key rotations so that copies move between region key versions, and
// request IDs, some of them retried.
type keysetGenerator struct {
	r    *rand.Rand
	now  time.Time
	ids  []string                    // request IDs used so far
	sent map[string]*statev1.Command // the command first sent with each
	next uint32                      // next key ID
}

var genKeysets = []string{"payments/ledger", "a", "b/c", "mail", "search/index", "BAD"}

func (g *keysetGenerator) pick(n int) int { return g.r.IntN(n) }

// primaries returns the PRIMARY region key version of every region.
func primaries(s *fsm.State) map[string]uint32 {
	out := map[string]uint32{}
	for _, r := range s.Regions() {
		p, _ := r.Primary()
		out[r.Name] = p.Version
	}
	return out
}

// stepFrom and stepTo are the transition of each step that changes a state.
var (
	stepFrom = map[statev1.KeysetStep]statev1.KeysetVersionState{
		stepPromote: ksEnabled, stepDisable: ksEnabled, stepEnable: ksDisabled,
		stepScheduleDestroy: ksDisabled, stepUndestroy: ksDestroyScheduled, stepDestroy: ksDestroyScheduled,
	}
	stepTo = map[statev1.KeysetStep]statev1.KeysetVersionState{
		stepPromote: ksPrimary, stepDisable: ksDisabled, stepEnable: ksEnabled,
		stepScheduleDestroy: ksDestroyScheduled, stepUndestroy: ksDisabled, stepDestroy: ksDestroyed,
	}
)

// stepped returns versions after step on id, as the FSM would set the
// states (times aside), for building matching copies.
func stepped(versions []*statev1.KeysetVersionRecord, step statev1.KeysetStep, id uint32) []*statev1.KeysetVersionRecord {
	out := make([]*statev1.KeysetVersionRecord, 0, len(versions)+1)
	for _, v := range versions {
		out = append(out, &statev1.KeysetVersionRecord{KeyId: v.GetKeyId(), State: v.GetState()})
	}
	if step == stepAdd {
		return append(out, &statev1.KeysetVersionRecord{KeyId: id, State: ksEnabled})
	}
	from, ok := stepFrom[step]
	for _, v := range out {
		if ok && v.KeyId == id && v.State == from {
			if step == stepPromote {
				for _, o := range out {
					if o.State == ksPrimary {
						o.State = ksEnabled
					}
				}
			}
			v.State = stepTo[step]
		}
	}
	return out
}

func (g *keysetGenerator) command(s *fsm.State) *statev1.Command {
	g.now = g.now.Add(time.Duration(1+g.pick(3600)) * time.Second)
	regionKeys := primaries(s)
	ks := s.Keysets()
	var cmd *statev1.Command
	switch op := g.pick(20); {
	case op < 3 || len(ks) == 0:
		name := genKeysets[g.pick(len(genKeysets))]
		regions := []string{"eu", "us"}
		switch g.pick(4) {
		case 0:
			regions = []string{"eu"}
		case 1:
			regions = []string{"us"}
		}
		g.next++
		rec := &statev1.KeysetRecord{Name: name, Regions: regions, Revision: 1,
			TtlHistory: []*statev1.TtlPeriod{{Ttl: dur(time.Duration(1+g.pick(48)) * time.Hour)}},
			Versions:   []*statev1.KeysetVersionRecord{{KeyId: g.next, State: ksPrimary, Template: "AES256_GCM"}}}
		if g.pick(2) == 0 {
			rec.Versions[0].Golden = fakeGolden(g.next)
		}
		rec.Copies = fakeCopies(name, regions, rec.Versions, regionKeys)
		cmd = createKeyset(rec, g.now)
	case op < 12:
		k := ks[g.pick(len(ks))]
		steps := []statev1.KeysetStep{stepAdd, stepPromote, stepDisable, stepEnable, stepScheduleDestroy, stepUndestroy, stepDestroy, stepRewrap}
		step := steps[g.pick(len(steps))]
		// Mostly a step that some version allows.
		var fit []statev1.KeysetStep
		for _, st := range steps {
			if _, ok := stepFrom[st]; !ok || slices.ContainsFunc(k.GetVersions(), func(v *statev1.KeysetVersionRecord) bool { return v.GetState() == stepFrom[st] }) {
				fit = append(fit, st)
			}
		}
		if g.pick(4) != 0 {
			step = fit[g.pick(len(fit))]
		}
		var id uint32
		if step == stepAdd {
			g.next++
			id = g.next
		} else if step != stepRewrap {
			vs := k.GetVersions()
			id = vs[g.pick(len(vs))].GetKeyId()
			// Mostly a version the step applies to.
			var fits []uint32
			for _, v := range vs {
				if v.GetState() == stepFrom[step] {
					fits = append(fits, v.GetKeyId())
				}
			}
			if len(fits) > 0 && g.pick(4) != 0 {
				id = fits[g.pick(len(fits))]
			}
		}
		rev := k.GetRevision()
		if g.pick(15) == 0 {
			rev--
		}
		versions := stepped(k.GetVersions(), step, id)
		if g.pick(20) == 0 {
			versions = k.GetVersions() // copies that do not follow the step
		}
		cmd = updateKeyset(k.GetName(), rev, step, id, fakeCopies(k.GetName(), k.GetRegions(), versions, regionKeys), g.now)
		// Mostly a destroy_after that has passed by the next commands.
		cmd.GetUpdateKeyset().DestroyAfter = timestamppb.New(g.now.Add(time.Duration(g.pick(2)) * time.Hour))
		// Mostly a golden ciphertext with an added version (records made
		// before golden ciphertexts have none); sometimes a bad one.
		switch n := g.pick(32); {
		case n == 0:
			cmd.GetUpdateKeyset().Golden = fakeGolden(id + 1)
		case n < 24 && step == stepAdd:
			cmd.GetUpdateKeyset().Golden = fakeGolden(id)
		}
	case op < 14:
		k := ks[g.pick(len(ks))]
		rot, ttl := dur(time.Duration(g.pick(100))*time.Hour), dur(time.Duration(1+g.pick(3))*time.Hour)
		if g.pick(2) == 0 {
			rot = nil
		}
		if g.pick(2) == 0 {
			ttl = nil
		}
		cmd = setPolicy(k.GetName(), k.GetRevision(), rot, ttl, g.now)
	case op < 18:
		region := []string{"eu", "us", "zz"}[g.pick(3)]
		var obs []*statev1.KeysetObservation
		for _, k := range ks {
			if g.pick(3) == 0 {
				continue
			}
			o := &statev1.KeysetObservation{Keyset: k.GetName()}
			for _, v := range k.GetVersions() {
				o.Versions = append(o.Versions, &statev1.VersionObservation{KeyId: v.GetKeyId(), ServedByAll: g.pick(2) == 0,
					EncryptCount: uint64(g.pick(1000)), DecryptCount: uint64(g.pick(1000)), LastUse: timestamppb.New(g.now.Add(-time.Minute))})
			}
			obs = append(obs, o)
		}
		cmd = recordPropagation(region, []uint32{regionKeys[region]}, obs, g.now)
	default:
		// Rotate a region key, so that copies move to new versions.
		region := []string{"eu", "us"}[g.pick(2)]
		r, _ := s.Region(region)
		n := uint32(len(r.Versions) + 1)
		cmd = rootkmstest.AddVersion(region, n, rootkmstest.Wrapped(region, n), kcv, true, g.now)
	}
	switch g.pick(4) {
	case 0: // a request ID used before, when there is one
		if len(g.ids) > 0 {
			id := g.ids[g.pick(len(g.ids))]
			if g.pick(3) != 0 {
				// A retry: the same command again (at a later time). It is
				// a Duplicate if the first was accepted.
				cmd = proto.CloneOf(g.sent[id])
				cmd.Time = timestamppb.New(g.now)
			} else {
				// The ID reused for whatever comes next: refused if the
				// first was accepted and this is another write.
				cmd.Identity, cmd.RequestId = g.sent[id].GetIdentity(), id
			}
		}
	case 1, 2:
		id := fmt.Sprintf("req-%d", len(g.ids))
		g.ids = append(g.ids, id)
		cmd.Identity, cmd.RequestId = []string{alice, bob}[g.pick(2)], id
		if g.sent == nil {
			g.sent = map[string]*statev1.Command{}
		}
		g.sent[id] = proto.CloneOf(cmd)
	}
	return cmd
}

// generateKeysets applies n generated keyset commands to an FSM holding
// euSetup, restoring a snapshot of it every 50 entries (Restore's checks are
// the invariants, and the restored Latest must equal the live one).
func generateKeysets(t *testing.T, seed uint64, n int) (run, *fsm.FSM) {
	t.Helper()
	f := setupFSM(t)
	setup := f.AppliedIndex()
	g := &keysetGenerator{r: rand.New(rand.NewPCG(seed, 0x6b657973)), now: at(1000)}
	var out run
	accepted, refused, duplicates := map[string]int{}, 0, 0
	for i := range n {
		cmd := g.command(f.State())
		b, err := fsm.EncodeCommand(cmd)
		if err != nil {
			t.Fatalf("EncodeCommand(%v) = %v", cmd, err)
		}
		res := f.Apply(&raft.Log{Type: raft.LogCommand, Index: setup + uint64(i) + 1, Data: b}).(*fsm.Result)
		out.data = append(out.data, b)
		out.results = append(out.results, res)
		switch {
		case res.Err != nil:
			refused++
		case res.Duplicate:
			duplicates++
		default:
			accepted[fmt.Sprintf("%T", cmd.GetOp())]++
			if u := cmd.GetUpdateKeyset(); u != nil {
				accepted[u.GetStep().String()]++
			}
		}
		if i%50 == 49 {
			checkRestores(t, f)
		}
	}
	for _, kind := range []string{"*statev1.Command_CreateKeyset", "*statev1.Command_UpdateKeyset", "*statev1.Command_SetKeysetPolicy",
		"*statev1.Command_RecordPropagation", "*statev1.Command_AddRegionKeyVersion",
		"KEYSET_STEP_ADD_VERSION", "KEYSET_STEP_PROMOTE", "KEYSET_STEP_DISABLE", "KEYSET_STEP_ENABLE", "KEYSET_STEP_SCHEDULE_DESTROY",
		"KEYSET_STEP_UNDESTROY", "KEYSET_STEP_DESTROY", "KEYSET_STEP_REWRAP"} {
		if accepted[kind] == 0 {
			t.Errorf("seed %d: no accepted %s among %d commands (accepted %v)", seed, kind, n, accepted)
		}
	}
	if refused < n/20 || refused > n/2 || duplicates < n/40 {
		t.Errorf("seed %d: %d refused, %d duplicates of %d commands, want refused between %d and %d and at least %d duplicates",
			seed, refused, duplicates, n, n/20, n/2, n/40)
	}
	out.final = rootkmstest.SnapshotBytes(t, f)
	return out, f
}

// checkRestores restores f's snapshot into a new FSM and compares.
func checkRestores(t *testing.T, f *fsm.FSM) {
	t.Helper()
	b := rootkmstest.SnapshotBytes(t, f)
	g := rootkmstest.NewFSM()
	if err := restoreBytes(g, b); err != nil {
		t.Fatalf("entry %d: Restore(Persist()) = %v", f.AppliedIndex(), err)
	}
	if got, want := g.State().Latest(), f.State().Latest(); !got.Equal(want) {
		t.Fatalf("entry %d: restored Latest() = %v, live %v", f.AppliedIndex(), got, want)
	}
	if got := rootkmstest.SnapshotBytes(t, g); !bytes.Equal(got, b) {
		t.Fatalf("entry %d: snapshot round trip changed the bytes", f.AppliedIndex())
	}
}

// replayKeysets applies want.data[from:] to f and compares the results.
func replayKeysets(t *testing.T, f *fsm.FSM, base uint64, want run, from int) {
	t.Helper()
	for i := from; i < len(want.data); i++ {
		res := f.Apply(&raft.Log{Type: raft.LogCommand, Index: base + uint64(i) + 1, Data: want.data[i]}).(*fsm.Result)
		w := want.results[i]
		if fmt.Sprint(res.Err) != fmt.Sprint(w.Err) || res.Duplicate != w.Duplicate || !sameRegion(res.Region, w.Region) || !proto.Equal(res.Keyset, w.Keyset) {
			t.Fatalf("entry %d: Apply() = %+v, want %+v", i+1, res, w)
		}
	}
}

func TestDeterministicReplayKeysets(t *testing.T) {
	for _, seed := range []uint64{1, 2} {
		want, orig := generateKeysets(t, seed, 400)
		base := setupFSM(t).AppliedIndex()
		f := setupFSM(t)
		replayKeysets(t, f, base, want, 0)
		if got := rootkmstest.SnapshotBytes(t, f); !bytes.Equal(got, want.final) {
			t.Errorf("seed %d: replayed snapshot differs", seed)
		}
		if !f.State().Latest().Equal(orig.State().Latest()) {
			t.Errorf("seed %d: replayed Latest() = %v, want %v", seed, f.State().Latest(), orig.State().Latest())
		}
		// A follower restored midway and replaying the rest ends equal.
		for _, k := range []int{1, 199, 399} {
			f := setupFSM(t)
			replayKeysets(t, f, base, run{data: want.data[:k], results: want.results[:k]}, 0)
			g := rootkmstest.NewFSM()
			if err := restoreBytes(g, rootkmstest.SnapshotBytes(t, f)); err != nil {
				t.Fatalf("seed %d: Restore(snapshot after %d) = %v", seed, k, err)
			}
			replayKeysets(t, g, base, want, k)
			if got := rootkmstest.SnapshotBytes(t, g); !bytes.Equal(got, want.final) {
				t.Errorf("seed %d: snapshot after restore at %d and replay differs", seed, k)
			}
		}
	}
}

// keysetSeeds are commands for the fuzz corpus: valid keyset commands for an
// FSM holding euSetup, with stand-in copies.
func keysetSeeds() []*statev1.Command {
	vs := []*statev1.KeysetVersionRecord{{KeyId: 7, State: ksPrimary, Template: "AES256_GCM"}}
	rec := &statev1.KeysetRecord{Name: "a/b", Regions: euUS, Revision: 1, TtlHistory: []*statev1.TtlPeriod{{Ttl: ttlHour}},
		Versions: vs, Copies: fakeCopies("a/b", euUS, vs, usable)}
	return []*statev1.Command{
		createKeyset(rec, at(100)),
		withRequest(createKeyset(rec, at(100)), alice, "r1"),
		updateKeyset("a/b", 1, stepAdd, 8, fakeCopies("a/b", euUS, stepped(vs, stepAdd, 8), usable), at(100)),
		setPolicy("a/b", 1, nil, dur(2*time.Hour), at(100)),
		recordPropagation("eu", []uint32{2}, []*statev1.KeysetObservation{{Keyset: "a/b",
			Versions: []*statev1.VersionObservation{{KeyId: 7, ServedByAll: true, EncryptCount: 1}}}}, at(100)),
	}
}
