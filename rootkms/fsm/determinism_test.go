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

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkmstest"
)

// generator proposes random commands, mostly valid for the state it is shown:
// rotations, status changes, new regions and members, with a share of
// mistakes (wrong versions, RMKs, names, transitions) that Apply must refuse.
type generator struct {
	r   *rand.Rand
	now time.Time
}

func newGenerator(seed uint64) *generator {
	return &generator{r: rand.New(rand.NewPCG(seed, 0x636169726e)), now: t0}
}

var (
	genRegions = []string{"eu", "us", "ap-south-1", "me-central", "sa-east-1", "af", "eu-2", "us-gov", "Bad_Name"}
	genMembers = []string{"node-1", "node-2", "node-3", "node-4", "node-5"}
)

func (g *generator) wrapped() []byte {
	b := make([]byte, 8+g.r.IntN(40))
	for i := range b {
		b[i] = byte(g.r.Uint32())
	}
	return b
}

func (g *generator) kcv() []byte {
	if g.r.IntN(25) == 0 {
		return []byte{0x0b, 0xad}
	}
	return kcv
}

func (g *generator) next(s *fsm.State) *statev1.Command {
	g.now = g.now.Add(time.Duration(1+g.r.IntN(3600)) * time.Second)
	regions := s.Regions()
	// region picks an existing region most of the time, any name otherwise.
	region := func() (string, int) {
		if len(regions) == 0 || g.r.IntN(12) == 0 {
			name := genRegions[g.r.IntN(len(genRegions))]
			if r, ok := s.Region(name); ok {
				return name, len(r.Versions)
			}
			return name, 0
		}
		r := regions[g.r.IntN(len(regions))]
		return r.Name, len(r.Versions)
	}
	switch op := g.r.IntN(20); {
	case op < 3:
		name := genRegions[g.r.IntN(len(genRegions))]
		return rootkmstest.CreateRegion(name, g.wrapped(), g.kcv(), g.now)
	case op < 9:
		name, n := region()
		v := uint32(n + 1)
		if g.r.IntN(15) == 0 {
			v = uint32(g.r.IntN(n + 3))
		}
		return rootkmstest.AddVersion(name, v, g.wrapped(), g.kcv(), g.r.IntN(2) == 0, g.now)
	case op < 17:
		name, n := region()
		v := uint32(g.r.IntN(n + 2))
		to := cryptov1.KeyStatus(g.r.IntN(5))
		// Mostly a transition the version allows, so that versions move
		// through their whole lifecycle.
		if r, ok := s.Region(name); ok && g.r.IntN(4) != 0 {
			if cur, ok := r.Version(v); ok {
				next := map[cryptov1.KeyStatus][]cryptov1.KeyStatus{
					enabled:  {primary, disabled},
					disabled: {enabled, destroyed},
				}[cur.Status]
				if len(next) > 0 {
					to = next[g.r.IntN(len(next))]
				}
			}
		}
		return rootkmstest.SetStatus(name, v, to, g.now)
	case op < 19:
		id := genMembers[g.r.IntN(len(genMembers))]
		return rootkmstest.RegisterMember(id, fmt.Sprintf("10.0.%d.%d:8443", g.r.IntN(4), g.r.IntN(4)), g.now)
	default:
		return rootkmstest.DeregisterMember(genMembers[g.r.IntN(len(genMembers))], g.now)
	}
}

// run is one generated command sequence as applied to a fresh FSM.
type run struct {
	data    [][]byte      // the log entries, indexes 1..n
	results []*fsm.Result // Apply's result for each
	final   []byte        // the final snapshot
}

// generate applies n generated commands to a fresh FSM, checking the
// invariants after every entry.
func generate(t *testing.T, seed uint64, n int) run {
	t.Helper()
	f := rootkmstest.NewFSM()
	g := newGenerator(seed)
	var out run
	accepted, refused := map[string]int{}, 0
	for range n {
		cmd := g.next(f.State())
		b, err := fsm.EncodeCommand(cmd)
		if err != nil {
			t.Fatalf("EncodeCommand(%v) = %v", cmd, err)
		}
		res := applyBytes(f, b).(*fsm.Result)
		out.data = append(out.data, b)
		out.results = append(out.results, res)
		if res.Err != nil {
			refused++
		} else {
			accepted[fmt.Sprintf("%T", cmd.GetOp())]++
			if cmd.GetSetRegionKeyVersionStatus() != nil {
				accepted[cmd.GetSetRegionKeyVersionStatus().GetStatus().String()]++
			}
		}
		if err := rootkmstest.CheckInvariants(f.State(), kcv); err != nil {
			t.Fatalf("seed %d, entry %d (%v): CheckInvariants = %v", seed, len(out.data), cmd, err)
		}
	}
	// The sequence must exercise every operation and every transition, and
	// refusals, or the comparisons below prove little.
	for _, kind := range []string{"*statev1.Command_CreateRegion", "*statev1.Command_AddRegionKeyVersion",
		"*statev1.Command_SetRegionKeyVersionStatus", "*statev1.Command_RegisterMember", "*statev1.Command_DeregisterMember",
		"KEY_STATUS_PRIMARY", "KEY_STATUS_ENABLED", "KEY_STATUS_DISABLED", "KEY_STATUS_DESTROYED"} {
		if accepted[kind] == 0 {
			t.Errorf("seed %d: no accepted %s among %d commands (accepted %v)", seed, kind, n, accepted)
		}
	}
	if refused < n/20 || refused > n/2 {
		t.Errorf("seed %d: %d of %d commands refused, want between %d and %d", seed, refused, n, n/20, n/2)
	}
	out.final = rootkmstest.SnapshotBytes(t, f)
	return out
}

// replay applies data[from:] to f as entries from+1.. and compares the
// results with want's.
func replay(t *testing.T, f *fsm.FSM, want run, from int) {
	t.Helper()
	for i := from; i < len(want.data); i++ {
		res := f.Apply(&raft.Log{Type: raft.LogCommand, Index: uint64(i + 1), Data: want.data[i]}).(*fsm.Result)
		if got, w := fmt.Sprint(res.Err), fmt.Sprint(want.results[i].Err); got != w {
			t.Fatalf("entry %d: Apply().Err = %s, want %s", i+1, got, w)
		}
		if !sameRegion(want.results[i].Region, res.Region) {
			t.Fatalf("entry %d: Apply().Region = %+v, want %+v", i+1, res.Region, want.results[i].Region)
		}
	}
}

func TestDeterministicReplay(t *testing.T) {
	var finals [][]byte
	for _, seed := range []uint64{1, 2, 3} {
		want := generate(t, seed, 500)
		f := rootkmstest.NewFSM()
		replay(t, f, want, 0)
		if got := rootkmstest.SnapshotBytes(t, f); !bytes.Equal(got, want.final) {
			t.Errorf("seed %d: replayed snapshot = %x, want %x", seed, got, want.final)
		}
		finals = append(finals, want.final)
	}
	// Different histories give different bytes: the comparison above sees
	// the state.
	if bytes.Equal(finals[0], finals[1]) || bytes.Equal(finals[1], finals[2]) {
		t.Errorf("three seeds gave equal snapshots; the generator is not exercising the state")
	}
}

func TestSnapshotRestoreMidway(t *testing.T) {
	want := generate(t, 4, 500)
	for _, k := range []int{1, 137, 250, 499} {
		t.Run(fmt.Sprint(k), func(t *testing.T) {
			f := rootkmstest.NewFSM()
			for i := range k {
				applyBytes(f, want.data[i])
			}
			b := rootkmstest.SnapshotBytes(t, f)
			g := rootkmstest.NewFSM()
			if err := restoreBytes(g, b); err != nil {
				t.Fatalf("Restore(snapshot after %d entries) = %v", k, err)
			}
			// g continues from entry k+1, as a follower does after
			// InstallSnapshot.
			replay(t, g, want, k)
			if got := rootkmstest.SnapshotBytes(t, g); !bytes.Equal(got, want.final) {
				t.Errorf("snapshot after restore at %d and replay = %x, want %x", k, got, want.final)
			}
		})
	}
}

// sameRegion reports whether a and b hold the same region (cmp.Diff with
// protocmp is too slow for thousands of comparisons under -race).
func sameRegion(a, b *fsm.Region) bool {
	if a == nil || b == nil {
		return a == b
	}
	if a.Name != b.Name || !a.CreatedAt.Equal(b.CreatedAt) || len(a.Versions) != len(b.Versions) ||
		!slices.Equal(a.ServedKeyVersions, b.ServedKeyVersions) || !a.ServedObservedAt.Equal(b.ServedObservedAt) {
		return false
	}
	for i, v := range a.Versions {
		w := b.Versions[i]
		if v.Version != w.Version || v.Status != w.Status || !proto.Equal(v.Key, w.Key) ||
			!v.CreatedAt.Equal(w.CreatedAt) || !v.PrimarySince.Equal(w.PrimarySince) ||
			!v.SupersededAt.Equal(w.SupersededAt) || !v.RetiredAt.Equal(w.RetiredAt) {
			return false
		}
	}
	return true
}
